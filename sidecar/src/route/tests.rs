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
                });
                config(vec![r])
            },
            "mirror percentage 150",
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
