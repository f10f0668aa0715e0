//! HTTP routes per Service port, compiled from the host's VirtualService (§1), or the default
//! catch-all route when there is none.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regex::Regex;
use weft_proto::discovery as pb;
use weft_proto::discovery::string_match::Kind as PbMatch;

use crate::host;
use crate::virtual_service::{
    DerivePort, Destination, HeaderOperations, HttpFaultInjection, HttpMatchRequest, HttpRedirect,
    HttpRetry, HttpRoute, StringMatch, StringMatchKind, VirtualServiceSpec,
};

use super::catalog::{Catalog, RuleView, ServiceView, labels_match};
use super::cluster::{ClusterId, millis};

/// Route name of the catch-all route pilot emits when no VirtualService routes a port.
pub(super) const DEFAULT_ROUTE: &str = "default";

/// The scheme of every request a sidecar's outbound listener routes: applications speak plain
/// HTTP to their sidecar (TLS from the application is opaque TCP, never routed).
const OUTBOUND_SCHEME: &str = "http";

/// Istio's default retry policy for outbound routes without `retries` (§1.5, `retry.DefaultPolicy`):
/// 2 retries on these conditions, and `retriable-status-codes` with 503 as its one code. In the
/// model, numeric entries of `retry_on` are the retriable status codes.
const DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
    "503",
];
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// The routes of one Service port. A port whose protocol is `tcp` gets only the default route
/// (its first destination is where opaque connections go; VirtualService `tcp` routes are not
/// implemented). So does a port the VirtualService yields no rule for, e.g. when every rule is
/// limited to another port or to other source workloads: Istio then leaves the host out of that
/// VirtualService's virtual host and the Service keeps its default route.
pub(super) fn for_port(
    catalog: &Catalog<'_>,
    svc: &ServiceView<'_>,
    port: u32,
    protocol: &str,
    wanted: &mut BTreeSet<ClusterId>,
) -> Vec<pb::HttpRoute> {
    if protocol != "tcp"
        && let Some(vs) = catalog.virtual_service_for(&svc.fqdn, svc.namespace)
    {
        let routes: Vec<pb::HttpRoute> = vs
            .spec
            .http
            .iter()
            .enumerate()
            .filter_map(|(index, rule)| compile_rule(catalog, vs, index, rule, port, wanted))
            .collect();
        if !routes.is_empty() {
            return routes;
        }
    }
    let default = ClusterId {
        host: svc.fqdn.clone(),
        port,
        subset: String::new(),
    };
    let mut route = default_route(default.name());
    if protocol == "tcp" {
        // Opaque TCP is forwarded, never retried.
        route.retries = None;
    }
    vec![route]
}

/// The compare `weft.io/mirror-compare*` asks for, with pilot's default ignored headers added;
/// `None` without the annotation (or with an invalid one stored before validation refused it).
fn mirror_compare(annotations: &BTreeMap<String, String>) -> Option<pb::MirrorCompare> {
    let compare = crate::virtual_service::mirror_compare::read(annotations).compare?;
    Some(pb::MirrorCompare {
        status: compare.status,
        headers: compare.headers,
        body: compare.body,
        ignore_headers: compare.all_ignored_headers(),
        ignore_json: compare.ignore_json,
    })
}

/// Istio's `BuildDefaultHTTPOutboundRoute`: match everything, one destination, the default retry
/// policy, no timeout.
fn default_route(cluster: String) -> pb::HttpRoute {
    pb::HttpRoute {
        name: DEFAULT_ROUTE.to_string(),
        destinations: vec![pb::WeightedCluster {
            cluster,
            weight: 100,
            ..Default::default()
        }],
        retries: retries(None),
        ..Default::default()
    }
}

/// One `http[]` rule for one port, or `None` when it cannot apply to this sidecar on this port.
fn compile_rule(
    catalog: &Catalog<'_>,
    vs: &RuleView<'_, VirtualServiceSpec>,
    index: usize,
    rule: &HttpRoute,
    port: u32,
    wanted: &mut BTreeSet<ClusterId>,
) -> Option<pb::HttpRoute> {
    let matches = if rule.matches.is_empty() {
        Vec::new()
    } else {
        let kept: Vec<pb::HttpMatch> = rule
            .matches
            .iter()
            .filter(|m| applies_here(catalog, m, port))
            .filter_map(compile_match)
            .collect();
        if kept.is_empty() {
            return None;
        }
        kept
    };
    let mut target = |dest: &Destination| {
        let id = destination_cluster(catalog, dest, vs.namespace, port);
        let name = id.name();
        wanted.insert(id);
        name
    };

    // Weights (§1.3, `applyHTTPRouteDestination`): a single destination takes all traffic whatever
    // its weight; otherwise weights are relative and 0-weight entries are dropped, as Istio drops
    // them from Envoy's weighted clusters.
    let single = rule.route.len() == 1;
    let destinations = rule
        .route
        .iter()
        .filter_map(|d| {
            let weight = if single {
                100
            } else {
                u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0)
            };
            (weight > 0).then(|| pb::WeightedCluster {
                cluster: target(&d.destination),
                weight,
                request_headers: d
                    .headers
                    .as_ref()
                    .and_then(|h| h.request.as_ref())
                    .map(header_ops),
                response_headers: d
                    .headers
                    .as_ref()
                    .and_then(|h| h.response.as_ref())
                    .map(header_ops),
            })
        })
        .collect();

    // Mirrors (§1.4, `MirrorPercent`/`MirrorPercentByPolicy`): no percentage = 100, the deprecated
    // integer `mirrorPercent` when `mirrorPercentage` is absent, and 0 = no mirror at all.
    // Shadow-diff: every mirror of every rule of the VirtualService gets the same compare.
    let compare = mirror_compare(vs.annotations);
    let mut mirrors = Vec::new();
    if let Some(mirror) = &rule.mirror {
        let percent = rule
            .mirror_percentage
            .as_ref()
            .map(|p| p.value)
            .or(rule.mirror_percent.map(|p| p as f64))
            .unwrap_or(100.0);
        if percent > 0.0 {
            mirrors.push(pb::Mirror {
                cluster: target(mirror),
                percent,
                compare: compare.clone(),
            });
        }
    }
    for policy in &rule.mirrors {
        let Some(destination) = &policy.destination else {
            continue;
        };
        let percent = policy.percentage.as_ref().map_or(100.0, |p| p.value);
        if percent > 0.0 {
            mirrors.push(pb::Mirror {
                cluster: target(destination),
                percent,
                compare: compare.clone(),
            });
        }
    }

    let request_ops = rule.headers.as_ref().and_then(|h| h.request.as_ref());
    let (request_headers, header_authority) = match request_ops {
        Some(ops) => {
            let (ops, authority) = split_authority(ops);
            (Some(ops), authority)
        }
        None => (None, None),
    };
    let rewrite = rule.rewrite.as_ref().and_then(|r| {
        let authority = r.authority.clone().or(header_authority.clone());
        (r.uri.is_some() || authority.is_some()).then(|| pb::Rewrite {
            uri: r.uri.clone().unwrap_or_default(),
            authority: authority.unwrap_or_default(),
        })
    });
    let rewrite = rewrite.or_else(|| {
        header_authority.map(|authority| pb::Rewrite {
            authority,
            ..Default::default()
        })
    });

    let label = rule.name.clone().unwrap_or_else(|| index.to_string());
    Some(pb::HttpRoute {
        name: format!("{}/{}/{label}", vs.namespace, vs.name),
        matches,
        destinations,
        redirect: rule.redirect.as_ref().map(|r| redirect(r, port)),
        mirrors,
        // No timeout when absent (§1.5: Istio writes `timeout: 0s`).
        timeout_ms: millis(rule.timeout.as_ref()),
        // A redirect is answered by the sidecar itself: nothing to retry.
        retries: if rule.redirect.is_some() {
            None
        } else {
            retries(rule.retries.as_ref())
        },
        fault: rule.fault.as_ref().map(fault),
        request_headers,
        response_headers: rule
            .headers
            .as_ref()
            .and_then(|h| h.response.as_ref())
            .map(header_ops),
        rewrite,
    })
}

/// Whether one match block can apply to this sidecar on this port. `port` keeps it to that Service
/// port's route list. `sourceLabels` and `sourceNamespace` select client workloads (§1.2), so they
/// are evaluated here against the node. `scheme` is evaluated against `http`, the only scheme an
/// outbound sidecar routes.
fn applies_here(catalog: &Catalog<'_>, m: &HttpMatchRequest, port: u32) -> bool {
    let node = catalog.node();
    let port_ok = m.port.is_none_or(|p| p == i64::from(port));
    let labels_ok = labels_match(&m.source_labels, &node.labels);
    let namespace_ok = m
        .source_namespace
        .as_deref()
        .is_none_or(|ns| ns == node.namespace);
    let scheme_ok = m
        .scheme
        .as_ref()
        .is_none_or(|s| string_matches(s, OUTBOUND_SCHEME));
    port_ok && labels_ok && namespace_ok && scheme_ok
}

/// A match block in the model. `authority` becomes a header match on `:authority`, as Istio
/// translates it for Envoy (`TranslateRouteMatch`); the `headers` keys `uri`, `scheme`, `method` and
/// `authority` are ignored as in Istio. `withoutHeaders` entries (presence only: validation refuses
/// one with a value, "header absent or different", which the model cannot express) become
/// `without_headers`. Should one with a value arrive anyway (an object stored before validation
/// refused it), the block is left out: it never matches rather than matching too much.
fn compile_match(m: &HttpMatchRequest) -> Option<pb::HttpMatch> {
    let mut without_headers = Vec::new();
    for (name, condition) in &m.without_headers {
        if condition.kind() != StringMatchKind::Present {
            return None;
        }
        without_headers.push(name.clone());
    }
    let mut headers: HashMap<String, pb::StringMatch> = m
        .headers
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "uri" | "scheme" | "method" | "authority"))
        .map(|(name, condition)| (name.clone(), string_match(condition)))
        .collect();
    if let Some(authority) = &m.authority {
        headers.insert(":authority".to_string(), string_match(authority));
    }
    Some(pb::HttpMatch {
        uri: m.uri.as_ref().map(string_match),
        headers,
        query_params: m
            .query_params
            .iter()
            .map(|(name, condition)| (name.clone(), string_match(condition)))
            .collect(),
        method: m.method.as_ref().map(string_match),
        port: m.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
        source_labels: m
            .source_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        without_headers,
    })
}

/// `exact`/`prefix`/`regex`; none set (a header or query parameter `{}`) leaves `kind` unset, which
/// means "present".
fn string_match(m: &StringMatch) -> pb::StringMatch {
    let kind = match m.kind() {
        StringMatchKind::Exact(v) => Some(PbMatch::Exact(v.to_string())),
        StringMatchKind::Prefix(v) => Some(PbMatch::Prefix(v.to_string())),
        StringMatchKind::Regex(v) => Some(PbMatch::Regex(v.to_string())),
        StringMatchKind::Present => None,
    };
    pb::StringMatch { kind }
}

/// Evaluates a string match against a known value (regexes are whole-value, as RE2 in Envoy).
fn string_matches(m: &StringMatch, value: &str) -> bool {
    match m.kind() {
        StringMatchKind::Exact(v) => v == value,
        StringMatchKind::Prefix(v) => value.starts_with(v),
        StringMatchKind::Regex(v) => {
            Regex::new(&format!("^(?:{v})$")).is_ok_and(|re| re.is_match(value))
        }
        StringMatchKind::Present => true,
    }
}

/// The cluster a destination names (`GetDestinationCluster`, §1.3): the host expanded in the
/// VirtualService's namespace; the port given, else the Service's only port, else the port being
/// routed; the subset as named (its cluster may not exist, see `cluster::build_all`).
fn destination_cluster(
    catalog: &Catalog<'_>,
    dest: &Destination,
    rule_namespace: &str,
    current_port: u32,
) -> ClusterId {
    let host = host::expand(&dest.host, rule_namespace);
    let given = dest
        .port
        .as_ref()
        .and_then(|p| p.number)
        .and_then(|n| u32::try_from(n).ok());
    let port = given.unwrap_or_else(|| {
        match catalog.service(&host).map(|svc| svc.spec.ports.as_slice()) {
            Some([only]) => u32::try_from(only.port).unwrap_or(current_port),
            _ => current_port,
        }
    });
    ClusterId {
        host,
        port,
        subset: dest.subset.clone().unwrap_or_default(),
    }
}

/// `retries` (§1.5, `retry.ConvertPolicy`): absent = Istio's default policy; `attempts` absent or 0
/// = no retries; otherwise the default policy with the given attempts, per-try timeout and
/// `retryOn` (status codes in it are retriable codes, and `retriable-status-codes` is added when
/// there are any, as Istio does). `retryRemoteLocalities: true` and `retryIgnorePreviousHosts: false`
/// are not in the model; validation refuses them.
fn retries(retry: Option<&HttpRetry>) -> Option<pb::RetryPolicy> {
    let Some(retry) = retry else {
        return Some(pb::RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            per_try_timeout_ms: 0,
            retry_on: DEFAULT_RETRY_ON.iter().map(|s| (*s).to_string()).collect(),
            backoff_base_ms: 0,
        });
    };
    let attempts = u32::try_from(retry.attempts.unwrap_or(0)).unwrap_or(0);
    if attempts == 0 {
        return None;
    }
    let retry_on = match retry.retry_on.as_deref().map(str::trim) {
        Some(list) if !list.is_empty() => parse_retry_on(list),
        _ => DEFAULT_RETRY_ON.iter().map(|s| (*s).to_string()).collect(),
    };
    Some(pb::RetryPolicy {
        attempts,
        per_try_timeout_ms: millis(retry.per_try_timeout.as_ref()),
        retry_on,
        backoff_base_ms: millis(retry.backoff.as_ref()),
    })
}

/// Istio's `parseRetryOn`: conditions in order, then `retriable-status-codes` if codes were given
/// without it, then the codes.
fn parse_retry_on(list: &str) -> Vec<String> {
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if token.parse::<u16>().is_ok() {
            codes.push(token.to_string());
        } else {
            conditions.push(token.to_string());
        }
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".to_string());
    }
    conditions.extend(codes);
    conditions
}

/// `fault` (§1.5, `TranslateFault`). A percentage comes from `percentage.value`, else from the
/// deprecated integer `percent`, else it is 0 (nothing is delayed or aborted). *Deviation*: current
/// Istio ignores `abort.percent` (only `delay.percent` falls back); weft honours it for both, as
/// Istio did when the field was current, because Istio's own bookinfo sample
/// (`virtual-service-ratings-test-abort.yaml`, `percent: 100`) is written for that.
fn fault(f: &HttpFaultInjection) -> pb::Fault {
    let percent = |percentage: Option<f64>, deprecated: Option<i64>| {
        percentage
            .or(deprecated.map(|p| p as f64))
            .unwrap_or(0.0)
            .clamp(0.0, 100.0)
    };
    let delay = f.delay.as_ref();
    let abort = f.abort.as_ref();
    pb::Fault {
        delay_ms: millis(delay.and_then(|d| d.fixed_delay.as_ref())),
        delay_percent: delay.map_or(0.0, |d| {
            percent(d.percentage.as_ref().map(|p| p.value), d.percent)
        }),
        abort_status: abort
            .and_then(|a| a.http_status)
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0),
        abort_percent: abort.map_or(0.0, |a| {
            percent(a.percentage.as_ref().map(|p| p.value), a.percent)
        }),
    }
}

/// Header operations (§1.6). Pseudo-headers and `host` are dropped from `remove`, as Istio does.
fn header_ops(ops: &HeaderOperations) -> pb::HeaderOps {
    pb::HeaderOps {
        set: to_hash_map(&ops.set),
        add: to_hash_map(&ops.add),
        remove: ops
            .remove
            .iter()
            .filter(|name| !name.starts_with(':') && !name.eq_ignore_ascii_case("host"))
            .cloned()
            .collect(),
    }
}

/// Rule-level request operations, with `host`/`:authority` taken out of `set`/`add`: Istio turns
/// those into an authority rewrite (§1.6). `set` wins over `add`.
fn split_authority(ops: &HeaderOperations) -> (pb::HeaderOps, Option<String>) {
    let is_authority = |name: &str| name.eq_ignore_ascii_case("host") || name == ":authority";
    let mut out = header_ops(ops);
    let take = |map: &mut HashMap<String, String>| {
        let keys: Vec<String> = map.keys().filter(|k| is_authority(k)).cloned().collect();
        let mut keys = keys;
        keys.sort();
        keys.into_iter().filter_map(|k| map.remove(&k)).next()
    };
    let from_set = take(&mut out.set);
    let from_add = take(&mut out.add);
    (out, from_set.or(from_add))
}

/// `redirect` (§1.6). `derivePort` is resolved here: `FROM_PROTOCOL_DEFAULT` is 443 for an https
/// redirect and 80 otherwise; `FROM_REQUEST_PORT` is the Service port being routed, which is the
/// port the client asked for. The code defaults to 301.
fn redirect(r: &HttpRedirect, port: u32) -> pb::Redirect {
    let scheme = r.scheme.clone().unwrap_or_default();
    let derived = match r.derive_port {
        Some(DerivePort::FromProtocolDefault) if scheme == "https" => 443,
        Some(DerivePort::FromProtocolDefault) => 80,
        Some(DerivePort::FromRequestPort) => port,
        None => 0,
    };
    pb::Redirect {
        uri: r.uri.clone().unwrap_or_default(),
        authority: r.authority.clone().unwrap_or_default(),
        port: r
            .port
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(derived),
        scheme,
        code: r
            .redirect_code
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(301),
    }
}

fn to_hash_map(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
