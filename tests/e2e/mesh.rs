//! The data plane end to end in explicit mode (no root needed): real CA, pilot and sidecars as
//! processes, the real httpbin under gunicorn as the apps, curl as the client through its sidecar.
//! Every hop between sidecars is mTLS with SPIFFE identities.

use std::time::Duration;

use weft_tests::{ControlPlane, Httpbin, Sidecar};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

struct Mesh {
    plane: ControlPlane,
    v1: Httpbin,
    v2: Httpbin,
    _v1_sidecar: Sidecar,
    v2_sidecar: Sidecar,
    sleep: Sidecar,
    _dir: tempfile::TempDir,
}

fn apply_file(plane: &ControlPlane, path: &str) {
    let (ok, out, err) = plane.pilot_cmd(&["apply", "-f", path]).unwrap();
    assert!(ok, "apply {path}: {out}{err}");
}

fn apply_yaml(plane: &ControlPlane, name: &str, yaml: &str) {
    let path = plane.dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    apply_file(plane, path.to_str().unwrap());
}

/// The seed's pods: httpbin v1 and v2 (gunicorn + sidecar each) and sleep (a sidecar, curl as its app).
fn mesh() -> Mesh {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    apply_file(&plane, &format!("{EXAMPLES}/httpbin-service.yaml"));
    let v1 = Httpbin::start(dir.path(), "httpbin-v1").unwrap();
    let v2 = Httpbin::start(dir.path(), "httpbin-v2").unwrap();
    let v1_sidecar = Sidecar::explicit(
        &plane,
        "httpbin-v1",
        "httpbin",
        "app=httpbin,version=v1",
        Some(v1.port),
        &[],
    )
    .unwrap();
    let v2_sidecar = Sidecar::explicit(
        &plane,
        "httpbin-v2",
        "httpbin",
        "app=httpbin,version=v2",
        Some(v2.port),
        &[],
    )
    .unwrap();
    let sleep = Sidecar::explicit(&plane, "sleep", "sleep", "app=sleep", None, &[]).unwrap();
    let m = Mesh {
        plane,
        v1,
        v2,
        _v1_sidecar: v1_sidecar,
        v2_sidecar,
        sleep,
        _dir: dir,
    };
    m.wait_endpoints();
    m
}

impl Mesh {
    /// Waits (bounded) until sleep's sidecar has a config in which `pred` holds.
    fn wait_config(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        for _ in 0..200 {
            let dump: serde_json::Value =
                serde_json::from_str(&self.sleep.config_dump().unwrap()).unwrap();
            if pred(&dump) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sleep's sidecar never got a config where {what}");
    }

    /// Endpoints of a cluster in a config dump.
    fn endpoints(dump: &serde_json::Value, cluster: &str) -> usize {
        dump["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == cluster)
            .and_then(|c| c["endpoints"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Waits until both httpbin pods are endpoints of the Service in sleep's config.
    fn wait_endpoints(&self) {
        self.wait_config("both httpbin pods are endpoints", |d| {
            Mesh::endpoints(d, "outbound|8000||httpbin.default.svc.cluster.local") == 2
        });
    }

    fn httpbin_routes(dump: &serde_json::Value) -> Vec<String> {
        dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["hostname"] == "httpbin.default.svc.cluster.local")
            .flat_map(|s| {
                s["ports"][0]["routes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect()
    }

    /// Sends `n` requests from sleep; returns how many the v1 and v2 access logs grew by.
    fn send(&self, n: usize, extra: &[&str]) -> (usize, usize) {
        let (a1, a2) = (self.v1.log_lines().len(), self.v2.log_lines().len());
        for _ in 0..n {
            let (code, body) = self
                .sleep
                .curl("http://httpbin:8000/headers", extra)
                .unwrap();
            assert_eq!(code, 200, "{body}");
        }
        // gunicorn writes its access-log line after the response; give the last one a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (b1, b2) = (
                self.v1.log_lines().len() - a1,
                self.v2.log_lines().len() - a2,
            );
            if b1 + b2 >= n || std::time::Instant::now() > deadline {
                return (b1, b2);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn seed_routing_default_balance_then_all_to_v1_with_mtls_identities() {
    let m = mesh();
    m.wait_endpoints();

    // Without a VirtualService, Kubernetes-style balancing over both versions.
    let (v1, v2) = m.send(20, &[]);
    assert_eq!(v1 + v2, 20);
    assert!(
        v1 > 0 && v2 > 0,
        "default balancing hit v1 {v1} and v2 {v2} times"
    );

    // The seed's rule: all traffic to v1.
    apply_file(&m.plane, &format!("{EXAMPLES}/all-v1.yaml"));
    m.wait_config("the all-to-v1 route is in", |d| {
        Mesh::httpbin_routes(d)
            .iter()
            .any(|r| r.starts_with("default/httpbin"))
    });
    let (v1, v2) = m.send(10, &[]);
    assert_eq!((v1, v2), (10, 0));

    // What httpbin saw: the caller's Host, and the caller's identity as proven by mTLS.
    let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &[]).unwrap();
    assert_eq!(code, 200);
    let headers: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &headers["headers"];
    assert_eq!(h["Host"], "httpbin:8000", "{body}");
    let xfcc = h["X-Forwarded-Client-Cert"].as_str().unwrap_or_default();
    assert_eq!(
        xfcc,
        "By=spiffe://cluster.local/ns/default/sa/httpbin;URI=spiffe://cluster.local/ns/default/sa/sleep",
        "{body}"
    );

    // Cleanup (the seed's last step) restores default balancing.
    let (ok, _, err) = m
        .plane
        .pilot_cmd(&["delete", "virtualservice", "httpbin"])
        .unwrap();
    assert!(ok, "{err}");
    m.wait_config("the VirtualService is gone", |d| {
        !Mesh::httpbin_routes(d)
            .iter()
            .any(|r| r.starts_with("default/httpbin"))
    });
    let (v1, v2) = m.send(20, &[]);
    assert!(v1 > 0 && v2 > 0, "after cleanup v1 {v1}, v2 {v2}");
}

#[test]
fn weighted_split_header_match_and_spoofed_identity_headers() {
    let m = mesh();
    apply_file(&m.plane, &format!("{EXAMPLES}/all-v1.yaml"));
    apply_yaml(
        &m.plane,
        "split.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n    route:\n    - destination:\n        host: httpbin\n        subset: v2\n  - route:\n    - destination:\n        host: httpbin\n        subset: v1\n      weight: 75\n    - destination:\n        host: httpbin\n        subset: v2\n      weight: 25\n",
    );
    m.wait_config("the split is in", |d| Mesh::httpbin_routes(d).len() == 2);
    // Header match: every jason request to v2.
    let (v1, v2) = m.send(10, &["-H", "end-user: jason"]);
    assert_eq!((v1, v2), (0, 10));
    // 75/25 over 200 requests: v2's share within a wide tolerance (binomial sd ~ 6).
    let (v1, v2) = m.send(200, &[]);
    assert_eq!(v1 + v2, 200);
    assert!(
        (25..=75).contains(&v2),
        "v2 got {v2} of 200 (expected about 50)"
    );

    // A client cannot claim an identity: its x-forwarded-client-cert is replaced by the real one.
    let (code, body) = m
        .sleep
        .curl(
            "http://httpbin:8000/headers",
            &[
                "-H",
                "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/default/sa/admin",
            ],
        )
        .unwrap();
    assert_eq!(code, 200);
    assert!(!body.contains("sa/admin"), "{body}");
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{body}"
    );
}

#[test]
fn strict_refuses_plaintext_permissive_accepts_it_and_errors_are_explained() {
    let m = mesh();
    m.wait_endpoints();
    let direct = format!("http://{}/get", m.v2_sidecar.inbound);
    // PERMISSIVE (the default): a client outside the mesh may talk plaintext to the inbound port.
    let (ok, out, _) = weft_tests::run(std::process::Command::new("curl").args([
        "-s",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &direct,
    ]))
    .unwrap();
    assert!(ok);
    assert_eq!(out, "200");

    apply_yaml(
        &m.plane,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    );
    // Wait until the v2 sidecar enforces it: plaintext refused before any byte reaches the app.
    let before = m.v2.log_lines().len();
    let mut refused = false;
    for _ in 0..200 {
        let (_, out, _) = weft_tests::run(std::process::Command::new("curl").args([
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &direct,
        ]))
        .unwrap();
        if out == "000" {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused, "STRICT never refused plaintext");
    // mTLS from the mesh still works under STRICT.
    let (code, _) = m.sleep.curl("http://httpbin:8000/get", &[]).unwrap();
    assert_eq!(code, 200);
    assert!(m.v2.log_lines().len() >= before, "log shrank?");

    // Errors the mesh makes are explained: an unknown host, a subset with no workload.
    let (code, body) = m.sleep.curl("http://nosuch:8000/", &["-i"]).unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("x-weft-error: no service for nosuch:8000"),
        "{body}"
    );
    apply_yaml(
        &m.plane,
        "v3.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n        subset: v3\n",
    );
    m.wait_config("the v3 route is in", |d| {
        Mesh::httpbin_routes(d)
            .iter()
            .any(|r| r.starts_with("default/httpbin"))
    });
    let (code, body) = m.sleep.curl("http://httpbin:8000/get", &["-i"]).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no healthy endpoint in outbound|8000|v3|httpbin.default.svc.cluster.local"),
        "{body}"
    );
}

#[test]
fn traffic_keeps_flowing_when_pilot_dies() {
    let mut m = mesh();
    apply_file(&m.plane, &format!("{EXAMPLES}/all-v1.yaml"));
    m.wait_config("the all-to-v1 route is in", |d| {
        Mesh::httpbin_routes(d)
            .iter()
            .any(|r| r.starts_with("default/httpbin"))
    });
    m.plane.pilot.kill().unwrap();
    let (v1, v2) = m.send(10, &[]);
    assert_eq!((v1, v2), (10, 0), "last config must stay in force");
}
