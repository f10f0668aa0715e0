//! pilot's push → the route model, validated: anything the model cannot represent refuses the whole
//! push (NACK) with what and where.

use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use regex::Regex;
use weft_ca::SpiffeId;
use weft_proto::discovery as pb;

use super::*;

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
    /// A retry policy names a condition the sidecar does not know.
    #[error("route {route}: {reason}")]
    Retry {
        /// Route name.
        route: String,
        /// What is wrong.
        reason: retry::RetryOnError,
    },
    /// A mirror's shadow-diff settings are not usable.
    #[error("route {route}: mirror compare: {reason}")]
    MirrorCompare {
        /// Route name.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// Something required is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
}

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
        let mut cluster_list = Vec::with_capacity(config.clusters.len());
        for c in config.clusters {
            let cluster = Arc::new(convert_cluster(c, cluster_list.len())?);
            clusters.insert(cluster.name.clone(), cluster.clone());
            cluster_list.push(cluster);
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
                index: si,
                name: s.name,
                namespace: s.namespace,
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
            cluster_list,
            inbound: InboundPolicy {
                mode: mtls_mode(inbound.mode),
                port_modes,
            },
            tracing: Tracing {
                sampling_percent: tracing.sampling_percent,
                service_name: (!tracing.service_name.is_empty())
                    .then(|| Arc::from(tracing.service_name.as_str())),
            },
            peers: config
                .peers
                .into_iter()
                .map(convert_peer)
                .collect::<Result<_, _>>()?,
        })
    }
}

fn convert_peer(p: pb::Peer) -> Result<Peer, InvalidConfig> {
    let addresses = p
        .addresses
        .iter()
        .map(|a| {
            a.parse::<IpAddr>().map_err(|_| InvalidConfig::Address {
                what: format!("peer {} address", p.workload),
                value: a.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    let label = |k: &str| p.labels.get(k).cloned().unwrap_or_default();
    let get = |k: &str| p.labels.get(k).map(String::as_str);
    Ok(Peer {
        app: label("app"),
        version: label("version"),
        canonical_service: crate::telemetry::canonical_service(get).to_owned(),
        canonical_revision: crate::telemetry::canonical_revision(get).to_owned(),
        identity: p.identity,
        workload: p.workload,
        namespace: p.namespace,
        addresses,
    })
}

fn mtls_mode(v: i32) -> MtlsMode {
    match pb::MtlsMode::try_from(v) {
        Ok(pb::MtlsMode::Strict) => MtlsMode::Strict,
        Ok(pb::MtlsMode::Disable) => MtlsMode::Disable,
        // Unknown values from a newer pilot fail safe to the mesh default, which still accepts mTLS.
        _ => MtlsMode::Permissive,
    }
}

fn convert_cluster(c: pb::Cluster, index: usize) -> Result<Cluster, InvalidConfig> {
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
        let label = |k: &str| e.labels.get(k).cloned().unwrap_or_default();
        let get = |k: &str| e.labels.get(k).map(String::as_str);
        let canonical_service = crate::telemetry::canonical_service(get).to_owned();
        let canonical_revision = crate::telemetry::canonical_revision(get).to_owned();
        endpoints.push(Endpoint {
            dial: SocketAddr::new(ip, dial_port),
            app_port: u16::try_from(e.port).unwrap_or(dial_port),
            identity,
            app: label("app"),
            version: label("version"),
            canonical_service,
            canonical_revision,
            workload: e.workload,
            workload_name: e.workload_name,
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
    let pool = c.connection_pool.as_ref();
    Ok(Cluster {
        outlier: c
            .outlier_detection
            .as_ref()
            .and_then(super::policy::OutlierPolicy::from_pb),
        limits: pool
            .map(super::policy::PoolLimits::from_pb)
            .unwrap_or_default(),
        max_requests_per_connection: pool.map_or(0, |p| p.max_requests_per_connection),
        idle_timeout: pool
            .map(|p| p.idle_timeout_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        port: u16::try_from(c.port).unwrap_or(0),
        index,
        name: c.name,
        service_hostname: c.service_hostname,
        subset: c.subset,
        endpoints,
        lb,
        tls,
        connect_timeout,
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
        let compare = match m.compare {
            Some(c) => Some(Arc::new(convert_compare(c).map_err(|reason| {
                InvalidConfig::MirrorCompare {
                    route: name.clone(),
                    reason,
                }
            })?)),
            None => None,
        };
        mirrors.push(MirrorPolicy {
            cluster: cluster(&m.cluster)?,
            percent: m.percent,
            compare,
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
        retries: match r.retries.as_ref().map(retry::Policy::from_pb) {
            None => None,
            Some(Ok(policy)) => policy,
            Some(Err(e)) => {
                return Err(InvalidConfig::Retry {
                    route: name,
                    reason: e,
                });
            }
        },
        fault,
        name,
        matches,
        action,
        mirrors,
    })
}

/// A mirror's compare settings: at least one aspect, lowercase header names (pilot lowercases
/// them; anything else means a pilot bug or a hand-made push), JSON paths of the supported subset.
fn convert_compare(c: pb::MirrorCompare) -> Result<compare::Compare, String> {
    if !(c.status || c.headers || c.body) {
        return Err("nothing to compare (none of status, headers, body)".into());
    }
    let mut ignore_headers = Vec::with_capacity(c.ignore_headers.len());
    for h in c.ignore_headers {
        if h.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("ignored header {h:?} is not lowercase"));
        }
        ignore_headers.push(
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("invalid ignored header {h:?}"))?,
        );
    }
    let ignore_json = c
        .ignore_json
        .iter()
        .map(|p| compare::JsonPath::parse(p).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(compare::Compare {
        status: c.status,
        headers: c.headers,
        body: c.body,
        ignore_headers,
        ignore_json,
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
    // A header or query match without a kind (`{}` in the VirtualService) asks only that the
    // header or parameter be present (Istio's semantics): never dropped.
    for (name, sm) in headers {
        let sm = string_match(sm, route)?.unwrap_or(StringMatch::Present);
        out.headers.push((header_name(&name, route)?, sm));
    }
    let mut query: Vec<_> = m.query_params.into_iter().collect();
    query.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, sm) in query {
        let sm = string_match(sm, route)?.unwrap_or(StringMatch::Present);
        out.query_params.push((name, sm));
    }
    for name in m.without_headers {
        out.without_headers.push(header_name(&name, route)?);
    }
    Ok(out)
}
