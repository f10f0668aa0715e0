//! Span export to demanding collectors (issue 19): real Python OTLP receivers (grpcio with TLS server
//! credentials; http.server + ssl) that require an API-key header, fail the first exports with a
//! retryable answer, or accept only part of a batch. A real sidecar pair (ca, pilot, httpbin) sends
//! one request; the receiver must get that request's spans from both sidecars, and the sidecars'
//! counters must tell what happened.

use std::time::Duration;

use weft_tests::otlp::{Receiver, test_tls};
use weft_tests::{ControlPlane, Httpbin, Sidecar};

const KEY: &str = "x-api-key=s3cret";

/// A pair: httpbin behind `httpbin-1`'s sidecar, and a client sidecar `sleep`.
struct Pair {
    _app: Httpbin,
    server: Sidecar,
    client: Sidecar,
}

fn pair(plane: &ControlPlane, dir: &std::path::Path) -> Pair {
    plane
        .apply(&format!(
            "{}/httpbin-service.yaml",
            weft_tests::seed::EXAMPLES
        ))
        .unwrap();
    let app = Httpbin::start(dir, "httpbin").unwrap();
    let server = Sidecar::explicit(
        plane,
        "httpbin-1",
        "httpbin",
        "app=httpbin",
        Some(app.port),
        &[],
    )
    .unwrap();
    let client = Sidecar::explicit(plane, "sleep", "sleep", "app=sleep", None, &[]).unwrap();
    Pair {
        _app: app,
        server,
        client,
    }
}

/// One request through `client` that reaches httpbin; its trace id (as the app saw it).
fn one_request(client: &Sidecar) -> String {
    for _ in 0..100 {
        let (code, body) = client.curl("http://httpbin:8000/headers", &[]).unwrap();
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            return v["headers"]["X-B3-Traceid"].as_str().unwrap().to_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no request got through the pair");
}

/// `weft_spans_total{result="..."}` of a sidecar.
fn spans_total(s: &Sidecar, result: &str) -> f64 {
    let text = s.stats().unwrap();
    let prefix = format!("weft_spans_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

/// Both sidecars' spans of `trace` (a client and a server span, one the other's parent); returns
/// them (client, server).
fn assert_both_spans(
    spans: &[serde_json::Value],
    trace: &str,
) -> (serde_json::Value, serde_json::Value) {
    let of: Vec<&serde_json::Value> = spans.iter().filter(|s| s["trace_id"] == trace).collect();
    let client = of.iter().find(|s| s["kind"] == 3).expect("client span");
    let server = of.iter().find(|s| s["kind"] == 2).expect("server span");
    assert_eq!(server["parent"], client["span_id"], "{of:#?}");
    // What reaches the collector carries Istio's tags (a string attribute each).
    for span in [client, server] {
        let tags = &span["attributes"];
        for tag in [
            "istio.mesh_id",
            "istio.canonical_service",
            "istio.canonical_revision",
            "istio.namespace",
            "node_id",
            "component",
        ] {
            // The proxy's own tags: once per export, on the resource.
            assert!(
                span["resource"][tag]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "{tag} missing: {span:#}"
            );
        }
        for tag in [
            "upstream_cluster",
            "http.url",
            "http.method",
            "http.status_code",
            "response_flags",
            "guid:x-request-id",
            "request_size",
            "response_size",
            "user_agent",
        ] {
            assert!(
                tags[tag].as_str().is_some_and(|v| !v.is_empty()),
                "{tag} missing: {span:#}"
            );
        }
        assert_eq!(tags["http.status_code"], "200", "{span:#}");
        assert_eq!(span["resource"]["component"], "proxy", "{span:#}");
    }
    assert_eq!(
        client["attributes"]["guid:x-request-id"], server["attributes"]["guid:x-request-id"],
        "one request id on both sides"
    );
    ((*client).clone(), (*server).clone())
}

fn of_trace(trace: &str) -> impl Fn(&[serde_json::Value]) -> bool + '_ {
    move |spans| spans.iter().filter(|s| s["trace_id"] == trace).count() >= 2
}

#[test]
fn a_tls_grpc_collector_that_wants_a_key_and_is_unavailable_twice_loses_nothing() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let tls = test_tls(dir.path()).unwrap();
    let rx = Receiver::start(
        dir.path(),
        "otlp-grpc-tls",
        &[
            "--transport",
            "grpc",
            "--cert",
            tls.cert.to_str().unwrap(),
            "--key",
            tls.key.to_str().unwrap(),
            "--require-header",
            KEY,
            "--unavailable",
            "2",
        ],
    )
    .unwrap();
    let mut plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane.otlp = Some(format!("https://{}", rx.addr));
    plane.otlp_protocol = "grpc";
    plane.otlp_env = vec![
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE".into(),
            tls.ca.display().to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_HEADERS".into(), KEY.into()),
        // Spans from the start-up requests must not be batched together with the measured one.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
    ];
    let p = pair(&plane, dir.path());
    let trace = one_request(&p.client);
    let spans = rx
        .wait_spans("both sidecars' spans of the request", of_trace(&trace))
        .unwrap();
    assert_both_spans(&spans, &trace);
    // The receiver refused two exports (UNAVAILABLE) and accepted the rest, each with the key.
    let exports = rx.exports();
    assert!(exports.len() >= 3, "{exports:#?}");
    assert!(
        exports.iter().all(|e| e["authorized"] == true),
        "{exports:#?}"
    );
    // The two refusals were retried, and nothing was lost.
    let stat = |s: &Sidecar, m: &str| s.stat(m).unwrap();
    let retries = stat(&p.client, "weft_span_export_retries_total")
        + stat(&p.server, "weft_span_export_retries_total");
    assert_eq!(retries, 2.0);
    for s in [&p.client, &p.server] {
        for lost in [
            "dropped",
            "rejected",
            "failed_non_retryable",
            "failed_retries_exhausted",
        ] {
            assert_eq!(spans_total(s, lost), 0.0, "{lost}");
        }
        assert!(spans_total(s, "exported") >= 1.0);
    }
    // Every span the sidecars count as exported is one the receiver kept (the last reply may still
    // be on its way to a sidecar: bounded wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let exported = spans_total(&p.client, "exported") + spans_total(&p.server, "exported");
        if exported as usize == rx.spans().len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exported {exported}, received {}",
            rx.spans().len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mtls_http_collectors_get_protobuf_gzip_and_json_with_the_key_retry_after_and_partial_success_counted()
 {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let tls = test_tls(dir.path()).unwrap();
    let rx = Receiver::start(
        dir.path(),
        "otlp-http-tls",
        &[
            "--transport",
            "http",
            "--cert",
            tls.cert.to_str().unwrap(),
            "--key",
            tls.key.to_str().unwrap(),
            "--client-ca",
            tls.ca.to_str().unwrap(),
            "--require-header",
            "x-api-key=s3cret key",
            "--partial",
            "1",
            "--unavailable",
            "1",
        ],
    )
    .unwrap();
    let mut plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane.otlp = Some(format!("https://{}", rx.addr));
    plane.otlp_protocol = "http/protobuf";
    let common = vec![
        (
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE".to_owned(),
            tls.ca.display().to_string(),
        ),
        // Percent-encoded, as the specification's W3C-baggage-like format has it.
        (
            "OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
            "x-api-key=s3cret%20key".to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
        // The receiver wants a client certificate (mTLS to the collector).
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE".to_owned(),
            tls.client_cert.display().to_string(),
        ),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_KEY".to_owned(),
            tls.client_key.display().to_string(),
        ),
    ];
    plane.otlp_env = common.clone();
    plane
        .otlp_env
        .push(("OTEL_EXPORTER_OTLP_COMPRESSION".into(), "gzip".into()));
    let p = pair(&plane, dir.path());
    let trace = one_request(&p.client);
    let spans = rx
        .wait_spans("both sidecars' spans over http/protobuf", of_trace(&trace))
        .unwrap();
    assert_both_spans(&spans, &trace);

    // A second client exports OTLP/JSON, uncompressed, under a service name of the environment's
    // (OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES).
    plane.otlp_protocol = "http/json";
    plane.otlp_env = common;
    plane.otlp_env.extend([
        ("OTEL_SERVICE_NAME".to_owned(), "sleep-json-svc".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".to_owned(),
            "service.name=not-this,team=mesh%20core".to_owned(),
        ),
    ]);
    let json_client =
        Sidecar::explicit(&plane, "sleep-json", "sleep", "app=sleep", None, &[]).unwrap();
    let trace2 = one_request(&json_client);
    let spans = rx
        .wait_spans("the spans of the JSON client's request", of_trace(&trace2))
        .unwrap();
    let (client, server) = assert_both_spans(&spans, &trace2);
    assert_eq!(client["service"], "sleep-json-svc", "{client}");
    assert_eq!(client["resource"]["team"], "mesh core", "{client}");
    assert_eq!(client["resource"]["k8s.pod.name"], "sleep-json", "{client}");
    // The server sidecar keeps the mesh's own name for its workload.
    let (_, first_server) = assert_both_spans(&spans, &trace);
    assert_eq!(server["service"], first_server["service"]);
    assert_ne!(server["service"], "sleep-json-svc");
    assert!(server["resource"].get("team").is_none(), "{server}");

    let exports = rx.exports();
    assert!(
        exports
            .iter()
            .all(|e| e["authorized"] == true && e["path"] == "/v1/traces"),
        "{exports:#?}"
    );
    assert!(
        exports
            .iter()
            .any(|e| e["content_type"] == "application/x-protobuf"
                && e["content_encoding"] == "gzip")
    );
    assert!(
        exports
            .iter()
            .any(|e| e["content_type"] == "application/json" && e["content_encoding"] == "")
    );
    // The first export was answered 503 with Retry-After: retried once, after the second asked for.
    let retries: f64 = [&p.client, &p.server, &json_client]
        .iter()
        .map(|s| s.stat("weft_span_export_retries_total").unwrap())
        .sum();
    assert_eq!(retries, 1.0);
    assert_eq!(exports[0]["n"], 1);
    // Every accepted reply rejected one span: each sidecar counted it, over both encodings.
    for s in [&p.client, &p.server, &json_client] {
        assert!(spans_total(s, "rejected") >= 1.0);
        assert!(s.stat("weft_span_export_partial_success_total").unwrap() >= 1.0);
        assert_eq!(spans_total(s, "failed_non_retryable"), 0.0);
    }
}

#[test]
fn a_grpc_partial_success_is_counted_and_a_wrong_key_drops_the_batch() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(
        dir.path(),
        "otlp-grpc",
        &[
            "--transport",
            "grpc",
            "--require-header",
            KEY,
            "--partial",
            "1",
        ],
    )
    .unwrap();
    let mut plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane.otlp = Some(rx.addr.clone());
    plane.otlp_protocol = "grpc";
    plane.otlp_env = vec![
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS".into(), KEY.into()),
        // The generic headers are overridden by the traces-specific ones.
        (
            "OTEL_EXPORTER_OTLP_HEADERS".into(),
            "x-api-key=wrong".into(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        // gRPC message compression: exercised (grpcio decodes it; it does not tell the handler).
        ("OTEL_EXPORTER_OTLP_COMPRESSION".into(), "gzip".into()),
    ];
    let p = pair(&plane, dir.path());
    let trace = one_request(&p.client);
    rx.wait_spans("both sidecars' spans", of_trace(&trace))
        .unwrap();
    for s in [&p.client, &p.server] {
        assert!(spans_total(s, "rejected") >= 1.0);
        assert!(s.stat("weft_span_export_partial_success_total").unwrap() >= 1.0);
    }

    // With the generic (wrong) key the receiver answers UNAUTHENTICATED: not retryable, the batch is dropped
    // and counted, nothing retried.
    plane.otlp_env.remove(0);
    let keyless =
        Sidecar::explicit(&plane, "sleep-nokey", "sleep", "app=sleep", None, &[]).unwrap();
    let _ = one_request(&keyless);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while spans_total(&keyless, "failed_non_retryable") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            keyless.stats().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(keyless.stat("weft_span_export_retries_total").unwrap(), 0.0);
    assert_eq!(spans_total(&keyless, "exported"), 0.0);
}
