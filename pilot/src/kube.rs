//! `pilot serve --registry kubernetes`: the cluster is the source of truth.
//!
//! - [`client`]: the API client (in-cluster config or `KUBECONFIG`).
//! - [`reflect`]: watchers and reflector stores for Services, EndpointSlices, Pods, Namespaces and
//!   the Istio kinds, and the builder that publishes a [`Snapshot`] (only when the objects changed)
//!   and the workload set (only when it changed).
//! - [`convert`]: Kubernetes objects to weft's resources and workloads (pure).
//! - [`root_configmap`]: the root certificate in every namespace.
//! - [`metrics`]: the counters `--monitoring-listen` serves.
//!
//! Several pilot replicas can run at once: each keeps its own stores from the API server and
//! writes nothing but the root ConfigMaps, which all replicas apply identically.

pub mod client;
pub mod convert;
pub mod metrics;
pub mod reflect;
pub mod root_configmap;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::Client;
use ::kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use weft_pilot_config::translate::Workload;

pub use metrics::KubeMetrics;
pub use reflect::InvalidObject;

use crate::registry::WorkloadSource;
use crate::store::Snapshot;

/// What the Kubernetes registry needs besides the client.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// The mesh root PEM to write into every namespace (`None`: no ConfigMaps are written).
    pub root_file: Option<PathBuf>,
    /// How often the root file is read again (and failed ConfigMap writes retried).
    pub root_poll: Option<Duration>,
}

/// The handle on the Kubernetes registry: snapshots of the config objects, the live workloads,
/// the refused objects and namespace labels. Cheap to clone.
#[derive(Clone)]
pub struct KubeRegistry {
    published: Arc<reflect::Published>,
    stores: reflect::Stores,
}

impl std::fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("revision", &self.snapshot().revision())
            .finish_non_exhaustive()
    }
}

impl KubeRegistry {
    /// Starts the watchers (and, with a root file, the ConfigMap writer). Tasks end on `shutdown`.
    pub fn start(client: Client, options: KubeOptions, shutdown: &CancellationToken) -> Self {
        let published = Arc::new(reflect::Published {
            snapshots: watch::channel(Arc::new(Snapshot::default())).0,
            workloads: watch::channel(Arc::new(Vec::new())).0,
            workload_generation: watch::channel(0).0,
            invalid: Mutex::new(Arc::new(Vec::new())),
            synced: watch::channel(false).0,
            metrics: Arc::new(KubeMetrics::default()),
        });
        let namespace_changed = Arc::new(Notify::new());
        let stores = reflect::start(
            &client,
            published.clone(),
            namespace_changed.clone(),
            shutdown,
        );
        if let Some(root_file) = options.root_file {
            tokio::spawn(root_configmap::run(
                client,
                stores.namespaces.clone(),
                namespace_changed,
                root_file,
                options
                    .root_poll
                    .unwrap_or(weft_ca::files::ROOT_POLL_INTERVAL),
                published.metrics.clone(),
                shutdown.clone(),
            ));
        }
        Self { published, stores }
    }

    /// Every snapshot published (the first once every watcher has listed).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.published.snapshots.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.snapshots.borrow().clone()
    }

    /// The objects of the cluster currently refused, by kind, namespace and name.
    pub fn invalid(&self) -> Arc<Vec<InvalidObject>> {
        let mut all = self
            .published
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !all.is_sorted_by(|a, b| a.key <= b.key) {
            Arc::make_mut(&mut all).sort_by(|a, b| a.key.cmp(&b.key));
        }
        all
    }

    /// Whether every watcher has listed once (what `/ready` answers).
    pub fn is_synced(&self) -> bool {
        *self.published.synced.borrow()
    }

    /// Waits until every watcher has listed once and the first snapshot is out.
    pub async fn wait_synced(&self) {
        let mut synced = self.published.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// The labels of a namespace, `None` if the cluster has no such namespace (for the injection
    /// webhook, which honours `istio-injection`).
    pub fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.stores
            .namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
    }

    /// The registry's counters.
    pub fn metrics(&self) -> Arc<KubeMetrics> {
        self.published.metrics.clone()
    }
}

impl WorkloadSource for KubeRegistry {
    /// The workloads of the last Pods and EndpointSlices seen (published with the snapshots'
    /// Pods from the same stores, so `_pods` is not needed to resolve them).
    fn workloads(&self, _pods: &Snapshot) -> Arc<Vec<Workload>> {
        self.published.workloads.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.workload_generation.subscribe()
    }
}

#[cfg(test)]
mod tests;
