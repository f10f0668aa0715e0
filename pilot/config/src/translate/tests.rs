//! Unit tests of the translation rules: precedence, defaults and determinism.

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use std::collections::BTreeMap;

use weft_proto::discovery as pb;

use super::*;
use crate::parse_documents;

fn parse(yaml: &str) -> Vec<Resource> {
    match parse_documents("test.yaml", yaml, "default") {
        Ok(resources) => resources,
        Err(errors) => panic!("test YAML does not parse:\n{errors}"),
    }
}

fn workload(namespace: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> Workload {
    Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        ip: ip.to_string(),
        ports: vec![],
        inbound_port: 15006,
        captured: true,
        workload_name: String::new(),
        no_sidecar: false,
    }
}

fn sleep() -> Workload {
    workload("default", "sleep", &[("app", "sleep")], "10.0.0.1")
}

fn httpbin(version: &str, ip: &str) -> Workload {
    workload(
        "default",
        &format!("httpbin-{version}"),
        &[("app", "httpbin"), ("version", version)],
        ip,
    )
}

const HTTPBIN_SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  ports: [{name: http, port: 8000, targetPort: 80}]
  selector: {app: httpbin}
";

fn view(yaml: &str, node: &Workload) -> pb::ProxyConfig {
    let workloads = vec![
        httpbin("v1", "10.0.0.11"),
        httpbin("v2", "10.0.0.12"),
        node.clone(),
    ];
    translate(&parse(yaml), &workloads, node, &MeshOptions::default())
}

fn routes(config: &pb::ProxyConfig) -> &[pb::HttpRoute] {
    config
        .services
        .first()
        .and_then(|s| s.ports.first())
        .map(|p| p.routes.as_slice())
        .unwrap_or_default()
}

// === PeerAuthentication precedence ===

fn pa(namespace: &str, name: &str, selector: Option<&str>, mode: &str) -> String {
    let selector = selector
        .map(|app| format!("  selector: {{matchLabels: {{app: {app}}}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{selector}  mtls: {{mode: {mode}}}\n---\n"
    )
}

fn inbound_mode(yaml: &str, node: &Workload) -> pb::MtlsMode {
    let config = translate(&parse(yaml), &[], node, &MeshOptions::default());
    config
        .inbound
        .and_then(|i| pb::MtlsMode::try_from(i.mode).ok())
        .unwrap_or(pb::MtlsMode::Permissive)
}

#[test]
fn peer_authentication_precedence() {
    use pb::MtlsMode::{Disable, Permissive, Strict};
    let mesh_strict = pa("istio-system", "default", None, "STRICT");
    let ns_permissive = pa("default", "default", None, "PERMISSIVE");
    let ns_disable = pa("default", "default", None, "DISABLE");
    let ns_unset = pa("default", "default", None, "UNSET");
    let wl_strict = pa("default", "sleep", Some("sleep"), "STRICT");
    let wl_unset = pa("default", "sleep", Some("sleep"), "UNSET");
    let wl_other = pa("default", "other", Some("other"), "DISABLE");
    let root_selector = pa("istio-system", "sel", Some("sleep"), "DISABLE");
    let other_ns = pa("elsewhere", "default", None, "DISABLE");
    let cases: Vec<(&str, String, pb::MtlsMode)> = vec![
        ("nothing: PERMISSIVE", String::new(), Permissive),
        ("mesh-wide", mesh_strict.clone(), Strict),
        (
            "namespace over mesh",
            format!("{mesh_strict}{ns_permissive}"),
            Permissive,
        ),
        (
            "workload over namespace",
            format!("{mesh_strict}{ns_disable}{wl_strict}"),
            Strict,
        ),
        (
            "UNSET inherits at each level",
            format!("{mesh_strict}{ns_unset}{wl_unset}"),
            Strict,
        ),
        (
            "a selector for other workloads is ignored",
            format!("{ns_disable}{wl_other}"),
            Disable,
        ),
        (
            "selector policies in the root namespace are ignored",
            format!("{mesh_strict}{root_selector}"),
            Strict,
        ),
        ("other namespaces do not apply", other_ns, Permissive),
    ];
    for (what, yaml, want) in cases {
        assert_eq!(inbound_mode(&yaml, &sleep()), want, "{what}");
    }
}

#[test]
fn several_policies_at_one_level_take_the_first_by_name() {
    let yaml = format!(
        "{}{}",
        pa("default", "b-disable", None, "DISABLE"),
        pa("default", "a-strict", None, "STRICT")
    );
    assert_eq!(inbound_mode(&yaml, &sleep()), pb::MtlsMode::Strict);
}

#[test]
fn port_level_mtls_comes_from_the_workload_policy() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: sleep}
spec:
  selector: {matchLabels: {app: sleep}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    9090: {mode: UNSET}
";
    let config = translate(&parse(yaml), &[], &sleep(), &MeshOptions::default());
    let inbound = config.inbound.unwrap_or_default();
    assert_eq!(inbound.mode, pb::MtlsMode::Strict as i32);
    let ports: BTreeMap<u32, i32> = inbound.port_modes.into_iter().collect();
    assert_eq!(
        ports,
        BTreeMap::from([(8080, pb::MtlsMode::Disable as i32)])
    );
}

// === which rule applies ===

#[test]
fn destination_rule_in_the_client_namespace_wins() {
    // Same host from two namespaces: the node's own namespace comes first (Istio's lookup order).
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: default}}
spec:
  host: httpbin.default.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: client}}
spec:
  host: httpbin.default.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
"
    );
    let lb = |node: &Workload| {
        view(&yaml, node)
            .clusters
            .iter()
            .find(|c| c.subset.is_empty())
            .map(|c| c.lb_policy)
    };
    assert_eq!(lb(&sleep()), Some(pb::LbPolicy::Random as i32));
    let remote = workload("client", "sleep", &[("app", "sleep")], "10.0.9.1");
    assert_eq!(lb(&remote), Some(pb::LbPolicy::RoundRobin as i32));
}

#[test]
fn exact_host_beats_wildcard_and_first_name_breaks_ties() {
    let vs = |name: &str, host: &str, subset: &str| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: [\"{host}\"]
  http: [{{route: [{{destination: {{host: httpbin, subset: {subset}}}}}]}}]
"
        )
    };
    let first_cluster = |yaml: &str| {
        routes(&view(yaml, &sleep()))
            .first()
            .and_then(|r| r.destinations.first())
            .map(|d| d.cluster.clone())
    };
    let yaml = format!(
        "{HTTPBIN_SERVICE}{}{}",
        vs("a-wildcard", "*.default.svc.cluster.local", "wild"),
        vs("b-exact", "httpbin", "exact")
    );
    assert_eq!(
        first_cluster(&yaml).as_deref(),
        Some("outbound|8000|exact|httpbin.default.svc.cluster.local")
    );
    let yaml = format!(
        "{HTTPBIN_SERVICE}{}{}",
        vs("b-second", "httpbin", "second"),
        vs("a-first", "httpbin", "first")
    );
    assert_eq!(
        first_cluster(&yaml).as_deref(),
        Some("outbound|8000|first|httpbin.default.svc.cluster.local")
    );
}

#[test]
fn a_virtual_service_with_no_rule_for_this_sidecar_leaves_the_default_route() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{sourceLabels: {{app: other}}}}, {{port: 9999}}]
    route: [{{destination: {{host: httpbin, subset: v2}}}}]
"
    );
    let config = view(&yaml, &sleep());
    let names: Vec<&str> = routes(&config).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["default"]);
    // The rule applies to a workload with the source labels.
    let other = workload("default", "other", &[("app", "other")], "10.0.0.9");
    let config = view(&yaml, &other);
    let names: Vec<&str> = routes(&config).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["default/httpbin/0"]);
}

// === route details ===

fn single_rule(rule: &str) -> pb::HttpRoute {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - {rule}
"
    );
    let config = view(&yaml, &sleep());
    routes(&config).first().cloned().unwrap_or_default()
}

#[test]
fn weights_single_destination_and_zero_weights() {
    let route = single_rule("route: [{destination: {host: httpbin, subset: v1}, weight: 7}]");
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, vec![100], "a single destination takes all traffic");
    let route = single_rule(
        "route: [{destination: {host: httpbin, subset: v1}, weight: 30}, {destination: {host: httpbin, subset: v2}, weight: 30}, {destination: {host: httpbin}, weight: 0}]",
    );
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, vec![30, 30], "relative weights, 0 dropped");
}

#[test]
fn mirror_percentages() {
    let percents = |rule: &str| -> Vec<f64> {
        single_rule(rule)
            .mirrors
            .iter()
            .map(|m| m.percent)
            .collect()
    };
    let route = "route: [{destination: {host: httpbin, subset: v1}}]";
    assert_eq!(
        percents(&format!(
            "{{{route}, mirror: {{host: httpbin, subset: v2}}}}"
        )),
        vec![100.0]
    );
    assert_eq!(
        percents(&format!(
            "{{{route}, mirror: {{host: httpbin}}, mirrorPercentage: {{value: 0}}}}"
        )),
        Vec::<f64>::new()
    );
    assert_eq!(
        percents(&format!(
            "{{{route}, mirror: {{host: httpbin}}, mirrorPercent: 30}}"
        )),
        vec![30.0]
    );
    assert_eq!(
        percents(&format!(
            "{{{route}, mirrors: [{{destination: {{host: httpbin}}, percentage: {{value: 0.5}}}}, {{destination: {{host: httpbin, subset: v2}}}}]}}"
        )),
        vec![0.5, 100.0]
    );
}

#[test]
fn mirror_compare_annotations_reach_every_mirror() {
    let vs = |annotations: &str| {
        format!(
            "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
  annotations: {{{annotations}}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{uri: {{prefix: /a}}}}]
    route: [{{destination: {{host: httpbin, subset: v1}}}}]
    mirror: {{host: httpbin, subset: v2}}
  - route: [{{destination: {{host: httpbin, subset: v1}}}}]
    mirrors: [{{destination: {{host: httpbin, subset: v2}}, percentage: {{value: 10}}}}, {{destination: {{host: httpbin}}}}]
"
        )
    };
    let compares = |annotations: &str| -> Vec<Option<pb::MirrorCompare>> {
        let config = view(&vs(annotations), &sleep());
        routes(&config)
            .iter()
            .flat_map(|r| r.mirrors.iter().map(|m| m.compare.clone()))
            .collect()
    };
    assert_eq!(
        compares(""),
        vec![None, None, None],
        "no annotation: no compare"
    );
    let found = compares(
        r#""weft.io/mirror-compare": "status, body", "weft.io/mirror-compare-ignore-headers": "ETag", "weft.io/mirror-compare-ignore-json": "$.headers.Host""#,
    );
    let mut ignore_headers: Vec<String> =
        crate::virtual_service::mirror_compare::DEFAULT_IGNORED_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect();
    ignore_headers.push("etag".to_string());
    let expected = pb::MirrorCompare {
        status: true,
        headers: false,
        body: true,
        ignore_headers,
        ignore_json: vec!["$.headers.Host".to_string()],
    };
    assert_eq!(found, vec![Some(expected); 3]);
    // The compare is part of what sidecars are told, so a change must change the fingerprint.
    let plain = view(&vs(""), &sleep());
    let compared = view(&vs(r#""weft.io/mirror-compare": "status""#), &sleep());
    assert_ne!(fingerprint(&plain), fingerprint(&compared));
    assert!(to_json(&compared).to_string().contains("\"compare\""));
}

#[test]
fn retries_default_disabled_and_custom() {
    let route = "route: [{destination: {host: httpbin}}]";
    let default = single_rule(route).retries.unwrap_or_default();
    assert_eq!(default.attempts, 2);
    assert_eq!(
        default.retry_on,
        vec![
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
            "503"
        ]
    );
    assert_eq!(
        single_rule(&format!("{{{route}, retries: {{attempts: 0}}}}")).retries,
        None
    );
    let custom = single_rule(&format!(
        "{{{route}, retries: {{attempts: 4, retryOn: \"502,reset\"}}}}"
    ))
    .retries
    .unwrap_or_default();
    assert_eq!(custom.attempts, 4);
    assert_eq!(
        custom.retry_on,
        vec!["reset", "retriable-status-codes", "502"]
    );
}

#[test]
fn faults_without_percentage_do_nothing() {
    let route = "route: [{destination: {host: httpbin}}]";
    let fault = single_rule(&format!(
        "{{{route}, fault: {{delay: {{fixedDelay: 1s}}, abort: {{httpStatus: 500}}}}}}"
    ))
    .fault
    .unwrap_or_default();
    assert_eq!((fault.delay_ms, fault.delay_percent), (1000, 0.0));
    assert_eq!((fault.abort_status, fault.abort_percent), (500, 0.0));
}

#[test]
fn destination_to_another_service_uses_its_only_port() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  ports: [{{name: http, port: 9000}}]
  selector: {{app: echo}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http: [{{route: [{{destination: {{host: echo}}}}]}}]
"
    );
    let config = view(&yaml, &sleep());
    let httpbin = config
        .services
        .iter()
        .find(|s| s.name == "httpbin")
        .and_then(|s| s.ports.first())
        .and_then(|p| p.routes.first())
        .and_then(|r| r.destinations.first())
        .map(|d| d.cluster.as_str());
    assert_eq!(
        httpbin,
        Some("outbound|9000||echo.default.svc.cluster.local")
    );
}

#[test]
fn protocol_selection() {
    let port = |name: Option<&str>, app: Option<&str>| {
        let mut port = ServicePort::default();
        port.name = name.map(str::to_string);
        port.port = 80;
        port.app_protocol = app.map(str::to_string);
        port
    };
    let cases = [
        (Some("http"), None, "http"),
        (Some("http-web"), None, "http"),
        (Some("HTTP2"), None, "http2"),
        (Some("grpc-api"), None, "grpc"),
        (Some("tcp-db"), None, "tcp"),
        (Some("https"), None, "tcp"),
        (Some("mysql"), None, "tcp"),
        (Some("web"), None, "http"),
        (None, None, "http"),
        (Some("web"), Some("grpc"), "grpc"),
        (Some("tcp"), Some("kubernetes.io/h2c"), "http2"),
        (Some("grpc"), Some("unknown-thing"), "grpc"),
    ];
    for (name, app, want) in cases {
        assert_eq!(protocol_of(&port(name, app)), want, "{name:?} {app:?}");
    }
}

// === identity, mesh options, determinism ===

#[test]
fn workload_from_node_and_identity() {
    let node = pb::Node {
        name: "sleep-1".into(),
        namespace: "prod".into(),
        service_account: "sleep".into(),
        labels: [("app".to_string(), "sleep".to_string())].into(),
        ip: "10.1.1.1".into(),
        ports: vec![80],
        inbound_port: 15006,
        captured: false,
        proxy_version: String::new(),
    };
    let w = Workload::from(&node);
    assert_eq!(
        w.identity("example.org"),
        "spiffe://example.org/ns/prod/sa/sleep"
    );
    assert_eq!(w.key(), "prod/sleep-1");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("sleep"));
    assert!(!w.captured);
}

#[test]
fn mesh_options_reach_the_view() {
    let mesh = MeshOptions {
        trust_domain: "example.org".into(),
        mirror_shadow_suffix: false,
        sampling_percent: 250.0,
        ..MeshOptions::default()
    };
    let workloads = vec![httpbin("v1", "10.0.0.11")];
    let config = translate(&parse(HTTPBIN_SERVICE), &workloads, &sleep(), &mesh);
    let settings = config.mesh.unwrap_or_default();
    assert_eq!(settings.trust_domain, "example.org");
    assert!(!settings.mirror_shadow_suffix);
    assert_eq!(config.tracing.map(|t| t.sampling_percent), Some(100.0));
    let identity = config
        .clusters
        .first()
        .and_then(|c| c.endpoints.first())
        .map(|e| e.identity.as_str());
    assert_eq!(
        identity,
        Some("spiffe://example.org/ns/default/sa/httpbin-v1")
    );
}

#[test]
fn tracing_service_name_is_the_canonical_service_dot_namespace_as_istios() {
    let node = httpbin("v1", "10.0.0.11");
    let name = |yaml: &str, node: &Workload| {
        translate(&parse(yaml), &[], node, &MeshOptions::default())
            .tracing
            .map(|t| t.service_name)
    };
    assert_eq!(
        name(HTTPBIN_SERVICE, &node).as_deref(),
        Some("httpbin.default")
    );
    // No label names it: the owning workload, else the pod.
    let mut unlabelled = node.clone();
    unlabelled.labels.clear();
    assert_eq!(
        name(HTTPBIN_SERVICE, &unlabelled).as_deref(),
        Some("httpbin-v1.default")
    );
    unlabelled.workload_name = "httpbin".into();
    assert_eq!(
        name(HTTPBIN_SERVICE, &unlabelled).as_deref(),
        Some("httpbin.default")
    );
    // The canonical-name label wins over `app`, as Istio's canonical service.
    let mut other_app = node;
    other_app.labels.insert("app".into(), "api".into());
    other_app
        .labels
        .insert("service.istio.io/canonical-name".into(), "api-canon".into());
    other_app.namespace = "prod".into();
    assert_eq!(
        name(HTTPBIN_SERVICE, &other_app).as_deref(),
        Some("api-canon.prod")
    );
}

#[test]
fn fingerprint_is_stable_and_sensitive() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{headers: {{a: {{exact: '1'}}, b: {{exact: '2'}}, c: {{prefix: '3'}}, d: {{}}, e: {{regex: '5.*'}}}}}}]
    headers: {{request: {{set: {{x1: a, x2: b, x3: c, x4: d}}}}}}
    route: [{{destination: {{host: httpbin}}}}]
"
    );
    let first = view(&yaml, &sleep());
    let again = view(&yaml, &sleep());
    assert_eq!(fingerprint(&first), fingerprint(&again));
    // Rebuilding every hash map gives another iteration order; the fingerprint must not change.
    let rebuilt = pb::ProxyConfig::decode_roundtrip(&first);
    assert_eq!(first, rebuilt);
    assert_eq!(fingerprint(&first), fingerprint(&rebuilt));
    // Any change to the view changes it.
    let mut moved = sleep();
    moved.namespace = "prod".into();
    assert_ne!(fingerprint(&first), fingerprint(&view(&yaml, &moved)));
    let mut changed = first.clone();
    if let Some(c) = changed.clusters.first_mut() {
        c.lb_policy = pb::LbPolicy::Random as i32;
    }
    assert_ne!(fingerprint(&first), fingerprint(&changed));
}

/// Encoding and decoding through protobuf, which rebuilds the maps.
trait DecodeRoundtrip: Sized {
    fn decode_roundtrip(config: &Self) -> Self;
}

impl DecodeRoundtrip for pb::ProxyConfig {
    fn decode_roundtrip(config: &Self) -> Self {
        use prost::Message;
        Self::decode(config.encode_to_vec().as_slice()).unwrap_or_default()
    }
}

// === outbound parts shared by nodes with the same key (pilot's per-push cache) ===

#[test]
fn nodes_with_the_same_outbound_key_get_the_same_outbound_part() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin}}
spec:
  host: httpbin
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{sourceLabels: {{app: sleep}}}}]
    route: [{{destination: {{host: httpbin, subset: v2}}}}]
  - match: [{{sourceNamespace: other}}]
    route: [{{destination: {{host: httpbin, subset: v2}}}}]
  - route: [{{destination: {{host: httpbin, subset: v1}}}}]
"
    );
    let resources = parse(&yaml);
    let keys = source_label_keys(&resources);
    assert_eq!(keys.iter().collect::<Vec<_>>(), ["app"]);
    let nodes = [
        sleep(),
        workload(
            "default",
            "sleep-2",
            &[("app", "sleep"), ("v", "2")],
            "10.0.0.2",
        ),
        workload("default", "curl", &[("app", "curl")], "10.0.0.3"),
        workload("default", "bare", &[], "10.0.0.4"),
        workload("other", "sleep", &[("app", "sleep")], "10.0.0.5"),
    ];
    let mut workloads = vec![httpbin("v1", "10.0.0.11"), httpbin("v2", "10.0.0.12")];
    workloads.extend(nodes.iter().cloned());
    let mesh = MeshOptions::default();
    let key = |n: &Workload| OutboundKey::new(n, &keys);
    for a in &nodes {
        let outbound = translate_outbound(&resources, &workloads, a, &mesh);
        let local = translate_local(&resources, a, &mesh);
        assert_eq!(
            translate(&resources, &workloads, a, &mesh),
            pb::ProxyConfig {
                services: outbound.services.clone(),
                clusters: outbound.clusters.clone(),
                peers: super::peers::build(&workloads, &mesh.trust_domain),
                ..local
            },
            "{} = outbound + local + peers",
            a.key()
        );
        for b in &nodes {
            let same = translate_outbound(&resources, &workloads, b, &mesh) == outbound;
            if key(a) == key(b) {
                assert!(same, "{} and {} share a key", a.key(), b.key());
            }
        }
    }
    // Only the labels sourceLabels names are in the key; the namespace always is.
    assert_eq!(key(&nodes[0]), key(&nodes[1]));
    assert_ne!(key(&nodes[0]), key(&nodes[2]));
    assert_ne!(key(&nodes[2]), key(&nodes[3]));
    assert_ne!(key(&nodes[0]), key(&nodes[4]));
    let fp =
        |n: &Workload| fingerprint_outbound(&translate_outbound(&resources, &workloads, n, &mesh));
    assert_eq!(fp(&nodes[0]), fp(&nodes[1]));
    assert_ne!(
        fp(&nodes[0]),
        fp(&nodes[2]),
        "sleep is routed to v2, curl to v1"
    );
}

#[test]
fn the_local_part_agrees_with_the_whole_view_when_a_service_name_repeats() {
    // Two objects with one FQDN (the store never holds that, translate's input may): the whole view
    // keeps the first, and so must the indexed local part, whose tracing name comes from it.
    let first = parse(
        "apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  ports: [{name: http, port: 80}]
  selector: {app: other}
",
    );
    let second = parse(
        "apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  ports: [{name: http, port: 80}]
  selector: {app: sleep}
",
    );
    // And a Service selecting on two labels, which only the node with both gets.
    let both = parse(
        "apiVersion: v1
kind: Service
metadata: {name: a-both}
spec:
  ports: [{name: http, port: 80}]
  selector: {app: sleep, version: v1}
",
    );
    let mesh = MeshOptions::default();
    let plain = sleep();
    let mut versioned = sleep();
    versioned.labels.insert("version".into(), "v1".into());
    // The first object of the FQDN wins: with `second` first, the plain node is selected by `api`.
    for (resources, plain_name) in [
        (
            [first.clone(), second.clone(), both.clone()].concat(),
            "sleep",
        ),
        ([both, second, first].concat(), "api"),
    ] {
        let index = LocalIndex::new(&resources);
        for node in [&plain, &versioned] {
            let whole = translate(&resources, std::slice::from_ref(node), node, &mesh);
            let local = translate_local_with(&resources, &index, node, &mesh);
            assert_eq!(
                (&local.mesh, &local.inbound, &local.tracing),
                (&whole.mesh, &whole.inbound, &whole.tracing)
            );
        }
        let name = |node: &Workload| {
            translate_local_with(&resources, &index, node, &mesh)
                .tracing
                .map(|t| t.service_name)
        };
        // Istio's `service.name` comes from the pod's labels, whichever Services select it.
        let _ = plain_name;
        assert_eq!(name(&versioned).as_deref(), Some("sleep.default"));
        assert_eq!(name(&plain).as_deref(), Some("sleep.default"));
    }
}

#[test]
fn fingerprint_outbound_is_the_fingerprint_of_a_config_with_only_those_parts() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - headers: {{request: {{set: {{x1: a}}, add: {{x2: b}}}}}}
    route: [{{destination: {{host: httpbin}}}}]
"
    );
    let resources = parse(&yaml);
    let node = sleep();
    let workloads = vec![httpbin("v1", "10.0.0.11"), node.clone()];
    let mesh = MeshOptions::default();
    let outbound = translate_outbound(&resources, &workloads, &node, &mesh);
    let only = pb::ProxyConfig {
        services: outbound.services.clone(),
        clusters: outbound.clusters.clone(),
        ..pb::ProxyConfig::default()
    };
    assert_eq!(fingerprint_outbound(&outbound), fingerprint(&only));
    // Moving a header from `set` to `add` (same names and values, another meaning) changes it.
    let mut moved = only.clone();
    let ops = moved
        .services
        .iter_mut()
        .flat_map(|s| &mut s.ports)
        .flat_map(|p| &mut p.routes)
        .find_map(|r| r.request_headers.as_mut())
        .expect("the route sets headers");
    let set = std::mem::take(&mut ops.set);
    ops.add.extend(set);
    assert_ne!(fingerprint(&only), fingerprint(&moved));
    // An endpoint label is part of it too.
    let mut relabelled = only.clone();
    if let Some(e) = relabelled
        .clusters
        .iter_mut()
        .flat_map(|c| &mut c.endpoints)
        .next()
    {
        e.labels.insert("version".into(), "v9".into());
    }
    assert_ne!(fingerprint(&only), fingerprint(&relabelled));
}

#[test]
fn a_name_dot_namespace_host_means_that_namespaces_service() {
    // `reviews.default` written in a rule of another namespace (Istio would keep it as written:
    // a virtual host for that literal Host only, and a cluster that does not exist). weft expands
    // it (README, "Short names"): the VirtualService routes the reviews Service under every name
    // a client uses, and the destination is reviews' own v2 cluster, with its endpoint.
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  ports: [{name: http, port: 9080}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: ops}
spec:
  hosts: [reviews.default]
  http:
  - route: [{destination: {host: reviews.default, subset: v2}}]
";
    let node = workload("ops", "client", &[("app", "client")], "10.0.0.1");
    let v2 = workload(
        "default",
        "reviews-v2",
        &[("app", "reviews"), ("version", "v2")],
        "10.0.0.22",
    );
    let config = translate(
        &parse(yaml),
        &[node.clone(), v2],
        &node,
        &MeshOptions::default(),
    );
    let reviews = config
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .expect("the reviews Service");
    assert_eq!(
        reviews.aliases,
        [
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local"
        ]
    );
    let route = &reviews.ports[0].routes[0];
    assert_eq!(route.name, "ops/reviews/0");
    let cluster = "outbound|9080|v2|reviews.default.svc.cluster.local";
    assert_eq!(route.destinations[0].cluster, cluster);
    let endpoints: Vec<&str> = config
        .clusters
        .iter()
        .filter(|c| c.name == cluster)
        .flat_map(|c| &c.endpoints)
        .map(|e| e.address.as_str())
        .collect();
    assert_eq!(endpoints, ["10.0.0.22"]);
}

/// `n` Services, each with a DestinationRule (two subsets), a VirtualService routing to them and a
/// workload PeerAuthentication, and two workloads per Service.
fn mesh_of(n: usize) -> (Vec<Resource>, Vec<Workload>) {
    let yaml: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector: {{app: s{i}}}\n  ports: [{{port: 80}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s{i}}}\nspec:\n  host: s{i}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}]\n  http:\n  - route:\n    - destination: {{host: s{i}, subset: v1}}\n      weight: 90\n    - destination: {{host: s{i}, subset: v2}}\n      weight: 10\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: s{i}}}\nspec:\n  selector: {{matchLabels: {{app: s{i}}}}}\n  mtls: {{mode: STRICT}}\n",
                i / 250,
                i % 250 + 2
            )
        })
        .collect();
    let workloads = (0..n)
        .flat_map(|i| {
            ["v1", "v2"].map(|version| {
                workload(
                    "default",
                    &format!("s{i}-{version}"),
                    &[("app", &format!("s{i}")), ("version", version)],
                    &format!(
                        "10.1.{}.{}",
                        i / 100,
                        i % 100 * 2 + usize::from(version == "v2")
                    ),
                )
            })
        })
        .collect();
    (parse(&yaml.join("---\n")), workloads)
}

#[test]
fn rule_and_policy_lookups_grow_with_the_services_not_their_square() {
    let examined = |n: usize| {
        let (resources, workloads) = mesh_of(n);
        catalog::EXAMINED.with(|e| e.set(0));
        let config = translate(&resources, &workloads, &sleep(), &MeshOptions::default());
        assert_eq!(config.services.len(), n);
        // Every subset cluster has its one endpoint, with the STRICT policy's identity.
        let v2 = config
            .clusters
            .iter()
            .find(|c| c.name == format!("outbound|80|v2|s{}.default.svc.cluster.local", n - 1))
            .unwrap();
        assert_eq!(v2.endpoints.len(), 1);
        catalog::EXAMINED.with(std::cell::Cell::get)
    };
    let (small, large) = (examined(50), examined(200));
    // A scan of every rule per Service examines 16 times as many for 4 times the Services.
    assert!(
        large <= 5 * small,
        "50 Services: {small} candidates examined, 200 Services: {large}"
    );
}

#[test]
fn a_pod_without_a_sidecar_is_a_plaintext_endpoint_on_its_app_port_under_auto_mtls_only() {
    let mut plain = httpbin("v1", "10.0.0.11");
    plain.no_sidecar = true;
    plain.captured = false;
    let endpoint = |yaml: &str| {
        let config = translate(
            &parse(yaml),
            std::slice::from_ref(&plain),
            &sleep(),
            &MeshOptions::default(),
        );
        config
            .clusters
            .iter()
            .find(|c| c.name == "outbound|8000||httpbin.default.svc.cluster.local")
            .and_then(|c| c.endpoints.first().cloned())
            .unwrap()
    };
    let auto = endpoint(HTTPBIN_SERVICE);
    assert_eq!(auto.identity, "", "no sidecar: plaintext, no identity");
    assert_eq!(
        (auto.port, auto.dial_port),
        (80, 80),
        "its app port, not 15006"
    );
    // An explicit ISTIO_MUTUAL is honoured: the handshake to a pod without a sidecar fails, as
    // with Istio.
    let mutual = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin}}
spec:
  host: httpbin
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
"
    );
    assert_eq!(
        endpoint(&mutual).identity,
        "spiffe://cluster.local/ns/default/sa/httpbin-v1"
    );
}

#[test]
fn outlier_pool_and_backoff_fields_reach_the_model() {
    let yaml = format!(
        "{HTTPBIN_SERVICE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin}}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool: {{http: {{maxRetries: 4, http1MaxPendingRequests: 2}}}}
    outlierDetection: {{consecutiveGatewayErrors: 3, minHealthPercent: 40, splitExternalLocalOriginErrors: true}}
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      outlierDetection: {{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 7}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - route: [{{destination: {{host: httpbin}}}}]
    retries: {{attempts: 1, backoff: 40ms}}
"
    );
    let config = view(&yaml, &sleep());
    let cluster = |subset: &str| {
        config
            .clusters
            .iter()
            .find(|c| c.subset == subset)
            .unwrap_or_else(|| panic!("cluster for subset {subset:?}"))
    };
    let whole = cluster("").outlier_detection.unwrap_or_default();
    // Left out: Envoy's defaults; split on: 5 local-origin failures.
    assert_eq!(
        (
            whole.consecutive_5xx,
            whole.consecutive_gateway_errors,
            whole.split_external_local_origin_errors,
            whole.consecutive_local_origin_failures,
            whole.min_health_percent,
            whole.max_ejection_percent
        ),
        (5, 3, true, 5, 40, 10)
    );
    let pool = cluster("").connection_pool.unwrap_or_default();
    assert_eq!((pool.max_retries, pool.max_pending_requests), (4, 2));
    let v1 = cluster("v1").outlier_detection.unwrap_or_default();
    assert_eq!(
        (
            v1.consecutive_5xx,
            v1.consecutive_gateway_errors,
            v1.consecutive_local_origin_failures
        ),
        (0, 2, 7)
    );
    let retries = routes(&config)
        .first()
        .and_then(|r| r.retries.clone())
        .unwrap_or_default();
    assert_eq!((retries.attempts, retries.backoff_base_ms), (1, 40));
}
