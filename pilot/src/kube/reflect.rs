//! The watchers: one kube-runtime watcher per kind (and per served version of the Istio kinds),
//! each feeding a reflector store, and one builder task that turns the stores into weft's
//! [`Snapshot`] and workload set whenever a watcher saw a change.
//!
//! The watchers use kube-runtime's defaults (`watcher::Config::default()`): list then watch,
//! bookmarks requested, pages of 500, the watch re-opened every 290 s; a watch that ends is
//! resumed from the last resourceVersion seen, and a 410 Gone (the version is too old) starts
//! over with a full list, whose result replaces the store at once when the list is complete.
//! Errors back off exponentially (kube's default backoff, 0.8 s to 30 s).
//!
//! The builder publishes a snapshot only when the set of objects differs from the last one, and
//! a workload set only when the workloads differ: an irrelevant change (an annotation nothing
//! reads, a relist that finds the same objects) wakes it but pushes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use ::kube::runtime::reflector::Store;
use ::kube::runtime::reflector::store::Writer;
use ::kube::runtime::{WatchStreamExt, watcher};
use ::kube::{Client, ResourceExt};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use weft_pilot_config::translate::Workload;
use weft_pilot_config::{Kind, Resource, ResourceKey};

use super::convert::{self, ISTIO_KINDS, ServiceOutcome};
use super::metrics::KubeMetrics;
use crate::store::Snapshot;

/// The versions of the Istio kinds read, newest first: when several are served (they are the same
/// objects, converted by the API server), the newest one's copy is taken.
pub const NETWORKING_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// The versions of PeerAuthentication read, newest first.
pub const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// An object of the cluster pilot refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidObject {
    /// The object.
    pub key: ResourceKey,
    /// Its `metadata.resourceVersion`.
    pub resource_version: String,
    /// Every problem, with its field path.
    pub problems: Vec<String>,
    /// Whether an earlier valid version of it stays in force.
    pub previous_in_force: bool,
}

/// What the builder publishes and the registry handle reads.
#[derive(Debug)]
pub(super) struct Published {
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub workloads: watch::Sender<Arc<Vec<Workload>>>,
    /// Bumped with every workload set published ([`crate::registry::WorkloadSource::subscribe`]).
    pub workload_generation: watch::Sender<u64>,
    pub invalid: Mutex<Arc<Vec<InvalidObject>>>,
    pub synced: watch::Sender<bool>,
    pub metrics: Arc<KubeMetrics>,
}

/// The reflector stores the builder reads.
#[derive(Clone)]
pub(super) struct Stores {
    pub services: Store<KubeService>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    /// Per Istio kind, a store per version, newest first.
    pub istio: Vec<(Kind, Vec<Store<DynamicObject>>)>,
}

/// Counts the watchers that have not yet completed their first list; the builder publishes its
/// first snapshot when none is left (so sidecars never get a half-listed mesh).
#[derive(Debug)]
pub(super) struct Pending(watch::Sender<usize>);

impl Pending {
    fn done(&self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Starts every watcher and the builder. `namespace_changed` is woken on namespace changes (for
/// the ConfigMap writer). Tasks end on `shutdown`.
pub(super) fn start(
    client: &Client,
    published: Arc<Published>,
    namespace_changed: Arc<Notify>,
    shutdown: &CancellationToken,
) -> Stores {
    let changed = Arc::new(Notify::new());
    let metrics = published.metrics.clone();
    let watchers = 4 + ISTIO_KINDS
        .iter()
        .map(|(kind, _)| versions(*kind).len())
        .sum::<usize>();
    let (pending_tx, pending) = watch::channel(watchers);
    let pending_tx = Arc::new(Pending(pending_tx));
    let spawn = SpawnCtx {
        metrics: metrics.clone(),
        pending: pending_tx,
        shutdown: shutdown.clone(),
    };
    let services =
        spawn.typed::<KubeService>(Api::all(client.clone()), "Service", vec![changed.clone()]);
    let slices = spawn.typed::<EndpointSlice>(
        Api::all(client.clone()),
        "EndpointSlice",
        vec![changed.clone()],
    );
    let pods = spawn.typed::<Pod>(Api::all(client.clone()), "Pod", vec![changed.clone()]);
    let namespaces = spawn.typed::<Namespace>(
        Api::all(client.clone()),
        "Namespace",
        vec![changed.clone(), namespace_changed],
    );
    let istio = ISTIO_KINDS
        .iter()
        .map(|(kind, plural)| {
            let stores = versions(*kind)
                .iter()
                .map(|version| {
                    let gvk = GroupVersionKind::gvk(kind.group(), version, kind.as_str());
                    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
                    spawn.dynamic(client, resource, kind.as_str(), changed.clone())
                })
                .collect();
            (*kind, stores)
        })
        .collect();
    let stores = Stores {
        services,
        slices,
        pods,
        namespaces,
        istio,
    };
    tokio::spawn(run_builder(
        stores.clone(),
        published,
        changed,
        pending,
        shutdown.clone(),
    ));
    stores
}

fn versions(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::PeerAuthentication => &SECURITY_VERSIONS,
        _ => &NETWORKING_VERSIONS,
    }
}

struct SpawnCtx {
    metrics: Arc<KubeMetrics>,
    pending: Arc<Pending>,
    shutdown: CancellationToken,
}

impl SpawnCtx {
    fn typed<K>(&self, api: Api<K>, kind: &'static str, notify: Vec<Arc<Notify>>) -> Store<K>
    where
        K: ::kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let writer = Writer::<K>::new(());
        let reader = writer.as_reader();
        tokio::spawn(watch_into(
            api,
            watcher::Config::default(),
            writer,
            kind,
            notify,
            self.metrics.clone(),
            Some(self.pending.clone()),
            self.shutdown.clone(),
        ));
        reader
    }

    fn dynamic(
        &self,
        client: &Client,
        resource: ApiResource,
        kind: &'static str,
        notify: Arc<Notify>,
    ) -> Store<DynamicObject> {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let writer = Writer::<DynamicObject>::new(resource);
        let reader = writer.as_reader();
        tokio::spawn(watch_into(
            api,
            watcher::Config::default(),
            writer,
            kind,
            vec![notify],
            self.metrics.clone(),
            Some(self.pending.clone()),
            self.shutdown.clone(),
        ));
        reader
    }
}

/// Runs one watcher into its store until shutdown, waking `notify` after every change the store
/// took (a complete list, an apply, a delete). A list answered 404 (a version of an Istio kind
/// the cluster does not serve, or the CRD not installed) counts as listed-empty for the first
/// snapshot, so it never holds the other kinds back; the watcher keeps retrying with backoff, so a
/// CRD installed later is picked up.
#[allow(clippy::too_many_arguments)]
pub(super) async fn watch_into<K>(
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    kind: &'static str,
    notify: Vec<Arc<Notify>>,
    metrics: Arc<KubeMetrics>,
    pending: Option<Arc<Pending>>,
    shutdown: CancellationToken,
) where
    K: ::kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash,
{
    let url = api.resource_url().to_string();
    let stream = watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    let mut listed = false;
    let mut not_served_logged = false;
    let wake = || notify.iter().for_each(|n| n.notify_one());
    loop {
        let item = tokio::select! {
            () = shutdown.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else { return };
        match item {
            Ok(event) => {
                metrics.event(kind, event_name(&event));
                // Nothing reads them, and they are often most of an object's size.
                let event = event.modify(|o| o.meta_mut().managed_fields = None);
                writer.apply_watcher_event(&event);
                match event {
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                    watcher::Event::InitDone => {
                        if !listed {
                            listed = true;
                            pending.iter().for_each(|p| p.done());
                            tracing::info!(%url, "listed");
                        }
                        not_served_logged = false;
                        wake();
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => wake(),
                }
            }
            Err(e) => {
                metrics.event(kind, "error");
                if not_served(&e) {
                    if !not_served_logged {
                        tracing::info!(%url, "not served by this cluster; watching for it to appear");
                        not_served_logged = true;
                    }
                    if !listed {
                        listed = true;
                        pending.iter().for_each(|p| p.done());
                    }
                } else {
                    tracing::warn!(%url, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    }
}

fn event_name<K>(event: &watcher::Event<K>) -> &'static str {
    match event {
        watcher::Event::Init => "restart",
        watcher::Event::InitApply(_) => "list",
        watcher::Event::InitDone => "synced",
        watcher::Event::Apply(_) => "apply",
        watcher::Event::Delete(_) => "delete",
    }
}

fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(::kube::Error::Api(status)) if status.code == 404)
}

/// One Istio object's last conversion, kept until its resourceVersion changes (so an object is
/// parsed, and an invalid one logged, once per version).
#[derive(Debug)]
struct Converted {
    resource_version: String,
    current: Result<Resource, Vec<String>>,
    /// The last valid version seen by this pilot (kept in force while the current one is
    /// invalid: an invalid config is refused whole and the previous one stays).
    last_valid: Option<Resource>,
}

/// The builder's memory between builds.
#[derive(Debug, Default)]
struct Builder {
    istio: BTreeMap<ResourceKey, Converted>,
    /// Services' conversions.
    services: Conversions<ServiceOutcome>,
    /// Pods' records.
    pods: Conversions<Result<Resource, convert::Problems>>,
    revision: u64,
    last: Option<BTreeMap<ResourceKey, Resource>>,
    last_workloads: Option<Arc<Vec<Workload>>>,
}

async fn run_builder(
    stores: Stores,
    published: Arc<Published>,
    changed: Arc<Notify>,
    mut pending: watch::Receiver<usize>,
    shutdown: CancellationToken,
) {
    // Nothing is published until every watcher has listed once.
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = pending.wait_for(|n| *n == 0) => if r.is_err() { return },
    }
    let mut builder = Builder::default();
    // A build parses every object new since the last one (all of them the first time): on the
    // blocking pool, so the async workers keep serving discovery meanwhile.
    let build = |mut builder: Builder| {
        let (stores, published) = (stores.clone(), published.clone());
        tokio::task::spawn_blocking(move || {
            builder.build(&stores, &published);
            builder
        })
    };
    builder = match build(builder).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "Kubernetes registry build failed");
            return;
        }
    };
    published.synced.send_replace(true);
    tracing::info!(
        objects = published.snapshots.borrow().len(),
        workloads = published.workloads.borrow().len(),
        "Kubernetes registry synced"
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = changed.notified() => {}
        }
        builder = match build(builder).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Kubernetes registry build failed");
                return;
            }
        };
    }
}

impl Builder {
    fn build(&mut self, stores: &Stores, published: &Published) {
        let mut resources: BTreeMap<ResourceKey, Resource> = BTreeMap::new();
        let mut invalid = Vec::new();
        self.services(stores, &mut resources, &mut invalid);
        self.pods(stores, &mut resources, &mut invalid);
        self.istio_objects(stores, &mut resources, &mut invalid);

        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for object in &invalid {
            *counts.entry(object.key.kind.as_str()).or_default() += 1;
        }
        published.metrics.set_invalid(&counts);
        *published.invalid.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(invalid);

        if self.last.as_ref() != Some(&resources) {
            self.revision += 1;
            let snapshot =
                Snapshot::from_resources(self.revision, resources.values().cloned().collect());
            self.last = Some(resources);
            published.snapshots.send_replace(Arc::new(snapshot));
            published.metrics.snapshot_published();
            tracing::debug!(revision = self.revision, "snapshot published");
        }

        let ready = convert::ReadyEndpoints::new(stores.slices.state().iter().map(|s| &**s));
        let pods = stores.pods.state();
        let workloads = convert::workloads(pods.iter().map(|p| &**p), &ready);
        if self.last_workloads.as_deref() != Some(&workloads) {
            let workloads = Arc::new(workloads);
            self.last_workloads = Some(workloads.clone());
            published.workloads.send_replace(workloads);
            published.workload_generation.send_modify(|g| *g += 1);
            published.metrics.workloads_published();
        }
    }

    /// The Services, each converted once per resourceVersion.
    fn services(
        &mut self,
        stores: &Stores,
        resources: &mut BTreeMap<ResourceKey, Resource>,
        invalid: &mut Vec<InvalidObject>,
    ) {
        let services = stores.services.state();
        let outcomes = convert_cached(&mut self.services, &services, |svc, id| {
            let outcome = convert::service(svc);
            match &outcome {
                ServiceOutcome::Skipped(why) => {
                    tracing::debug!(service = %format!("{}/{}", id.0, id.1), reason = %why, "Service not in the mesh registry")
                }
                ServiceOutcome::Invalid(problems) => report(Kind::Service, id, problems),
                ServiceOutcome::Served(_) => {}
            }
            outcome
        });
        for (id, version, outcome) in outcomes {
            match outcome {
                ServiceOutcome::Served(resource) => {
                    resources.insert(resource.key(), resource.clone());
                }
                ServiceOutcome::Skipped(_) => {}
                ServiceOutcome::Invalid(problems) => {
                    invalid.push(refused(Kind::Service, id, version, problems))
                }
            }
        }
    }

    /// The Pods, as the records sidecars are admitted against (`kind: Pod`), each converted once
    /// per resourceVersion.
    fn pods(
        &mut self,
        stores: &Stores,
        resources: &mut BTreeMap<ResourceKey, Resource>,
        invalid: &mut Vec<InvalidObject>,
    ) {
        let pods = stores.pods.state();
        let outcomes = convert_cached(&mut self.pods, &pods, |pod, id| {
            let record = convert::pod_record(pod);
            if let Err(problems) = &record {
                report(Kind::Pod, id, problems);
            }
            record
        });
        for (id, version, record) in outcomes {
            match record {
                Ok(resource) => {
                    resources.insert(resource.key(), resource.clone());
                }
                Err(problems) => invalid.push(refused(Kind::Pod, id, version, problems)),
            }
        }
    }

    fn istio_objects(
        &mut self,
        stores: &Stores,
        resources: &mut BTreeMap<ResourceKey, Resource>,
        invalid: &mut Vec<InvalidObject>,
    ) {
        let mut present = BTreeSet::new();
        for (kind, versions) in &stores.istio {
            // The newest served version's copy of each object.
            let mut objects: BTreeMap<ResourceKey, Arc<DynamicObject>> = BTreeMap::new();
            for store in versions {
                for object in store.state() {
                    let key = ResourceKey {
                        kind: *kind,
                        namespace: object.namespace().unwrap_or_default(),
                        name: object.name_any(),
                    };
                    objects.entry(key).or_insert(object);
                }
            }
            for (key, object) in objects {
                let version = object.resource_version().unwrap_or_default();
                let entry = self.istio.entry(key.clone()).or_insert_with(|| Converted {
                    resource_version: String::new(),
                    current: Err(Vec::new()),
                    last_valid: None,
                });
                if entry.resource_version != version || version.is_empty() {
                    entry.resource_version = version.clone();
                    entry.current = match serde_json::to_value(&*object) {
                        Ok(json) => convert::istio_object(json),
                        Err(e) => Err(vec![e.to_string()]),
                    };
                    match &entry.current {
                        Ok(resource) => entry.last_valid = Some(resource.clone()),
                        Err(problems) => tracing::warn!(
                            object = %key,
                            resource_version = %version,
                            problems = %problems.join("; "),
                            previous_in_force = entry.last_valid.is_some(),
                            "invalid object in the cluster refused"
                        ),
                    }
                }
                if let Err(problems) = &entry.current {
                    invalid.push(InvalidObject {
                        key: key.clone(),
                        resource_version: version,
                        problems: problems.clone(),
                        previous_in_force: entry.last_valid.is_some(),
                    });
                }
                if let Some(resource) = &entry.last_valid {
                    resources.insert(key.clone(), resource.clone());
                }
                present.insert(key);
            }
        }
        self.istio.retain(|key, _| present.contains(key));
    }
}

/// Conversions by namespace and name.
type Conversions<T> = BTreeMap<(String, String), Cached<T>>;

/// One object's conversion, kept until its resourceVersion changes.
#[derive(Debug)]
struct Cached<T> {
    version: String,
    value: T,
}

/// Converts each of `objects` (namespace and name, resourceVersion) with `convert`, which runs
/// only for an object not seen at that version before (so its log lines come once per version);
/// forgets the objects gone. Returns every object's conversion.
fn convert_cached<'a, K, T>(
    cache: &'a mut Conversions<T>,
    objects: &[Arc<K>],
    mut convert: impl FnMut(&K, &(String, String)) -> T,
) -> Vec<((String, String), String, &'a T)>
where
    K: ::kube::Resource,
{
    let mut seen = BTreeSet::new();
    for object in objects {
        let id = (object.namespace().unwrap_or_default(), object.name_any());
        let version = object.resource_version().unwrap_or_default();
        let fresh = cache
            .get(&id)
            .is_some_and(|c| c.version == version && !version.is_empty());
        if !fresh {
            let value = convert(object, &id);
            cache.insert(id.clone(), Cached { version, value });
        }
        seen.insert(id);
    }
    cache.retain(|id, _| seen.contains(id));
    cache
        .iter()
        .map(|(id, c)| (id.clone(), c.version.clone(), &c.value))
        .collect()
}

/// Logs a Service or Pod of the cluster weft refuses (called once per resourceVersion).
fn report(kind: Kind, id: &(String, String), problems: &[String]) {
    tracing::warn!(object = %format!("{kind} {}/{}", id.0, id.1), problems = %problems.join("; "), "object of the cluster refused");
}

/// A Service or Pod refused (no earlier version is kept for these: they are the platform's
/// record, not config).
fn refused(
    kind: Kind,
    (namespace, name): (String, String),
    resource_version: String,
    problems: &[String],
) -> InvalidObject {
    InvalidObject {
        key: ResourceKey {
            kind,
            namespace,
            name,
        },
        resource_version,
        problems: problems.to_vec(),
        previous_in_force: false,
    }
}
