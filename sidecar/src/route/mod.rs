//! The route model: pilot's `ProxyConfig`, validated and indexed for the request path. Pure data: no
//! I/O, no counters, no telemetry types. What changes while requests run (balancer cursors, requests
//! in flight, ejections, pool limits) lives in `upstream::state`; metric labels in `telemetry`.
//!
//! Conversion (`convert`) happens once per push, off the request path; a push that does not convert
//! is NACKed with the error and the previous table stays in force. The table is immutable and shared
//! as an `Arc`, so requests read it without locks and finish on the table they started with.
//! Matching (`matching`) picks the route and the weighted destination.

pub mod compare;
mod convert;
mod matching;
pub mod policy;
pub mod retry;

pub use convert::InvalidConfig;
pub use matching::RequestView;

// Looked up on every request with keys pilot chose (a request can only miss, never insert): foldhash
// is several times cheaper than SipHash here and flooding is not a concern.
use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use regex::Regex;
use weft_ca::SpiffeId;

/// The whole config, validated.
#[derive(Debug)]
pub struct RouteTable {
    /// pilot's version of this config.
    pub version: String,
    /// Trust domain of the mesh.
    pub trust_domain: String,
    /// Append `-shadow` to mirrored requests' host.
    pub mirror_shadow_suffix: bool,
    services: Vec<Service>,
    by_vip: HashMap<SocketAddr, (usize, usize)>,
    by_host: HashMap<String, usize>,
    clusters: HashMap<String, Arc<Cluster>>,
    /// The same clusters by [`Cluster::index`].
    cluster_list: Vec<Arc<Cluster>>,
    /// How this workload accepts connections.
    pub inbound: InboundPolicy,
    /// Tracing settings.
    pub tracing: Tracing,
    /// The mesh's workloads as callers.
    peers: Vec<Peer>,
}

/// A mesh workload as a caller (`pb::Peer`): names the workload behind a verified certificate in
/// the inbound side's `source_*` metric labels.
#[derive(Debug)]
pub struct Peer {
    /// The SPIFFE ID its sidecars present.
    pub identity: String,
    /// The owning workload's name.
    pub workload: String,
    /// Its namespace.
    pub namespace: String,
    /// Its `app` label.
    pub app: String,
    /// Its `version` label.
    pub version: String,
    /// Istio's canonical service (empty: none of the labels names it).
    pub canonical_service: String,
    /// Istio's canonical revision (empty: none names it).
    pub canonical_revision: String,
    /// Its pods' addresses.
    pub addresses: Vec<IpAddr>,
}

/// A Service as this sidecar sees it.
#[derive(Debug)]
pub struct Service {
    /// FQDN.
    pub hostname: String,
    /// Virtual IP, if it has one.
    pub vip: Option<IpAddr>,
    /// Ports with their routes.
    pub ports: Vec<ServicePort>,
    /// The Service's name and namespace (for metric labels).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Position in the table's Service list (the index of its metric labels).
    pub index: usize,
}

/// One port of a Service, with its routes (first match wins).
#[derive(Debug)]
pub struct ServicePort {
    /// Service port.
    pub port: u16,
    /// Application protocol (`http`, `http2`, `grpc`, `tcp`).
    pub protocol: String,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// One HTTP route.
#[derive(Debug)]
pub struct Route {
    /// Name for metrics and logs.
    pub name: String,
    /// OR of matches; empty matches everything.
    pub matches: Vec<Match>,
    /// What to do with a matching request.
    pub action: Action,
    /// Mirror copies to send.
    pub mirrors: Vec<MirrorPolicy>,
    /// Route timeout.
    pub timeout: Option<Duration>,
    /// Retry policy (None: no retries).
    pub retries: Option<retry::Policy>,
    /// Fault injection.
    pub fault: Option<Fault>,
    /// Request header operations.
    pub request_headers: HeaderOps,
    /// Response header operations.
    pub response_headers: HeaderOps,
    /// Path/authority rewrite.
    pub rewrite: Option<Rewrite>,
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Forward to one of the weighted destinations.
    Forward {
        /// Destinations with weight > 0.
        destinations: Vec<WeightedCluster>,
        /// Sum of their weights (> 0).
        total_weight: u32,
    },
    /// Answer with a redirect.
    Redirect(Redirect),
}

/// A destination cluster and its weight.
#[derive(Debug)]
pub struct WeightedCluster {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Relative weight (> 0).
    pub weight: u32,
    /// Per-destination request header operations.
    pub request_headers: HeaderOps,
    /// Per-destination response header operations.
    pub response_headers: HeaderOps,
}

/// A mirror target.
#[derive(Debug)]
pub struct MirrorPolicy {
    /// Where copies go.
    pub cluster: Arc<Cluster>,
    /// Share of requests mirrored, 0..=100.
    pub percent: f64,
    /// Shadow-diff: compare the copy's answer with the primary's (`None`: the answer is dropped).
    /// Shared, so a comparison in flight holds it without copying.
    pub compare: Option<Arc<compare::Compare>>,
}

/// Fault injection.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Delay and its percentage.
    pub delay: Option<(Duration, f64)>,
    /// Abort status and its percentage.
    pub abort: Option<(u16, f64)>,
}

/// Header operations.
#[derive(Debug, Default, Clone)]
pub struct HeaderOps {
    /// Replace.
    pub set: Vec<(HeaderName, http::HeaderValue)>,
    /// Append.
    pub add: Vec<(HeaderName, http::HeaderValue)>,
    /// Remove.
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Whether there is nothing to do (the common case: skip the work).
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the operations to `headers`.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Path and authority rewrite.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// New path prefix.
    pub uri: Option<String>,
    /// New authority.
    pub authority: Option<String>,
}

/// A redirect answer.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// New path.
    pub uri: Option<String>,
    /// New authority.
    pub authority: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New scheme.
    pub scheme: Option<String>,
    /// Status code (301 by default).
    pub code: u16,
}

/// A request matcher; all present conditions must hold.
#[derive(Debug, Default)]
pub struct Match {
    /// Path matcher.
    pub uri: Option<StringMatch>,
    /// Case-insensitive path match.
    pub ignore_uri_case: bool,
    /// Method matcher.
    pub method: Option<StringMatch>,
    /// Header matchers.
    pub headers: Vec<(HeaderName, StringMatch)>,
    /// Query parameter matchers.
    pub query_params: Vec<(String, StringMatch)>,
    /// Headers that must be absent.
    pub without_headers: Vec<HeaderName>,
}

/// A string matcher.
#[derive(Debug)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-string regex.
    Regex(Regex),
    /// Any value: the header or query parameter only has to be present (Istio's `{}`).
    Present,
}

/// An upstream cluster.
#[derive(Debug)]
pub struct Cluster {
    /// `outbound|port|subset|fqdn`.
    pub name: String,
    /// The Service FQDN.
    pub service_hostname: String,
    /// The Service port.
    pub port: u16,
    /// Subset name, empty for the whole Service.
    pub subset: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Load balancer.
    pub lb: LbPolicy,
    /// TLS to the endpoints.
    pub tls: TlsMode,
    /// Connect timeout (connectionPool.tcp.connectTimeout, default 10 s as Envoy).
    pub connect_timeout: Duration,
    /// Outlier detection (`None`: off).
    pub outlier: Option<policy::OutlierPolicy>,
    /// Connection-pool limits (requests in flight, pending, retries).
    pub limits: policy::PoolLimits,
    /// Requests per upstream connection before a new one is opened (0: unlimited).
    pub max_requests_per_connection: u32,
    /// Upstream connections idle this long are closed (`None`: Istio's default, 1 h).
    pub idle_timeout: Option<Duration>,
    /// Position in the table's cluster list: the index of this cluster's runtime state
    /// (`upstream::state`) and metric labels (`telemetry::TableLabels`).
    pub index: usize,
}

impl Cluster {
    /// The SPIFFE ID `endpoint`'s sidecar must prove, or `None` for plaintext (TLS disabled by a
    /// DestinationRule, or, under auto mTLS, an endpoint without a sidecar).
    pub fn peer_identity<'e>(&self, endpoint: &'e Endpoint) -> Option<&'e SpiffeId> {
        match self.tls {
            TlsMode::Disable => None,
            TlsMode::Auto | TlsMode::IstioMutual => endpoint.identity.as_ref(),
        }
    }

    /// Whether `other` (the same cluster in another push) has the same definition apart from
    /// its endpoints: Envoy drains a cluster's connection pools when its definition changes and
    /// keeps them through endpoint changes.
    pub fn same_definition(&self, other: &Cluster) -> bool {
        self.service_hostname == other.service_hostname
            && self.port == other.port
            && self.subset == other.subset
            && self.lb == other.lb
            && self.tls == other.tls
            && self.connect_timeout == other.connect_timeout
            && self.outlier == other.outlier
            && self.limits == other.limits
            && self.max_requests_per_connection == other.max_requests_per_connection
            && self.idle_timeout == other.idle_timeout
    }
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub dial: SocketAddr,
    /// The application port (what the peer forwards to).
    pub app_port: u16,
    /// The identity its sidecar must present; `None` = no sidecar.
    pub identity: Option<SpiffeId>,
    /// `ns/pod`, for the config dump and the namespace label.
    pub workload: String,
    /// The owning workload's name, for metrics (empty: the pod's).
    pub workload_name: String,
    /// The pod's `app` label (empty when it has none), for metrics.
    pub app: String,
    /// The pod's `version` label (empty when it has none), for metrics.
    pub version: String,
    /// Istio's canonical service from the pod's labels (empty when none names it), for metrics.
    pub canonical_service: String,
    /// Istio's canonical revision from the pod's labels (empty when none names it), for metrics.
    pub canonical_revision: String,
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Power of two choices on in-flight requests (Envoy's LEAST_REQUEST).
    LeastRequest,
    /// Rotate.
    RoundRobin,
    /// Uniform random.
    Random,
    /// To the original destination.
    Passthrough,
}

/// TLS towards a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// mTLS to endpoints with a sidecar, plaintext otherwise.
    Auto,
    /// Always mTLS.
    IstioMutual,
    /// Plaintext.
    Disable,
}

/// Inbound mTLS policy for this workload.
#[derive(Debug, Clone, Default)]
pub struct InboundPolicy {
    /// Default mode.
    pub mode: MtlsMode,
    /// Per application port overrides.
    pub port_modes: HashMap<u16, MtlsMode>,
}

impl InboundPolicy {
    /// The mode for an application port.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.port_modes.get(&port).copied().unwrap_or(self.mode)
    }
}

/// PeerAuthentication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtlsMode {
    /// mTLS and plaintext.
    #[default]
    Permissive,
    /// mTLS only.
    Strict,
    /// Plaintext only.
    Disable,
}

/// Tracing settings.
#[derive(Debug, Clone, Default)]
pub struct Tracing {
    /// Share of new traces sampled, 0..=100.
    pub sampling_percent: f64,
    /// OTLP `service.name` (shared, so a span takes it without copying the text).
    pub service_name: Option<Arc<str>>,
}

// === lookups ===

impl Default for RouteTable {
    fn default() -> Self {
        Self::empty()
    }
}

impl RouteTable {
    /// A table with nothing in it: every outbound request fails with 503 "no config" until pilot's
    /// first push arrives (never a hang).
    pub fn empty() -> Self {
        Self {
            version: String::new(),
            trust_domain: String::new(),
            mirror_shadow_suffix: true,
            services: Vec::new(),
            by_vip: HashMap::default(),
            by_host: HashMap::default(),
            clusters: HashMap::default(),
            cluster_list: Vec::new(),
            inbound: InboundPolicy::default(),
            tracing: Tracing::default(),
            peers: Vec::new(),
        }
    }

    /// The Service port a connection to `addr` (a Service VIP and port) is for.
    pub fn by_vip(&self, addr: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let (s, p) = *self.by_vip.get(&addr)?;
        let svc = self.services.get(s)?;
        Some((svc, svc.ports.get(p)?))
    }

    /// The Service port for a Host/:authority (`httpbin`, `httpbin:8000`, an FQDN...). Without a port in
    /// the authority, `default_port` (80 for http) is used.
    pub fn by_authority(
        &self,
        authority: &str,
        default_port: u16,
    ) -> Option<(&Service, &ServicePort)> {
        let (host, port) = split_authority(authority, default_port);
        let idx = match self.by_host.get(host) {
            Some(i) => *i,
            // Hosts are case-insensitive; only pay for lowercasing when the fast path misses.
            None => *self.by_host.get(&host.to_ascii_lowercase())?,
        };
        let svc = self.services.get(idx)?;
        let port = svc.ports.iter().find(|p| p.port == port)?;
        Some((svc, port))
    }

    /// The Service a host name (an alias or the FQDN, lowercase, no port) names.
    pub fn service_by_host(&self, host: &str) -> Option<&Service> {
        self.services.get(*self.by_host.get(host)?)
    }

    /// Every Service (for the DNS proxy and config dump).
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Host aliases and the Service they name (for the DNS proxy).
    pub fn hosts(&self) -> impl Iterator<Item = (&str, &Service)> {
        self.by_host
            .iter()
            .filter_map(|(h, i)| Some((h.as_str(), self.services.get(*i)?)))
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// Every cluster, in [`Cluster::index`] order.
    pub fn clusters(&self) -> &[Arc<Cluster>] {
        &self.cluster_list
    }

    /// The mesh's workloads as callers.
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }
}

/// Splits `host[:port]` (IPv6 in brackets allowed); the port defaults to `default_port`.
pub fn split_authority(authority: &str, default_port: u16) -> (&str, u16) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default_port);
        return (host, port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().unwrap_or(default_port)),
        _ => (authority, default_port),
    }
}

/// Appends `-shadow` to the host part of an authority: `httpbin:8000` → `httpbin-shadow:8000`.
pub fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests;
