//! Clusters: one per Service port and per DestinationRule subset, with endpoints and the merged
//! traffic policy; plus an empty cluster for every route target that does not exist.

use std::collections::{BTreeMap, BTreeSet};

use weft_proto::discovery as pb;

use crate::destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRuleSpec, LoadBalancerSettings,
    OutlierDetection, SimpleLb, Subset, TlsMode, TrafficPolicy,
};
use crate::duration::Duration;
use crate::peer_authentication::MtlsMode;
use crate::service::{IntOrString, ServicePort};

use super::Workload;
use super::catalog::{Catalog, ServiceView, labels_match};
use super::inbound;

/// Names one cluster: `outbound|<port>|<subset>|<host>` (Istio's `BuildSubsetKey`, §1.3).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ClusterId {
    pub(super) host: String,
    pub(super) port: u32,
    /// Empty for the Service's default cluster.
    pub(super) subset: String,
}

impl ClusterId {
    pub(super) fn name(&self) -> String {
        format!("outbound|{}|{}|{}", self.port, self.subset, self.host)
    }
}

/// Every cluster of the view, sorted by name: for each Service port the default cluster and one
/// per subset of the host's DestinationRule (Istio generates subset clusters whether or not a
/// route uses them), then any cluster in `wanted` (what routes and mirrors reference) that does
/// not exist yet. Those stand for Istio's missing clusters: a subset no DestinationRule defines
/// (§2.6, istio/istio#15226), a port the Service lacks, a host without a Service. They are emitted
/// with no endpoints so the sidecar answers 503 for them, as Envoy does (`NC`), instead of NACKing
/// a config that refers to an unknown cluster.
pub(super) fn build_all(catalog: &Catalog<'_>, wanted: &BTreeSet<ClusterId>) -> Vec<pb::Cluster> {
    let mut clusters: BTreeMap<String, pb::Cluster> = BTreeMap::new();
    for svc in catalog.services() {
        let rule = catalog
            .destination_rule_for(&svc.fqdn, svc.namespace)
            .map(|dr| dr.spec);
        for port in &svc.spec.ports {
            let Ok(number) = u32::try_from(port.port) else {
                continue;
            };
            let id = ClusterId {
                host: svc.fqdn.clone(),
                port: number,
                subset: String::new(),
            };
            let cluster = build(catalog, &id, Some((svc, port)), rule, None);
            clusters.insert(id.name(), cluster);
            for subset in rule.map(|r| r.subsets.as_slice()).unwrap_or_default() {
                let id = ClusterId {
                    subset: subset.name.clone(),
                    ..id.clone()
                };
                let cluster = build(catalog, &id, Some((svc, port)), rule, Some(subset));
                clusters.insert(id.name(), cluster);
            }
        }
    }
    for id in wanted {
        let name = id.name();
        if clusters.contains_key(&name) {
            continue;
        }
        let namespace = catalog.service(&id.host).map_or("", |svc| svc.namespace);
        let rule = catalog
            .destination_rule_for(&id.host, namespace)
            .map(|dr| dr.spec);
        clusters.insert(name, build(catalog, id, None, rule, None));
    }
    clusters.into_values().collect()
}

/// One cluster. `source` gives the Service port whose selected workloads are the endpoints (none
/// for a cluster that does not exist in Istio); `subset` narrows them by its labels.
fn build(
    catalog: &Catalog<'_>,
    id: &ClusterId,
    source: Option<(&ServiceView<'_>, &ServicePort)>,
    rule: Option<&DestinationRuleSpec>,
    subset: Option<&Subset>,
) -> pb::Cluster {
    let policy = Policy::merged(rule, id.port, subset);
    let tls_mode = tls_mode(policy.tls);
    let endpoints = match source {
        Some((svc, port)) => endpoints(catalog, svc, port, subset, tls_mode),
        None => Vec::new(),
    };
    pb::Cluster {
        name: id.name(),
        service_hostname: id.host.clone(),
        port: id.port,
        subset: id.subset.clone(),
        endpoints,
        lb_policy: lb_policy(policy.load_balancer) as i32,
        tls_mode: tls_mode as i32,
        connection_pool: policy.connection_pool.map(connection_pool),
        outlier_detection: policy.outlier_detection.map(outlier_detection),
    }
}

/// The endpoints of a Service port: workloads the Service selects (same namespace, selector
/// labels), narrowed to the subset's labels, sorted by address, port and workload.
fn endpoints(
    catalog: &Catalog<'_>,
    svc: &ServiceView<'_>,
    port: &ServicePort,
    subset: Option<&Subset>,
    tls_mode: pb::TlsMode,
) -> Vec<pb::Endpoint> {
    let trust_domain = &catalog.mesh().trust_domain;
    let mut endpoints: Vec<pb::Endpoint> = catalog
        .selected_by(svc)
        .into_iter()
        .filter(|w| subset.is_none_or(|s| labels_match(&s.labels, &w.labels)))
        .map(|w| {
            let target = endpoint_port(port, w);
            // Auto mTLS (§2.2, and Istio's endpoint builder `mtlsChecker`): an endpoint whose own
            // PeerAuthentication DISABLEs mTLS on that port is sent plaintext, which the model
            // expresses as "no identity" (what it says for an endpoint without a sidecar).
            // A pod without a sidecar is plaintext under auto mTLS too (an explicit ISTIO_MUTUAL
            // to it fails the handshake, as with Istio).
            let plaintext = tls_mode == pb::TlsMode::Auto
                && (w.no_sidecar || inbound::peer_mode(catalog, w, target) == MtlsMode::Disable);
            pb::Endpoint {
                address: w.ip.clone(),
                port: target,
                dial_port: if w.captured || w.no_sidecar {
                    target
                } else {
                    w.inbound_port
                },
                identity: if plaintext {
                    String::new()
                } else {
                    w.identity(trust_domain)
                },
                labels: w
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                workload: w.key(),
                workload_name: w.owner().to_string(),
            }
        })
        .collect();
    endpoints
        .sort_by(|a, b| (&a.address, a.port, &a.workload).cmp(&(&b.address, b.port, &b.workload)));
    endpoints
}

/// The Service's target port when it is a number (`targetPort` absent = `port`, as Kubernetes).
pub(super) fn numeric_target_port(port: &ServicePort) -> Option<u32> {
    match port.target() {
        IntOrString::Int(n) => u32::try_from(n).ok(),
        IntOrString::String(_) => None,
    }
}

/// The application port on one workload. A named `targetPort` would be looked up among the pod's
/// named container ports, which the registry does not know (the sidecar reports numbers only):
/// weft uses the workload's only port when it declares exactly one, else the Service port.
fn endpoint_port(port: &ServicePort, workload: &Workload) -> u32 {
    if let Some(n) = numeric_target_port(port) {
        return n;
    }
    match workload.ports.as_slice() {
        [only] => *only,
        _ => u32::try_from(port.port).unwrap_or(0),
    }
}

// === traffic policy ===

/// The four policy parts a cluster takes from a DestinationRule.
#[derive(Clone, Copy, Debug, Default)]
struct Policy<'a> {
    load_balancer: Option<&'a LoadBalancerSettings>,
    connection_pool: Option<&'a ConnectionPoolSettings>,
    outlier_detection: Option<&'a OutlierDetection>,
    tls: Option<&'a ClientTlsSettings>,
}

impl<'a> Policy<'a> {
    /// Istio's merge (`MergeTrafficPolicy`, §2.1): the rule's `trafficPolicy`, replaced by its
    /// `portLevelSettings` entry for this port if any; then each part the subset's policy sets
    /// overrides it, and the subset's own port-level entry replaces all four. A port-level entry
    /// does not inherit: a part it leaves out falls back to the default, not to the level above.
    fn merged(
        rule: Option<&'a DestinationRuleSpec>,
        port: u32,
        subset: Option<&'a Subset>,
    ) -> Self {
        let mut policy = rule
            .and_then(|r| r.traffic_policy.as_ref())
            .map(|tp| Self::for_port(tp, port))
            .unwrap_or_default();
        if let Some(tp) = subset.and_then(|s| s.traffic_policy.as_ref()) {
            let top = Self::top_level(tp);
            policy = Self {
                load_balancer: top.load_balancer.or(policy.load_balancer),
                connection_pool: top.connection_pool.or(policy.connection_pool),
                outlier_detection: top.outlier_detection.or(policy.outlier_detection),
                tls: top.tls.or(policy.tls),
            };
            if let Some(port_policy) = Self::port_level(tp, port) {
                policy = port_policy;
            }
        }
        policy
    }

    fn for_port(tp: &'a TrafficPolicy, port: u32) -> Self {
        Self::port_level(tp, port).unwrap_or_else(|| Self::top_level(tp))
    }

    fn top_level(tp: &'a TrafficPolicy) -> Self {
        Self {
            load_balancer: tp.load_balancer.as_ref(),
            connection_pool: tp.connection_pool.as_ref(),
            outlier_detection: tp.outlier_detection.as_ref(),
            tls: tp.tls.as_ref(),
        }
    }

    fn port_level(tp: &'a TrafficPolicy, port: u32) -> Option<Self> {
        tp.port_level_settings
            .iter()
            .find(|p| {
                p.port
                    .as_ref()
                    .and_then(|s| s.number)
                    .is_some_and(|n| n == i64::from(port))
            })
            .map(|p| Self {
                load_balancer: p.load_balancer.as_ref(),
                connection_pool: p.connection_pool.as_ref(),
                outlier_detection: p.outlier_detection.as_ref(),
                tls: p.tls.as_ref(),
            })
    }
}

/// `loadBalancer.simple` (§2.3): unset and `LEAST_CONN` are LEAST_REQUEST (Istio's default and
/// the deprecated alias).
fn lb_policy(lb: Option<&LoadBalancerSettings>) -> pb::LbPolicy {
    match lb.and_then(|lb| lb.simple) {
        None | Some(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest) => {
            pb::LbPolicy::LeastRequest
        }
        Some(SimpleLb::RoundRobin) => pb::LbPolicy::RoundRobin,
        Some(SimpleLb::Random) => pb::LbPolicy::Random,
        Some(SimpleLb::Passthrough) => pb::LbPolicy::Passthrough,
    }
}

/// `tls.mode` (§2.2): no `tls` block means auto mTLS; any `tls` block turns auto mTLS off and its
/// mode applies (an absent mode is the API default, DISABLE). SIMPLE and MUTUAL (TLS origination
/// with user certificates) have no counterpart in the data-plane model yet and validation refuses
/// them; one stored before that rule becomes DISABLE (the sidecar sends what the application sent).
fn tls_mode(tls: Option<&ClientTlsSettings>) -> pb::TlsMode {
    match tls {
        None => pb::TlsMode::Auto,
        Some(tls) => match tls.mode {
            Some(TlsMode::IstioMutual) => pb::TlsMode::IstioMutual,
            None | Some(TlsMode::Disable | TlsMode::Simple | TlsMode::Mutual) => {
                pb::TlsMode::Disable
            }
        },
    }
}

/// `connectionPool` (§2.4). 0 in the model is "default", as Istio treats values that are not > 0.
/// The idle timeout is `http.idleTimeout`, else `tcp.idleTimeout`.
fn connection_pool(pool: &ConnectionPoolSettings) -> pb::ConnectionPool {
    let tcp = pool.tcp.as_ref();
    let http = pool.http.as_ref();
    pb::ConnectionPool {
        max_connections: count(tcp.and_then(|t| t.max_connections)),
        connect_timeout_ms: millis(tcp.and_then(|t| t.connect_timeout.as_ref())),
        max_pending_requests: count(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: count(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: count(http.and_then(|h| h.max_requests_per_connection)),
        idle_timeout_ms: millis(
            http.and_then(|h| h.idle_timeout.as_ref())
                .or_else(|| tcp.and_then(|t| t.idle_timeout.as_ref())),
        ),
        max_retries: count(http.and_then(|h| h.max_retries)),
    }
}

/// `outlierDetection` (§2.5): present means on, with Envoy's defaults filled in for what is left out
/// (5 consecutive 5xx, 10s interval, 30s base ejection, 10% max ejected; gateway errors off; 5
/// consecutive local-origin failures when they are split). An explicit `consecutive5xxErrors: 0`
/// turns 5xx ejection off. `minHealthPercent` absent is 0, as Istio sets it (panic mode off).
fn outlier_detection(outlier: &OutlierDetection) -> pb::OutlierDetection {
    pb::OutlierDetection {
        consecutive_5xx: outlier.consecutive_5xx_errors.map_or(5, |n| count(Some(n))),
        interval_ms: outlier
            .interval
            .as_ref()
            .map_or(10_000, |d| millis(Some(d))),
        base_ejection_time_ms: outlier
            .base_ejection_time
            .as_ref()
            .map_or(30_000, |d| millis(Some(d))),
        max_ejection_percent: outlier.max_ejection_percent.map_or(10, |n| count(Some(n))),
        consecutive_gateway_errors: count(outlier.consecutive_gateway_errors),
        split_external_local_origin_errors: outlier.split_external_local_origin_errors
            == Some(true),
        consecutive_local_origin_failures: if outlier.split_external_local_origin_errors
            == Some(true)
        {
            outlier
                .consecutive_local_origin_failures
                .map_or(5, |n| count(Some(n)))
        } else {
            0
        },
        min_health_percent: count(outlier.min_health_percent),
    }
}

/// A non-negative count as `u32` (negative is rejected by validation; saturates if huge).
fn count(value: Option<i64>) -> u32 {
    value.map_or(0, |n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// A duration in whole milliseconds, 0 when absent.
pub(super) fn millis(value: Option<&Duration>) -> u64 {
    value.map_or(0, |d| {
        u64::try_from(d.get().as_millis()).unwrap_or(u64::MAX)
    })
}
