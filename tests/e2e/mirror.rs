//! Mirroring and tracing, the two behaviours of the seed task, through real sidecars and httpbin
//! (explicit mode, no root needed), with spans collected by the `otlp-sink` receiver.

use std::time::{Duration, Instant};

use weft_tests::seed::{Seed, has_vs_route};

/// `promtool check metrics` on a sidecar's scrape: every lint but the one Istio's own
/// `istio_request_duration_milliseconds` draws (kept as Istio names it, for its dashboards).
fn promtool_problems(text: &str, dir: &std::path::Path, name: &str) -> Vec<String> {
    weft_tests::prometheus::lints(text, dir, name)
        .unwrap()
        .into_iter()
        .filter(|l| {
            l != r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#
        })
        .collect()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits (bounded) until v2's access log has grown to `n` lines.
fn wait_v2_lines(m: &Seed, n: usize) -> Vec<String> {
    wait_lines(&m.v2, n)
}

/// Waits (bounded) until an app's access log has `n` lines (gunicorn logs after it answers).
fn wait_lines(app: &weft_tests::Httpbin, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = app.log_lines();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_seed_mirror_step_with_shadow_host_and_one_trace() {
    let m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("all-to-v1", has_vs_route).unwrap();
    assert_eq!(
        m.send(3, &[]).unwrap(),
        (3, 0),
        "before the mirror rule v2 sees nothing"
    );

    m.apply("mirror-v2.yaml").unwrap();
    m.wait_mirroring(true).unwrap();
    let v1_before = m.v1.log_lines().len();
    let v2_before = m.v2.log_lines().len();
    let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &[]).unwrap();
    assert_eq!(code, 200);

    // The caller got v1's answer; v1 and v2 both logged the request, v2's with the shadow host.
    let v1_lines = wait_lines(&m.v1, v1_before + 1);
    assert_eq!(v1_lines.len(), v1_before + 1);
    assert!(
        v1_lines.last().unwrap().ends_with("host=httpbin:8000"),
        "{v1_lines:?}"
    );
    let v2_lines = wait_v2_lines(&m, v2_before + 1);
    assert_eq!(v2_lines.len(), v2_before + 1, "the mirror never reached v2");
    let shadow = v2_lines.last().unwrap();
    assert!(shadow.contains("\"GET /headers HTTP/1.1\" 200"), "{shadow}");
    assert!(shadow.ends_with("host=httpbin-shadow:8000"), "{shadow}");
    // The copy carries the primary's x-request-id, x-envoy-internal, and the client pod's address in
    // x-forwarded-for, as in the seed's capture.
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned()
    };
    let primary = v1_lines.last().unwrap();
    let rid = field(primary, "rid=");
    assert_eq!(rid.len(), 36, "{primary}");
    assert_eq!(field(shadow, "rid="), rid, "{shadow}");
    assert_eq!(field(primary, "internal="), "-", "{primary}");
    assert_eq!(field(shadow, "internal="), "true", "{shadow}");
    assert_eq!(field(shadow, "xff="), "127.0.0.1", "{shadow}");

    // B3 as the app sees it, and the spans that make up the trace.
    let h = json(&body)["headers"].clone();
    let trace_id = h["X-B3-Traceid"].as_str().unwrap().to_owned();
    let server_span = h["X-B3-Spanid"].as_str().unwrap().to_owned();
    let client_span = h["X-B3-Parentspanid"].as_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32, "128-bit trace ids: {h}");
    assert_eq!(h["X-B3-Sampled"], "1");
    // httpbin hides X-Request-Id and X-Forwarded-For unless asked to show them.
    let (_, env) = m
        .sleep
        .curl("http://httpbin:8000/headers?show_env=1", &[])
        .unwrap();
    let env = json(&env)["headers"].clone();
    assert!(
        env["X-Request-Id"].as_str().is_some_and(|r| r.len() == 36),
        "{env}"
    );
    let spans = m
        .otlp
        .wait(
            "client, server, mirror and shadow-server spans of the trace",
            |spans| {
                spans
                    .iter()
                    .filter(|s| s["trace_id"] == trace_id.as_str())
                    .count()
                    >= 4
            },
        )
        .unwrap();
    let of_trace: Vec<&serde_json::Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == trace_id.as_str())
        .collect();
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        of_trace
            .iter()
            .find(|s| pred(s))
            .copied()
            .unwrap_or_else(|| panic!("span missing in {of_trace:#?}"))
    };
    let client = find(&|s| s["span_id"] == client_span.as_str());
    // Istio's `service.name` (`<canonical service>.<namespace>`), operation name and tags.
    assert_eq!(
        (client["kind"].as_str(), client["service"].as_str()),
        (Some("client"), Some("sleep.default"))
    );
    assert_eq!(client["name"], "httpbin.default.svc.cluster.local:8000/*");
    assert_eq!(client["attributes"]["http.response.status_code"], 200);
    assert_eq!(client["attributes"]["weft.subset"], "v1");
    let tags = &client["attributes"];
    for (tag, want) in [
        ("http.status_code", "200"),
        ("http.method", "GET"),
        ("http.url", "http://httpbin:8000/headers"),
        ("http.protocol", "HTTP/1.1"),
        ("response_flags", "-"),
        (
            "upstream_cluster",
            "outbound|8000|v1|httpbin.default.svc.cluster.local",
        ),
        ("request_size", "0"),
        ("peer.address", "127.0.0.1"),
        ("guid:x-request-id", rid.as_str()),
    ] {
        assert_eq!(tags[tag], want, "{tag}: {client:#}");
    }
    // The proxy's own tags travel once per export, as the resource's attributes.
    let resource = &client["resource"];
    for (tag, want) in [
        ("component", "proxy"),
        ("istio.mesh_id", "cluster.local"),
        ("istio.canonical_service", "sleep"),
        ("istio.canonical_revision", "v1"),
        ("istio.namespace", "default"),
    ] {
        assert_eq!(resource[tag], want, "{tag}: {client:#}");
    }
    assert!(
        resource["node_id"]
            .as_str()
            .is_some_and(|n| n.starts_with("sidecar~127.0.0.1~sleep.default~")),
        "{client:#}"
    );
    assert!(
        tags["user_agent"]
            .as_str()
            .is_some_and(|u| u.starts_with("curl/"))
    );
    assert!(tags["response_size"].as_str().is_some_and(|n| n != "0"));
    assert_eq!(
        client["attributes"]["weft.destination.workload"],
        "default/httpbin-v1"
    );
    let server = find(&|s| s["span_id"] == server_span.as_str());
    assert_eq!(
        (server["kind"].as_str(), server["service"].as_str()),
        (Some("server"), Some("httpbin.default"))
    );
    // The callee names the span as Istio's inbound side does, after the Service called.
    assert_eq!(server["name"], "httpbin.default.svc.cluster.local:8000/*");
    // (Envoy's inbound cluster name; the app's port is picked per test here.)
    assert!(
        server["attributes"]["upstream_cluster"]
            .as_str()
            .is_some_and(|c| c.starts_with("inbound|") && c.ends_with("||")),
        "{server:#}"
    );
    assert_eq!(server["resource"]["istio.canonical_service"], "httpbin");
    assert_eq!(server["resource"]["istio.canonical_revision"], "v1");
    assert_eq!(
        server["parent_span_id"],
        client_span.as_str(),
        "server span's parent is the client span"
    );
    assert_eq!(
        server["attributes"]["weft.peer.identity"],
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    let mirror = find(&|s| s["attributes"]["weft.mirror"] == "true");
    assert_eq!(
        mirror["parent_span_id"],
        client_span.as_str(),
        "the mirror is a child of the client span"
    );
    assert_eq!(
        mirror["attributes"]["http.url"],
        "http://httpbin-shadow:8000/headers"
    );
    let shadow_server =
        find(&|s| s["kind"] == "server" && s["parent_span_id"] == mirror["span_id"]);
    assert_eq!(
        shadow_server["attributes"]["http.url"],
        "http://httpbin-shadow:8000/headers"
    );
    // Two requests were mirrored: /headers and /headers?show_env=1 (counted once answered).
    let deadline = Instant::now() + Duration::from_secs(10);
    while m
        .sleep_stat("weft_mirror_requests_total{result=\"sent\"}")
        .unwrap()
        < 2
    {
        assert!(Instant::now() < deadline, "mirror copies were not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        m.sleep_stat("weft_mirror_requests_total{result=\"sent\"}")
            .unwrap(),
        2
    );

    // Cleanup: no more mirroring.
    let (ok, _, err) = m.plane.pilot_cmd(&["delete", "vs", "httpbin"]).unwrap();
    assert!(ok, "{err}");
    m.wait_mirroring(false).unwrap();
}

#[test]
fn incoming_b3_and_traceparent_are_continued() {
    let m = Seed::explicit(&[]).unwrap();
    let trace = "463ac35c9f6413ad48485a3953bb6124";
    for (what, header) in [
        ("single b3", format!("b3: {trace}-a2fb4a1d1a96d312-1")),
        ("multi", format!("X-B3-TraceId: {trace}")),
        (
            "traceparent",
            format!("traceparent: 00-{trace}-b7ad6b7169203331-01"),
        ),
    ] {
        let mut extra = vec!["-H", header.as_str()];
        if what == "traceparent" {
            extra.extend(["-H", "tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]);
        }
        if what == "multi" {
            extra.extend([
                "-H",
                "X-B3-SpanId: a2fb4a1d1a96d312",
                "-H",
                "X-B3-Sampled: 1",
            ]);
        }
        let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &extra).unwrap();
        assert_eq!(code, 200, "{what}");
        let h = json(&body)["headers"].clone();
        assert_eq!(h["X-B3-Traceid"], trace, "{what}: {h}");
        if what == "traceparent" {
            // W3C: the vendors' state goes on untouched, and the app sees this hop's span as
            // the parent in `traceparent`.
            assert_eq!(
                h["Tracestate"], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
                "{h}"
            );
            assert!(
                h["Traceparent"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(&format!("00-{trace}-"))
                        && !t.contains("b7ad6b7169203331")),
                "{h}"
            );
        }
    }
    // Both sidecars' spans of the traceparent request carry the caller's tracestate.
    let spans = m
        .otlp
        .wait("spans carrying the tracestate", |spans| {
            spans
                .iter()
                .filter(|s| {
                    s["trace_id"] == trace
                        && s["trace_state"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
                })
                .count()
                >= 2
        })
        .unwrap();
    let kinds: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter(|s| s["trace_state"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        .filter_map(|s| s["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["client", "server"].into_iter().collect(),
        "{spans:#?}"
    );
    // A malformed context starts a new trace instead of failing.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/headers",
            &["-H", "X-B3-TraceId: zzz", "-H", "X-B3-SpanId: -"],
        )
        .unwrap();
    assert_eq!(code, 200);
    let h = json(&body)["headers"].clone();
    assert_ne!(h["X-B3-Traceid"], "zzz");
    assert_eq!(h["X-B3-Traceid"].as_str().map(str::len), Some(32));
}

const MIRROR_50: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n        subset: v1\n    mirror:\n      host: httpbin\n      subset: v2\n    mirrorPercentage:\n      value: PCT\n";

#[test]
fn mirror_percentage_is_honoured() {
    let m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("all-to-v1", has_vs_route).unwrap();
    // Istio's own test: 0 (±0), 10 (±5 of 100 there; wider here), 50 (±10; wider here), 100.
    for (pct, range) in [
        (0.0, 0..=0),
        (10.0, 2..=22),
        (50.0, 30..=70),
        (100.0, 100..=100),
    ] {
        m.apply_yaml("pct.yaml", &MIRROR_50.replace("PCT", &pct.to_string()))
            .unwrap();
        if pct == 0.0 {
            // A 0% mirror is no mirror at all.
            m.wait_mirroring(false).unwrap();
        } else {
            m.wait_config("the percentage is in", |d| {
                d.to_string().contains(&format!("\"percent\":{pct:.1}"))
            })
            .unwrap();
        }
        let before = m.v2.log_lines().len();
        let stat = |result: &str| {
            m.sleep_stat(&format!(
                "weft_mirror_requests_total{{result=\"{result}\"}}"
            ))
            .unwrap()
        };
        // A copy made is one the roll chose: sent, or failed on its way. The roll is what the
        // percentage decides; whether a copy then reached v2 is the upstream's business (a v2
        // connection whose on-demand PING is slow on a loaded machine is held failing for a
        // moment, and the copies made meanwhile fail at once, by design: issue 17).
        let (sent_before, failed_before) = (stat("sent"), stat("failed"));
        assert_eq!(m.send(100, &[]).unwrap().0, 100, "every primary goes to v1");
        let (made, delivered) = if *range.end() == 0 {
            std::thread::sleep(Duration::from_millis(300));
            let arrived = m.v2.log_lines().len() - before;
            (arrived, arrived)
        } else {
            // The copies are sent as the primaries finish: wait (bounded) until the sidecar's
            // counts of finished copies stop moving (on a loaded machine the first copies alone
            // can take longer than any fixed wait).
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut last = (stat("sent"), stat("failed"));
            let mut still_since = Instant::now();
            while Instant::now() < deadline && still_since.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(100));
                let now = (stat("sent"), stat("failed"));
                if now != last {
                    last = now;
                    still_since = Instant::now();
                }
            }
            let sent = usize::try_from(last.0 - sent_before).unwrap_or(0);
            let failed = usize::try_from(last.1 - failed_before).unwrap_or(0);
            // Every copy the sidecar counts as sent reached v2.
            let arrived = wait_v2_lines(&m, before + sent).len() - before;
            assert!(
                arrived >= sent,
                "mirrorPercentage {pct}: {sent} copies sent, {arrived} reached v2"
            );
            (sent + failed, sent)
        };
        assert!(
            range.contains(&made),
            "mirrorPercentage {pct}: {made} of 100 copies made ({delivered} delivered); the \
             sidecar's mirror counters:\n{}",
            m.sleep
                .stats()
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("weft_mirror"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn a_failing_slow_or_oversized_mirror_never_touches_the_primary() {
    let mut m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.apply("mirror-v2.yaml").unwrap();
    m.wait_mirroring(true).unwrap();

    // A body over the 1 MiB mirror buffer: the primary succeeds, the copy is dropped and counted.
    let big = m.dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 2 * 1024 * 1024]).unwrap();
    let v2_before = m.v2.log_lines().len();
    let (code, _) = m
        .sleep
        .curl(
            "http://httpbin:8000/post",
            &[
                "--data-binary",
                &format!("@{}", big.display()),
                "-o",
                "/dev/null",
            ],
        )
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        m.sleep_stat("weft_mirror_requests_total{result=\"dropped_too_large\"}")
            .unwrap(),
        1
    );
    // A small body is mirrored whole.
    let (code, _) = m
        .sleep
        .curl("http://httpbin:8000/post", &["--data", "hello=mirror"])
        .unwrap();
    assert_eq!(code, 200);
    let lines = wait_v2_lines(&m, v2_before + 1);
    assert_eq!(
        lines.len(),
        v2_before + 1,
        "only the small POST was mirrored: {lines:?}"
    );
    assert!(lines.last().unwrap().contains("POST /post"), "{lines:?}");

    // A slow mirror target: v2's gunicorn (its whole process group: master and worker) is stopped,
    // so copies hang; primaries stay fast. It stays stopped (killed at the end), so no backlog of
    // copies can reach its log later.
    let v2_group = format!("-{}", m.v2.proc.id());
    weft_tests::run(std::process::Command::new("kill").args(["-STOP", "--", &v2_group])).unwrap();
    let started = Instant::now();
    assert_eq!(m.send(5, &[]).unwrap(), (5, 0));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "5 primaries took {took:?} behind a hanging mirror"
    );

    // A dead mirror target (v2's sidecar gone): primaries unaffected, failures counted.
    let failed_before = m
        .sleep_stat("weft_mirror_requests_total{result=\"failed\"}")
        .unwrap();
    m.sidecars[1].proc.kill().unwrap();
    assert_eq!(m.send(5, &[]).unwrap(), (5, 0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while m
        .sleep_stat("weft_mirror_requests_total{result=\"failed\"}")
        .unwrap()
        < failed_before + 5
    {
        assert!(
            Instant::now() < deadline,
            "mirror failures were not counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn istio_metrics_and_access_logs_move_as_expected() {
    let m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("all-to-v1", has_vs_route).unwrap();
    assert_eq!(m.send(4, &[]).unwrap(), (4, 0));
    let series = |text: &str, must: &[&str]| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && must.iter().all(|w| l.contains(w))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // The caller's sidecar reports as source, the callee's as destination, both seeing mTLS.
    let sleep_stats = m.sleep.stats().unwrap();
    let out = series(
        &sleep_stats,
        &[
            "reporter=\"source\"",
            "source_workload=\"sleep\"",
            "destination_workload=\"httpbin-v1\"",
            "destination_version=\"v1\"",
            "destination_service=\"httpbin.default.svc.cluster.local\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert_eq!(out, 4, "{sleep_stats}");
    let v1_stats = m.sidecars[0].stats().unwrap();
    // Both sides' real output passes promtool: HELP and TYPE once per family, samples together.
    for (name, text) in [("sleep", &sleep_stats), ("httpbin-v1", &v1_stats)] {
        let problems = promtool_problems(text, m.dir.path(), name);
        assert!(problems.is_empty(), "{name}: {problems:?}\n{text}");
    }
    // Istio's labels for a workload with `app`/`version` labels, in the one default cluster.
    for want in [
        "request_protocol=\"http\"",
        "grpc_response_status=\"\"",
        "destination_canonical_service=\"httpbin\"",
        "destination_canonical_revision=\"v1\"",
        "destination_cluster=\"Kubernetes\"",
        "source_canonical_service=\"sleep\"",
        "source_cluster=\"Kubernetes\"",
    ] {
        assert!(series(&sleep_stats, &[want]) >= 4, "{want}: {sleep_stats}");
    }
    // The callee names the caller's workload from the caller's verified certificate and what
    // pilot knows of the pods with that identity (sleep's Pod record says app=sleep, version=v1).
    let inb = series(
        &v1_stats,
        &[
            "reporter=\"destination\"",
            "source_workload=\"sleep\"",
            "source_workload_namespace=\"default\"",
            "source_app=\"sleep\"",
            "source_version=\"v1\"",
            "source_canonical_service=\"sleep\"",
            "source_canonical_revision=\"v1\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
            "destination_workload=\"httpbin-v1\"",
            "destination_service_name=\"httpbin\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(inb >= 4, "{v1_stats}");
    assert!(sleep_stats.contains("istio_request_duration_milliseconds_bucket{reporter=\"source\""));
    // The HTTP connections count on the listener, and not as Istio's TCP connections.
    assert!(sleep_stats.lines().any(|l| {
        l.starts_with("weft_listener_connections_opened_total{listener=\"outbound\"}")
            && !l.ends_with(" 0")
    }));
    assert!(
        sleep_stats
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\""))
            .all(|l| l.ends_with(" 0")),
        "{sleep_stats}"
    );

    // A 503 from the mesh is counted with its code too.
    m.apply_yaml(
        "v3.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n        subset: v3\n",
    )
    .unwrap();
    m.wait_config("the v3 route", |d| d.to_string().contains("|v3|"))
        .unwrap();
    assert_eq!(m.sleep.curl("http://httpbin:8000/get", &[]).unwrap().0, 503);
    assert_eq!(
        series(
            &m.sleep.stats().unwrap(),
            &[
                "response_code=\"503\"",
                "connection_security_policy=\"none\""
            ]
        ),
        1
    );

    // Envoy-format access log lines on the sidecars' stdout, one per request.
    let lines = m.sleep.proc.stdout_lines();
    let ok = lines
        .iter()
        .filter(|l| l.contains("\"GET /headers HTTP/1.1\" 200 - "))
        .count();
    assert_eq!(ok, 4, "{lines:#?}");
    let line = lines
        .iter()
        .find(|l| l.contains("\"GET /headers HTTP/1.1\" 200 - "))
        .unwrap();
    assert!(line.starts_with('['), "{line}");
    assert!(
        line.contains("\"httpbin:8000\"")
            && line.contains("outbound|8000|v1|httpbin.default.svc.cluster.local"),
        "{line}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"GET /get HTTP/1.1\" 503 UH ")),
        "{lines:#?}"
    );
    let v1_lines = m.sidecars[0].proc.stdout_lines();
    assert!(
        v1_lines
            .iter()
            .filter(|l| l.contains("\"GET /headers HTTP/1.1\" 200 - "))
            .count()
            >= 4,
        "{v1_lines:#?}"
    );
}

#[test]
fn spans_also_export_over_otlp_http_protobuf() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let mut plane = weft_tests::ControlPlane::start(dir.path(), &[]).unwrap();
    let sink = weft_tests::OtlpSink::start(dir.path(), None).unwrap();
    plane.otlp = Some(sink.http.clone());
    plane.otlp_protocol = "http/protobuf";
    plane
        .apply(&format!(
            "{}/httpbin-service.yaml",
            weft_tests::seed::EXAMPLES
        ))
        .unwrap();
    let app = weft_tests::Httpbin::start(dir.path(), "httpbin").unwrap();
    let _server = weft_tests::Sidecar::explicit(
        &plane,
        "httpbin-1",
        "httpbin",
        "app=httpbin",
        Some(app.port),
        &[],
    )
    .unwrap();
    let client =
        weft_tests::Sidecar::explicit(&plane, "sleep", "sleep", "app=sleep", None, &[]).unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        let (code, b) = client.curl("http://httpbin:8000/headers", &[]).unwrap();
        if code == 200 {
            body = b;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let trace_id = json(&body)["headers"]["X-B3-Traceid"]
        .as_str()
        .unwrap()
        .to_owned();
    sink.wait("both spans over OTLP/HTTP", |spans| {
        spans
            .iter()
            .filter(|s| s["trace_id"] == trace_id.as_str())
            .count()
            >= 2
    })
    .unwrap();
}

#[test]
fn the_shadow_suffix_can_be_switched_off_mesh_wide() {
    // Istio 1.28+ behaviour: mirrors keep the original host.
    let m = Seed::explicit(&["--mirror-shadow-suffix", "false"]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.apply("mirror-v2.yaml").unwrap();
    m.wait_mirroring(true).unwrap();
    let before = m.v2.log_lines().len();
    assert_eq!(
        m.sleep.curl("http://httpbin:8000/headers", &[]).unwrap().0,
        200
    );
    let lines = wait_v2_lines(&m, before + 1);
    assert!(
        lines.last().unwrap().ends_with("host=httpbin:8000"),
        "{lines:?}"
    );
}

#[test]
fn a_mirror_target_that_resets_connections_does_not_touch_the_primary() {
    let m = Seed::explicit(&[]).unwrap();
    // The mirror goes to a Service whose only endpoint resets every connection it accepts.
    let rst = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let rst_addr = rst.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in rst.incoming().flatten() {
            // SO_LINGER 0 + close = RST.
            let sock = socket2::SockRef::from(&conn);
            let _ = sock.set_linger(Some(Duration::ZERO));
            drop(conn);
        }
    });
    let reset = weft_tests::Sidecar::explicit(
        &m.plane,
        "resetter",
        "resetter",
        "app=resetter",
        Some(rst_addr.port()),
        &[],
    )
    .unwrap();
    m.apply_yaml(
        "resetter.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: resetter\nspec:\n  selector:\n    app: resetter\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n    mirror:\n      host: resetter\n",
    )
    .unwrap();
    m.wait_config("the mirror to resetter", |d| {
        d.to_string().contains("resetter.default.svc.cluster.local")
            && d.to_string().contains("default/resetter")
    })
    .unwrap();
    m.wait_mirroring(true).unwrap();
    let (v1, v2) = m.send(10, &[]).unwrap();
    assert_eq!(v1 + v2, 10, "every primary answered 200");
    let deadline = Instant::now() + Duration::from_secs(10);
    // The resetter's sidecar turns its app's resets into 503s (flag UF, as Envoy's) for the copies;
    // every copy ends (sent
    // with that status, or failed) without the primary noticing.
    let done = || {
        m.sleep_stat("weft_mirror_requests_total{result=\"sent\"}")
            .unwrap()
            + m.sleep_stat("weft_mirror_requests_total{result=\"failed\"}")
                .unwrap()
    };
    while done() < 10 {
        assert!(Instant::now() < deadline, "mirror copies never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let resetter_stats = reset.stats().unwrap();
    assert!(
        resetter_stats.lines().any(|l| l
            .starts_with("istio_requests_total{reporter=\"destination\"")
            && l.contains("response_code=\"503\"")),
        "{resetter_stats}"
    );
}
