use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::config::{Batch, Config, Off, Protocol, key_values};
use super::*;

fn parse(pairs: &[(&str, &str)]) -> (Result<Config, Off>, Vec<String>) {
    let env: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut warnings = Vec::new();
    let cfg = Config::from_env(|k| env.get(k).cloned(), &mut warnings);
    (cfg, warnings)
}

fn ok(pairs: &[(&str, &str)]) -> Config {
    let (cfg, warnings) = parse(pairs);
    assert!(warnings.is_empty(), "{warnings:?}");
    cfg.unwrap()
}

const EP: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");

#[test]
fn no_endpoint_or_switched_off_means_no_export() {
    assert_eq!(parse(&[]).0, Err(Off::NoEndpoint));
    assert_eq!(
        parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]).0,
        Err(Off::NoEndpoint),
        "empty is unset"
    );
    assert_eq!(
        parse(&[EP, ("OTEL_SDK_DISABLED", "TRUE")]).0,
        Err(Off::SdkDisabled)
    );
    assert_eq!(
        parse(&[EP, ("OTEL_TRACES_EXPORTER", "none")]).0,
        Err(Off::ExporterNone)
    );
    assert!(parse(&[EP, ("OTEL_TRACES_EXPORTER", "otlp")]).0.is_ok());
    // Unknown exporters: warned about, OTLP kept.
    let (cfg, w) = parse(&[EP, ("OTEL_TRACES_EXPORTER", "zipkin")]);
    assert!(cfg.is_ok() && w.len() == 1, "{w:?}");
    let (cfg, w) = parse(&[EP, ("OTEL_SDK_DISABLED", "yes")]);
    assert!(cfg.is_ok() && w[0].contains("OTEL_SDK_DISABLED"), "{w:?}");
    // A URL that does not parse: no export, said once.
    let (cfg, w) = parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:21")]);
    assert_eq!(cfg, Err(Off::NoEndpoint));
    assert_eq!(w.len(), 1, "{w:?}");
}

#[test]
fn endpoint_protocol_and_precedence() {
    let c = ok(&[EP]);
    assert_eq!(
        (c.endpoint.as_str(), c.protocol),
        ("http://c:4317", Protocol::Grpc)
    );
    let c = ok(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]);
    assert_eq!(
        (c.endpoint.as_str(), c.protocol),
        ("http://c:4318/v1/traces", Protocol::HttpProtobuf)
    );
    // The traces URL is used as is, and wins over the generic one.
    let c = ok(&[
        EP,
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://t:443/custom/path",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ]);
    assert_eq!(
        (c.endpoint.as_str(), c.protocol),
        ("https://t:443/custom/path", Protocol::HttpJson)
    );
    // Traces protocol wins over the generic one.
    let c = ok(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:9999"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
    ]);
    assert_eq!(
        (c.endpoint.as_str(), c.protocol),
        ("https://c:9999", Protocol::Grpc)
    );
    // A bad protocol: warned, then the port decides.
    let (c, w) = parse(&[EP, ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")]);
    assert_eq!(c.unwrap().protocol, Protocol::Grpc);
    assert_eq!(w.len(), 1);
    // No scheme: https unless insecure.
    let c = ok(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ]);
    assert_eq!(c.endpoint, "https://c:4317");
    let c = ok(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
        ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true"),
    ]);
    assert_eq!(c.endpoint, "http://c:4317");
}

#[test]
fn headers_timeout_compression_tls_files() {
    let c = ok(&[
        EP,
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "api-key=secret, x-tenant = a%20b%2Cc ,",
        ),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic.pem"),
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
    ]);
    let h: Vec<(&str, &str)> = c
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    assert_eq!(h, [("api-key", "secret"), ("x-tenant", "a b,c")]);
    assert!(c.headers.iter().all(|(_, v)| v.is_sensitive()));
    assert_eq!(c.timeout, Duration::from_millis(2500));
    assert!(c.gzip);
    assert_eq!(c.certificate, Some(PathBuf::from("/traces.pem")));
    assert_eq!(
        c.client_identity,
        Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
    );
    // Traces headers replace the generic ones.
    let c = ok(&[
        EP,
        ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
    ]);
    assert_eq!(c.headers.len(), 1);
    assert_eq!(c.headers[0].0, "b");
    // Defaults.
    let c = ok(&[EP]);
    assert_eq!(c.timeout, Duration::from_secs(10));
    assert!(!c.gzip && c.headers.is_empty() && c.certificate.is_none());
    assert_eq!(c.batch, Batch::default());
}

#[test]
fn bad_values_warn_and_fall_back_to_defaults() {
    let (c, w) = parse(&[
        EP,
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "good=1,novalue,=x,bad name=2,ok=%zz",
        ),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-5"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=1,broken"),
    ]);
    let c = c.unwrap();
    let names: Vec<&str> = c.headers.iter().map(|(k, _)| k.as_str()).collect();
    // `%zz` is not an escape: kept literally, as percent-decoding does.
    assert_eq!(names, ["good", "ok"]);
    assert_eq!(c.timeout, Duration::from_secs(10));
    assert!(!c.gzip);
    assert_eq!(c.client_identity, None);
    assert_eq!(c.batch, Batch::default());
    assert!(
        c.resource.is_empty(),
        "a bad entry discards the whole variable"
    );
    // One warning per bad value; a header value never appears in one.
    assert_eq!(w.len(), 9, "{w:#?}");
    assert!(w.iter().all(|w| !w.contains("secret")));
}

#[test]
fn resource_attributes_and_service_name() {
    let c = ok(&[
        EP,
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod,service.name=from-attrs,team=a%2Cb",
        ),
    ]);
    assert_eq!(c.service_name.as_deref(), Some("from-attrs"));
    assert_eq!(
        c.resource,
        [
            ("deployment.environment".to_owned(), "prod".to_owned()),
            ("team".to_owned(), "a,b".to_owned())
        ]
    );
    let c = ok(&[
        EP,
        ("OTEL_SERVICE_NAME", "from-env"),
        ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
    ]);
    assert_eq!(
        c.service_name.as_deref(),
        Some("from-env"),
        "OTEL_SERVICE_NAME wins"
    );
    assert_eq!(ok(&[EP]).service_name, None, "the mesh's own name stays");
    let merged = merge_resource(
        vec![("k8s.pod.name", "p".into()), ("weft.identity", "i".into())],
        &[
            ("k8s.pod.name".into(), "q".into()),
            ("team".into(), "a".into()),
        ],
    );
    assert_eq!(
        merged,
        [
            ("k8s.pod.name", "q".to_owned()),
            ("weft.identity", "i".to_owned()),
            ("team", "a".to_owned())
        ]
    );
}

#[test]
fn batch_processor_settings() {
    let c = ok(&[
        EP,
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10"),
        ("OTEL_BSP_SCHEDULE_DELAY", "250"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "3000"),
    ]);
    assert_eq!(
        c.batch,
        Batch {
            queue: 100,
            size: 10,
            delay: Duration::from_millis(250),
            export_timeout: Duration::from_secs(3)
        }
    );
    let (c, w) = parse(&[
        EP,
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000"),
    ]);
    assert_eq!(
        c.unwrap().batch.size,
        100,
        "a batch never exceeds the queue"
    );
    assert_eq!(w.len(), 1);
}

#[test]
fn key_value_lists() {
    assert_eq!(
        key_values(" a = 1 ,b=x%3Dy,, c=%E2%9C%93"),
        [
            Ok(("a".into(), "1".into())),
            Ok(("b".into(), "x=y".into())),
            Ok(("c".into(), "✓".into()))
        ]
    );
    assert_eq!(key_values("a=%FF"), [Err("a=%FF".into())], "not UTF-8");
    assert_eq!(key_values(""), []);
}

#[test]
fn backoff_grows_capped_with_jitter_in_the_upper_half() {
    for retry in 1..=10 {
        let full = FIRST_BACKOFF
            .saturating_mul(1 << (retry - 1).min(16))
            .min(MAX_BACKOFF);
        assert_eq!(backoff(retry, 1.0), full);
        assert_eq!(backoff(retry, 0.0), full / 2);
        for _ in 0..100 {
            let d = backoff(retry, fastrand::f64());
            assert!(d >= full / 2 && d <= full, "{retry}: {d:?}");
        }
    }
    assert_eq!(backoff(1, 1.0), Duration::from_millis(500));
    assert_eq!(backoff(2, 1.0), Duration::from_secs(1));
    assert_eq!(backoff(30, 1.0), MAX_BACKOFF);
}

#[test]
fn log_lines_are_rate_limited_and_count_what_they_skipped() {
    let mut r = RateLimited::default();
    let t = Instant::now();
    assert_eq!(r.allow(t), Some(0));
    assert_eq!(r.allow(t + Duration::from_secs(1)), None);
    assert_eq!(r.allow(t + Duration::from_secs(2)), None);
    assert_eq!(r.allow(t + Duration::from_secs(11)), Some(2));
}

#[test]
fn json_bodies_follow_the_otlp_json_mapping() {
    use crate::telemetry::trace::{Hop, Kind, Span};
    let span = Span {
        hop: Hop {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
            parent: Some(0x00f067aa0ba902b7),
            sampled: true,
        },
        name: "n".into(),
        kind: Kind::Server,
        service: Arc::from("svc"),
        start: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        end: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(2),
        status: 200,
        attributes: vec![("http.request.method", "GET".into())],
        events: Vec::new(),
        trace_state: Some("rojo=00f067aa0ba902b7".into()),
    };
    let req = crate::telemetry::trace::request(&[span], &[]);
    let v: serde_json::Value = serde_json::to_value(&req).unwrap();
    let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(s["traceId"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(s["spanId"], "b7ad6b7169203331");
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(s["kind"], 2, "enums as integers");
    assert_eq!(
        s["startTimeUnixNano"], "1000000000",
        "64-bit integers as strings"
    );
    let attrs = s["attributes"].as_array().unwrap();
    assert!(
        attrs.contains(
            &serde_json::json!({"key": "http.request.method", "value": {"stringValue": "GET"}})
        ),
        "{attrs:?}"
    );
    assert_eq!(
        v["resourceSpans"][0]["resource"]["attributes"][0],
        serde_json::json!({"key": "service.name", "value": {"stringValue": "svc"}})
    );
}
