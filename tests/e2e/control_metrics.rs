//! The control plane's metrics as Prometheus sees them: a real `ca serve` and `pilot serve` with
//! `--monitoring-listen`, a VirtualService applied and a bad one refused, a real sidecar connected,
//! a change pushed to it, a NACK from a test-driven discovery stream, a certificate signed and a
//! bad token presented; then both `/metrics` texts must count exactly that, pass `promtool check
//! metrics` (only Istio's own counter names without `_total` may be linted), and a real Prometheus
//! (Debian's) must scrape both.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use weft_proto::discovery as pb;
use weft_tests::discovery_client::{self, DiscoveryStream};
use weft_tests::prometheus::{self, Prometheus};
use weft_tests::{ControlPlane, Sidecar, run};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const MONITORING: [&str; 2] = ["--monitoring-listen", "127.0.0.1:0"];

/// `GET http://addr/metrics`.
fn scrape(addr: &str) -> String {
    let (ok, out, err) = run(std::process::Command::new("curl").args([
        "-sf",
        "-m",
        "10",
        &format!("http://{addr}/metrics"),
    ]))
    .unwrap();
    assert!(ok, "scrape {addr}: {err}");
    out
}

/// The value of the sample written exactly `series` (name and labels as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes `addr` until `pred` holds for the text (counts land asynchronously); the last text.
fn scrape_until(addr: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(addr);
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never held:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `promtool check metrics`: the text parses, and the only lints are those Istio's own names draw
/// (counters without `_total`, and the CA's counters ending in `_count`), kept as Istio exports
/// them for its dashboards and alerts.
fn promtool_accepts(text: &str, dir: &std::path::Path, name: &str) {
    let report = prometheus::lints(text, dir, name).unwrap();
    let other: Vec<_> = report
        .iter()
        .filter(|l| {
            let istio = l.starts_with("pilot_") || l.starts_with("citadel_server_");
            let no_total = l.ends_with(r#" counter metrics should have "_total" suffix"#);
            let count = l.starts_with("citadel_server_")
                && l.ends_with(
                    r#" non-histogram and non-summary metrics should not have "_count" suffix"#,
                );
            !(istio && (no_total || count))
        })
        .collect();
    assert!(
        other.is_empty(),
        "{name}: promtool check metrics:\n{other:?}"
    );
}

/// A test-driven discovery stream for pod `default/nacker` (registered first, reporting no
/// version), with a certificate from the plane's CA: it receives its first push and NACKs it.
async fn nack_first_push(plane: &ControlPlane) -> mpsc::Sender<pb::DiscoveryRequest> {
    let node = pb::Node {
        proxy_version: String::new(),
        ..discovery_client::node("nacker", "nacker", &[("app", "nacker")], "10.9.0.1")
    };
    let mut stream = DiscoveryStream::open_registered(plane, node).await.unwrap();
    let first = stream.next().await.unwrap();
    stream
        .nack(&first, "", "the test rejects this config")
        .await
        .unwrap();
    stream.keep_open()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_and_ca_metrics_count_what_happened_pass_promtool_and_are_scraped_by_prometheus() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start_with_ca_args(dir.path(), &MONITORING, &MONITORING).unwrap();
    let ca_mon = plane
        .ca
        .announced("monitoring")
        .expect("CA monitoring address");
    let pilot_mon = plane
        .pilot
        .announced("monitoring")
        .expect("pilot monitoring address");

    // Config: a Service and the seed's VirtualService, then one refused (an unknown field).
    plane
        .apply(&format!("{EXAMPLES}/httpbin-service.yaml"))
        .unwrap();
    plane.apply(&format!("{EXAMPLES}/all-v1.yaml")).unwrap();
    let bad = dir.path().join("bad-vs.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\n\
         spec:\n  hosts: [httpbin]\n  htp: []\n",
    )
    .unwrap();
    let (ok, out, err) = plane
        .pilot_cmd(&["apply", "-f", bad.to_str().unwrap()])
        .unwrap();
    assert!(!ok, "the bad VirtualService was accepted: {out}{err}");

    // A real sidecar: its certificate from the CA, its config from pilot (ready = first push); it
    // reports its own version.
    let sleep = Sidecar::explicit(&plane, "sleep", "sleep", "app=sleep", None, &[]).unwrap();
    let sidecar_version = format!(r#"pilot_xds{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    let text = scrape_until(&pilot_mon, "one sidecar connected and pushed", |t| {
        value(t, &sidecar_version) == Some(1.0)
            && value(t, r#"pilot_xds_pushes{type="proxyconfig"}"#).is_some_and(|v| v >= 1.0)
    });
    assert_eq!(
        value(
            &text,
            r#"weft_pilot_config_rejected_total{reason="invalid"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"pilot_total_xds_rejects{type="proxyconfig"}"#),
        Some(0.0)
    );

    // A change reaches the connected sidecar: one convergence time per push it causes.
    plane.apply(&format!("{EXAMPLES}/mirror-v2.yaml")).unwrap();
    let text = scrape_until(&pilot_mon, "a convergence time", |t| {
        value(t, "pilot_proxy_convergence_time_count").is_some_and(|v| v >= 1.0)
    });
    let pushes = value(&text, r#"pilot_xds_pushes{type="proxyconfig"}"#).unwrap();
    assert!(pushes >= 2.0, "{text}");
    let converged = value(&text, "pilot_proxy_convergence_time_count").unwrap();
    let mean_convergence = value(&text, "pilot_proxy_convergence_time_sum").unwrap() / converged;
    // Debounce (100 ms quiet) then the push: well inside the 30 s bucket, over the 0 s one.
    assert_eq!(
        value(&text, r#"pilot_proxy_convergence_time_bucket{le="30"}"#),
        Some(converged)
    );
    assert!(value(&text, "pilot_proxy_convergence_time_sum").unwrap() > 0.0);
    assert_eq!(
        value(&text, r#"pilot_xds_push_time_count{type="proxyconfig"}"#),
        Some(pushes)
    );

    // A NACK from a second stream.
    let _nacker = nack_first_push(&plane).await;
    let pilot_text = scrape_until(&pilot_mon, "one NACK", |t| {
        value(t, r#"pilot_total_xds_rejects{type="proxyconfig"}"#) == Some(1.0)
    });
    assert_eq!(value(&pilot_text, &sidecar_version), Some(1.0));
    assert_eq!(
        value(&pilot_text, r#"pilot_xds{version="unknown"}"#),
        Some(1.0),
        "the stream that reported no version"
    );
    assert_eq!(
        value(&pilot_text, r#"pilot_info{version="0.1.0"}"#),
        Some(1.0)
    );

    // A bad token at the CA.
    assert!(plane.forged_token_refused().await.unwrap());
    let ca_text = scrape(&ca_mon);
    let issued = value(&ca_text, "citadel_server_success_cert_issuance_count").unwrap();
    // pilot, the sidecar and the NACKing stream, each once.
    assert_eq!(issued, 3.0, "{ca_text}");
    assert_eq!(
        value(&ca_text, "citadel_server_csr_count"),
        Some(issued + 1.0),
        "{ca_text}"
    );
    assert_eq!(
        value(
            &ca_text,
            r#"citadel_server_authentication_failure_count{reason="invalid_token"}"#
        ),
        Some(1.0),
        "{ca_text}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let root_expiry = value(&ca_text, "citadel_server_root_cert_expiry_timestamp").unwrap();
    assert!(root_expiry > now + 365.0 * 86400.0, "{ca_text}");

    // The format, as Prometheus' own checker reads it.
    promtool_accepts(&pilot_text, dir.path(), "pilot");
    promtool_accepts(&ca_text, dir.path(), "ca");

    // A real Prometheus scraping both every second.
    let config = json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "pilot", "static_configs": [{"targets": [pilot_mon]}]},
            {"job_name": "ca", "static_configs": [{"targets": [ca_mon]}]},
        ],
    });
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let prom = Prometheus::start(&config_file, dir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prom.query("up == 1").unwrap_or_default();
        let mut jobs: Vec<_> = up
            .iter()
            .filter_map(|s| s["metric"]["job"].as_str())
            .collect();
        jobs.sort_unstable();
        if jobs == ["ca", "pilot"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets up: {jobs:?}; all: {:?}",
            prom.query("up")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let pushes = prom
        .query(r#"pilot_xds_pushes{job="pilot",type="proxyconfig"}"#)
        .unwrap();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    let pushed = prometheus::sample_value(&pushes[0]);
    assert!(pushed >= 2.0, "{pushes:?}");
    let failures = prom
        .query(r#"sum(citadel_server_authentication_failure_count{job="ca"})"#)
        .unwrap();
    assert_eq!(
        failures.first().map(prometheus::sample_value),
        Some(1.0),
        "{failures:?}"
    );
    let p99 = prom
        .query("histogram_quantile(0.99, sum by (le) (pilot_proxy_convergence_time_bucket))")
        .unwrap();
    let p99 = p99
        .first()
        .map(prometheus::sample_value)
        .unwrap_or(f64::NAN);
    assert!(p99 > 0.0 && p99 <= 30.0, "convergence p99 {p99}");
    eprintln!(
        "control metrics: {pushed} pushes; convergence mean {mean_convergence:.3} s, p99 as \
         Prometheus interpolates it {p99:.3} s"
    );
    drop(sleep);
}
