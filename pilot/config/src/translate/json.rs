//! The data-plane model as canonical JSON, for golden files and debugging.
//!
//! prost generates `HashMap`s for `map<>` fields, so neither `Debug` nor the protobuf encoding of a
//! `ProxyConfig` is stable. The JSON here sorts every map, so equal configs give equal text. It
//! follows the proto3 JSON habit of leaving out default values (empty strings and lists, 0,
//! false, absent messages) with field names as in `discovery.proto`; enums are always written, by
//! name. Every message is destructured without `..`, so a field added to the proto does not compile
//! until it is rendered here, and therefore can never be missed by a golden file. (Pushes compare
//! [`super::fingerprint`]s, which hash the model directly instead of rendering it.)

use serde_json::{Map, Value};
use weft_proto::discovery as pb;
use weft_proto::discovery::string_match::Kind as PbMatch;

/// The config as canonical JSON (see the module docs for the format).
pub fn to_json(config: &pb::ProxyConfig) -> Value {
    let pb::ProxyConfig {
        mesh,
        services,
        clusters,
        inbound,
        tracing,
        peers,
    } = config;
    Obj::default()
        .msg("mesh", mesh.as_ref().map(mesh_settings))
        .list("services", services.iter().map(outbound_service))
        .list("clusters", clusters.iter().map(cluster))
        .msg("inbound", inbound.as_ref().map(inbound_json))
        .msg("tracing", tracing.as_ref().map(tracing_json))
        .list("peers", peers.iter().map(peer))
        .into()
}

fn peer(p: &pb::Peer) -> Value {
    let pb::Peer {
        identity,
        workload,
        namespace,
        labels,
        addresses,
    } = p;
    Obj::default()
        .str("identity", identity)
        .str("workload", workload)
        .str("namespace", namespace)
        .map(
            "labels",
            labels.iter().map(|(k, v)| (k, Value::from(v.as_str()))),
        )
        .list(
            "addresses",
            addresses.iter().map(|a| Value::from(a.as_str())),
        )
        .into()
}

fn mesh_settings(m: &pb::MeshSettings) -> Value {
    let pb::MeshSettings {
        trust_domain,
        mirror_shadow_suffix,
    } = m;
    Obj::default()
        .str("trust_domain", trust_domain)
        .bool("mirror_shadow_suffix", *mirror_shadow_suffix)
        .into()
}

fn outbound_service(s: &pb::OutboundService) -> Value {
    let pb::OutboundService {
        hostname,
        aliases,
        vip,
        ports,
        namespace,
        name,
    } = s;
    Obj::default()
        .str("hostname", hostname)
        .str("namespace", namespace)
        .str("name", name)
        .list("aliases", aliases.iter().map(|a| Value::from(a.as_str())))
        .str("vip", vip)
        .list("ports", ports.iter().map(service_port))
        .into()
}

fn service_port(p: &pb::ServicePort) -> Value {
    let pb::ServicePort {
        name,
        port,
        target_port,
        protocol,
        routes,
    } = p;
    Obj::default()
        .str("name", name)
        .num("port", u64::from(*port))
        .num("target_port", u64::from(*target_port))
        .str("protocol", protocol)
        .list("routes", routes.iter().map(http_route))
        .into()
}

fn http_route(r: &pb::HttpRoute) -> Value {
    let pb::HttpRoute {
        name,
        matches,
        destinations,
        redirect,
        mirrors,
        timeout_ms,
        retries,
        fault,
        request_headers,
        response_headers,
        rewrite,
    } = r;
    Obj::default()
        .str("name", name)
        .list("matches", matches.iter().map(http_match))
        .list("destinations", destinations.iter().map(weighted_cluster))
        .msg("redirect", redirect.as_ref().map(redirect_json))
        .list("mirrors", mirrors.iter().map(mirror))
        .num("timeout_ms", *timeout_ms)
        .msg("retries", retries.as_ref().map(retry_policy))
        .msg("fault", fault.as_ref().map(fault_json))
        .msg("request_headers", request_headers.as_ref().map(header_ops))
        .msg(
            "response_headers",
            response_headers.as_ref().map(header_ops),
        )
        .msg("rewrite", rewrite.as_ref().map(rewrite_json))
        .into()
}

fn http_match(m: &pb::HttpMatch) -> Value {
    let pb::HttpMatch {
        uri,
        headers,
        query_params,
        method,
        port,
        ignore_uri_case,
        source_labels,
        without_headers,
    } = m;
    Obj::default()
        .msg("uri", uri.as_ref().map(string_match))
        .map("headers", headers.iter().map(|(k, v)| (k, string_match(v))))
        .map(
            "query_params",
            query_params.iter().map(|(k, v)| (k, string_match(v))),
        )
        .msg("method", method.as_ref().map(string_match))
        .num("port", u64::from(*port))
        .bool("ignore_uri_case", *ignore_uri_case)
        .map(
            "source_labels",
            source_labels
                .iter()
                .map(|(k, v)| (k, Value::from(v.as_str()))),
        )
        .list(
            "without_headers",
            without_headers.iter().map(|h| Value::from(h.as_str())),
        )
        .into()
}

fn string_match(m: &pb::StringMatch) -> Value {
    let pb::StringMatch { kind } = m;
    let obj = Obj::default();
    match kind {
        Some(PbMatch::Exact(v)) => obj.always("exact", Value::from(v.as_str())),
        Some(PbMatch::Prefix(v)) => obj.always("prefix", Value::from(v.as_str())),
        Some(PbMatch::Regex(v)) => obj.always("regex", Value::from(v.as_str())),
        None => obj,
    }
    .into()
}

fn weighted_cluster(w: &pb::WeightedCluster) -> Value {
    let pb::WeightedCluster {
        cluster,
        weight,
        request_headers,
        response_headers,
    } = w;
    Obj::default()
        .str("cluster", cluster)
        .num("weight", u64::from(*weight))
        .msg("request_headers", request_headers.as_ref().map(header_ops))
        .msg(
            "response_headers",
            response_headers.as_ref().map(header_ops),
        )
        .into()
}

fn mirror(m: &pb::Mirror) -> Value {
    let pb::Mirror {
        cluster,
        percent,
        compare,
    } = m;
    Obj::default()
        .str("cluster", cluster)
        .float("percent", *percent)
        .msg("compare", compare.as_ref().map(mirror_compare))
        .into()
}

fn mirror_compare(c: &pb::MirrorCompare) -> Value {
    let pb::MirrorCompare {
        status,
        headers,
        body,
        ignore_headers,
        ignore_json,
    } = c;
    Obj::default()
        .bool("status", *status)
        .bool("headers", *headers)
        .bool("body", *body)
        .list(
            "ignore_headers",
            ignore_headers.iter().map(|s| Value::from(s.as_str())),
        )
        .list(
            "ignore_json",
            ignore_json.iter().map(|s| Value::from(s.as_str())),
        )
        .into()
}

fn retry_policy(r: &pb::RetryPolicy) -> Value {
    let pb::RetryPolicy {
        attempts,
        per_try_timeout_ms,
        retry_on,
        backoff_base_ms,
    } = r;
    Obj::default()
        .num("attempts", u64::from(*attempts))
        .num("per_try_timeout_ms", *per_try_timeout_ms)
        .list("retry_on", retry_on.iter().map(|s| Value::from(s.as_str())))
        .num("backoff_base_ms", *backoff_base_ms)
        .into()
}

fn fault_json(f: &pb::Fault) -> Value {
    let pb::Fault {
        delay_ms,
        delay_percent,
        abort_status,
        abort_percent,
    } = f;
    Obj::default()
        .num("delay_ms", *delay_ms)
        .float("delay_percent", *delay_percent)
        .num("abort_status", u64::from(*abort_status))
        .float("abort_percent", *abort_percent)
        .into()
}

fn header_ops(h: &pb::HeaderOps) -> Value {
    let pb::HeaderOps { set, add, remove } = h;
    Obj::default()
        .map("set", set.iter().map(|(k, v)| (k, Value::from(v.as_str()))))
        .map("add", add.iter().map(|(k, v)| (k, Value::from(v.as_str()))))
        .list("remove", remove.iter().map(|s| Value::from(s.as_str())))
        .into()
}

fn rewrite_json(r: &pb::Rewrite) -> Value {
    let pb::Rewrite { uri, authority } = r;
    Obj::default()
        .str("uri", uri)
        .str("authority", authority)
        .into()
}

fn redirect_json(r: &pb::Redirect) -> Value {
    let pb::Redirect {
        uri,
        authority,
        port,
        scheme,
        code,
    } = r;
    Obj::default()
        .str("uri", uri)
        .str("authority", authority)
        .num("port", u64::from(*port))
        .str("scheme", scheme)
        .num("code", u64::from(*code))
        .into()
}

fn cluster(c: &pb::Cluster) -> Value {
    let pb::Cluster {
        name,
        service_hostname,
        port,
        subset,
        endpoints,
        lb_policy,
        tls_mode,
        connection_pool,
        outlier_detection,
    } = c;
    Obj::default()
        .str("name", name)
        .str("service_hostname", service_hostname)
        .num("port", u64::from(*port))
        .str("subset", subset)
        .always(
            "lb_policy",
            enum_name(*lb_policy, |v| {
                pb::LbPolicy::try_from(v).ok().map(|e| e.as_str_name())
            }),
        )
        .always(
            "tls_mode",
            enum_name(*tls_mode, |v| {
                pb::TlsMode::try_from(v).ok().map(|e| e.as_str_name())
            }),
        )
        .msg("connection_pool", connection_pool.as_ref().map(pool_json))
        .msg(
            "outlier_detection",
            outlier_detection.as_ref().map(outlier_json),
        )
        .list("endpoints", endpoints.iter().map(endpoint))
        .into()
}

fn endpoint(e: &pb::Endpoint) -> Value {
    let pb::Endpoint {
        address,
        port,
        dial_port,
        identity,
        labels,
        workload,
        workload_name,
    } = e;
    Obj::default()
        .str("workload", workload)
        .str("workload_name", workload_name)
        .str("address", address)
        .num("port", u64::from(*port))
        .num("dial_port", u64::from(*dial_port))
        .str("identity", identity)
        .map(
            "labels",
            labels.iter().map(|(k, v)| (k, Value::from(v.as_str()))),
        )
        .into()
}

fn pool_json(p: &pb::ConnectionPool) -> Value {
    let pb::ConnectionPool {
        max_connections,
        connect_timeout_ms,
        max_pending_requests,
        max_requests,
        max_requests_per_connection,
        idle_timeout_ms,
        max_retries,
    } = p;
    Obj::default()
        .num("max_connections", u64::from(*max_connections))
        .num("connect_timeout_ms", *connect_timeout_ms)
        .num("max_pending_requests", u64::from(*max_pending_requests))
        .num("max_requests", u64::from(*max_requests))
        .num(
            "max_requests_per_connection",
            u64::from(*max_requests_per_connection),
        )
        .num("idle_timeout_ms", *idle_timeout_ms)
        .num("max_retries", u64::from(*max_retries))
        .into()
}

fn outlier_json(o: &pb::OutlierDetection) -> Value {
    let pb::OutlierDetection {
        consecutive_5xx,
        interval_ms,
        base_ejection_time_ms,
        max_ejection_percent,
        consecutive_gateway_errors,
        split_external_local_origin_errors,
        consecutive_local_origin_failures,
        min_health_percent,
    } = o;
    Obj::default()
        .num("consecutive_5xx", u64::from(*consecutive_5xx))
        .num("interval_ms", *interval_ms)
        .num("base_ejection_time_ms", *base_ejection_time_ms)
        .num("max_ejection_percent", u64::from(*max_ejection_percent))
        .num(
            "consecutive_gateway_errors",
            u64::from(*consecutive_gateway_errors),
        )
        .bool(
            "split_external_local_origin_errors",
            *split_external_local_origin_errors,
        )
        .num(
            "consecutive_local_origin_failures",
            u64::from(*consecutive_local_origin_failures),
        )
        .num("min_health_percent", u64::from(*min_health_percent))
        .into()
}

fn inbound_json(i: &pb::Inbound) -> Value {
    let pb::Inbound { mode, port_modes } = i;
    let mtls = |v: i32| {
        enum_name(v, |v| {
            pb::MtlsMode::try_from(v).ok().map(|e| e.as_str_name())
        })
    };
    let mut ports: Vec<(&u32, &i32)> = port_modes.iter().collect();
    ports.sort();
    Obj::default()
        .always("mode", mtls(*mode))
        .map(
            "port_modes",
            ports
                .into_iter()
                .map(|(port, m)| (port.to_string(), mtls(*m))),
        )
        .into()
}

fn tracing_json(t: &pb::Tracing) -> Value {
    let pb::Tracing {
        sampling_percent,
        service_name,
    } = t;
    Obj::default()
        .float("sampling_percent", *sampling_percent)
        .str("service_name", service_name)
        .into()
}

/// An enum value by name (`LB_POLICY_ROUND_ROBIN`), or its number if it is not a known value.
fn enum_name(value: i32, name: impl Fn(i32) -> Option<&'static str>) -> Value {
    name(value).map_or_else(|| Value::from(value), Value::from)
}

/// A JSON object built field by field, leaving out default values.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn always(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.to_string(), value);
        self
    }

    fn str(self, key: &str, value: &str) -> Self {
        if value.is_empty() {
            self
        } else {
            self.always(key, Value::from(value))
        }
    }

    fn num(self, key: &str, value: u64) -> Self {
        if value == 0 {
            self
        } else {
            self.always(key, Value::from(value))
        }
    }

    fn float(self, key: &str, value: f64) -> Self {
        if value == 0.0 {
            self
        } else {
            self.always(key, Value::from(value))
        }
    }

    fn bool(self, key: &str, value: bool) -> Self {
        if value {
            self.always(key, Value::Bool(true))
        } else {
            self
        }
    }

    fn msg(self, key: &str, value: Option<Value>) -> Self {
        match value {
            Some(v) => self.always(key, v),
            None => self,
        }
    }

    fn list(self, key: &str, values: impl Iterator<Item = Value>) -> Self {
        let values: Vec<Value> = values.collect();
        if values.is_empty() {
            self
        } else {
            self.always(key, Value::Array(values))
        }
    }

    /// A map with its keys sorted (serde_json keeps insertion order with `preserve_order`).
    fn map<K: ToString>(self, key: &str, entries: impl Iterator<Item = (K, Value)>) -> Self {
        let mut entries: Vec<(String, Value)> = entries.map(|(k, v)| (k.to_string(), v)).collect();
        if entries.is_empty() {
            return self;
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        self.always(key, Value::Object(entries.into_iter().collect()))
    }
}

impl From<Obj> for Value {
    fn from(obj: Obj) -> Self {
        Value::Object(obj.0)
    }
}
