//! The sidecar's config model: pilot's `ProxyConfig`, validated and indexed for the request path.
//!
//! Conversion happens once per push, off the request path (`RouteTable::try_from`); a push that does not
//! convert is NACKed with the error and the previous table stays in force. The table is immutable and
//! shared as an `Arc`, so requests read it without locks and finish on the table they started with.

// Looked up on every request with keys pilot chose (a request can only miss, never insert): foldhash
// is several times cheaper than SipHash here and flooding is not a concern.
use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::time::Duration;

use http::HeaderName;
use regex::Regex;
use weft_ca::SpiffeId;
use weft_proto::discovery as pb;

/// Why a pushed config was rejected. The message goes back to pilot in the NACK.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    /// A route names a cluster the push does not contain.
    #[error("route {route} references unknown cluster {cluster}")]
    UnknownCluster {
        /// Route name.
        route: String,
        /// Cluster name.
        cluster: String,
    },
    /// A regex does not compile.
    #[error("route {route}: invalid regex {regex:?}: {reason}")]
    Regex {
        /// Route name.
        route: String,
        /// The pattern.
        regex: String,
        /// Compiler message.
        reason: String,
    },
    /// A header name is not valid HTTP.
    #[error("route {route}: invalid header name {name:?}")]
    HeaderName {
        /// Route name.
        route: String,
        /// The name.
        name: String,
    },
    /// An address or port does not parse.
    #[error("{what}: invalid address {value:?}")]
    Address {
        /// Where.
        what: String,
        /// The value.
        value: String,
    },
    /// An endpoint identity is not a SPIFFE ID.
    #[error("cluster {cluster}: endpoint identity {identity:?}: {reason}")]
    Identity {
        /// Cluster name.
        cluster: String,
        /// The identity.
        identity: String,
        /// Why.
        reason: weft_ca::spiffe::SpiffeIdError,
    },
    /// A percentage outside 0..=100.
    #[error("route {route}: {what} percentage {value} is outside 0..100")]
    Percent {
        /// Route name.
        route: String,
        /// Which percentage.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// A route with neither destinations nor a redirect, or with all weights 0.
    #[error("route {route}: {reason}")]
    Route {
        /// Route name.
        route: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Something required is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
}

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
    /// How this workload accepts connections.
    pub inbound: InboundPolicy,
    /// Tracing settings.
    pub tracing: Tracing,
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
    /// Istio `destination_service*` metric labels.
    pub metric_labels: crate::telemetry::Labels,
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
    /// Retry policy.
    pub retries: Option<RetryPolicy>,
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
}

/// Retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Per-attempt timeout.
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry-on conditions.
    pub retry_on: Vec<String>,
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
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
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
    /// Round-robin cursor.
    pub cursor: AtomicUsize,
    /// Istio `destination_service*` metric labels.
    pub metric_labels: crate::telemetry::Labels,
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
    /// `ns/pod` for metrics.
    pub workload: String,
    /// Requests in flight, for LEAST_REQUEST.
    pub in_flight: AtomicU32,
    /// Istio `destination_*` metric labels of this endpoint, built once per push.
    pub metric_labels: crate::telemetry::Labels,
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
    /// OTLP `service.name`.
    pub service_name: String,
}

// === lookups ===

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
            inbound: InboundPolicy::default(),
            tracing: Tracing::default(),
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

    /// Every cluster, in no particular order.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
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

// === conversion ===

impl TryFrom<pb::ProxyConfig> for RouteTable {
    type Error = InvalidConfig;

    fn try_from(config: pb::ProxyConfig) -> Result<Self, Self::Error> {
        RouteTable::convert(String::new(), config)
    }
}

impl RouteTable {
    /// Converts and validates a push of `version`.
    pub fn convert(version: String, config: pb::ProxyConfig) -> Result<Self, InvalidConfig> {
        let mesh = config.mesh.ok_or(InvalidConfig::Missing("mesh settings"))?;
        let mut clusters =
            HashMap::with_capacity_and_hasher(config.clusters.len(), Default::default());
        for c in config.clusters {
            let cluster = convert_cluster(c)?;
            clusters.insert(cluster.name.clone(), Arc::new(cluster));
        }
        let mut services = Vec::with_capacity(config.services.len());
        let mut by_vip = HashMap::default();
        let mut by_host = HashMap::default();
        for (si, s) in config.services.into_iter().enumerate() {
            let vip = if s.vip.is_empty() {
                None
            } else {
                Some(
                    s.vip
                        .parse::<IpAddr>()
                        .map_err(|_| InvalidConfig::Address {
                            what: format!("service {} vip", s.hostname),
                            value: s.vip.clone(),
                        })?,
                )
            };
            let mut ports = Vec::with_capacity(s.ports.len());
            for (pi, p) in s.ports.into_iter().enumerate() {
                let port = u16::try_from(p.port).map_err(|_| InvalidConfig::Address {
                    what: format!("service {} port", s.hostname),
                    value: p.port.to_string(),
                })?;
                if let Some(vip) = vip {
                    by_vip.insert(SocketAddr::new(vip, port), (si, pi));
                }
                let routes = p
                    .routes
                    .into_iter()
                    .map(|r| convert_route(r, &clusters))
                    .collect::<Result<_, _>>()?;
                ports.push(ServicePort {
                    port,
                    protocol: p.protocol,
                    routes,
                });
            }
            by_host.insert(s.hostname.to_ascii_lowercase(), si);
            for alias in &s.aliases {
                by_host.insert(alias.to_ascii_lowercase(), si);
            }
            services.push(Service {
                metric_labels: crate::telemetry::service_labels(&s.hostname),
                hostname: s.hostname,
                vip,
                ports,
            });
        }
        let inbound = config.inbound.unwrap_or_default();
        let mut port_modes = HashMap::default();
        for (port, mode) in inbound.port_modes {
            let port = u16::try_from(port).map_err(|_| InvalidConfig::Address {
                what: "inbound port_modes".into(),
                value: port.to_string(),
            })?;
            port_modes.insert(port, mtls_mode(mode));
        }
        let tracing = config.tracing.unwrap_or_default();
        if !(0.0..=100.0).contains(&tracing.sampling_percent) {
            return Err(InvalidConfig::Percent {
                route: "tracing".into(),
                what: "sampling",
                value: tracing.sampling_percent,
            });
        }
        Ok(RouteTable {
            version,
            trust_domain: mesh.trust_domain,
            mirror_shadow_suffix: mesh.mirror_shadow_suffix,
            services,
            by_vip,
            by_host,
            clusters,
            inbound: InboundPolicy {
                mode: mtls_mode(inbound.mode),
                port_modes,
            },
            tracing: Tracing {
                sampling_percent: tracing.sampling_percent,
                service_name: tracing.service_name,
            },
        })
    }
}

fn mtls_mode(v: i32) -> MtlsMode {
    match pb::MtlsMode::try_from(v) {
        Ok(pb::MtlsMode::Strict) => MtlsMode::Strict,
        Ok(pb::MtlsMode::Disable) => MtlsMode::Disable,
        // Unknown values from a newer pilot fail safe to the mesh default, which still accepts mTLS.
        _ => MtlsMode::Permissive,
    }
}

fn convert_cluster(c: pb::Cluster) -> Result<Cluster, InvalidConfig> {
    let mut endpoints = Vec::with_capacity(c.endpoints.len());
    for e in c.endpoints {
        let ip: IpAddr = e.address.parse().map_err(|_| InvalidConfig::Address {
            what: format!("cluster {} endpoint", c.name),
            value: e.address.clone(),
        })?;
        let dial_port = u16::try_from(e.dial_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| InvalidConfig::Address {
                what: format!("cluster {} endpoint dial port", c.name),
                value: e.dial_port.to_string(),
            })?;
        let identity = if e.identity.is_empty() {
            None
        } else {
            Some(
                SpiffeId::parse(&e.identity).map_err(|reason| InvalidConfig::Identity {
                    cluster: c.name.clone(),
                    identity: e.identity.clone(),
                    reason,
                })?,
            )
        };
        let (ns, pod) = e
            .workload
            .split_once('/')
            .unwrap_or(("", e.workload.as_str()));
        let label = |k: &str| e.labels.get(k).map(String::as_str).unwrap_or_default();
        let metric_labels = crate::telemetry::workload_labels(
            "destination",
            pod,
            ns,
            identity.as_ref().map(SpiffeId::as_str).unwrap_or_default(),
            label("app"),
            label("version"),
        );
        endpoints.push(Endpoint {
            dial: SocketAddr::new(ip, dial_port),
            app_port: u16::try_from(e.port).unwrap_or(dial_port),
            identity,
            workload: e.workload,
            in_flight: AtomicU32::new(0),
            metric_labels,
        });
    }
    let lb = match pb::LbPolicy::try_from(c.lb_policy) {
        Ok(pb::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(pb::LbPolicy::Random) => LbPolicy::Random,
        Ok(pb::LbPolicy::Passthrough) => LbPolicy::Passthrough,
        _ => LbPolicy::LeastRequest,
    };
    let tls = match pb::TlsMode::try_from(c.tls_mode) {
        Ok(pb::TlsMode::IstioMutual) => TlsMode::IstioMutual,
        Ok(pb::TlsMode::Disable) => TlsMode::Disable,
        _ => TlsMode::Auto,
    };
    let connect_timeout = c
        .connection_pool
        .as_ref()
        .map(|p| p.connect_timeout_ms)
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(10), Duration::from_millis);
    Ok(Cluster {
        port: u16::try_from(c.port).unwrap_or(0),
        metric_labels: crate::telemetry::service_labels(&c.service_hostname),
        name: c.name,
        service_hostname: c.service_hostname,
        subset: c.subset,
        endpoints,
        lb,
        tls,
        connect_timeout,
        cursor: AtomicUsize::new(0),
    })
}

fn convert_route(
    r: pb::HttpRoute,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<Route, InvalidConfig> {
    let name = r.name;
    let cluster = |c: &str| {
        clusters
            .get(c)
            .cloned()
            .ok_or_else(|| InvalidConfig::UnknownCluster {
                route: name.clone(),
                cluster: c.to_owned(),
            })
    };
    let action = match r.redirect {
        Some(rd) => Action::Redirect(Redirect {
            uri: non_empty(rd.uri),
            authority: non_empty(rd.authority),
            port: u16::try_from(rd.port).ok().filter(|p| *p != 0),
            scheme: non_empty(rd.scheme),
            code: u16::try_from(rd.code)
                .ok()
                .filter(|c| (300..400).contains(c))
                .unwrap_or(301),
        }),
        None => {
            let mut destinations = Vec::with_capacity(r.destinations.len());
            for d in r.destinations {
                // Weight 0 is never chosen (Envoy drops such clusters from the weighted list).
                if d.weight == 0 {
                    continue;
                }
                destinations.push(WeightedCluster {
                    cluster: cluster(&d.cluster)?,
                    weight: d.weight,
                    request_headers: header_ops(d.request_headers, &name)?,
                    response_headers: header_ops(d.response_headers, &name)?,
                });
            }
            let total_weight = destinations
                .iter()
                .try_fold(0u32, |acc, d| acc.checked_add(d.weight))
                .ok_or(InvalidConfig::Route {
                    route: name.clone(),
                    reason: "weights overflow",
                })?;
            if total_weight == 0 {
                return Err(InvalidConfig::Route {
                    route: name,
                    reason: "no destination with a weight above 0 and no redirect",
                });
            }
            Action::Forward {
                destinations,
                total_weight,
            }
        }
    };
    let mut mirrors = Vec::with_capacity(r.mirrors.len());
    for m in r.mirrors {
        if !(0.0..=100.0).contains(&m.percent) {
            return Err(InvalidConfig::Percent {
                route: name,
                what: "mirror",
                value: m.percent,
            });
        }
        mirrors.push(MirrorPolicy {
            cluster: cluster(&m.cluster)?,
            percent: m.percent,
        });
    }
    let matches = r
        .matches
        .into_iter()
        .map(|m| convert_match(m, &name))
        .collect::<Result<_, _>>()?;
    let fault = match r.fault {
        Some(f) => {
            for (what, v) in [("delay", f.delay_percent), ("abort", f.abort_percent)] {
                if !(0.0..=100.0).contains(&v) {
                    return Err(InvalidConfig::Percent {
                        route: name,
                        what,
                        value: v,
                    });
                }
            }
            Some(Fault {
                delay: (f.delay_ms > 0)
                    .then(|| (Duration::from_millis(f.delay_ms), f.delay_percent)),
                abort: u16::try_from(f.abort_status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .map(|s| (s, f.abort_percent)),
            })
        }
        None => None,
    };
    Ok(Route {
        request_headers: header_ops(r.request_headers, &name)?,
        response_headers: header_ops(r.response_headers, &name)?,
        rewrite: r.rewrite.map(|rw| Rewrite {
            uri: non_empty(rw.uri),
            authority: non_empty(rw.authority),
        }),
        timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
        retries: r.retries.filter(|p| p.attempts > 0).map(|p| RetryPolicy {
            attempts: p.attempts,
            per_try_timeout: (p.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(p.per_try_timeout_ms)),
            retry_on: p.retry_on,
        }),
        fault,
        name,
        matches,
        action,
        mirrors,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn header_name(name: &str, route: &str) -> Result<HeaderName, InvalidConfig> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
        InvalidConfig::HeaderName {
            route: route.to_owned(),
            name: name.to_owned(),
        }
    })
}

fn header_ops(ops: Option<pb::HeaderOps>, route: &str) -> Result<HeaderOps, InvalidConfig> {
    let Some(ops) = ops else {
        return Ok(HeaderOps::default());
    };
    let value = |name: &str, v: &str| {
        http::HeaderValue::from_str(v).map_err(|_| InvalidConfig::HeaderName {
            route: route.to_owned(),
            name: format!("{name} (value {v:?})"),
        })
    };
    let mut out = HeaderOps::default();
    let mut set: Vec<_> = ops.set.into_iter().collect();
    set.sort();
    for (k, v) in set {
        out.set.push((header_name(&k, route)?, value(&k, &v)?));
    }
    let mut add: Vec<_> = ops.add.into_iter().collect();
    add.sort();
    for (k, v) in add {
        out.add.push((header_name(&k, route)?, value(&k, &v)?));
    }
    for k in ops.remove {
        out.remove.push(header_name(&k, route)?);
    }
    Ok(out)
}

fn string_match(m: pb::StringMatch, route: &str) -> Result<Option<StringMatch>, InvalidConfig> {
    Ok(match m.kind {
        Some(pb::string_match::Kind::Exact(s)) => Some(StringMatch::Exact(s)),
        Some(pb::string_match::Kind::Prefix(s)) => Some(StringMatch::Prefix(s)),
        Some(pb::string_match::Kind::Regex(s)) => {
            // Anchored: Istio's regex matches the whole value (RE2 FullMatch).
            let anchored = format!("^(?:{s})$");
            Some(StringMatch::Regex(Regex::new(&anchored).map_err(|e| {
                InvalidConfig::Regex {
                    route: route.to_owned(),
                    regex: s.clone(),
                    reason: e.to_string(),
                }
            })?))
        }
        None => None,
    })
}

fn convert_match(m: pb::HttpMatch, route: &str) -> Result<Match, InvalidConfig> {
    let mut out = Match {
        ignore_uri_case: m.ignore_uri_case,
        ..Match::default()
    };
    if let Some(uri) = m.uri {
        out.uri = string_match(uri, route)?;
        if m.ignore_uri_case
            && let Some(StringMatch::Regex(r)) = &out.uri
        {
            let ci = format!("(?i){}", r.as_str());
            out.uri = Some(StringMatch::Regex(Regex::new(&ci).map_err(|e| {
                InvalidConfig::Regex {
                    route: route.to_owned(),
                    regex: ci.clone(),
                    reason: e.to_string(),
                }
            })?));
        }
    }
    if let Some(method) = m.method {
        out.method = string_match(method, route)?;
    }
    let mut headers: Vec<_> = m.headers.into_iter().collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, sm) in headers {
        if let Some(sm) = string_match(sm, route)? {
            out.headers.push((header_name(&name, route)?, sm));
        }
    }
    let mut query: Vec<_> = m.query_params.into_iter().collect();
    query.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, sm) in query {
        if let Some(sm) = string_match(sm, route)? {
            out.query_params.push((name, sm));
        }
    }
    for name in m.without_headers {
        out.without_headers.push(header_name(&name, route)?);
    }
    Ok(out)
}

// === matching ===

/// What route matching looks at.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a http::HeaderMap,
}

impl Match {
    /// Whether the request satisfies every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(uri) = &self.uri {
            let ok = if self.ignore_uri_case {
                uri.matches_ignore_case(req.path)
            } else {
                uri.matches(req.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method
            && !m.matches(req.method)
        {
            return false;
        }
        for (name, m) in &self.headers {
            // Every value is checked, so `X-Role: user` plus `X-Role: admin` cannot slip past an exact
            // match on one of them (Istio CVE-2026-26308 class): all values must match.
            let mut values = req.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return false;
            }
            for v in values {
                match v.to_str() {
                    Ok(v) if m.matches(v) => {}
                    _ => return false,
                }
            }
        }
        for name in &self.without_headers {
            if req.headers.contains_key(name) {
                return false;
            }
        }
        for (name, m) in &self.query_params {
            let found = req.query.and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then_some(v)
                })
            });
            match found {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

impl ServicePort {
    /// The first route any of whose matches holds (a route without matches holds for everything).
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}

impl Route {
    /// Picks a destination by weight with `roll` uniform in `0..total_weight`.
    pub fn pick(&self, roll: u32) -> Option<&WeightedCluster> {
        let Action::Forward {
            destinations,
            total_weight,
        } = &self.action
        else {
            return None;
        };
        let mut r = roll % (*total_weight).max(1);
        for d in destinations {
            if r < d.weight {
                return Some(d);
            }
            r -= d.weight;
        }
        destinations.last()
    }
}

#[cfg(test)]
mod tests;
