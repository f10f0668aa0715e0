//! Admission webhooks, served by pilot (istiod's port 15017): `POST /inject` adds the sidecar to new
//! pods ([`inject`], decided by [`policy`]), `POST /validate` refuses Istio objects `pilot apply`
//! would refuse ([`validate`]). Both speak AdmissionReview `admission.k8s.io/v1`.
//!
//! [`server`] serves them over TLS with a certificate from weft's CA naming the webhook Service
//! (`weft-pilot.weft-system.svc`, ...), renewed like discovery's; [`ca_bundle`] keeps the webhook
//! configurations' `caBundle` equal to the mesh root so the API server trusts that certificate.
//!
//! Failure policy: a request that is not an AdmissionReview v1 is answered HTTP 400 (the API server
//! then applies the configuration's `failurePolicy`). A review we cannot act on because of a bug or
//! a pod shape `pilot inject` refuses is *allowed* without a patch and with a warning (kubectl
//! prints it): a broken injector must not stop every pod of the cluster. The install manifests set
//! `failurePolicy: Fail` (Istio's), so a pod is never created uninjected because pilot was down.

pub mod ca_bundle;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod inject;
pub mod policy;
pub mod server;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

/// The only AdmissionReview version served (the webhook configurations ask for it).
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// Largest request body: the API server's own limit for a webhook request is 3 MiB of object plus
/// the review around it.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Name of the MutatingWebhookConfiguration (install manifests).
pub const MUTATING_CONFIGURATION: &str = "weft-sidecar-injector";
/// Name of the ValidatingWebhookConfiguration (install manifests).
pub const VALIDATING_CONFIGURATION: &str = "weft-validator";
/// The webhook Service's name by default (install manifests).
pub const DEFAULT_SERVICE: &str = "weft-pilot";

/// Looks up a namespace's labels (`None`: unknown). The Kubernetes registry provides one; without
/// it the webhook trusts the configuration's selectors (see [`policy`]).
pub type NamespaceLabels = Arc<dyn Fn(&str) -> Option<BTreeMap<String, String>> + Send + Sync>;

/// A request body that is not an AdmissionReview v1 with a request: answered HTTP 400 with this
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// Both handlers, with what they need: pure functions of the request body (no I/O), so the tests and
/// the fuzz target call them directly.
#[derive(Clone)]
pub struct Admission {
    /// What `/inject` adds (the same options `pilot inject` takes).
    pub inject: crate::inject::Options,
    /// Namespace labels, when pilot knows them.
    pub namespace_labels: Option<NamespaceLabels>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("inject", &self.inject)
            .field("namespace_labels", &self.namespace_labels.is_some())
            .finish()
    }
}

impl Admission {
    /// Handlers with `inject` options and no namespace lookup.
    pub fn new(inject: crate::inject::Options) -> Self {
        Self {
            inject,
            namespace_labels: None,
        }
    }

    /// `POST /inject`: the AdmissionReview body in, the answering AdmissionReview (JSON) out.
    pub fn inject(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let request = parse_review(body)?;
        encode(inject::review(self, &request))
    }

    /// `POST /validate`: the AdmissionReview body in, the answering AdmissionReview (JSON) out.
    pub fn validate(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let request = parse_review(body)?;
        encode(validate::review(&request))
    }

    /// The answer when a handler failed on `body` (a panic caught by the server): allowed, with a
    /// warning, so that a bug never stops a pod or an object (see the module docs).
    pub fn allowed_after_failure(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let request = parse_review(body)?;
        encode(allowed_with_warning(
            &request,
            "weft: the webhook failed internally; allowed unchecked".into(),
        ))
    }

    fn labels_of(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespace_labels.as_ref().and_then(|f| f(namespace))
    }
}

/// Parses an AdmissionReview v1 carrying a request.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, BadReview> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| BadReview(format!("not an AdmissionReview: {e}")))?;
    if review.types.kind != "AdmissionReview" || review.types.api_version != ADMISSION_API_VERSION {
        return Err(BadReview(format!(
            "expected kind AdmissionReview, apiVersion {ADMISSION_API_VERSION}; got kind {:?}, apiVersion {:?}",
            review.types.kind, review.types.api_version
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| BadReview("the AdmissionReview has no request".into()))?;
    if request.uid.is_empty() {
        return Err(BadReview("the AdmissionReview's request has no uid".into()));
    }
    Ok(request)
}

fn encode(mut response: AdmissionResponse) -> Result<Vec<u8>, BadReview> {
    // kube serialises the patch bytes as a JSON array of numbers; Kubernetes' own encoding of a
    // []byte is a base64 string (what the API server documents and other webhooks send), and a
    // quarter of the size.
    let patch = response.patch.take();
    let mut review = serde_json::to_value(response.into_review())
        .map_err(|e| BadReview(format!("cannot encode the response: {e}")))?;
    if let (Some(patch), Some(body)) = (
        patch,
        review.get_mut("response").and_then(|r| r.as_object_mut()),
    ) {
        body.insert(
            "patch".into(),
            base64::engine::general_purpose::STANDARD
                .encode(patch)
                .into(),
        );
    }
    // Serialising a Value does not fail; if it ever did, the API server is told (400) rather than
    // sent half a body.
    serde_json::to_vec(&review).map_err(|e| BadReview(format!("cannot encode the response: {e}")))
}

/// Allowed, unchanged, with `warning` shown to the client.
fn allowed_with_warning(
    request: &AdmissionRequest<DynamicObject>,
    warning: String,
) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request);
    response.warnings = Some(vec![warning]);
    response
}

/// What `pilot serve --webhook-listen` runs with.
#[derive(Clone)]
pub struct WebhookOptions {
    /// The CA's address.
    pub ca: String,
    /// The mesh root file (`--ca-root`), also what caBundle is set to.
    pub root_file: std::path::PathBuf,
    /// pilot's token file.
    pub token_file: std::path::PathBuf,
    /// Trust domain of pilot's identity.
    pub trust_domain: String,
    /// Lifetime asked for the serving certificate (renewed at about half).
    pub cert_ttl: std::time::Duration,
    /// The webhook Service's name.
    pub service: String,
    /// Its namespace: pilot's (its identity's namespace too).
    pub namespace: String,
    /// The handlers.
    pub admission: Admission,
    /// Patch the webhook configurations' caBundle through this client.
    pub kube: Option<kube::Client>,
    /// How long open connections get at shutdown.
    pub drain: std::time::Duration,
}

impl std::fmt::Debug for WebhookOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookOptions")
            .field("ca", &self.ca)
            .field("root_file", &self.root_file)
            .field("service", &self.service)
            .field("namespace", &self.namespace)
            .field("admission", &self.admission)
            .field("kube", &self.kube.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the webhooks could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// pilot's identity, its CA client or its TLS config could not be set up.
    #[error("webhook certificate: {0}")]
    Identity(String),
}

/// Gets the serving certificate (its DNS SANs are the Service's names; waits for the CA like
/// discovery does), keeps it renewed, keeps caBundle patched when a client is given, and serves on
/// `listener` until `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    opts: WebhookOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), WebhookError> {
    use weft_ca::client::{CaClient, fetch_with_retry, keep_rotated};
    let identity = |e: &dyn std::fmt::Display| WebhookError::Identity(e.to_string());
    let id = weft_ca::SpiffeId::new(
        &opts.trust_domain,
        &opts.namespace,
        crate::discovery::PILOT_SERVICE_ACCOUNT,
    )
    .map_err(|e| identity(&e))?;
    let roots = weft_ca::files::RootFile::load(&opts.root_file).map_err(|e| identity(&e))?;
    let ca_id = weft_ca::server::ca_identity(&opts.trust_domain).map_err(|e| identity(&e))?;
    let names = weft_ca::dns::service_names(&opts.service, &opts.namespace);
    let ca = CaClient::with_files(
        &opts.ca,
        &roots,
        ca_id,
        &opts.token_file,
        &weft_ca::grpc::Keepalive::default(),
    )
    .map_err(|e| identity(&e))?
    .with_dns_names(names.clone());
    let Some(creds) =
        fetch_with_retry(&ca, &id, opts.cert_ttl, shutdown.clone().cancelled_owned()).await
    else {
        return Ok(());
    };
    let store = weft_ca::tls::CredentialStore::new(creds);
    let config = server::tls_config(store.clone(), roots.bundle()).map_err(|e| identity(&e))?;
    let rotation = tokio::spawn(keep_rotated(ca, id.clone(), opts.cert_ttl, store));
    let root_watch = tokio::spawn(roots.watch(weft_ca::files::ROOT_POLL_INTERVAL));
    let patcher = opts.kube.map(|client| {
        tokio::spawn(
            ca_bundle::Patcher::new(client, opts.root_file.clone()).keep_patched(shutdown.clone()),
        )
    });
    tracing::info!(%id, dns = ?names, "webhooks serving");
    server::serve(
        listener,
        std::sync::Arc::new(config),
        std::sync::Arc::new(opts.admission),
        shutdown,
        opts.drain,
    )
    .await;
    rotation.abort();
    root_watch.abort();
    if let Some(patcher) = patcher {
        patcher.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
