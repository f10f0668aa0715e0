//! The mesh root certificate in every namespace, as ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`): Istio's names, so pods written for Istio mount it unchanged.
//!
//! Kept current like istiod's namespace controller: written at start, when a namespace appears,
//! when the ConfigMap is edited or deleted (a watch on ConfigMaps of that name, by field selector),
//! and when the root file changes (polled every [`weft_ca::files::ROOT_POLL_INTERVAL`], which also
//! retries writes that failed). Writes are server-side applies with field manager
//! [`FIELD_MANAGER`], forced: several pilot replicas apply the same content under the same manager,
//! so they agree instead of conflicting, and a hand edit of the key is taken back.
//!
//! Skipped, as Istio skips them (its `inject.IgnoredNamespaces`): kube-system, kube-public,
//! kube-node-lease and local-path-storage; and namespaces being deleted (a write there fails).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::reflector::store::Writer;
use ::kube::runtime::reflector::{ObjectRef, Store};
use ::kube::runtime::watcher;
use ::kube::{Client, ResourceExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::metrics::KubeMetrics;
use crate::inject::SYSTEM_NAMESPACES;

/// The ConfigMap's name (Istio's).
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// The key holding the PEM (Istio's).
pub const CONFIGMAP_KEY: &str = "root-cert.pem";
/// The server-side apply field manager of every pilot replica.
pub const FIELD_MANAGER: &str = "weft-pilot";
/// Istio labels the ConfigMap so that its own watchers can select it.
const CONFIG_LABEL: (&str, &str) = ("istio.io/config", "true");

/// Whether `namespace` gets no ConfigMap.
pub fn skipped(namespace: &str) -> bool {
    SYSTEM_NAMESPACES.contains(&namespace)
}

/// Reads the root file: its text, if it holds at least one certificate. A file that does not (a
/// half-written or emptied one) never replaces what the namespaces have.
async fn read_root(path: &Path) -> Option<String> {
    match tokio::fs::read_to_string(path).await {
        Ok(pem) if weft_ca::tls::TrustBundle::from_pem(&pem).is_ok() => Some(pem),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "root file holds no certificate; ConfigMaps left as they are");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the root file; ConfigMaps left as they are");
            None
        }
    }
}

/// Keeps the ConfigMap current in every namespace of `namespaces` until shutdown. `namespace_changed`
/// is woken by the namespace watcher; `poll` is how often the root file is read again.
pub(super) async fn run(
    client: Client,
    namespaces: Store<Namespace>,
    namespace_changed: Arc<Notify>,
    root_file: PathBuf,
    poll: Duration,
    metrics: Arc<KubeMetrics>,
    shutdown: CancellationToken,
) {
    let writer = Writer::<ConfigMap>::new(());
    let configmaps = writer.as_reader();
    tokio::spawn(super::reflect::watch_into(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
        writer,
        "ConfigMap",
        vec![namespace_changed.clone()],
        metrics,
        None,
        shutdown.clone(),
    ));
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = async { tokio::try_join!(namespaces.wait_until_ready(), configmaps.wait_until_ready()) } => {
            if r.is_err() { return }
        }
    }
    let mut root = read_root(&root_file).await;
    let mut written = Written::default();
    loop {
        if let Some(pem) = &root {
            reconcile(&client, &namespaces, &configmaps, pem, &mut written).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = namespace_changed.notified() => {}
            () = tokio::time::sleep(poll) => {
                let now = read_root(&root_file).await;
                if now.is_some() && now != root {
                    tracing::info!(path = %root_file.display(), "root certificate changed; updating every namespace");
                    root = now;
                }
            }
        }
    }
}

/// How long a write is trusted while the watch has not shown it yet: a change seen in between
/// (another namespace's event) must not write the same ConfigMap again; a write the watch never
/// shows (the ConfigMap deleted right after) is redone after this.
const WRITE_SETTLE: Duration = Duration::from_secs(2);

/// The namespaces written recently, with what and when.
type Written = std::collections::BTreeMap<String, (String, tokio::time::Instant)>;

/// Applies the ConfigMap where it is missing or differs.
async fn reconcile(
    client: &Client,
    namespaces: &Store<Namespace>,
    configmaps: &Store<ConfigMap>,
    pem: &str,
    written: &mut Written,
) {
    let now = tokio::time::Instant::now();
    written.retain(|_, (_, at)| now.duration_since(*at) < WRITE_SETTLE);
    for ns in namespaces.state() {
        let name = ns.name_any();
        let terminating = ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
        if skipped(&name) || terminating {
            continue;
        }
        let current = configmaps.get(&ObjectRef::new(CONFIGMAP_NAME).within(&name));
        let up_to_date = current.as_ref().is_some_and(|cm| {
            cm.data
                .as_ref()
                .and_then(|d| d.get(CONFIGMAP_KEY))
                .is_some_and(|v| v == pem)
        });
        if up_to_date {
            written.remove(&name);
            continue;
        }
        if written
            .get(&name)
            .is_some_and(|(content, _)| content == pem)
        {
            continue;
        }
        let api = Api::<ConfigMap>::namespaced(client.clone(), &name);
        let object = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": CONFIGMAP_NAME,
                "namespace": name,
                "labels": { CONFIG_LABEL.0: CONFIG_LABEL.1 },
            },
            "data": { CONFIGMAP_KEY: pem },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch(CONFIGMAP_NAME, &params, &Patch::Apply(&object))
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %name, "{CONFIGMAP_NAME} written");
                written.insert(name, (pem.to_string(), now));
            }
            // Retried at the next poll or change.
            Err(e) => {
                tracing::warn!(namespace = %name, error = %e, "cannot write {CONFIGMAP_NAME}")
            }
        }
    }
}
