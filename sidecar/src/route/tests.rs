#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use std::collections::HashMap as Map;
use weft_proto::discovery as pb;

fn endpoint(ip: &str, sa: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: ip.into(),
        port: 80,
        dial_port: 80,
        identity: format!("spiffe://cluster.local/ns/default/sa/{sa}"),
        labels: Map::new(),
        workload: format!("default/{sa}"),
        workload_name: sa.into(),
    }
}

fn cluster(name: &str, eps: Vec<pb::Endpoint>) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        service_hostname: "httpbin.default.svc.cluster.local".into(),
        port: 8000,
        endpoints: eps,
        ..Default::default()
    }
}

fn dest(c: &str, w: u32) -> pb::WeightedCluster {
    pb::WeightedCluster {
        cluster: c.into(),
        weight: w,
        ..Default::default()
    }
}

fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(s.into())),
    }
}
fn prefix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Prefix(s.into())),
    }
}
fn regex(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Regex(s.into())),
    }
}

const V1: &str = "outbound|8000|v1|httpbin.default.svc.cluster.local";
const V2: &str = "outbound|8000|v2|httpbin.default.svc.cluster.local";

fn config(routes: Vec<pb::HttpRoute>) -> pb::ProxyConfig {
    pb::ProxyConfig {
        mesh: Some(pb::MeshSettings {
            trust_domain: "cluster.local".into(),
            mirror_shadow_suffix: true,
        }),
        services: vec![pb::OutboundService {
            hostname: "httpbin.default.svc.cluster.local".into(),
            aliases: vec![
                "httpbin".into(),
                "httpbin.default".into(),
                "httpbin.default.svc".into(),
            ],
            vip: "10.96.0.10".into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 8000,
                target_port: 80,
                protocol: "http".into(),
                routes,
            }],
            namespace: "default".into(),
            name: "httpbin".into(),
        }],
        clusters: vec![
            cluster(V1, vec![endpoint("10.0.0.1", "httpbin")]),
            cluster(V2, vec![endpoint("10.0.0.2", "httpbin")]),
        ],
        inbound: None,
        tracing: None,
        peers: Vec::new(),
    }
}

fn route(
    name: &str,
    matches: Vec<pb::HttpMatch>,
    dests: Vec<pb::WeightedCluster>,
) -> pb::HttpRoute {
    pb::HttpRoute {
        name: name.into(),
        matches,
        destinations: dests,
        ..Default::default()
    }
}

fn req<'a>(
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a http::HeaderMap,
) -> RequestView<'a> {
    RequestView {
        method,
        path,
        query,
        headers,
    }
}

#[test]
fn finds_services_by_vip_and_by_any_alias() {
    let t =
        RouteTable::try_from(config(vec![route("default", vec![], vec![dest(V1, 100)])])).unwrap();
    let vip: SocketAddr = "10.96.0.10:8000".parse().unwrap();
    assert_eq!(
        t.by_vip(vip).unwrap().0.hostname,
        "httpbin.default.svc.cluster.local"
    );
    assert!(t.by_vip("10.96.0.10:9999".parse().unwrap()).is_none());
    for a in [
        "httpbin:8000",
        "HTTPBIN:8000",
        "httpbin.default:8000",
        "httpbin.default.svc.cluster.local:8000",
    ] {
        assert_eq!(t.by_authority(a, 80).unwrap().1.port, 8000, "{a}");
    }
    assert!(
        t.by_authority("httpbin", 80).is_none(),
        "port 80 is not a port of the Service"
    );
    assert!(t.by_authority("other:8000", 80).is_none());
}

#[test]
fn first_matching_route_wins_with_every_kind_of_match() {
    let mut headers_match = Map::new();
    headers_match.insert("end-user".to_string(), exact("jason"));
    let mut query = Map::new();
    query.insert("debug".to_string(), exact("1"));
    let routes = vec![
        route(
            "hdr",
            vec![pb::HttpMatch {
                headers: headers_match,
                ..Default::default()
            }],
            vec![dest(V2, 100)],
        ),
        route(
            "regex",
            vec![pb::HttpMatch {
                uri: Some(regex("/status/[0-9]+")),
                ..Default::default()
            }],
            vec![dest(V2, 100)],
        ),
        route(
            "query",
            vec![pb::HttpMatch {
                query_params: query,
                method: Some(exact("POST")),
                ..Default::default()
            }],
            vec![dest(V2, 100)],
        ),
        route(
            "ci",
            vec![pb::HttpMatch {
                uri: Some(prefix("/API")),
                ignore_uri_case: true,
                ..Default::default()
            }],
            vec![dest(V2, 100)],
        ),
        route(
            "without",
            vec![pb::HttpMatch {
                uri: Some(exact("/w")),
                without_headers: vec!["x-skip".into()],
                ..Default::default()
            }],
            vec![dest(V2, 100)],
        ),
        route("default", vec![], vec![dest(V1, 100)]),
    ];
    let t = RouteTable::try_from(config(routes)).unwrap();
    let (_, port) = t.by_authority("httpbin:8000", 80).unwrap();
    let none = http::HeaderMap::new();
    let mut jason = http::HeaderMap::new();
    jason.insert("end-user", "jason".parse().unwrap());
    let mut two_users = http::HeaderMap::new();
    two_users.append("end-user", "jason".parse().unwrap());
    two_users.append("end-user", "admin".parse().unwrap());
    let mut skip = http::HeaderMap::new();
    skip.insert("x-skip", "1".parse().unwrap());
    let name = |r: RequestView<'_>| port.route(&r).map(|r| r.name.clone()).unwrap();

    assert_eq!(name(req("GET", "/headers", None, &jason)), "hdr");
    assert_eq!(
        name(req("GET", "/headers", None, &two_users)),
        "default",
        "every value must match"
    );
    assert_eq!(name(req("GET", "/status/418", None, &none)), "regex");
    assert_eq!(
        name(req("GET", "/status/418/x", None, &none)),
        "default",
        "regex is anchored"
    );
    assert_eq!(
        name(req("POST", "/post", Some("a=b&debug=1"), &none)),
        "query"
    );
    assert_eq!(
        name(req("GET", "/post", Some("debug=1"), &none)),
        "default",
        "method must match too"
    );
    assert_eq!(name(req("GET", "/api/v1", None, &none)), "ci");
    assert_eq!(name(req("GET", "/w", None, &none)), "without");
    assert_eq!(name(req("GET", "/w", None, &skip)), "default");
}

#[test]
fn a_header_or_query_match_without_a_kind_asks_for_presence() {
    let mut headers_match = Map::new();
    headers_match.insert("x-canary".to_string(), pb::StringMatch::default());
    let mut query = Map::new();
    query.insert("beta".to_string(), pb::StringMatch::default());
    let t = RouteTable::try_from(config(vec![
        route(
            "present",
            vec![
                pb::HttpMatch {
                    headers: headers_match,
                    ..Default::default()
                },
                pb::HttpMatch {
                    query_params: query,
                    ..Default::default()
                },
            ],
            vec![dest(V2, 100)],
        ),
        route("default", vec![], vec![dest(V1, 100)]),
    ]))
    .unwrap();
    let port = &t.services()[0].ports[0];
    let none = http::HeaderMap::new();
    let mut canary = http::HeaderMap::new();
    canary.insert("x-canary", http::HeaderValue::from_static(""));
    let name = |r: RequestView<'_>| port.route(&r).unwrap().name.clone();
    assert_eq!(name(req("GET", "/", None, &none)), "default");
    assert_eq!(name(req("GET", "/", None, &canary)), "present");
    assert_eq!(name(req("GET", "/", Some("beta"), &none)), "present");
    assert_eq!(name(req("GET", "/", Some("beta=1&x=2"), &none)), "present");
    assert_eq!(name(req("GET", "/", Some("betamax=1"), &none)), "default");
}

#[test]
fn weighted_pick_follows_weights_and_never_picks_zero() {
    let routes = vec![route(
        "split",
        vec![],
        vec![dest(V1, 80), dest(V2, 20), dest(V2, 0)],
    )];
    let t = RouteTable::try_from(config(routes)).unwrap();
    let (_, port) = t.by_authority("httpbin:8000", 80).unwrap();
    let r = &port.routes[0];
    let mut counts = Map::new();
    for roll in 0..100 {
        *counts
            .entry(r.pick(roll).unwrap().cluster.name.clone())
            .or_insert(0) += 1;
    }
    assert_eq!(counts[V1], 80);
    assert_eq!(counts[V2], 20);
    let Action::Forward {
        destinations,
        total_weight,
    } = &r.action
    else {
        panic!()
    };
    assert_eq!((destinations.len(), *total_weight), (2, 100));
}

#[test]
fn invalid_pushes_are_rejected_with_a_reason() {
    let cases: Vec<(pb::ProxyConfig, &str)> = vec![
        (
            config(vec![route(
                "r",
                vec![],
                vec![dest("outbound|1||nope", 100)],
            )]),
            "references unknown cluster outbound|1||nope",
        ),
        (
            config(vec![route(
                "r",
                vec![pb::HttpMatch {
                    uri: Some(regex("(")),
                    ..Default::default()
                }],
                vec![dest(V1, 1)],
            )]),
            "invalid regex",
        ),
        (
            config(vec![route("r", vec![], vec![dest(V1, 0)])]),
            "no destination with a weight above 0",
        ),
        (
            {
                let mut c = config(vec![]);
                c.services[0].vip = "not-an-ip".into();
                c
            },
            "invalid address \"not-an-ip\"",
        ),
        (
            {
                let mut c = config(vec![]);
                c.clusters[0].endpoints[0].identity = "spiffe://Bad/ns/a/sa/b".into();
                c
            },
            "endpoint identity",
        ),
        (
            {
                let mut r = route("r", vec![], vec![dest(V1, 1)]);
                r.mirrors.push(pb::Mirror {
                    cluster: V2.into(),
                    percent: 150.0,
                    compare: None,
                });
                config(vec![r])
            },
            "mirror percentage 150",
        ),
        (
            {
                let mut r = route("r", vec![], vec![dest(V1, 1)]);
                r.mirrors.push(pb::Mirror {
                    cluster: V2.into(),
                    percent: 100.0,
                    compare: Some(pb::MirrorCompare::default()),
                });
                config(vec![r])
            },
            "nothing to compare",
        ),
        (
            {
                let mut r = route("r", vec![], vec![dest(V1, 1)]);
                r.mirrors.push(pb::Mirror {
                    cluster: V2.into(),
                    percent: 100.0,
                    compare: Some(pb::MirrorCompare {
                        status: true,
                        ignore_headers: vec!["Date".into()],
                        ..Default::default()
                    }),
                });
                config(vec![r])
            },
            "ignored header \"Date\" is not lowercase",
        ),
        (
            {
                let mut r = route("r", vec![], vec![dest(V1, 1)]);
                r.mirrors.push(pb::Mirror {
                    cluster: V2.into(),
                    percent: 100.0,
                    compare: Some(pb::MirrorCompare {
                        body: true,
                        ignore_json: vec!["$.a[*]".into()],
                        ..Default::default()
                    }),
                });
                config(vec![r])
            },
            "invalid JSON path \"$.a[*]\"",
        ),
        (
            {
                let mut c = config(vec![]);
                c.mesh = None;
                c
            },
            "mesh settings is missing",
        ),
    ];
    for (cfg, want) in cases {
        let err = RouteTable::try_from(cfg).unwrap_err().to_string();
        assert!(err.contains(want), "{err} should contain {want}");
    }
}

#[test]
fn authorities_split_and_shadow() {
    assert_eq!(split_authority("httpbin:8000", 80), ("httpbin", 8000));
    assert_eq!(split_authority("httpbin", 80), ("httpbin", 80));
    assert_eq!(split_authority("[::1]:9000", 80), ("::1", 9000));
    assert_eq!(split_authority("[::1]", 80), ("::1", 80));
    assert_eq!(shadow_authority("httpbin:8000"), "httpbin-shadow:8000");
    assert_eq!(
        shadow_authority("httpbin.default.svc.cluster.local"),
        "httpbin.default.svc.cluster.local-shadow"
    );
    assert_eq!(shadow_authority("cluster-1"), "cluster-1-shadow");
}

#[test]
fn inbound_modes_per_port() {
    let mut c = config(vec![]);
    let mut port_modes = Map::new();
    port_modes.insert(8080, pb::MtlsMode::Disable as i32);
    c.inbound = Some(pb::Inbound {
        mode: pb::MtlsMode::Strict as i32,
        port_modes,
    });
    let t = RouteTable::try_from(c).unwrap();
    assert_eq!(t.inbound.mode_for(80), MtlsMode::Strict);
    assert_eq!(t.inbound.mode_for(8080), MtlsMode::Disable);
}

/// Every field pilot can push is read by the conversion: a field pilot accepts and the sidecar
/// ignores lies to the operator who set it. The fields come from the proto's descriptors, so a
/// field added later is walked without editing this test. A field counts as read when some valid
/// change to it, at some place it occurs in the baseline, changes the converted table (its Debug
/// output, which shows every model field). This proves a field is read, not that its every value
/// means what pilot meant by it.
#[allow(
    clippy::needless_update,
    reason = "the baseline's messages end in `..Default::default()` so that a field added to the \
              proto later compiles at its default and the walk still changes it"
)]
mod every_pushed_field_is_read {
    use super::*;
    use prost::Message;
    use prost_reflect::{
        DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor,
        ReflectMessage, Value,
    };
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    /// Fields the sidecar has a reason not to read, by their path from `ProxyConfig`. Only what
    /// pilot has already applied or what is redundant with a field that is read belongs here.
    const NOT_READ: &[(&str, &str)] = &[
        (
            "ProxyConfig.services.ports.name",
            "pilot has derived `protocol` from it (Istio's protocol selection); the sidecar reads \
             `protocol`",
        ),
        (
            "ProxyConfig.services.ports.target_port",
            "pilot resolves it per endpoint into `Endpoint.port`, which the sidecar reads (named \
             target ports differ per pod)",
        ),
        (
            "ProxyConfig.services.ports.routes.matches.port",
            "the route list is already per port (pilot drops matches for other ports); kept for display",
        ),
        (
            "ProxyConfig.services.ports.routes.matches.source_labels",
            "pilot evaluates them against the node and sends only matches that apply; kept for display",
        ),
    ];

    /// A cluster no route references, so that its name can change without breaking a route.
    const SPARE: &str = "outbound|9000||spare.default.svc.cluster.local";

    fn headers(prefix: &str) -> Option<pb::HeaderOps> {
        Some(pb::HeaderOps {
            set: Map::from([(format!("x-{prefix}-set"), "1".into())]),
            add: Map::from([(format!("x-{prefix}-add"), "2".into())]),
            remove: vec![format!("x-{prefix}-remove")],
            ..Default::default()
        })
    }

    fn rich_cluster(name: &str, subset: &str, ip: &str) -> pb::Cluster {
        pb::Cluster {
            name: name.into(),
            service_hostname: "httpbin.default.svc.cluster.local".into(),
            port: 8000,
            subset: subset.into(),
            endpoints: vec![pb::Endpoint {
                address: ip.into(),
                port: 80,
                dial_port: 15006,
                identity: "spiffe://cluster.local/ns/default/sa/httpbin".into(),
                labels: Map::from([
                    ("app".into(), "httpbin".into()),
                    ("version".into(), subset.into()),
                ]),
                workload: format!("default/httpbin-{subset}-abc12"),
                workload_name: format!("httpbin-{subset}"),
                ..Default::default()
            }],
            lb_policy: pb::LbPolicy::RoundRobin as i32,
            tls_mode: pb::TlsMode::IstioMutual as i32,
            // Both limits on requests in flight equal: the lower one counts, so lowering either
            // shows.
            connection_pool: Some(pb::ConnectionPool {
                max_connections: 10,
                connect_timeout_ms: 1000,
                max_pending_requests: 5,
                max_requests: 10,
                max_requests_per_connection: 100,
                idle_timeout_ms: 60_000,
                max_retries: 3,
                ..Default::default()
            }),
            // Split mode, so that the local-origin threshold counts.
            outlier_detection: Some(pb::OutlierDetection {
                consecutive_5xx: 5,
                interval_ms: 10_000,
                base_ejection_time_ms: 30_000,
                max_ejection_percent: 50,
                consecutive_gateway_errors: 3,
                split_external_local_origin_errors: true,
                consecutive_local_origin_failures: 4,
                min_health_percent: 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A valid push with at least one instance of every message and every field set to a value
    /// whose change shows (a delay percentage needs a delay, a redirect code a non-default code).
    fn baseline() -> pb::ProxyConfig {
        let forward = pb::HttpRoute {
            name: "default/httpbin/0".into(),
            matches: vec![pb::HttpMatch {
                uri: Some(prefix("/api")),
                headers: Map::from([("end-user".into(), exact("jason"))]),
                query_params: Map::from([("debug".into(), regex("[0-9]+"))]),
                method: Some(exact("GET")),
                port: 8000,
                ignore_uri_case: true,
                source_labels: Map::from([("app".into(), "sleep".into())]),
                without_headers: vec!["x-skip".into()],
                ..Default::default()
            }],
            destinations: vec![
                pb::WeightedCluster {
                    cluster: V1.into(),
                    weight: 80,
                    request_headers: headers("v1-request"),
                    response_headers: headers("v1-response"),
                    ..Default::default()
                },
                pb::WeightedCluster {
                    cluster: V2.into(),
                    weight: 20,
                    request_headers: headers("v2-request"),
                    response_headers: headers("v2-response"),
                    ..Default::default()
                },
            ],
            redirect: None,
            mirrors: vec![pb::Mirror {
                cluster: V2.into(),
                percent: 50.0,
                compare: Some(pb::MirrorCompare {
                    status: true,
                    headers: true,
                    body: true,
                    ignore_headers: vec!["date".into()],
                    ignore_json: vec!["$.headers.Host".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            timeout_ms: 3000,
            retries: Some(pb::RetryPolicy {
                attempts: 2,
                per_try_timeout_ms: 500,
                retry_on: vec!["5xx".into(), "503".into()],
                backoff_base_ms: 50,
                ..Default::default()
            }),
            fault: Some(pb::Fault {
                delay_ms: 100,
                delay_percent: 10.0,
                abort_status: 503,
                abort_percent: 5.0,
                ..Default::default()
            }),
            request_headers: headers("request"),
            response_headers: headers("response"),
            rewrite: Some(pb::Rewrite {
                uri: "/v2".into(),
                authority: "httpbin-v2".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let redirect = pb::HttpRoute {
            name: "default/httpbin/1".into(),
            matches: vec![pb::HttpMatch {
                uri: Some(exact("/old")),
                ..Default::default()
            }],
            redirect: Some(pb::Redirect {
                uri: "/new".into(),
                authority: "example.com".into(),
                port: 8080,
                scheme: "https".into(),
                code: 302,
                ..Default::default()
            }),
            ..Default::default()
        };
        pb::ProxyConfig {
            mesh: Some(pb::MeshSettings {
                trust_domain: "cluster.local".into(),
                mirror_shadow_suffix: true,
                ..Default::default()
            }),
            services: vec![pb::OutboundService {
                hostname: "httpbin.default.svc.cluster.local".into(),
                aliases: vec!["httpbin".into(), "httpbin.default".into()],
                vip: "10.96.0.10".into(),
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 8000,
                    target_port: 80,
                    protocol: "http".into(),
                    routes: vec![forward, redirect],
                    ..Default::default()
                }],
                namespace: "default".into(),
                name: "httpbin".into(),
                ..Default::default()
            }],
            clusters: vec![
                rich_cluster(V1, "v1", "10.0.0.1"),
                rich_cluster(V2, "v2", "10.0.0.2"),
                rich_cluster(SPARE, "spare", "10.0.0.3"),
            ],
            inbound: Some(pb::Inbound {
                mode: pb::MtlsMode::Strict as i32,
                port_modes: Map::from([(8080, pb::MtlsMode::Disable as i32)]),
                ..Default::default()
            }),
            tracing: Some(pb::Tracing {
                sampling_percent: 10.0,
                service_name: "httpbin".into(),
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                identity: "spiffe://cluster.local/ns/default/sa/sleep".into(),
                workload: "sleep".into(),
                namespace: "default".into(),
                labels: Map::from([
                    ("app".into(), "sleep".into()),
                    ("version".into(), "v1".into()),
                ]),
                addresses: vec!["10.0.0.7".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Valid values for the strings whose values are constrained, by `Message.field`.
    fn valid_strings(type_field: &str) -> &'static [&'static str] {
        match type_field {
            "OutboundService.vip" => &["10.96.0.99"],
            "Endpoint.address" | "Peer.addresses" => &["10.0.0.99"],
            "Endpoint.identity" => &["spiffe://cluster.local/ns/default/sa/other"],
            "WeightedCluster.cluster" | "Mirror.cluster" => &[V1, V2],
            "RetryPolicy.retry_on" => &["reset", "gateway-error"],
            "MirrorCompare.ignore_json" => &["$.mutated[0]"],
            // A valid header name, query parameter, label, host, path and regex alike.
            _ => &["mutated"],
        }
    }

    /// Values of one scalar type other than `current`.
    fn samples(type_field: &str, kind: &Kind, current: &Value) -> Vec<Value> {
        let values = match (kind, current) {
            (Kind::String, _) => valid_strings(type_field)
                .iter()
                .map(|s| Value::String((*s).into()))
                .collect(),
            (Kind::Bytes, _) => vec![Value::Bytes("mutated".into())],
            (Kind::Bool, Value::Bool(b)) => vec![Value::Bool(!b)],
            // One up and one down: where two limits combine (the lower one counts), only one of
            // the two directions shows.
            (Kind::Uint32 | Kind::Fixed32, Value::U32(n)) => [n.checked_add(1), n.checked_sub(1)]
                .into_iter()
                .flatten()
                .map(Value::U32)
                .collect(),
            (Kind::Uint64 | Kind::Fixed64, Value::U64(n)) => [n.checked_add(1), n.checked_sub(1)]
                .into_iter()
                .flatten()
                .map(Value::U64)
                .collect(),
            (Kind::Int32 | Kind::Sint32 | Kind::Sfixed32, Value::I32(n)) => {
                vec![Value::I32(n + 1), Value::I32(n - 1)]
            }
            (Kind::Int64 | Kind::Sint64 | Kind::Sfixed64, Value::I64(n)) => {
                vec![Value::I64(n + 1), Value::I64(n - 1)]
            }
            (Kind::Double, Value::F64(x)) => vec![Value::F64(x + 1.0), Value::F64(x - 1.0)],
            (Kind::Float, Value::F32(x)) => vec![Value::F32(x + 1.0), Value::F32(x - 1.0)],
            (Kind::Enum(e), _) => e.values().map(|v| Value::EnumNumber(v.number())).collect(),
            (kind, current) => panic!("{type_field}: no sample for {kind:?} (now {current:?})"),
        };
        values.into_iter().filter(|v| v != current).collect()
    }

    /// The message type a field leads to (a map's value type for a map).
    fn message_of(f: &FieldDescriptor) -> Option<MessageDescriptor> {
        match f.kind() {
            Kind::Message(m) if f.is_map() => match m.map_entry_value_field().kind() {
                Kind::Message(v) => Some(v),
                _ => None,
            },
            Kind::Message(m) => Some(m),
            _ => None,
        }
    }

    /// Every field path reachable from `desc`, with its `Message.field` name.
    fn schema(
        desc: &MessageDescriptor,
        prefix: &str,
        stack: &mut Vec<String>,
        out: &mut BTreeMap<String, String>,
    ) {
        for f in desc.fields() {
            let path = format!("{prefix}.{}", f.name());
            out.insert(path.clone(), format!("{}.{}", desc.name(), f.name()));
            if let Some(child) = message_of(&f)
                && !stack.iter().any(|s| s == child.full_name())
            {
                stack.push(child.full_name().to_owned());
                schema(&child, &path, stack, out);
                stack.pop();
            }
        }
    }

    /// One step from a message to a field's value and into its elements.
    #[derive(Clone, Debug)]
    enum Step {
        Field(FieldDescriptor),
        Index(usize),
        Key(MapKey),
    }

    /// One field of one message instance in the baseline.
    struct Site {
        /// The field's path from `ProxyConfig` without indices: what the verdict is about.
        schema: String,
        /// The steps to the message holding the field.
        container: Vec<Step>,
        field: FieldDescriptor,
    }

    fn shown(steps: &[Step], field: &FieldDescriptor) -> String {
        let mut s = String::new();
        for step in steps {
            match step {
                Step::Field(f) => write!(s, ".{}", f.name()),
                Step::Index(i) => write!(s, "[{i}]"),
                Step::Key(k) => write!(s, "[{k:?}]"),
            }
            .unwrap();
        }
        format!("{}.{}", s.trim_start_matches('.'), field.name())
            .trim_start_matches('.')
            .to_owned()
    }

    fn sites(msg: &DynamicMessage, prefix: &str, steps: &mut Vec<Step>, out: &mut Vec<Site>) {
        for f in msg.descriptor().fields() {
            let path = format!("{prefix}.{}", f.name());
            out.push(Site {
                schema: path.clone(),
                container: steps.clone(),
                field: f.clone(),
            });
            if message_of(&f).is_none() || !msg.has_field(&f) {
                continue;
            }
            steps.push(Step::Field(f.clone()));
            match &*msg.get_field(&f) {
                Value::Message(m) => sites(m, &path, steps, out),
                Value::List(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Message(m) = item {
                            steps.push(Step::Index(i));
                            sites(m, &path, steps, out);
                            steps.pop();
                        }
                    }
                }
                Value::Map(map) => {
                    let sorted: BTreeMap<_, _> = map.iter().collect();
                    for (k, v) in sorted {
                        if let Value::Message(m) = v {
                            steps.push(Step::Key(k.clone()));
                            sites(m, &path, steps, out);
                            steps.pop();
                        }
                    }
                }
                _ => {}
            }
            steps.pop();
        }
    }

    fn container<'a>(msg: &'a mut DynamicMessage, steps: &[Step]) -> &'a mut DynamicMessage {
        let Some((Step::Field(f), mut rest)) = steps.split_first() else {
            assert!(steps.is_empty(), "a path starts with a field: {steps:?}");
            return msg;
        };
        let mut value = msg.get_field_mut(f);
        match rest.split_first() {
            Some((Step::Index(i), r)) => {
                value = &mut value.as_list_mut().unwrap()[*i];
                rest = r;
            }
            Some((Step::Key(k), r)) => {
                value = value.as_map_mut().unwrap().get_mut(k).unwrap();
                rest = r;
            }
            _ => {}
        }
        container(value.as_message_mut().unwrap(), rest)
    }

    fn map_key(v: Value) -> MapKey {
        match v {
            Value::String(s) => MapKey::String(s),
            Value::U32(n) => MapKey::U32(n),
            Value::U64(n) => MapKey::U64(n),
            Value::I32(n) => MapKey::I32(n),
            Value::I64(n) => MapKey::I64(n),
            Value::Bool(b) => MapKey::Bool(b),
            v => panic!("{v:?} is no map key"),
        }
    }

    /// Valid changes to one field of `msg`: what each is, and the new value (`None`: cleared).
    fn changes(
        msg: &DynamicMessage,
        f: &FieldDescriptor,
        type_field: &str,
    ) -> Vec<(String, Option<Value>)> {
        let current = msg.get_field(f).into_owned();
        let mut out = Vec::new();
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                unreachable!()
            };
            let (key_field, value_field) =
                (entry.map_entry_key_field(), entry.map_entry_value_field());
            let map = current.as_map().unwrap();
            let sorted: BTreeMap<_, _> = map.iter().collect();
            // A new entry like an existing one (an empty message value may mean nothing).
            let new_value = match (sorted.values().next(), value_field.kind()) {
                (Some(v), _) => (*v).clone(),
                (None, Kind::Message(m)) => Value::Message(DynamicMessage::new(m)),
                (None, kind) => samples(type_field, &kind, &value_field.default_value()).remove(0),
            };
            for key in samples(type_field, &key_field.kind(), &key_field.default_value()) {
                let key = map_key(key);
                if map.contains_key(&key) {
                    continue;
                }
                let mut m = map.clone();
                m.insert(key.clone(), new_value.clone());
                out.push((format!("insert {key:?}"), Some(Value::Map(m))));
            }
            if value_field.kind().as_message().is_none() {
                for (k, v) in &sorted {
                    for s in samples(type_field, &value_field.kind(), v) {
                        let mut m = map.clone();
                        m.insert((*k).clone(), s.clone());
                        out.push((format!("[{k:?}] = {s:?}"), Some(Value::Map(m))));
                    }
                }
            }
            if !map.is_empty() {
                out.push(("clear".into(), None));
            }
        } else if f.is_list() {
            let items = current.as_list().unwrap();
            let appended: Vec<Value> = match f.kind() {
                Kind::Message(m) => vec![
                    items
                        .last()
                        .cloned()
                        .unwrap_or_else(|| Value::Message(DynamicMessage::new(m))),
                ],
                kind => samples(type_field, &kind, &Value::default_value(&kind)),
            };
            for a in appended {
                let what = match &a {
                    Value::Message(m) => {
                        format!("append a {} like the last", m.descriptor().name())
                    }
                    v => format!("append {v:?}"),
                };
                let mut l = items.to_vec();
                l.push(a);
                out.push((what, Some(Value::List(l))));
            }
            if !items.is_empty() {
                out.push((
                    "remove the last".into(),
                    Some(Value::List(items[..items.len() - 1].to_vec())),
                ));
            }
        } else if let Kind::Message(m) = f.kind() {
            let empty = Value::Message(DynamicMessage::new(m));
            if msg.has_field(f) {
                out.push(("unset".into(), None));
            }
            if current != empty || !msg.has_field(f) {
                out.push(("set to an empty message".into(), Some(empty)));
            }
        } else {
            for s in samples(type_field, &f.kind(), &current) {
                out.push((format!("= {s:?}"), Some(s)));
            }
        }
        out
    }

    /// `{:#?}` with the entries of every map and set in order: the model's hash maps iterate in
    /// an order of their own, different from one table to the next.
    fn canonical(table: &RouteTable) -> String {
        let text = format!("{table:#?}");
        let lines: Vec<&str> = text.lines().collect();
        canonical_lines(&lines).join("\n")
    }

    fn indent(line: &str) -> usize {
        line.len() - line.trim_start().len()
    }

    fn canonical_lines(lines: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            out.push(line.to_owned());
            i += 1;
            let trimmed = line.trim();
            if !trimmed.ends_with(['{', '[', '(']) {
                continue;
            }
            // The body is every deeper line up to the closing one at this depth (which may open
            // the next block itself: a map entry's value after a struct key).
            let depth = indent(line);
            let end = i + lines[i..]
                .iter()
                .position(|l| indent(l) <= depth)
                .expect("pretty Debug closes every block");
            let body = canonical_lines(&lines[i..end]);
            i = end;
            // A map or set prints `{` with no type name before it.
            let before = trimmed.trim_end_matches('{').trim_end();
            let unordered = trimmed.ends_with('{') && (before.is_empty() || before.ends_with(':'));
            if !unordered {
                out.extend(body);
                continue;
            }
            let mut entries: Vec<Vec<String>> = Vec::new();
            for l in body {
                let closes = l.trim_start().starts_with(['}', ']', ')']);
                match entries.last_mut() {
                    Some(entry) if indent(&l) > depth + 4 || closes => entry.push(l),
                    _ => entries.push(vec![l]),
                }
            }
            entries.sort();
            out.extend(entries.into_iter().flatten());
        }
        out
    }

    fn table_of(config: pb::ProxyConfig) -> Result<String, String> {
        RouteTable::convert("v1".into(), config)
            .map(|t| canonical(&t))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn canonical_debug_sorts_map_entries_only() {
        let lines = [
            "T {",
            "    m: {",
            "        \"b\": S {",
            "            x: 1,",
            "        },",
            "        \"a\": 2,",
            "    },",
            "    v: [",
            "        2,",
            "        1,",
            "    ],",
            "}",
        ];
        assert_eq!(
            canonical_lines(&lines),
            [
                "T {",
                "    m: {",
                "        \"a\": 2,",
                "        \"b\": S {",
                "            x: 1,",
                "        },",
                "    },",
                "    v: [",
                "        2,",
                "        1,",
                "    ],",
                "}",
            ]
        );
    }

    /// How changing one field at one place came out.
    enum Outcome {
        /// The table differs: the field is read.
        Read,
        /// The conversion accepted the change and the table is the same.
        Same(String),
        /// The conversion refused the change (the value is not valid there).
        Refused(String, String),
    }

    #[test]
    fn a_change_to_any_pushed_field_changes_the_table() {
        let pool = DescriptorPool::decode(weft_proto::FILE_DESCRIPTOR_SET).unwrap();
        let root = pool
            .get_message_by_name("weft.discovery.v1.ProxyConfig")
            .unwrap();
        let mut fields = BTreeMap::new();
        schema(&root, root.name(), &mut Vec::new(), &mut fields);

        let config = baseline();
        let base = table_of(config.clone()).expect("the baseline is valid");
        assert_eq!(
            table_of(config.clone()).unwrap(),
            base,
            "the same push converts to the same table"
        );
        let base_msg =
            DynamicMessage::decode(root.clone(), config.encode_to_vec().as_slice()).unwrap();
        let mut all = Vec::new();
        sites(&base_msg, root.name(), &mut Vec::new(), &mut all);

        let mut outcomes: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
        for site in &all {
            let holder = container(&mut base_msg.clone(), &site.container).clone();
            let type_field = &fields[&site.schema];
            for (what, value) in changes(&holder, &site.field, type_field) {
                let mut changed = base_msg.clone();
                let msg = container(&mut changed, &site.container);
                match value {
                    Some(v) => msg.set_field(&site.field, v),
                    None => msg.clear_field(&site.field),
                }
                let shown = format!("{} {what}", shown(&site.container, &site.field));
                let outcome = match table_of(changed.transcode_to().unwrap()) {
                    Ok(table) if table != base => Outcome::Read,
                    Ok(_) => Outcome::Same(shown),
                    Err(e) => Outcome::Refused(shown, e),
                };
                outcomes
                    .entry(site.schema.clone())
                    .or_default()
                    .push(outcome);
            }
        }

        let allowed: BTreeMap<&str, &str> = NOT_READ.iter().copied().collect();
        let mut problems = Vec::new();
        for (path, type_field) in &fields {
            let tried = outcomes.get(path).map_or(&[][..], Vec::as_slice);
            let read = tried.iter().any(|o| matches!(o, Outcome::Read));
            if tried.is_empty() {
                problems.push(format!(
                    "{type_field} ({path}): the baseline has no instance of it; extend baseline()"
                ));
                continue;
            }
            match (read, allowed.contains_key(path.as_str())) {
                (true, true) => problems.push(format!(
                    "{type_field} ({path}) is listed as not read but is: take it off NOT_READ"
                )),
                (false, false) => {
                    let mut p = format!(
                        "{type_field} ({path}) is not read: no valid change to it changes the \
                         RouteTable"
                    );
                    for o in tried {
                        match o {
                            Outcome::Same(s) => write!(p, "\n    {s}: same table"),
                            Outcome::Refused(s, e) => write!(p, "\n    {s}: refused ({e})"),
                            Outcome::Read => Ok(()),
                        }
                        .unwrap();
                    }
                    problems.push(p);
                }
                _ => {}
            }
        }
        for path in allowed.keys() {
            if !fields.contains_key(*path) {
                problems.push(format!("NOT_READ names {path}, which is no field"));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
