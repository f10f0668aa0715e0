//! Keeps `webhooks[*].clientConfig.caBundle` of pilot's MutatingWebhookConfiguration
//! (`weft-sidecar-injector`) and ValidatingWebhookConfiguration (`weft-validator`) equal to the mesh
//! root, as istiod does for its own: the API server verifies the webhook's certificate with it.
//!
//! The value is the root file pilot is given (`--ca-root`, the ConfigMap `istio-ca-root-cert`
//! mounted), all of it: during a root rotation it holds both roots, and the API server then trusts
//! a webhook certificate from either. The file is read every `poll`; when its text changes, and
//! every `resync` anyway (someone may have re-applied the manifests with an empty caBundle), each
//! configuration is read and patched where a webhook's caBundle differs. A failure (API server
//! down, no RBAC) is retried with capped exponential backoff; a configuration that does not exist
//! is logged and looked for again at the next resync.
//!
//! The patch is a JSONPatch guarded by a `test` of the `resourceVersion` read, so a concurrent
//! change to the list of webhooks makes it fail (and be retried on the new list) instead of
//! patching the wrong entry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{MUTATING_CONFIGURATION, VALIDATING_CONFIGURATION};

/// How often the root file is read by default (weft_ca's root poll).
pub const POLL: Duration = weft_ca::files::ROOT_POLL_INTERVAL;
/// How often the configurations are checked even if the root did not change.
pub const RESYNC: Duration = Duration::from_secs(60);

/// Why a patch round failed.
#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    /// The root file could not be read, or holds no certificate.
    #[error("cannot read the root file {}: {reason}", path.display())]
    Root {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The API server refused or could not be reached.
    #[error("{configuration}: {source}")]
    Api {
        /// Which configuration.
        configuration: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The patch could not be built (not expected).
    #[error("cannot build the patch: {0}")]
    Patch(#[from] serde_json::Error),
}

/// What [`Patcher::keep_patched`] needs.
#[derive(Clone)]
pub struct Patcher {
    /// The API server.
    pub client: kube::Client,
    /// The root file (`--ca-root`).
    pub root_file: PathBuf,
    /// How often the root file is read.
    pub poll: Duration,
    /// How often the configurations are checked anyway.
    pub resync: Duration,
}

impl std::fmt::Debug for Patcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patcher")
            .field("root_file", &self.root_file)
            .field("poll", &self.poll)
            .field("resync", &self.resync)
            .finish()
    }
}

/// Which of the two webhook configuration kinds.
#[derive(Debug, Clone, Copy)]
enum Configuration {
    Mutating,
    Validating,
}

impl Configuration {
    fn name(self) -> &'static str {
        match self {
            Configuration::Mutating => MUTATING_CONFIGURATION,
            Configuration::Validating => VALIDATING_CONFIGURATION,
        }
    }
}

impl Patcher {
    /// A patcher with the default poll and resync periods.
    pub fn new(client: kube::Client, root_file: PathBuf) -> Self {
        Self {
            client,
            root_file,
            poll: POLL,
            resync: RESYNC,
        }
    }

    /// Patches at once, then whenever the root changes or `resync` passed, until `shutdown`.
    pub async fn keep_patched(self, shutdown: CancellationToken) {
        let mut patched: Option<String> = None;
        let mut last_check: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            let due = last_check.is_none_or(|at| at.elapsed() >= self.resync);
            let wait = match self.read_root().await {
                Ok(pem) if due || patched.as_deref() != Some(&pem) => {
                    match self.patch_all(&pem).await {
                        Ok(changed) => {
                            if changed > 0 {
                                tracing::info!(webhooks = changed, "webhook caBundle patched");
                            }
                            patched = Some(pem);
                            last_check = Some(Instant::now());
                            failures = 0;
                            self.poll
                        }
                        Err(e) => {
                            let wait = backoff(failures);
                            failures = failures.saturating_add(1);
                            tracing::warn!(error = %e, retry_in = ?wait, "cannot patch the webhook caBundle");
                            wait
                        }
                    }
                }
                Ok(_) => self.poll,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook caBundle not updated");
                    self.poll
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn read_root(&self) -> Result<String, CaBundleError> {
        let error = |reason: String| CaBundleError::Root {
            path: self.root_file.clone(),
            reason,
        };
        let pem = tokio::fs::read_to_string(&self.root_file)
            .await
            .map_err(|e| error(e.to_string()))?;
        // Never publish a bundle that verifies nothing (a file caught half-written).
        weft_ca::tls::TrustBundle::from_pem(&pem).map_err(|e| error(e.to_string()))?;
        Ok(pem)
    }

    /// One round over both configurations; returns how many webhooks were patched.
    pub async fn patch_all(&self, pem: &str) -> Result<usize, CaBundleError> {
        let mut changed = 0;
        for configuration in [Configuration::Mutating, Configuration::Validating] {
            changed += self.patch_one(configuration, pem).await?;
        }
        Ok(changed)
    }

    async fn patch_one(
        &self,
        configuration: Configuration,
        pem: &str,
    ) -> Result<usize, CaBundleError> {
        let name = configuration.name();
        let api_error = |source| CaBundleError::Api {
            configuration: name.to_string(),
            source,
        };
        // Both kinds are read as JSON: the part that matters (webhooks[].clientConfig.caBundle,
        // metadata.resourceVersion) is the same in both.
        let current: Option<Value> = match configuration {
            Configuration::Mutating => {
                Api::<MutatingWebhookConfiguration>::all(self.client.clone())
                    .get_opt(name)
                    .await
                    .map_err(api_error)?
                    .map(serde_json::to_value)
                    .transpose()?
            }
            Configuration::Validating => {
                Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
                    .get_opt(name)
                    .await
                    .map_err(api_error)?
                    .map(serde_json::to_value)
                    .transpose()?
            }
        };
        let Some(current) = current else {
            tracing::warn!(
                configuration = name,
                "webhook configuration not found; its caBundle is set once it exists"
            );
            return Ok(0);
        };
        let Some(ops) = patch_ops(&current, pem) else {
            return Ok(0);
        };
        let count = ops.len() - 1;
        // kube takes json-patch 4's type: built from the JSON document.
        let patch = Patch::Json::<()>(serde_json::from_value(Value::Array(ops))?);
        let params = PatchParams::default();
        match configuration {
            Configuration::Mutating => {
                Api::<MutatingWebhookConfiguration>::all(self.client.clone())
                    .patch(name, &params, &patch)
                    .await
                    .map_err(api_error)?;
            }
            Configuration::Validating => {
                Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
                    .patch(name, &params, &patch)
                    .await
                    .map_err(api_error)?;
            }
        }
        Ok(count)
    }
}

/// The JSONPatch setting every webhook's caBundle that differs from `pem` (guarded by a test of the
/// resourceVersion); `None` if all are equal already.
fn patch_ops(configuration: &Value, pem: &str) -> Option<Vec<Value>> {
    let bundle = base64::engine::general_purpose::STANDARD.encode(pem);
    let webhooks = configuration.get("webhooks").and_then(Value::as_array)?;
    let mut ops: Vec<Value> = webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| w.pointer("/clientConfig/caBundle").and_then(Value::as_str) != Some(&bundle))
        .map(|(i, _)| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
        .collect();
    if ops.is_empty() {
        return None;
    }
    let version = configuration
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    ops.insert(
        0,
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}),
    );
    Some(ops)
}

/// 200 ms doubling to 30 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200)
        .saturating_mul(1u32 << failures.min(8))
        .min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests;
