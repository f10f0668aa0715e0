//! `pilot serve --registry kubernetes` as a process, with KUBECONFIG pointing at the in-process
//! fake API server, and a real sidecar taking its config from it: the cluster's Services,
//! endpoints and Istio objects reach the sidecar, changes in the cluster are pushed, invalid
//! objects are refused and reported, and the root ConfigMap is written.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use weft_tests::kube_fake::FakeApiServer;
use weft_tests::{ControlPlane, Sidecar, run};

const VS: &str = "apis/networking.istio.io/v1/virtualservices";
const VIP: &str = "10.96.7.7";
const POD_IP: &str = "10.1.0.5";

fn object<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

fn pod(name: &str, sa: &str, app: &str, ip: &str) -> Pod {
    object(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app},
                     "annotations": {"sidecar.weft.dev/status": "{}"}},
        "spec": {"serviceAccountName": sa, "nodeName": "node-a",
                 "containers": [{"name": app, "ports": [{"containerPort": 80}]}, {"name": "weft-proxy"}]},
        "status": {"phase": "Running", "podIP": ip},
    }))
}

fn slice(ready: bool) -> EndpointSlice {
    object(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "httpbin-x", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [POD_IP],
                       "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                       "targetRef": {"kind": "Pod", "name": "httpbin-1", "namespace": "default"}}],
    }))
}

fn virtual_service(name: &str, timeout: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"hosts": ["httpbin"], "http": [{"timeout": timeout, "route": [{"destination": {"host": "httpbin"}}]}]},
    })
}

/// Polls `check` every 100 ms for at most 20 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn pilot_serves_the_cluster_to_a_sidecar_and_follows_it() {
    weft_tests::init();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeApiServer::start()).unwrap();
    fake.apply::<Namespace>(&object(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"},
        "status": {"phase": "Active"},
    })));
    fake.apply::<Service>(&object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": VIP, "selector": {"app": "httpbin"},
                 "ports": [{"name": "http", "port": 8000, "targetPort": 80}]},
    })));
    fake.apply(&pod("httpbin-1", "httpbin", "httpbin", POD_IP));
    fake.apply(&pod("sleep-1", "sleep", "sleep", "127.0.0.1"));
    fake.apply(&slice(true));
    fake.apply_json(VS, virtual_service("httpbin", "7s"));
    fake.apply_json(VS, virtual_service("broken", "soon"));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.write_kubeconfig(dir.path()).unwrap();
    let plane = ControlPlane::start_with_env(
        dir.path(),
        &[
            "--registry",
            "kubernetes",
            "--monitoring-listen",
            "127.0.0.1:0",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )
    .unwrap();
    // Admitted as the cluster's Pod sleep-1 (no Pod is registered through pilot's API).
    let sidecar =
        Sidecar::explicit_of_platform_pod(&plane, "sleep-1", "sleep", "app=sleep").unwrap();

    // The cluster's Service (its cluster IP), endpoint and VirtualService reach the sidecar.
    let dump = sidecar.config_dump().unwrap();
    assert!(dump.contains(VIP), "{dump}");
    assert!(dump.contains(POD_IP), "{dump}");
    assert!(
        dump.contains("\"default/httpbin/0\""),
        "the VirtualService's route: {dump}"
    );

    // A change nothing reads (a pod annotation) is seen but pushes nothing.
    let version = |dump: &str| -> String {
        serde_json::from_str::<Value>(dump).unwrap()["version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let pushed = version(&dump);
    let monitoring = plane.pilot.announced("monitoring").unwrap();
    // Synced (the sidecar got the cluster's config): the readiness probe of the install manifests
    // passes, and the liveness one.
    for path in ["/ready", "/healthz"] {
        let (ok, body, err) =
            run(Command::new("curl").args(["-sf", &format!("http://{monitoring}{path}")])).unwrap();
        assert!(ok, "{path}: {body}{err}");
    }
    let metrics = || {
        let (ok, text, err) =
            run(Command::new("curl").args(["-sf", &format!("http://{monitoring}/metrics")]))
                .unwrap();
        assert!(ok, "{err}");
        text
    };
    let pod_applies = |text: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("weft_pilot_kube_watch_events_total{kind=\"Pod\",event=\"apply\"}")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = pod_applies(&metrics());
    let mut annotated = pod("httpbin-1", "httpbin", "httpbin", POD_IP);
    annotated
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("unrelated".into(), "x".into());
    fake.apply(&annotated);
    eventually("pilot saw the pod change", || {
        pod_applies(&metrics()) > before
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(version(&sidecar.config_dump().unwrap()), pushed);

    // The endpoint leaves when its slice says it is terminating; the change is pushed.
    fake.apply(&slice(false));
    eventually("the terminating endpoint gone from the sidecar", || {
        sidecar
            .config_dump()
            .is_ok_and(|d| d.contains(VIP) && !d.contains(POD_IP) && version(&d) != pushed)
    });

    // Config comes from the cluster: apply is refused, get and analyze show what pilot serves
    // and refuses.
    let path = dir.path().join("vs.yaml");
    std::fs::write(
        &path,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {hosts: [x]}\n",
    )
    .unwrap();
    let (ok, _, err) = plane
        .pilot_cmd(&["apply", "-f", &path.to_string_lossy()])
        .unwrap();
    assert!(!ok && err.contains("kubectl apply"), "{err}");
    let (ok, out, err) = plane.pilot_cmd(&["get", "vs"]).unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("httpbin") && !out.contains("broken"), "{out}");
    let (_, out, err) = plane.pilot_cmd(&["analyze"]).unwrap();
    let analysis = format!("{out}{err}");
    assert!(
        analysis.contains("IST0106")
            && analysis.contains("broken")
            && analysis.contains("spec.http[0].timeout"),
        "{analysis}"
    );

    // The metrics count the refused object and the watch events.
    let metrics = metrics();
    assert!(
        metrics.contains("weft_pilot_invalid_objects{kind=\"VirtualService\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("weft_pilot_kube_watch_events_total{kind=\"EndpointSlice\",event=\"apply\"}"),
        "{metrics}"
    );

    // A sidecar claiming a pod the cluster does not have, or labels its Pod does not have, is
    // refused, and proxy-status says why.
    let _ghost = Sidecar::spawn_unregistered(&plane, "ghost-1", "sleep", "app=sleep").unwrap();
    let _liar = Sidecar::spawn_unregistered(&plane, "sleep-1", "sleep", "app=httpbin").unwrap();
    let mut status = String::new();
    eventually("both refused in proxy-status", || {
        status = plane.pilot_cmd(&["proxy-status"]).unwrap().1;
        status
            .lines()
            .any(|l| l.contains("ghost-1") && l.contains("REFUSED"))
            && status.contains("app=httpbin")
    });
    assert!(
        status
            .lines()
            .filter(|l| l.contains("sleep-1"))
            .any(|l| l.contains("SYNCED")),
        "the admitted sidecar stays: {status}"
    );

    // The root certificate is in the namespace, as the CA's root file has it.
    let root = std::fs::read_to_string(&plane.root).unwrap();
    eventually("istio-ca-root-cert written", || {
        fake.get("api/v1/configmaps", "default", "istio-ca-root-cert")
            .and_then(|cm| cm.pointer("/data/root-cert.pem").cloned())
            .is_some_and(|pem| pem == root.as_str())
    });
    drop(sidecar);
    drop(plane);
}

/// Before every watch has listed (here: an API server that is not there), `/ready` answers 503, so
/// a pod of the install manifests gets no traffic; `/healthz` answers 200, so it is not restarted.
#[test]
fn pilot_is_not_ready_until_the_cluster_is_listed() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on (bound, then closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"http://{closed}\"}}\n\
             users:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: gone, user: u}}\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(weft_tests::bin("pilot"));
    cmd.args([
        "serve",
        "--registry",
        "kubernetes",
        "--monitoring-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(dir.path().join("pilot"))
    .env("KUBECONFIG", &kubeconfig);
    let (pilot, _) = weft_tests::Proc::spawn_listening_unix("pilot", cmd, dir.path()).unwrap();
    let monitoring = pilot.announced("monitoring").unwrap();
    let code = |path: &str| {
        let (_, out, _) = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{monitoring}{path}"),
        ]))
        .unwrap();
        out
    };
    // Still not ready after a few watch retries.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(code("/ready"), "503");
    assert_eq!(code("/healthz"), "200");
}
