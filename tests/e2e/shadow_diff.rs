//! Shadow-diff (issue 20) through a real sidecar: real ca, a real `sidecar run` (explicit mode), and
//! real HTTP servers as v1 and v2 (httpbin, or `tests/python/shadow_app.py`, under gunicorn).
//!
//! The config comes from [`FakePilot`] as a hand-made `ProxyConfig` whose route mirror carries
//! `Mirror.compare` the way pilot translates the `weft.io/mirror-compare*` annotations (its
//! `ignore_headers` holds pilot's defaults): these tests stand on the sidecar's half of the
//! contract alone. The annotation → `Mirror.compare` translation and `pilot mirror-report` are
//! pilot's half, tested there.

use std::process::Command;
use std::time::{Duration, Instant};

use weft_pilot_config::virtual_service::mirror_compare::DEFAULT_IGNORED_HEADERS;
use weft_proto::discovery as pb;
use weft_tests::fake_pilot::{FakePilot, simple_config};
use weft_tests::{ControlPlane, Httpbin, OtlpSink, Sidecar};

const FQDN: &str = "httpbin.default.svc.cluster.local";
const V2: &str = "outbound|8000|v2|httpbin.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(20);

/// A compare as pilot pushes it: pilot's default ignored headers, and `ignore_json`.
fn compare(ignore_json: &[&str]) -> pb::MirrorCompare {
    pb::MirrorCompare {
        status: true,
        headers: true,
        body: true,
        ignore_headers: DEFAULT_IGNORED_HEADERS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ignore_json: ignore_json.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// A first route `default/httpbin/down` for paths under `/down`: the existing route's copy whose
/// mirror goes to `cluster` (a copy target that is down).
fn mirror_down(cfg: &mut pb::ProxyConfig, cluster: &str) {
    let routes = &mut cfg.services[0].ports[0].routes;
    let mut to_down = routes[0].clone();
    to_down.name = "default/httpbin/down".into();
    to_down.matches = vec![pb::HttpMatch {
        uri: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Prefix("/down".into())),
        }),
        ..Default::default()
    }];
    to_down.mirrors[0].cluster = cluster.into();
    routes.insert(0, to_down);
}

fn cluster(name: &str, port: u16) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        service_hostname: FQDN.into(),
        port: 8000,
        endpoints: vec![pb::Endpoint {
            address: "127.0.0.1".into(),
            port: u32::from(port),
            dial_port: u32::from(port),
            workload: format!("default/{name}"),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// httpbin:8000 → v1 on `v1`, every request mirrored to v2 on `v2` and compared, route timeout
/// `timeout_ms` (0: none), every request traced.
fn config(v1: u16, v2: u16, ignore_json: &[&str], timeout_ms: u64) -> pb::ProxyConfig {
    let mut c = simple_config("httpbin", 8000, &[("127.0.0.1", v1, "")]);
    c.clusters.push(cluster(V2, v2));
    let route = &mut c.services[0].ports[0].routes[0];
    route.name = "default/httpbin/0".into();
    route.timeout_ms = timeout_ms;
    route.mirrors = vec![pb::Mirror {
        cluster: V2.into(),
        percent: 100.0,
        compare: Some(compare(ignore_json)),
    }];
    c.tracing = Some(pb::Tracing {
        sampling_percent: 100.0,
        service_name: "sleep".into(),
    });
    c
}

struct Mesh {
    pilot: FakePilot,
    client: Sidecar,
    plane: ControlPlane,
}

/// A ca, a fake pilot pushing `config`, and the client sidecar ("sleep"), ready.
fn mesh(dir: &std::path::Path, config: pb::ProxyConfig, otlp: Option<&OtlpSink>) -> Mesh {
    let mut plane = ControlPlane::start(dir, &[]).unwrap();
    plane.otlp = otlp.map(|s| s.grpc.clone());
    let pilot = FakePilot::start(&plane).unwrap();
    let nonce = pilot.push("1", config);
    let client = Sidecar::explicit_with_pilot(
        &plane,
        &pilot.addr.to_string(),
        "sleep",
        "sleep",
        "app=sleep",
        None,
        &[],
    )
    .unwrap();
    let ack = pilot.reply_to(&nonce, WAIT).unwrap();
    assert!(!ack.is_nack(), "{}", ack.error());
    Mesh {
        pilot,
        client,
        plane,
    }
}

/// One curl through the sidecar fetching every URL of `glob` (curl's `[1-N]` ranges) on one
/// connection; the status of each.
fn burst(client: &Sidecar, glob: &str) -> Vec<u16> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "60",
            "-x",
            &format!("http://{}", client.outbound),
        ])
        .args(["-o", "/dev/null", "-w", "%{http_code}\n"])
        .arg(glob)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

fn report(client: &Sidecar) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{}/mirror_report", client.admin)])
        .output()
        .unwrap();
    assert!(out.status.success(), "/mirror_report failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn total(outcomes: &serde_json::Value) -> u64 {
    outcomes.as_object().map_or(0, |m| {
        m.values().filter_map(serde_json::Value::as_u64).sum()
    })
}

/// Waits (bounded) until the report has concluded `n` comparisons over all routes.
fn wait_concluded(client: &Sidecar, n: u64) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = report(client);
        let done: u64 = r["routes"]
            .as_array()
            .map_or(0, |rs| rs.iter().map(|x| total(&x["outcomes"])).sum());
        if done >= n {
            assert_eq!(done, n, "more comparisons than requests: {r:#}");
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {n} comparisons concluded: {r:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn path<'a>(route: &'a serde_json::Value, p: &str) -> &'a serde_json::Value {
    route["paths"]
        .as_array()
        .and_then(|ps| ps.iter().find(|x| x["path"] == p))
        .unwrap_or_else(|| panic!("no path {p} in {route:#}"))
}

/// `promtool check metrics` on a sidecar's scrape: every lint but the base-unit one that Istio's
/// `_milliseconds` names and ours (named by the issue) share.
fn promtool_problems(text: &str, dir: &std::path::Path) -> Vec<String> {
    weft_tests::prometheus::lints(text, dir, "sleep")
        .unwrap()
        .into_iter()
        .filter(|l| !l.contains("use base unit \"seconds\""))
        .collect()
}

#[test]
fn identical_versions_match_on_every_request_date_and_trace_headers_aside() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let v1 = Httpbin::start(dir.path(), "v1").unwrap();
    let v2 = Httpbin::start(dir.path(), "v2").unwrap();
    let m = mesh(dir.path(), config(v1.port, v2.port, &[], 0), None);
    // `/config_dump` shows what the route compares.
    let dump: serde_json::Value = serde_json::from_str(&m.client.config_dump().unwrap()).unwrap();
    let compare = &dump["services"][0]["ports"][0]["routes"][0]["mirrors"][0]["compare"];
    assert_eq!(compare["body"], true, "{dump:#}");
    assert_eq!(compare["ignore_headers"][0], "date", "{dump:#}");
    // 300 requests over three shapes, long enough that gunicorn's `Date` ticks over between
    // primaries and copies; the copies carry other span ids in their trace headers.
    let started = Instant::now();
    let mut codes = Vec::new();
    for glob in [
        "http://httpbin:8000/json?i=[1-100]",
        "http://httpbin:8000/status/200?i=[1-100]",
        "http://httpbin:8000/html?i=[1-100]",
    ] {
        codes.extend(burst(&m.client, glob));
    }
    assert_eq!(codes.len(), 300);
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let r = wait_concluded(&m.client, 300);
    eprintln!("300 requests in {:?}", started.elapsed());
    let route = &r["routes"][0];
    assert_eq!(route["route"], "default/httpbin/0");
    assert_eq!(route["destination_service"], FQDN);
    assert_eq!(
        route["outcomes"],
        serde_json::json!({"match": 300}),
        "{r:#}"
    );
    for p in ["GET /json", "GET /status/200", "GET /html"] {
        assert_eq!(
            path(route, p)["outcomes"],
            serde_json::json!({"match": 100})
        );
        assert!(
            path(route, p)["sample"].is_null(),
            "no divergence, no sample"
        );
    }
    assert_eq!(route["noisy_headers"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["pending"], 0);

    let stats = m.client.stats().unwrap();
    let series = format!(
        "weft_mirror_compare_total{{source_workload=\"sleep\",destination_service=\"{FQDN}\",route=\"default/httpbin/0\",outcome=\"match\"}} 300"
    );
    assert!(stats.lines().any(|l| l == series), "{stats}");
    assert!(
        stats.lines().any(|l| l.starts_with(
            "weft_mirror_compare_latency_delta_milliseconds_count{source_workload=\"sleep\""
        ) && l.ends_with(" 300")),
        "{stats}"
    );
    let problems = promtool_problems(&stats, dir.path());
    assert!(problems.is_empty(), "{problems:#?}");

    // The report reaches pilot on the config stream (within the 5 s period): no nonce, so it is
    // neither an ACK nor a NACK, and the stream goes on taking pushes.
    let deadline = Instant::now() + WAIT;
    let sent = loop {
        let req = m.pilot.next_request(WAIT).unwrap().request;
        if let Some(rep) = req.mirror_report
            && rep.routes.first().and_then(|r| r.outcomes.get("match")) == Some(&300)
        {
            assert_eq!(req.response_nonce, "");
            assert!(req.error_detail.is_none());
            break rep;
        }
        assert!(Instant::now() < deadline, "no report with the 300 matches");
    };
    assert_eq!(sent.routes[0].route, "default/httpbin/0");
    assert_eq!(sent.routes[0].paths.len(), 3);
    let nonce = m.pilot.push("2", config(v1.port, v2.port, &[], 0));
    let ack = m.pilot.reply_to(&nonce, WAIT).unwrap();
    assert!(!ack.is_nack(), "{}", ack.error());
}

#[test]
fn divergences_are_named_by_path_and_noise_and_ignored_paths_are_not() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = shadow_apps(dir.path());
    // A port nothing listens on: "v2 down".
    let down = closed_port();
    // Route timeout 1 s: the copy timeout too (v2's /slow takes 3 s).
    let mut cfg = config(v1.port, v2.port, &["$.served_by"], 1000);
    let down_cluster = "outbound|8000|down|httpbin.default.svc.cluster.local";
    cfg.clusters.push(cluster(down_cluster, down));
    mirror_down(&mut cfg, down_cluster);
    let sink = OtlpSink::start(dir.path(), None).unwrap();
    let m = mesh(dir.path(), cfg, Some(&sink));

    let mut sent = 0;
    for (glob, n) in [
        ("http://httpbin:8000/flaky?i=[1-5]", 5),
        ("http://httpbin:8000/hdr?i=[1-3]", 3),
        ("http://httpbin:8000/json/ignored?i=[1-3]", 3),
        ("http://httpbin:8000/json/diff?i=[1-3]", 3),
        ("http://httpbin:8000/json/noisy?i=[1-4]", 4),
        ("http://httpbin:8000/orders/[12345-12346]", 2),
        ("http://httpbin:8000/down?i=[1-2]", 2),
    ] {
        let codes = burst(&m.client, glob);
        assert_eq!(
            codes,
            vec![200; n],
            "{glob}: the caller always gets v1's answer"
        );
        sent += n as u64;
    }
    // v2 slow beyond the copy timeout: the primary is not held up.
    let t = Instant::now();
    let (code, _) = m.client.curl("http://httpbin:8000/slow", &[]).unwrap();
    assert_eq!(code, 200);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "the primary waited for the copy: {:?}",
        t.elapsed()
    );
    sent += 1;

    let r = wait_concluded(&m.client, sent);
    let routes = r["routes"].as_array().unwrap();
    let main = routes
        .iter()
        .find(|x| x["route"] == "default/httpbin/0")
        .unwrap();
    let to_down = routes
        .iter()
        .find(|x| x["route"] == "default/httpbin/down")
        .unwrap();
    let outcomes = |p: &str| path(main, p)["outcomes"].clone();
    // v2 answering 500 on one path: exactly that path is `status`.
    assert_eq!(outcomes("GET /flaky"), serde_json::json!({"status": 5}));
    let sample = &path(main, "GET /flaky")["sample"];
    assert_eq!(
        (&sample["primary_status"], &sample["mirror_status"]),
        (&serde_json::json!(200), &serde_json::json!(500))
    );
    assert_eq!(sample["request_id"].as_str().unwrap().len(), 36, "{sample}");
    for p in main["paths"].as_array().unwrap() {
        if p["path"] != "GET /flaky" {
            assert!(p["outcomes"].get("status").is_none(), "{p:#}");
        }
    }
    assert_eq!(outcomes("GET /hdr"), serde_json::json!({"headers": 3}));
    assert_eq!(
        path(main, "GET /hdr")["sample"]["headers"],
        serde_json::json!(["x-added-by-v2"])
    );
    // Differing only in an ignored path: match. In another path: `body`, naming it.
    assert_eq!(
        outcomes("GET /json/ignored"),
        serde_json::json!({"match": 3})
    );
    assert_eq!(outcomes("GET /json/diff"), serde_json::json!({"body": 3}));
    assert_eq!(
        path(main, "GET /json/diff")["sample"]["json_paths"],
        serde_json::json!(["$.a.b"])
    );
    // A fresh id in every answer: the first copy diverges; the second primary differs from the
    // first in the same path, which is noise from then on.
    assert_eq!(
        outcomes("GET /json/noisy"),
        serde_json::json!({"body": 1, "match": 3})
    );
    // Ids in the path are one shape, and the id the body echoes differs between its primaries:
    // noise too (Diffy's method cannot tell an echoed id from a random one).
    assert_eq!(
        main["noisy_json"],
        serde_json::json!(["$.meta.request", "$.order"])
    );
    assert_eq!(
        outcomes("GET /orders/{id}"),
        serde_json::json!({"match": 2})
    );
    assert_eq!(outcomes("GET /slow"), serde_json::json!({"timeout": 1}));
    // v2 down: the copy fails to connect.
    assert_eq!(
        path(to_down, "GET /down")["outcomes"],
        serde_json::json!({"mirror_error": 2})
    );
    assert_eq!(r["pending"], 0);

    // The client span of each divergent request carries the event; a matching one none.
    let spans = sink
        .wait("the divergence events of /flaky", |spans| {
            spans
                .iter()
                .filter(|s| {
                    s["kind"] == "client"
                        && s["attributes"]["http.url"]
                            .as_str()
                            .is_some_and(|p| p.contains("/flaky"))
                        && s["events"][0]["name"] == "weft.mirror.divergence"
                })
                .count()
                == 5
        })
        .unwrap();
    let client_span = |prefix: &str| {
        spans
            .iter()
            .find(|s| {
                s["kind"] == "client"
                    && s["attributes"]["weft.mirror"].is_null()
                    && s["attributes"]["http.url"]
                        .as_str()
                        .is_some_and(|p| p.contains(prefix))
            })
            .unwrap_or_else(|| panic!("no client span for {prefix}"))
            .clone()
    };
    let flaky = client_span("/flaky");
    let event = &flaky["events"][0]["attributes"];
    assert_eq!(event["outcome"], "status");
    assert_eq!(event["mirror_status"], "500");
    assert!(event["latency_delta_us"].as_str().is_some(), "{event}");
    let spans = sink
        .wait("the /json/diff and /json/ignored spans", |spans| {
            spans.iter().any(|s| {
                s["attributes"]["http.url"]
                    .as_str()
                    .is_some_and(|p| p.contains("/json/ignored"))
            })
        })
        .unwrap();
    let _ = spans;
    let diff = client_span("/json/diff");
    assert_eq!(diff["events"][0]["attributes"]["json_paths"], "$.a.b");
    let ignored = client_span("/json/ignored");
    assert_eq!(ignored["events"], serde_json::json!([]), "{ignored:#}");
    let down = client_span("/down");
    assert_eq!(down["events"][0]["attributes"]["outcome"], "mirror_error");
}

/// Resident set of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_v2_that_never_answers_keeps_the_pending_table_bounded() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let v1 = Httpbin::start_app(
        dir.path(),
        "v1",
        "shadow_app:app",
        &[("SHADOW_VARIANT", "v1")],
    )
    .unwrap();
    // Listens and never accepts: connections complete into the backlog and then hang, later ones
    // are not even accepted by the kernel. No answer ever comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let m = mesh(dir.path(), config(v1.port, silent_port, &[], 1000), None);
    let pid = m.client.proc.pid();
    let pending = || {
        m.client
            .stat("weft_mirror_compare_pending")
            .unwrap_or(f64::NAN)
    };
    // Warm up (pools, allocator arenas), then measure.
    assert!(
        burst(&m.client, "http://httpbin:8000/get?i=[1-300]")
            .iter()
            .all(|c| *c == 200)
    );
    let deadline = Instant::now() + WAIT;
    while pending() > 0.0 {
        assert!(Instant::now() < deadline, "comparisons never concluded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = rss_kib(pid);
    let mut max_pending = 0.0f64;
    let rounds = 8;
    for round in 0..rounds {
        let codes = burst(
            &m.client,
            &format!("http://httpbin:8000/get?r={round}&i=[1-500]"),
        );
        assert_eq!(codes.len(), 500);
        assert!(codes.iter().all(|c| *c == 200), "the primary is untouched");
        let p = pending();
        assert!(p <= 1024.0, "pending {p} over the table's bound");
        max_pending = max_pending.max(p);
    }
    let sent = 300 + rounds * 500;
    let r = wait_concluded(&m.client, sent);
    let after = rss_kib(pid);
    eprintln!("rss {before} KiB -> {after} KiB, max pending {max_pending}");
    assert!(max_pending > 0.0, "copies were pending at some point");
    let o = &r["routes"][0]["outcomes"];
    assert!(o["timeout"].as_u64().unwrap_or(0) > 0, "{o}");
    assert_eq!(o.get("match"), None, "{o}");
    // Copies beyond the mirror's in-flight bound are not sent: not compared either.
    assert!(o["skipped"].as_u64().unwrap_or(0) > 0, "{o}");
    assert_eq!(r["pending"], 0);
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB over {} requests",
        rounds * 500
    );
    drop(silent);
}

/// `/config_dump`'s version.
fn version(s: &Sidecar) -> String {
    let dump: serde_json::Value = serde_json::from_str(&s.config_dump().unwrap()).unwrap();
    dump["version"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn through_mtls_sidecars_a_copy_is_compared_and_a_mesh_error_is_a_mirror_error() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = shadow_apps(dir.path());
    let closed = closed_port();
    // First a config without endpoints, so that every sidecar becomes ready and shows its ports.
    let m = mesh(
        dir.path(),
        config(v1.port, v2.port, &["$.served_by"], 0),
        None,
    );
    let plane = &m.plane;
    let pod = |name: &str, app: u16| {
        Sidecar::explicit_with_pilot(
            plane,
            &m.pilot.addr.to_string(),
            name,
            "httpbin",
            "app=httpbin",
            Some(app),
            &[],
        )
        .unwrap()
    };
    let pod_v1 = pod("httpbin-v1", v1.port);
    let pod_v2 = pod("httpbin-v2", v2.port);
    // Its app is down: its sidecar answers copies 503 with `x-weft-error` (flag UF).
    let pod_v3 = pod("httpbin-v3", closed);
    let port_of = |s: &Sidecar| -> u16 { s.inbound.rsplit(':').next().unwrap().parse().unwrap() };
    let mtls = |c: &mut pb::Cluster, app: u16, sidecar: &Sidecar| {
        c.endpoints[0].port = u32::from(app);
        c.endpoints[0].dial_port = u32::from(port_of(sidecar));
        c.endpoints[0].identity = "spiffe://cluster.local/ns/default/sa/httpbin".into();
        c.tls_mode = pb::TlsMode::IstioMutual as i32;
    };
    let mut cfg = config(v1.port, v2.port, &["$.served_by"], 0);
    mtls(&mut cfg.clusters[0], v1.port, &pod_v1);
    mtls(&mut cfg.clusters[1], v2.port, &pod_v2);
    let down = "outbound|8000|v3|httpbin.default.svc.cluster.local";
    let mut c3 = cluster(down, closed);
    mtls(&mut c3, closed, &pod_v3);
    cfg.clusters.push(c3);
    mirror_down(&mut cfg, down);
    m.pilot.push("2", cfg);
    let deadline = Instant::now() + WAIT;
    while version(&m.client) != "2" {
        assert!(Instant::now() < deadline, "the client never took version 2");
        std::thread::sleep(Duration::from_millis(100));
    }

    for (glob, n) in [
        ("http://httpbin:8000/flaky?i=[1-3]", 3),
        ("http://httpbin:8000/json/diff?i=[1-2]", 2),
        ("http://httpbin:8000/json/ignored?i=[1-4]", 4),
        ("http://httpbin:8000/down?i=[1-2]", 2),
    ] {
        assert_eq!(burst(&m.client, glob), vec![200; n], "{glob}");
    }
    let r = wait_concluded(&m.client, 11);
    let route = |name: &str| {
        r["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["route"] == name)
            .unwrap()
            .clone()
    };
    let main = route("default/httpbin/0");
    assert_eq!(
        path(&main, "GET /flaky")["outcomes"],
        serde_json::json!({"status": 3})
    );
    assert_eq!(
        path(&main, "GET /json/diff")["outcomes"],
        serde_json::json!({"body": 2})
    );
    assert_eq!(
        path(&main, "GET /json/ignored")["outcomes"],
        serde_json::json!({"match": 4}),
        "the hop through two sidecars adds nothing that differs: {main:#}"
    );
    let to_down = route("default/httpbin/down");
    assert_eq!(
        path(&to_down, "GET /down")["outcomes"],
        serde_json::json!({"mirror_error": 2})
    );
    assert_eq!(path(&to_down, "GET /down")["sample"]["mirror_status"], 503);
    // The copies reached v2 (through its sidecar: the endpoints are mTLS only).
    assert!(
        v2.log_lines()
            .iter()
            .filter(|l| l.contains("GET /flaky"))
            .count()
            >= 3,
        "{:?}",
        v2.log_lines()
    );
    drop((pod_v1, pod_v2, pod_v3));
}

/// pilot (the real one, before its half of issue 20) and the sidecar's report: a request carrying
/// `mirror_report` and no nonce, sent after the stream's first push as the sidecar sends it, is
/// neither an ACK nor a NACK to pilot: the stream goes on, the next push is ACKed as usual and
/// proxy-status stays SYNCED. Driven by hand over the real discovery proto and mTLS, since the real
/// pilot pushes no `compare` yet (so a real sidecar would not report to it).
#[tokio::test]
async fn pilot_takes_a_nonce_less_report_for_neither_ack_nor_nack() {
    use weft_tests::discovery_client::{DiscoveryStream, node};

    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let apply = |file: &str| {
        let (ok, out, err) = plane
            .pilot_cmd(&["apply", "-f", &format!("{examples}/{file}")])
            .unwrap();
        assert!(ok, "apply {file}: {out}{err}");
    };
    apply("httpbin-service.yaml");
    let mut stream = DiscoveryStream::open_registered(
        &plane,
        node("sleep-1", "sleep", &[("app", "sleep")], "10.1.0.1"),
    )
    .await
    .unwrap();
    let first = stream.next().await.unwrap();
    stream.ack(&first).await.unwrap();
    let report = pb::DiscoveryRequest {
        version_info: first.version_info.clone(),
        mirror_report: Some(pb::MirrorReport {
            routes: vec![pb::RouteCompare {
                route: "default/httpbin/0".into(),
                destination_service: FQDN.into(),
                outcomes: [("match".to_owned(), 3u64)].into(),
                ..Default::default()
            }],
        }),
        ..Default::default()
    };
    stream.send(report.clone()).await.unwrap();
    let status = |want: &'static str| {
        let plane = &plane;
        async move {
            for _ in 0..100 {
                let (ok, out, err) = plane.pilot_cmd(&["proxy-status"]).unwrap();
                assert!(ok, "{err}");
                let line = out.lines().find(|l| l.contains("sleep-1")).unwrap_or("");
                if line.contains(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("sleep-1 never {want} in proxy-status");
        }
    };
    status("SYNCED").await;
    // A config change: pushed on the same stream, ACKed as usual; another report in between.
    apply("all-v1.yaml");
    let second = stream.next().await.unwrap();
    assert_ne!(second.version_info, first.version_info);
    stream.send(report).await.unwrap();
    stream.ack(&second).await.unwrap();
    status("SYNCED").await;
    let (_, out, _) = plane.pilot_cmd(&["proxy-status"]).unwrap();
    assert!(!out.contains("NACKED"), "{out}");
}

/// v1 and v2 of `tests/python/shadow_app.py` under gunicorn (v2 differs on the paths it names).
fn shadow_apps(dir: &std::path::Path) -> (Httpbin, Httpbin) {
    let app = |variant: &str| {
        Httpbin::start_app(
            dir,
            variant,
            "shadow_app:app",
            &[("SHADOW_VARIANT", variant)],
        )
        .unwrap()
    };
    (app("v1"), app("v2"))
}

/// A loopback port nothing listens on (a copy target that is down).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
