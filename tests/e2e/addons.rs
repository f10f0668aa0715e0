//! The Kubernetes add-ons (`deploy/k8s/addons/`) against the real things that can run here:
//! `kubernetes-validate --strict` on every manifest, and Debian's `prometheus` (binary run directly,
//! bounded, killed with its process group) scraping a local mesh through the add-on's own
//! relabelling, then every Grafana panel query, taken from the dashboards' JSON, run through
//! Prometheus' HTTP API: each must return data.
//!
//! Kubernetes service discovery cannot run here (and Debian builds Prometheus without it), so the
//! test's scrape job is the shipped `kubernetes-pods` job with `kubernetes_sd_configs` swapped for
//! `file_sd_configs` whose targets carry the `__meta_kubernetes_*` labels the pod role gives a pod
//! (annotations as `pilot inject` writes them, namespace, name, labels, phase). Everything else,
//! the relabel rules above all, is the shipped text; only the scrape interval is shortened.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::prometheus::{self, Prometheus, query, sample_value, tool as prometheus_tool};
use weft_tests::seed::EXAMPLES;
use weft_tests::{ControlPlane, Httpbin, Proc, Sidecar, run, venv};

const ADDONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s/addons");

/// The documents of a manifest file, as JSON values.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{ADDONS}/{file}")).unwrap();
    text.split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .filter(|d| !d.is_null())
        .collect()
}

/// `data[key]` of the ConfigMap `name` in `file`.
fn config_map(file: &str, name: &str, key: &str) -> String {
    documents(file)
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
        .and_then(|d| d["data"][key].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{file}: no ConfigMap {name} with data {key}"))
}

#[test]
fn addon_manifests_pass_kubernetes_validate_strict() {
    let validator = venv().join("bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh",
        validator.display()
    );
    let mut files: Vec<_> = std::fs::read_dir(ADDONS)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["grafana.yaml", "jaeger.yaml", "prometheus.yaml"]);
    for file in &files {
        let (ok, out, err) = run(Command::new(&validator).arg("--strict").arg(file)).unwrap();
        assert!(
            ok && !out.contains("ERROR"),
            "kubernetes-validate --strict rejects {}:\n{out}{err}",
            file.display()
        );
    }
}

/// The shipped config with the Kubernetes-discovery jobs fed from files instead: the pod role's
/// from `pods_file`, the endpoints role's from `endpoints_file`. Every other job (Prometheus
/// scraping itself) is left out, as nothing here serves it.
fn derived_config(shipped: &str, pods_file: &str, endpoints_file: &str) -> Value {
    let mut config: Value = serde_saphyr::from_str(shipped).unwrap();
    let jobs = config["scrape_configs"].as_array().unwrap().clone();
    let mut derived = Vec::new();
    for mut job in jobs {
        let Some(sd) = job.as_object_mut().unwrap().remove("kubernetes_sd_configs") else {
            continue;
        };
        // The roles the files below stand in for, each with the labels Kubernetes gives it.
        let file = if sd == json!([{"role": "pod"}]) {
            pods_file
        } else if sd == json!([{"role": "endpoints", "namespaces": {"names": ["weft-system"]}}]) {
            endpoints_file
        } else {
            panic!("{}: no stand-in for {sd}", job["job_name"]);
        };
        job["file_sd_configs"] = json!([{"files": [file], "refresh_interval": "1s"}]);
        job["scrape_interval"] = json!("1s");
        job["scrape_timeout"] = json!("1s");
        derived.push(job);
    }
    assert!(!derived.is_empty(), "no kubernetes_sd_configs job shipped");
    config["scrape_configs"] = Value::Array(derived);
    config["global"]["scrape_interval"] = json!("1s");
    config["global"]["scrape_timeout"] = json!("1s");
    config
}

/// The `__meta_kubernetes_*` labels Kubernetes' endpoints role gives one port of a ready endpoint
/// of a Service in weft-system, backed by pod `pod`.
fn endpoint_target(service: &str, port_name: &str, address: &str, pod: &str) -> Value {
    json!({
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": "weft-system",
            "__meta_kubernetes_service_name": service,
            "__meta_kubernetes_endpoint_port_name": port_name,
            "__meta_kubernetes_endpoint_ready": "true",
            "__meta_kubernetes_pod_name": pod,
        },
    })
}

/// The `__meta_kubernetes_*` labels Kubernetes' pod role gives a pod whose sidecar's Prometheus
/// port is `port`, annotated as `pilot inject` annotates (unless `annotated` is false).
fn pod_target(
    name: &str,
    labels: &[(&str, &str)],
    port: &str,
    phase: &str,
    annotated: bool,
) -> Value {
    let mut l = BTreeMap::from([
        (
            "__meta_kubernetes_namespace".to_owned(),
            "default".to_owned(),
        ),
        ("__meta_kubernetes_pod_name".to_owned(), name.to_owned()),
        (
            "__meta_kubernetes_pod_ip".to_owned(),
            "127.0.0.1".to_owned(),
        ),
        ("__meta_kubernetes_pod_phase".to_owned(), phase.to_owned()),
        (
            "__meta_kubernetes_pod_container_name".to_owned(),
            "weft-proxy".to_owned(),
        ),
        (
            "__meta_kubernetes_pod_container_init".to_owned(),
            "false".to_owned(),
        ),
    ]);
    if annotated {
        for (k, v) in [
            ("scrape", "true"),
            ("port", port),
            ("path", "/stats/prometheus"),
        ] {
            l.insert(
                format!("__meta_kubernetes_pod_annotation_prometheus_io_{k}"),
                v.to_owned(),
            );
            l.insert(
                format!("__meta_kubernetes_pod_annotationpresent_prometheus_io_{k}"),
                "true".to_owned(),
            );
        }
    }
    for (k, v) in labels {
        l.insert(format!("__meta_kubernetes_pod_label_{k}"), (*v).to_owned());
    }
    // The pod role's address is the container port's; the relabelling must replace it.
    json!({"targets": ["127.0.0.1:9"], "labels": l})
}

/// Grafana's built-in interval variables, as a dashboard at its defaults would expand them.
const BUILTINS: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "5m"),
];

fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = expr.to_owned();
    for (k, v) in BUILTINS {
        out = out.replace(k, v);
    }
    // Longest names first, so `$service` does not eat `$service_name`.
    let mut names: Vec<_> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    out
}

/// Every value combination of a dashboard's query variables (`label_values(EXPR, LABEL)`, each
/// able to use the ones before), as a user could pick them from Grafana's drop-downs; at most
/// [`MAX_ASSIGNMENTS`]. A variable with no values at all is a problem.
fn resolve_variables(
    base: &str,
    dashboard: &Value,
    problems: &mut Vec<String>,
) -> Vec<BTreeMap<String, String>> {
    let title = dashboard["title"].as_str().unwrap_or("?");
    let mut assignments = vec![BTreeMap::new()];
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") => {}
            other => {
                problems.push(format!(
                    "{title}: variable {name}: type {other:?} is not checked here"
                ));
                continue;
            }
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        let Some((expr, label)) = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(e, l)| (e, l.trim()))
            .filter(|(_, l)| {
                !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        else {
            problems.push(format!(
                "{title}: variable {name}: {q:?} is not label_values(EXPR, LABEL)"
            ));
            continue;
        };
        let mut next = Vec::new();
        for vars in &assignments {
            let expr = substitute(expr, vars);
            match query(base, &format!("group by ({label}) ({expr})")) {
                Ok(r) => {
                    for value in r.iter().filter_map(|s| s["metric"][label].as_str()) {
                        let mut vars = vars.clone();
                        vars.insert(name.clone(), value.to_owned());
                        next.push(vars);
                    }
                }
                Err(e) => problems.push(format!("{title}: variable {name}: {e}")),
            }
        }
        next.truncate(MAX_ASSIGNMENTS);
        if next.is_empty() {
            problems.push(format!("{title}: variable {name}: {q} has no values"));
            return Vec::new();
        }
        assignments = next;
    }
    assignments
}

/// Bounds the variable combinations tried per dashboard.
const MAX_ASSIGNMENTS: usize = 64;

/// Runs every panel query of `dashboard`; each must return data (a finite value) for at least
/// one choice of the variables. Returns how many queries there were, pushing failures to
/// `problems`.
fn check_dashboard(base: &str, dashboard: &Value, problems: &mut Vec<String>) -> usize {
    let title = dashboard["title"].as_str().unwrap_or("?").to_owned();
    let assignments = resolve_variables(base, dashboard, problems);
    let mut ran = 0;
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(!panels.is_empty(), "{title}: no panels");
    for panel in &panels {
        let ptitle = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{title} / {ptitle}: no queries"));
        }
        for t in targets {
            let raw = t["expr"].as_str().unwrap_or_default();
            ran += 1;
            let mut why = format!("{raw}: no variable values to try");
            let answered = assignments.iter().any(|vars| {
                let expr = substitute(raw, vars);
                why = if expr.is_empty() || expr.contains('$') {
                    format!("unresolved query {expr:?}")
                } else {
                    match query(base, &expr) {
                        Err(e) => format!("{expr}: {e}"),
                        Ok(r) if r.is_empty() => format!("{expr}: no data"),
                        Ok(r) if r.iter().all(|s| !sample_value(s).is_finite()) => {
                            format!("{expr}: only NaN/Inf: {r:?}")
                        }
                        Ok(_) => return true,
                    }
                };
                false
            });
            if !answered {
                problems.push(format!("{title} / {ptitle}: {why}"));
            }
        }
    }
    ran
}

/// A tiny app exposing its own Prometheus metrics (what an annotated app has), in the venv's
/// Python; prints `listening on ADDR` for the harness.
const METRICS_APP: &str = r##"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    scrapes = 0
    def do_GET(self):
        if self.path != "/metrics":
            self.send_error(404)
            return
        H.scrapes += 1
        body = ("# HELP demo_app_scrapes_total Scrapes of the demo app.\n"
                "# TYPE demo_app_scrapes_total counter\n"
                "demo_app_scrapes_total %d\n" % H.scrapes).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("listening on 127.0.0.1:%d" % s.server_address[1], flush=True)
s.serve_forever()
"##;

/// The seed's mesh (httpbin v1 and v2, sleep) in explicit mode, each sidecar serving merged
/// metrics on a port of its own and merging the metrics app named by `annotations`.
struct Mesh {
    sidecars: Vec<Sidecar>,
    sleep: Sidecar,
    _apps: (Httpbin, Httpbin),
    plane: ControlPlane,
}

impl Mesh {
    fn start(dir: &std::path::Path, annotations: &str) -> Self {
        weft_tests::init();
        let monitoring = ["--monitoring-listen", "127.0.0.1:0"];
        let plane = ControlPlane::start_with_ca_args(dir, &monitoring, &monitoring).unwrap();
        plane
            .apply(&format!("{EXAMPLES}/httpbin-service.yaml"))
            .unwrap();
        let v1 = Httpbin::start(dir, "httpbin-v1").unwrap();
        let v2 = Httpbin::start(dir, "httpbin-v2").unwrap();
        let sidecar = |name: &str, sa: &str, labels: &str, app: Option<u16>| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .to_string();
            let extra = [
                "--prometheus-port",
                &port,
                "--app-prometheus-annotations",
                annotations,
            ];
            Sidecar::explicit(&plane, name, sa, labels, app, &extra).unwrap()
        };
        let s1 = sidecar(
            "httpbin-v1",
            "httpbin",
            "app=httpbin,version=v1",
            Some(v1.port),
        );
        let s2 = sidecar(
            "httpbin-v2",
            "httpbin",
            "app=httpbin,version=v2",
            Some(v2.port),
        );
        let sleep = sidecar("sleep", "sleep", "app=sleep", None);
        Mesh {
            sidecars: vec![s1, s2],
            sleep,
            _apps: (v1, v2),
            plane,
        }
    }
}

/// Sends `n` requests of each kind (2xx, 4xx, 5xx) from sleep to httpbin, and as many from
/// httpbin-v1's app to httpbin (a workload that serves and calls, so every panel of the workload
/// view has a workload to show).
fn traffic(m: &Mesh, n: usize) {
    for _ in 0..n {
        for (path, want) in [("/get", 200), ("/status/404", 404), ("/status/503", 503)] {
            for client in [&m.sleep, &m.sidecars[0]] {
                let (code, _) = client
                    .curl(&format!("http://httpbin:8000{path}"), &[])
                    .unwrap();
                assert_eq!(code, want, "{path}");
            }
        }
    }
}

#[test]
fn prometheus_config_and_every_dashboard_query_return_data_from_a_real_prometheus() {
    let promtool = prometheus_tool("promtool");
    let shipped = config_map("prometheus.yaml", "prometheus", "prometheus.yml");
    let dir = tempfile::tempdir().unwrap();

    // promtool on the config as shipped. Debian builds Prometheus without Kubernetes discovery,
    // so there the only errors allowed are that it does not know `kubernetes_sd_configs`.
    let shipped_file = dir.path().join("shipped.yml");
    std::fs::write(&shipped_file, &shipped).unwrap();
    let (ok, out, err) = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(&shipped_file))
    .unwrap();
    // One such error per job that discovers through Kubernetes (pods, and the control plane's
    // endpoints), and no other.
    let no_k8s_sd = "field kubernetes_sd_configs not found";
    let report = format!("{out}{err}");
    assert!(
        ok || (report.matches(no_k8s_sd).count() == 2 && report.matches("not found").count() == 2),
        "promtool check config (shipped):\n{report}"
    );

    // The app whose metrics the sidecars merge, and the seed's mesh with it annotated.
    let (_app, app_addr) = Proc::spawn_listening(
        "metrics-app",
        {
            let mut c = Command::new(venv().join("bin/python3"));
            c.args(["-c", METRICS_APP]);
            c
        },
        dir.path(),
    )
    .unwrap();
    let annotations =
        json!({"scrape": "true", "port": app_addr.port().to_string(), "path": "/metrics"});
    let m = Mesh::start(dir.path(), &annotations.to_string());
    traffic(&m, 5);

    // Each pod's merged metrics parse as Prometheus text (lint: only missing HELP, which the
    // sidecar does not write, and Istio's millisecond name are allowed).
    let sidecars = [
        (
            "httpbin-v1",
            [("app", "httpbin"), ("version", "v1")],
            &m.sidecars[0],
        ),
        (
            "httpbin-v2",
            [("app", "httpbin"), ("version", "v2")],
            &m.sidecars[1],
        ),
        ("sleep", [("app", "sleep"), ("version", "")], &m.sleep),
    ];
    let mut targets = Vec::new();
    for (name, labels, s) in &sidecars {
        let addr = s
            .proc
            .announced("prometheus")
            .expect("prometheus port announced");
        let port = addr.rsplit_once(':').unwrap().1.to_owned();
        let (ok, text, err) = run(Command::new("curl").args([
            "-sf",
            "-m",
            "10",
            &format!("http://{addr}/stats/prometheus"),
        ]))
        .unwrap();
        assert!(ok, "{name}: {err}");
        assert!(text.contains("istio_requests_total{"), "{name}: {text}");
        assert!(
            text.contains("\ndemo_app_scrapes_total "),
            "{name}: app metrics not merged:\n{text}"
        );
        let report = prometheus::lints(&text, dir.path(), name).unwrap();
        let other: Vec<_> = report
            .into_iter()
            // The app's own families may lack help; the sidecar's carry theirs.
            .filter(|l| (!l.ends_with(" no help text") || l.starts_with("istio_") || l.starts_with("weft_"))
                    // Istio's own name, kept for its dashboards.
                    && l != r#"istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds""#)
            .collect();
        assert!(
            other.is_empty(),
            "{name}: promtool check metrics:\n{}",
            other.join("\n")
        );
        let labels: Vec<_> = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .copied()
            .collect();
        targets.push(pod_target(name, &labels, &port, "Running", true));
    }
    // Two pods the relabelling must drop: one not annotated, one finished.
    let v1_port = sidecars[0].2.proc.announced("prometheus").unwrap();
    let v1_port = v1_port.rsplit_once(':').unwrap().1;
    targets.push(pod_target(
        "not-annotated",
        &[("app", "x")],
        v1_port,
        "Running",
        false,
    ));
    targets.push(pod_target(
        "finished-job",
        &[("app", "y")],
        v1_port,
        "Succeeded",
        true,
    ));
    let targets_file = dir.path().join("pods.json");
    std::fs::write(
        &targets_file,
        serde_json::to_vec(&Value::Array(targets)).unwrap(),
    )
    .unwrap();

    // The control plane's Services: the monitoring ports of pilot and the CA, and pilot's discovery
    // port, which the relabelling must drop.
    let monitoring = |p: &Proc| p.announced("monitoring").expect("monitoring announced");
    let endpoints = json!([
        endpoint_target(
            "weft-pilot",
            "http-monitoring",
            &monitoring(&m.plane.pilot),
            "weft-pilot-0"
        ),
        endpoint_target(
            "weft-ca",
            "http-monitoring",
            &monitoring(&m.plane.ca),
            "weft-ca-0"
        ),
        endpoint_target(
            "weft-pilot",
            "grpc-xds",
            &m.plane.discovery_addr,
            "weft-pilot-0"
        ),
    ]);
    let endpoints_file = dir.path().join("endpoints.json");
    std::fs::write(&endpoints_file, serde_json::to_vec(&endpoints).unwrap()).unwrap();

    let config = derived_config(
        &shipped,
        targets_file.to_str().unwrap(),
        endpoints_file.to_str().unwrap(),
    );
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(&config_file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    // Prometheus itself (promtool checks the derived config first): data in the temp dir, a port
    // nothing holds, killed on drop.
    let prom = Prometheus::start(&config_file, dir.path()).unwrap();
    let base = prom.base.clone();

    // All three pods scraped through their sidecar's port and path, the other two dropped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&base, r#"up{job="kubernetes-pods"} == 1"#).unwrap_or_default();
        let mut pods: Vec<_> = up
            .iter()
            .filter_map(|s| s["metric"]["pod"].as_str())
            .collect();
        pods.sort_unstable();
        if pods == ["httpbin-v1", "httpbin-v2", "sleep"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets up: {pods:?}; all: {:?}",
            query(&base, "up")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let all_up = query(&base, r#"up{job="kubernetes-pods"}"#).unwrap();
    assert_eq!(
        all_up.len(),
        3,
        "the unannotated and finished pods must be dropped: {all_up:?}"
    );

    // The control plane: pilot and the CA scraped at their monitoring ports, the discovery port
    // dropped, and their own metric names there under the Service's name.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&base, r#"up{job="weft-control-plane"} == 1"#).unwrap_or_default();
        let mut apps: Vec<_> = up
            .iter()
            .filter_map(|s| s["metric"]["app"].as_str())
            .collect();
        apps.sort_unstable();
        if apps == ["weft-ca", "weft-pilot"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "control plane targets up: {apps:?}; all: {:?}",
            query(&base, r#"up{job="weft-control-plane"}"#)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let control = query(&base, r#"up{job="weft-control-plane"}"#).unwrap();
    assert_eq!(
        control.len(),
        2,
        "the discovery port must be dropped: {control:?}"
    );
    let pushes = query(
        &base,
        r#"pilot_xds_pushes{app="weft-pilot",pod="weft-pilot-0",namespace="weft-system"}"#,
    )
    .unwrap();
    assert!(!pushes.is_empty(), "pilot's pushes, relabelled");
    let signed = query(
        &base,
        r#"citadel_server_success_cert_issuance_count{app="weft-ca"}"#,
    )
    .unwrap();
    assert!(!signed.is_empty(), "the CA's signings");
    let v1 = query(&base, r#"istio_requests_total{pod="httpbin-v1",namespace="default",app="httpbin",version="v1",reporter="destination"}"#).unwrap();
    assert!(!v1.is_empty(), "relabelled pod labels missing");
    let merged = query(&base, r#"demo_app_scrapes_total{pod="httpbin-v1"}"#).unwrap();
    assert_eq!(
        merged.len(),
        1,
        "the app's metrics through the sidecar: {merged:?}"
    );

    // What the control-plane dashboard shows beyond start-up: a config change pushed to the
    // connected sidecars (a convergence time; the load balancer only, so routing is as before)
    // and a certificate request the CA refuses (a bad token).
    let policy = dir.path().join("httpbin-lb.yaml");
    std::fs::write(
        &policy,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: httpbin-lb}\n\
         spec:\n  host: httpbin\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n",
    )
    .unwrap();
    m.plane.apply(policy.to_str().unwrap()).unwrap();
    let refused = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(m.plane.forged_token_refused())
        .unwrap();
    assert!(refused, "the CA signed for a forged token");

    // Traffic while Prometheus scrapes, so rates over the last minute are not zero.
    for _ in 0..3 {
        traffic(&m, 3);
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(2));

    let dashboards_json = documents("grafana.yaml")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "weft-grafana-dashboards")
        .expect("weft-grafana-dashboards ConfigMap");
    let data = dashboards_json["data"].as_object().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "weft-control-plane.json",
            "weft-mesh.json",
            "weft-service.json",
            "weft-workload.json"
        ]
    );
    let mut problems = Vec::new();
    let mut ran = 0;
    for (name, text) in data {
        let dashboard: Value =
            serde_json::from_str(text.as_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        ran += check_dashboard(&base, &dashboard, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{} of {ran} dashboard queries failed:\n{}",
        problems.len(),
        problems.join("\n")
    );
    eprintln!("addons: {ran} dashboard queries returned data");
}
