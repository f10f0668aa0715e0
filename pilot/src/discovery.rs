//! Discovery: one mTLS gRPC stream per sidecar, carrying that sidecar's compiled view of the mesh.
//!
//! Flow (Istio's xDS, simplified to one state-of-the-world resource): the sidecar's first request names
//! its node (its pod); pilot admits it only as the platform's Pod of that name whose service account
//! the client certificate proves ([`crate::registry::admit`]; refusals show in `proxy-status`),
//! registers the workload, and sends the full view. Store and registry changes are debounced (quiet period, capped
//! wait) into a new [`PushContext`]; every stream then recomputes its view and pushes only if the view
//! changed. Each response has a version and a nonce; the sidecar ACKs or NACKs it, and the outcome is
//! recorded for `proxy-status`. A NACKed version is never re-sent (the next push is a different view).
//! A request carrying a shadow-diff report (`mirror_report`, no nonce) is neither: it is kept in
//! [`reports`] for `pilot mirror-report` and touches nothing a push depends on.
//!
//! Cost per push: sidecars whose nodes share an [`OutboundKey`] share the outbound part of their
//! views (services and clusters, nearly all of a view). It is translated, fingerprinted and encoded
//! once per key per push context; each stream's response is its own small part (version, nonce,
//! mesh, inbound, tracing) around those shared bytes, which it refers to instead of copying (see
//! [`wire`]). Each stream holds at most one response beyond the one being written: a newer push
//! replaces a waiting one ([`wire::Outbox`]).
//!
//! Memory per push context: the objects are shared with the previous context while the store
//! revision is the same (registry changes, e.g. sidecars connecting, do not copy them), and a
//! session keeps a context only while it computes its view, so contexts and their shared bytes go
//! as soon as every stream has moved on.
//!
//! Time per push: the outbound parts of every registered workload's key are queued for translation
//! ([`translator`]) before the context is published, so they do not wait for the streams' sessions
//! to be scheduled among the connection tasks writing the previous keys' views; and at most
//! [`CONCURRENT_PUSHES`] responses are in flight at once ([`PushSlots`]), so streams finish one
//! after another instead of all at the end.

pub mod metrics;
pub mod reports;
mod translator;
mod wire;

pub use translator::Translator;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::codec::{BufferSettings, Codec as _, DecodeBuf, Decoder};
use tonic::{Request, Status, Streaming};
use weft_ca::SpiffeId;
use weft_pilot_config::Resource;
use weft_pilot_config::translate::{
    LocalIndex, MeshOptions, OutboundKey, Workload, fingerprint, fingerprint_outbound,
    fingerprint_peers, source_label_keys, translate_local_with, translate_outbound,
};
use weft_proto::discovery as pb;

use crate::registry::admit::{self, Refusal};
use crate::registry::{Registration, Registry, WorkloadSource};
use crate::store::Snapshot;
pub use metrics::DiscoveryMetrics;

/// How long a new stream has to send its node.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request a sidecar may send (tonic's default limit for generated servers).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Initial (and growth step of the) buffer requests are decoded from. tonic's default is 8 KiB per
/// stream, allocated up front; a sidecar's requests are ACKs of a few dozen bytes and one node of a
/// few hundred, so with a thousand streams that default alone was 8 MB of pilot's memory. A larger
/// request still decodes: the buffer grows in steps of this size.
const REQUEST_BUFFER_BYTES: usize = 512;

/// How many outbound translations run at once (on threads of their own): enough to use the cores,
/// few enough that a push to many sidecars with different keys does not build every view at the
/// same time.
const CONCURRENT_TRANSLATIONS: usize = 2;

/// How many pushes are in flight at once (see [`PushSlots`]); Istio's PILOT_PUSH_THROTTLE default.
const CONCURRENT_PUSHES: usize = 100;

/// How long a push may hold its slot waiting for the sidecar's answer.
const PUSH_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The config objects of one store revision, with what every push computes from them alone.
/// Shared by all the push contexts of that revision.
#[derive(Debug)]
pub struct Objects {
    /// All config objects.
    pub resources: Vec<Resource>,
    /// The labels VirtualServices' `sourceLabels` look at (part of each node's [`OutboundKey`]).
    source_label_keys: BTreeSet<String>,
    /// What each sidecar's local part looks at.
    local: LocalIndex,
}

impl Objects {
    /// Indexes `resources`.
    pub fn new(resources: Vec<Resource>) -> Self {
        Self {
            source_label_keys: source_label_keys(&resources),
            local: LocalIndex::new(&resources),
            resources,
        }
    }
}

/// Everything a push is computed from, built once per debounced change and shared by all streams.
#[derive(Debug)]
pub struct PushContext {
    /// Increases with every change; sent as the version.
    pub epoch: u64,
    /// Store revision it was built from.
    pub revision: u64,
    /// All config objects (shared with other contexts built from the same store revision).
    pub objects: Arc<Objects>,
    /// All live workloads.
    pub workloads: Arc<Vec<Workload>>,
    /// When the first of the changes this context was debounced from arrived (`None` for the
    /// first context): where `pilot_proxy_convergence_time` starts.
    pub changed_at: Option<tokio::time::Instant>,
    /// Outbound parts translated (or queued for translation) from this context, by key: sidecars
    /// whose nodes have the same key (typically: the same namespace) share one translation and one
    /// fingerprint.
    outbound: Mutex<HashMap<OutboundKey, translator::Pending<Arc<SharedOutbound>>>>,
    /// The mesh's peers (`ProxyConfig.peers`, the same for every sidecar), built by the first push
    /// that needs them.
    peers: std::sync::OnceLock<SharedPeers>,
}

/// The peers of one context, encoded once for every stream, and their fingerprint.
#[derive(Debug)]
struct SharedPeers {
    encoded: Bytes,
    fingerprint: u64,
}

/// One translated outbound part, encoded once for every stream it is sent to, and its fingerprint.
#[derive(Debug)]
struct SharedOutbound {
    /// The services and clusters as `ProxyConfig` fields 2 and 3 (see [`wire::encode_outbound`]);
    /// every response carrying them refers to these bytes.
    encoded: Bytes,
    fingerprint: u64,
}

impl PushContext {
    /// A context for `epoch` over these objects and workloads.
    pub fn new(
        epoch: u64,
        revision: u64,
        objects: Arc<Objects>,
        workloads: Arc<Vec<Workload>>,
    ) -> Self {
        Self {
            epoch,
            revision,
            objects,
            workloads,
            changed_at: None,
            outbound: Mutex::default(),
            peers: std::sync::OnceLock::new(),
        }
    }

    /// The mesh's peers, built from this context's workloads on first use.
    fn peers(&self, trust_domain: &str) -> &SharedPeers {
        self.peers.get_or_init(|| {
            let peers = weft_pilot_config::translate::peers::build(&self.workloads, trust_domain);
            SharedPeers {
                fingerprint: fingerprint_peers(&peers),
                encoded: wire::encode_peers(&peers),
            }
        })
    }

    /// The outbound part of `node`'s view: translated once per key (queued now if nobody asked for
    /// that key yet) and shared by every stream asking for the same key.
    fn outbound_for(
        self: &Arc<Self>,
        node: &Workload,
        translator: &Translator,
    ) -> translator::Pending<Arc<SharedOutbound>> {
        let key = OutboundKey::new(node, &self.objects.source_label_keys);
        let mut outbound = self.outbound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = outbound.get(&key) {
            return pending.clone();
        }
        // The job holds the context weakly: a context superseded before its turn comes, and no
        // longer held by any session, is not translated at all (while sidecars connect, contexts
        // follow each other every debounce period).
        let (ctx, node, mesh) = (
            Arc::downgrade(self),
            node.clone(),
            translator.mesh().clone(),
        );
        let pending = translator.run(move || {
            let ctx = ctx.upgrade()?;
            let started = std::time::Instant::now();
            let outbound = translate_outbound(&ctx.objects.resources, &ctx.workloads, &node, &mesh);
            let shared = SharedOutbound {
                fingerprint: fingerprint_outbound(&outbound),
                encoded: wire::encode_outbound(&outbound),
            };
            tracing::debug!(
                epoch = ctx.epoch,
                namespace = %node.namespace,
                bytes = shared.encoded.len(),
                took = ?started.elapsed(),
                "outbound view translated"
            );
            Some(Arc::new(shared))
        });
        outbound.insert(key, pending.clone());
        pending
    }

    /// Queues the outbound part of every registered workload's key (the sidecars this context will
    /// be pushed to), so that translation starts now rather than when their sessions get to it.
    fn start_translations(self: &Arc<Self>, translator: &Translator) {
        for node in self.workloads.iter() {
            drop(self.outbound_for(node, translator));
        }
    }
}

/// Debounce settings (Istio's PILOT_DEBOUNCE_AFTER / PILOT_DEBOUNCE_MAX: 100 ms quiet, 10 s max).
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// Push once no change arrived for this long...
    pub quiet: Duration,
    /// ...or once the first unpushed change is this old.
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Builds push contexts from store and registry changes, debounced. Returns the receiver streams watch.
fn spawn_debouncer(
    mut store: watch::Receiver<Arc<Snapshot>>,
    registry: Arc<dyn WorkloadSource>,
    debounce: Debounce,
    translator: Translator,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<PushContext>> {
    // The objects of the last revision seen: contexts built for registry changes alone (a thousand
    // of them while a thousand sidecars connect) share them instead of copying every object.
    let mut last: Option<(u64, Arc<Objects>)> = None;
    let mut build = {
        let registry = registry.clone();
        move |epoch: u64, snapshot: &Snapshot, changed_at: Option<tokio::time::Instant>| {
            let objects = match &last {
                Some((revision, objects)) if *revision == snapshot.revision() => objects.clone(),
                _ => {
                    // Pods reach translation as workloads (the registry resolves them), so the
                    // translation input leaves them out: one copy fewer of every Pod per revision.
                    let objects = Arc::new(Objects::new(
                        snapshot
                            .iter()
                            .filter(|o| o.resource.kind() != weft_pilot_config::Kind::Pod)
                            .map(|o| o.resource.clone())
                            .collect(),
                    ));
                    last = Some((snapshot.revision(), objects.clone()));
                    objects
                }
            };
            let mut ctx = PushContext::new(
                epoch,
                snapshot.revision(),
                objects,
                registry.workloads(snapshot),
            );
            ctx.changed_at = changed_at;
            let ctx = Arc::new(ctx);
            ctx.start_translations(&translator);
            ctx
        }
    };
    let first = build(1, &store.borrow_and_update(), None);
    let (tx, rx) = watch::channel(first);
    let mut workloads = registry.subscribe();
    tokio::spawn(async move {
        let mut epoch = 1;
        loop {
            // Wait for the first change.
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = store.changed() => if r.is_err() { return },
                r = workloads.changed() => if r.is_err() { return },
            }
            let started = tokio::time::Instant::now();
            // Then for quiet, or the cap.
            loop {
                let quiet_until = tokio::time::Instant::now() + debounce.quiet;
                let deadline = quiet_until.min(started + debounce.max);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => break,
                    r = store.changed() => if r.is_err() { return },
                    r = workloads.changed() => if r.is_err() { return },
                }
                if tokio::time::Instant::now() >= started + debounce.max {
                    break;
                }
            }
            epoch += 1;
            let ctx = build(epoch, &store.borrow_and_update(), Some(started));
            workloads.mark_unchanged();
            tracing::debug!(
                epoch,
                revision = ctx.revision,
                workloads = ctx.workloads.len(),
                "push context built"
            );
            tx.send_replace(ctx);
        }
    });
    rx
}

// === proxy status ===

/// What `proxy-status` shows for one connected sidecar.
#[derive(Debug, Clone)]
pub struct ProxyStatus {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Identity from its client certificate.
    pub identity: String,
    /// Last version sent.
    pub version_sent: String,
    /// Last version ACKed.
    pub version_acked: String,
    /// Error of the last NACK, if the last response was NACKed.
    pub nack: Option<String>,
    /// Why its stream was refused (the registry rule), for a sidecar that is not connected.
    pub refused: Option<String>,
    /// When the last push was sent.
    pub last_push: SystemTime,
    /// The version the sidecar reported (see [`proxy_version`]).
    pub proxy_version: String,
}

/// The version a sidecar reported, for `pilot_xds{version}` and proxy-status: kept when it is at
/// most 64 bytes of letters, digits and `.+-_` (a version, not a payload a hostile pod sends to
/// bloat pilot's metrics or its operator's terminal), else `unknown`, as for a sidecar that reported
/// none.
pub fn proxy_version(node: &pb::Node) -> String {
    let v = node.proxy_version.as_str();
    let plain = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'));
    if plain {
        v.to_owned()
    } else {
        metrics::UNKNOWN_VERSION.to_owned()
    }
}

impl ProxyStatus {
    /// SYNCED (acked what was sent), NACKED (rejected it), or STALE (no answer yet).
    pub fn state(&self) -> &'static str {
        if self.refused.is_some() {
            "REFUSED"
        } else if self.nack.is_some() {
            "NACKED"
        } else if self.version_acked == self.version_sent {
            "SYNCED"
        } else {
            "STALE"
        }
    }
}

/// The connected sidecars, by stream, and the last refusal of each pod whose sidecar was refused
/// (until it is admitted, at most [`MAX_REFUSALS`] of them, for [`REFUSAL_MEMORY`]).
#[derive(Debug, Default)]
pub struct ProxyTable {
    entries: Mutex<BTreeMap<u64, ProxyStatus>>,
    /// What the sessions count (pushes, NACKs, times); the connected count is `entries`.
    metrics: DiscoveryMetrics,
    next: Mutex<u64>,
    refusals: Mutex<BTreeMap<(String, String), (ProxyStatus, std::time::Instant)>>,
    /// The sidecars' latest shadow-diff reports (`pilot mirror-report`).
    reports: reports::MirrorReports,
}

/// How many refused pods `proxy-status` remembers (a flood of refused streams must not grow pilot).
const MAX_REFUSALS: usize = 1024;
/// How long a refusal is shown after the last attempt (a refused sidecar retries within seconds).
const REFUSAL_MEMORY: Duration = Duration::from_secs(600);

impl ProxyTable {
    fn refusals(
        &self,
    ) -> MutexGuard<'_, BTreeMap<(String, String), (ProxyStatus, std::time::Instant)>> {
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the stream of `node` (with certificate `peer`) was refused.
    fn refused(&self, node: &pb::Node, peer: &SpiffeId, refusal: &Refusal) {
        let now = std::time::Instant::now();
        let mut refusals = self.refusals();
        refusals.retain(|_, (_, at)| now.duration_since(*at) < REFUSAL_MEMORY);
        let key = (node.namespace.clone(), node.name.clone());
        if refusals.len() >= MAX_REFUSALS && !refusals.contains_key(&key) {
            return;
        }
        let status = ProxyStatus {
            name: node.name.clone(),
            namespace: node.namespace.clone(),
            identity: peer.to_string(),
            version_sent: String::new(),
            version_acked: String::new(),
            nack: None,
            refused: Some(refusal.reason.clone()),
            last_push: SystemTime::now(),
            proxy_version: proxy_version(node),
        };
        refusals.insert(key, (status, now));
    }

    /// Forgets the refusal of a pod whose sidecar is now admitted.
    fn admitted(&self, workload: &Workload) {
        self.refusals()
            .remove(&(workload.namespace.clone(), workload.name.clone()));
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(entry) = self.lock().get_mut(&id) {
            f(entry);
        }
    }

    /// What discovery counted.
    pub fn metrics(&self) -> &DiscoveryMetrics {
        &self.metrics
    }

    /// Writes discovery's metric families (see [`metrics`]).
    pub fn render_metrics(&self, out: &mut weft_ca::monitoring::Exposition) {
        let mut connected: BTreeMap<String, usize> = BTreeMap::new();
        for status in self.lock().values() {
            *connected.entry(status.proxy_version.clone()).or_default() += 1;
        }
        self.metrics.render(out, &connected);
    }

    /// The latest shadow-diff report of each sidecar (connected or recently gone), by pod.
    pub fn mirror_reports(&self) -> Vec<reports::StoredReport> {
        self.reports.list()
    }

    /// The connected sidecars and the recently refused ones, sorted by namespace and name.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut all: Vec<ProxyStatus> = self.lock().values().cloned().collect();
        let now = std::time::Instant::now();
        all.extend(
            self.refusals()
                .values()
                .filter(|(_, at)| now.duration_since(*at) < REFUSAL_MEMORY)
                .map(|(status, _)| status.clone()),
        );
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}

// === the service ===

/// The `DiscoveryService` implementation.
#[derive(Debug, Clone)]
pub struct Discovery {
    contexts: watch::Receiver<Arc<PushContext>>,
    /// Where admitted sidecars register their workloads; `None` when the workloads come from
    /// the platform (`--registry kubernetes`).
    registry: Option<Arc<Registry>>,
    /// The platform's Pods (and the config objects): what a sidecar's node is checked against.
    pods: watch::Receiver<Arc<Snapshot>>,
    /// `--trust-workload-claims`.
    trust_claims: bool,
    translator: Translator,
    proxies: Arc<ProxyTable>,
    pushes: PushSlots,
    shutdown: CancellationToken,
    /// No first push before this (the registry refills as sidecars reconnect after a restart).
    warm_until: tokio::time::Instant,
}

impl Discovery {
    /// A discovery service pushing contexts from `contexts`, translating on `translator` (the
    /// one the debouncer that builds the contexts uses). Admitted sidecars register in
    /// `registry`, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        contexts: watch::Receiver<Arc<PushContext>>,
        registry: Option<Arc<Registry>>,
        pods: watch::Receiver<Arc<Snapshot>>,
        trust_claims: bool,
        translator: Translator,
        proxies: Arc<ProxyTable>,
        shutdown: CancellationToken,
        warm_up: Duration,
    ) -> Self {
        Self {
            contexts,
            registry,
            pods,
            trust_claims,
            translator,
            proxies,
            pushes: PushSlots::new(CONCURRENT_PUSHES, PUSH_ANSWER_TIMEOUT),
            shutdown,
            warm_until: tokio::time::Instant::now() + warm_up,
        }
    }
}

impl tonic::server::NamedService for Discovery {
    const NAME: &'static str = wire::SERVICE_NAME;
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

/// `weft.discovery.v1.DiscoveryService`, served by hand rather than through the generated server so
/// that responses can be written from shared pre-encoded pieces (see [`wire`]). Requests are decoded
/// with the generated prost types as before, and errors are the same gRPC statuses.
impl tower::Service<http::Request<tonic::body::Body>> for Discovery {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match this.route(request).await {
                Ok(body) => {
                    let mut response = http::Response::new(tonic::body::Body::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

impl Discovery {
    /// Checks method and encoding as the generated server does, then opens the stream.
    async fn route(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<wire::ResponseBody, Status> {
        if request.uri().path() != wire::STREAM_CONFIG_PATH {
            return Err(Status::unimplemented(format!(
                "unknown method {}",
                request.uri().path()
            )));
        }
        if let Some(encoding) = request.headers().get("grpc-encoding")
            && encoding.as_bytes() != b"identity"
        {
            return Err(Status::unimplemented(format!(
                "request compression {encoding:?} is not supported"
            )));
        }
        let (metadata, extensions, body) = Request::from_http(request).into_parts();
        let decoder = SmallBuffer(
            tonic_prost::ProstCodec::<pb::DiscoveryResponse, pb::DiscoveryRequest>::default()
                .decoder(),
        );
        let inbound = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST_BYTES));
        self.stream_config(Request::from_parts(metadata, extensions, inbound))
            .await
    }

    /// `StreamConfig`: checks the client certificate against the node of the first request,
    /// registers the workload and starts its session; the body carries the session's responses.
    async fn stream_config(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<wire::ResponseBody, Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| weft_ca::tls::peer_identity(&certs))
            .ok_or_else(|| Status::unauthenticated("a mesh client certificate is required"))?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no first request within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let node = first
            .node
            .ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
        let admitted = {
            let pods = self.pods.borrow();
            admit::admit(&node, &peer, &pods, self.trust_claims)
        };
        let workload = match admitted {
            Ok(workload) => workload,
            Err(refusal) => {
                tracing::warn!(pod = %format!("{}/{}", node.namespace, node.name), identity = %peer, reason = %refusal, "sidecar refused");
                self.proxies.refused(&node, &peer, &refusal);
                return Err(refusal.into());
            }
        };
        let id = self.proxies.next_id();
        self.proxies.lock().insert(
            id,
            ProxyStatus {
                name: workload.name.clone(),
                namespace: workload.namespace.clone(),
                identity: peer.to_string(),
                version_sent: String::new(),
                version_acked: String::new(),
                nack: None,
                refused: None,
                last_push: SystemTime::now(),
                proxy_version: proxy_version(&node),
            },
        );
        self.proxies.admitted(&workload);
        let registration = self.registry.as_ref().map(|r| r.register(workload.clone()));
        tracing::info!(pod = %format!("{}/{}", workload.namespace, workload.name), identity = %peer, "sidecar connected");
        let (outbox, body) = wire::outbox();
        let session = Session {
            id,
            node: workload,
            contexts: self.contexts.clone(),
            translator: self.translator.clone(),
            proxies: self.proxies.clone(),
            pushes: self.pushes.clone(),
            in_flight: None,
            outbox,
            _registration: registration,
            last_fingerprint: None,
            nonce: 0,
            last_nonce: String::new(),
            warm_until: self.warm_until,
        };
        tokio::spawn(session.run(inbound, self.shutdown.clone()));
        Ok(body)
    }
}

/// A request decoder with a small initial buffer (see [`REQUEST_BUFFER_BYTES`]).
struct SmallBuffer<D>(D);

impl<D: Decoder> Decoder for SmallBuffer<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        // The yield threshold only concerns encoding, which this decoder never does.
        BufferSettings::new(REQUEST_BUFFER_BYTES, REQUEST_BUFFER_BYTES)
    }
}

struct Session {
    id: u64,
    node: Workload,
    contexts: watch::Receiver<Arc<PushContext>>,
    translator: Translator,
    proxies: Arc<ProxyTable>,
    pushes: PushSlots,
    /// The slot of the push awaiting its answer.
    in_flight: Option<InFlight>,
    outbox: wire::Outbox,
    _registration: Option<Registration>,
    last_fingerprint: Option<u64>,
    nonce: u64,
    last_nonce: String,
    warm_until: tokio::time::Instant,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::DiscoveryRequest>,
        shutdown: CancellationToken,
    ) {
        // Just after a restart the registry holds only the sidecars that have reconnected so far:
        // a sidecar keeps serving its last config until the others are back (a first push with
        // their endpoints missing would fail requests; the soak showed 503s for ~200 ms).
        tokio::select! {
            () = shutdown.cancelled() => return self.end(),
            () = tokio::time::sleep_until(self.warm_until) => {}
        }
        // The context is dropped right after the push: a session that kept it (for as long as it
        // lives) would keep that push's objects and shared bytes alive too.
        let ctx = self.contexts.borrow_and_update().clone();
        let first = self.push(&ctx, false).await;
        drop(ctx);
        if first.is_err() {
            return self.end();
        }
        loop {
            let answer_due = self.in_flight.as_ref().map(InFlight::due);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until_some(answer_due) => self.in_flight = None,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.answer(req),
                    Ok(None) | Err(_) => break,
                },
                r = self.contexts.changed() => {
                    if r.is_err() { break; }
                    let ctx = self.contexts.borrow_and_update().clone();
                    if self.push(&ctx, true).await.is_err() { break; }
                }
            }
        }
        self.end();
    }

    fn end(self) {
        self.proxies.lock().remove(&self.id);
        self.proxies
            .reports
            .disconnected(self.id, &self.node.namespace, &self.node.name);
        tracing::info!(pod = %format!("{}/{}", self.node.namespace, self.node.name), "sidecar disconnected");
    }

    /// Computes this sidecar's view and sends it if it differs from the last one sent. The view is
    /// what `translate` gives, assembled from the outbound part shared with same-key sidecars and
    /// this node's own part; its fingerprint combines the two parts' fingerprints. `converging`: the
    /// push follows a change of context (not the stream's first), so its convergence time counts.
    async fn push(&mut self, ctx: &Arc<PushContext>, converging: bool) -> Result<(), ()> {
        let started = tokio::time::Instant::now();
        let shared = match ctx.outbound_for(&self.node, &self.translator).await {
            Ok(shared) => shared,
            Err(e) => {
                tracing::error!(pod = %format!("{}/{}", self.node.namespace, self.node.name), error = %e, "no view to push");
                return Err(());
            }
        };
        let local = translate_local_with(
            &ctx.objects.resources,
            &ctx.objects.local,
            &self.node,
            self.translator.mesh(),
        );
        let peers = ctx.peers(&self.translator.mesh().trust_domain);
        let fp = combine(
            combine(shared.fingerprint, fingerprint(&local)),
            peers.fingerprint,
        );
        if self.last_fingerprint == Some(fp) {
            return Ok(());
        }
        // A newer view supersedes the one in flight: give its slot back before waiting for one, or
        // sessions holding slots could all wait for each other.
        self.in_flight = None;
        let waiting = tokio::time::Instant::now();
        let slot = self.pushes.take().await.ok_or(())?;
        let waited = waiting.elapsed();
        self.nonce += 1;
        let version = ctx.epoch.to_string();
        let nonce = format!("{}-{}", self.id, self.nonce);
        // The services and clusters are the shared bytes, referred to, not copied.
        let Some(response) =
            wire::Message::response(&version, &nonce, &local, &shared.encoded, &peers.encoded)
        else {
            tracing::error!(pod = %format!("{}/{}", self.node.namespace, self.node.name), "view exceeds the largest gRPC message");
            return Err(());
        };
        drop(shared);
        if self.outbox.post(response).is_err() {
            self.proxies.metrics.send_failed();
            return Err(());
        }
        self.proxies.metrics.pushed(
            started.elapsed().saturating_sub(waited),
            ctx.changed_at.filter(|_| converging).map(|at| at.elapsed()),
        );
        self.in_flight = Some(slot);
        self.last_fingerprint = Some(fp);
        self.last_nonce = nonce;
        self.proxies.update(self.id, |p| {
            p.version_sent = version;
            p.nack = None;
            p.last_push = SystemTime::now();
        });
        Ok(())
    }

    /// Records an ACK or NACK of the last response; answers to older responses are ignored (the
    /// sidecar will answer the newer one too).
    ///
    /// A request carrying a shadow-diff report is a report only (the contract gives it no nonce):
    /// it is stored for `pilot mirror-report` and changes nothing else, neither the push slot nor
    /// what `proxy-status` shows nor what is pushed next.
    fn answer(&mut self, req: pb::DiscoveryRequest) {
        if let Some(report) = req.mirror_report {
            let workload = reports::workload_of(&self.node.name, &self.node.labels);
            if let Err(e) = self.proxies.reports.record(
                self.id,
                &self.node.namespace,
                &self.node.name,
                &workload,
                report,
            ) {
                tracing::warn!(pod = %format!("{}/{}", self.node.namespace, self.node.name), error = %e, "mirror report dropped");
            }
            return;
        }
        if req.response_nonce != self.last_nonce {
            return;
        }
        self.in_flight = None;
        match req.error_detail {
            Some(err) => {
                tracing::warn!(pod = %format!("{}/{}", self.node.namespace, self.node.name), error = %err.message, "config NACKed");
                self.proxies.metrics.rejected();
                self.proxies.update(self.id, |p| {
                    p.nack = Some(err.message);
                    p.version_acked = req.version_info;
                });
            }
            None => self.proxies.update(self.id, |p| {
                p.nack = None;
                p.version_acked = req.version_info;
            }),
        }
    }
}

/// Bounds the pushes in flight, as Istio's push throttle does: a slot is taken before a response is
/// posted and given back when the sidecar answers it (ACK or NACK), when a newer push supersedes
/// it, when the stream ends, or after the answer timeout (a sidecar that never answers holds a slot
/// only that long). Without it a change started all thousand streams' writes at once: every stream
/// finished near the end of the push (median ≈ slowest), and every connection had its TLS and
/// HTTP/2 send buffers full at the same time. With it the median stream is done in about half the
/// time of the whole push, and buffers are in use on at most this many connections.
#[derive(Clone, Debug)]
struct PushSlots {
    slots: Arc<Semaphore>,
    answer_timeout: Duration,
}

/// A push's slot (see [`PushSlots`]); dropping it gives the slot back.
#[derive(Debug)]
struct InFlight {
    _permit: OwnedSemaphorePermit,
    due: tokio::time::Instant,
}

impl PushSlots {
    fn new(slots: usize, answer_timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            answer_timeout,
        }
    }

    /// Waits for a free slot (first come, first served).
    async fn take(&self) -> Option<InFlight> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(InFlight {
            _permit: permit,
            due: tokio::time::Instant::now() + self.answer_timeout,
        })
    }
}

impl InFlight {
    /// When the slot is given back if no answer came.
    fn due(&self) -> tokio::time::Instant {
        self.due
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One fingerprint from two parts' (FNV-1a over their bytes).
fn combine(outbound: u64, local: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    outbound
        .to_le_bytes()
        .into_iter()
        .chain(local.to_le_bytes())
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

// === serving ===

/// Namespace of pilot's own identity.
pub const PILOT_NAMESPACE: &str = "weft-system";
/// Service account of pilot's own identity.
pub const PILOT_SERVICE_ACCOUNT: &str = "pilot";

/// What discovery needs beyond the store.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// The CA's address.
    pub ca: String,
    /// The mesh root PEM file (reloaded when it changes, see `weft_ca::files`).
    pub root_file: std::path::PathBuf,
    /// pilot's bootstrap token file (read again for every certificate request).
    pub token_file: std::path::PathBuf,
    /// Validity pilot asks for its own certificate (rotated at half life).
    pub cert_ttl: Duration,
    /// Debounce settings.
    pub debounce: Debounce,
    /// How long a disconnected workload stays registered.
    pub workload_grace: Duration,
    /// How long after start sidecars wait for their first push (see `pilot serve --warm-up`).
    pub warm_up: Duration,
    /// Mesh-wide settings sent to every sidecar.
    pub mesh: MeshOptions,
    /// `--trust-workload-claims` (insecure): admit what sidecars say about their pods.
    pub trust_workload_claims: bool,
    /// How long in-flight calls get to finish after shutdown begins (`--drain-duration`).
    pub drain: Duration,
    /// HTTP/2 keepalive of the discovery server's connections and of the channel to the CA.
    pub keepalive: weft_ca::grpc::Keepalive,
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Identity or TLS setup failed.
    #[error("discovery identity: {0}")]
    Identity(String),
    /// The gRPC server failed.
    #[error("discovery server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The translation threads could not be started.
    #[error("discovery translation threads: {0}")]
    Threads(std::io::Error),
}

/// Where discovery's config objects and workloads come from.
#[derive(Clone)]
pub enum Source {
    /// The local store's snapshots; workloads registered by their sidecars' streams.
    Local(watch::Receiver<Arc<Snapshot>>),
    /// A platform registry (`--registry kubernetes`): its snapshots and its workloads; sidecars
    /// register nothing (several pilots then serve the same mesh with no shared local state).
    Platform {
        /// Config snapshots.
        snapshots: watch::Receiver<Arc<Snapshot>>,
        /// Live workloads.
        workloads: Arc<dyn WorkloadSource>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Local(_) => "Source::Local",
            Source::Platform { .. } => "Source::Platform",
        })
    }
}

/// Serves discovery on `listener` until `shutdown`: gets pilot's certificate from the CA (waiting for
/// the CA if needed), keeps it rotated, and streams each connected sidecar its view of `source`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: DiscoveryOptions,
    source: Source,
    proxies: Arc<ProxyTable>,
    shutdown: CancellationToken,
) -> Result<(), DiscoveryError> {
    use weft_ca::tls::{self, ClientAuth, CredentialStore};
    let drain = opts.drain;
    let td = opts.mesh.trust_domain.clone();
    let identity = SpiffeId::new(&td, PILOT_NAMESPACE, PILOT_SERVICE_ACCOUNT)
        .map_err(|e| DiscoveryError::Identity(e.to_string()))?;
    let roots = weft_ca::files::RootFile::load(&opts.root_file)
        .map_err(|e| DiscoveryError::Identity(e.to_string()))?;
    let bundle = roots.bundle().clone();
    let ca_id =
        weft_ca::server::ca_identity(&td).map_err(|e| DiscoveryError::Identity(e.to_string()))?;
    let ca = weft_ca::client::CaClient::with_files(
        &opts.ca,
        &roots,
        ca_id,
        &opts.token_file,
        &opts.keepalive,
    )
    .map_err(|e| DiscoveryError::Identity(e.to_string()))?;
    let Some(creds) = weft_ca::client::fetch_with_retry(
        &ca,
        &identity,
        opts.cert_ttl,
        shutdown.clone().cancelled_owned(),
    )
    .await
    else {
        return Ok(());
    };
    let creds = CredentialStore::new(creds);
    let rotation = tokio::spawn(weft_ca::client::keep_rotated(
        ca,
        identity.clone(),
        opts.cert_ttl,
        creds.clone(),
    ));
    let root_watch = tokio::spawn(roots.watch(weft_ca::files::ROOT_POLL_INTERVAL));
    let config = tls::server_config(creds, &bundle, ClientAuth::Required, &[tls::ALPN_H2])
        .map_err(|e| DiscoveryError::Identity(e.to_string()))?;
    if opts.trust_workload_claims {
        tracing::warn!(
            "--trust-workload-claims: sidecars are admitted with the labels and address they \
             declare; any workload can claim another's labels and receive its traffic (insecure)"
        );
    }
    let (snapshots, registry, workloads): (_, _, Arc<dyn WorkloadSource>) = match source {
        Source::Local(snapshots) => {
            let registry = Registry::new(opts.workload_grace, opts.trust_workload_claims);
            (snapshots, Some(registry.clone()), registry)
        }
        Source::Platform {
            snapshots,
            workloads,
        } => (snapshots, None, workloads),
    };
    let translator =
        Translator::new(opts.mesh, CONCURRENT_TRANSLATIONS).map_err(DiscoveryError::Threads)?;
    let contexts = spawn_debouncer(
        snapshots.clone(),
        workloads,
        opts.debounce,
        translator.clone(),
        shutdown.clone(),
    );
    let service = Discovery::new(
        contexts,
        registry,
        snapshots,
        opts.trust_workload_claims,
        translator,
        proxies,
        shutdown.clone(),
        opts.warm_up,
    );
    tracing::info!(%identity, "discovery serving");
    let incoming = weft_ca::grpc::tls_incoming(listener, Arc::new(config));
    // Without server-side PINGs a sidecar on a lost node (no FIN) kept its stream, and so its
    // endpoints, for as long as the partition lasted: the grace period never started.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(opts.keepalive.interval))
        .http2_keepalive_timeout(Some(opts.keepalive.timeout))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r.map_err(DiscoveryError::from),
        () = shutdown.cancelled() => {
            match tokio::time::timeout(drain, server).await {
                Ok(r) => r.map_err(DiscoveryError::from),
                Err(_) => Ok(()),
            }
        }
    };
    rotation.abort();
    root_watch.abort();
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_reported_version_is_kept_only_when_plain() {
        let version = |v: &str| {
            proxy_version(&pb::Node {
                proxy_version: v.into(),
                ..Default::default()
            })
        };
        assert_eq!(version("0.1.0"), "0.1.0");
        assert_eq!(version("1.24.0-rc.1+build_7"), "1.24.0-rc.1+build_7");
        for odd in [
            "",
            "1.0\"} 1e9\npilot_xds{version=\"x",
            "v 1",
            &"9".repeat(65),
            "é",
        ] {
            assert_eq!(version(odd), "unknown", "{odd:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn push_slots_are_bounded_first_come_first_served_and_timed() {
        let slots = PushSlots::new(2, Duration::from_secs(5));
        let a = slots.take().await.unwrap();
        let b = slots.take().await.unwrap();
        assert_eq!(
            a.due(),
            tokio::time::Instant::now() + Duration::from_secs(5)
        );
        // Both taken: the next waits until one is given back (an answer, or its due time).
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await.is_some() }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(a);
        assert!(waiting.await.unwrap());
        // A session gives a slot back at its due time, whatever the sidecar does; without a push
        // in flight there is nothing to wait for.
        let due = b.due();
        sleep_until_some(Some(due)).await;
        assert_eq!(tokio::time::Instant::now(), due);
        drop(b);
        assert!(slots.take().await.is_some());
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until_some(None));
        assert!(never.await.is_err());
    }
}
