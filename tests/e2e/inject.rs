//! `pilot inject` output checked by Kubernetes' own schemas: the PyPI `kubernetes-validate --strict`
//! (installed into the test venv by `deploy/local/install-deps.sh` from
//! `deploy/local/requirements-test.txt`) over the injected apps/v1 copy of the seed's httpbin-v1
//! Deployment and over every workload kind. extensions/v1beta1 (the seed's own apiVersion) is gone
//! from Kubernetes, so the validator cannot check it; the golden tests in `pilot/tests/inject.rs` do.
//!
//! The admission webhooks of a real `pilot serve --webhook-listen` (with a real CA): AdmissionReviews
//! posted over TLS verified by rustls against the mesh root for `weft-pilot.weft-system.svc`; the
//! returned JSONPatch applied to the seed's pods gives `pilot inject`'s output, which passes
//! `kubernetes-validate --strict`; `/validate` refuses what `pilot apply` refuses, with its words.

use std::process::Command;

use weft_tests::{bin, run, venv};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pilot/testdata/inject");

#[test]
fn injected_manifests_pass_kubernetes_validate_strict() {
    let validator = venv().join("bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh (it installs deploy/local/requirements-test.txt \
         into the venv; WEFT_VENV picks another venv)",
        validator.display()
    );
    let dir = tempfile::tempdir().unwrap();
    for name in ["httpbin-v1-apps.yaml", "workloads.yaml"] {
        let (ok, stdout, stderr) =
            run(Command::new(bin("pilot")).args(["inject", "-f", &format!("{TESTDATA}/{name}")]))
                .unwrap();
        assert!(ok, "pilot inject -f {name} failed: {stderr}");
        assert!(
            stdout.contains("name: weft-proxy"),
            "{name}: nothing injected"
        );
        let injected = dir.path().join(name);
        std::fs::write(&injected, &stdout).unwrap();
        let (ok, out, err) = run(Command::new(&validator).arg("--strict").arg(&injected)).unwrap();
        assert!(
            ok,
            "kubernetes-validate --strict rejects the injected {name}:\n{out}{err}"
        );
        assert!(!out.contains("ERROR"), "{out}");
    }
}

/// The webhook Service's in-cluster name, what the API server verifies the certificate for.
const WEBHOOK_NAME: &str = "weft-pilot.weft-system.svc";
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/istio-samples");

/// The pod the seed's Deployment `name` makes: its template, named as a ReplicaSet names pods.
fn seed_pod(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{name}.yaml")).unwrap();
    let deployment: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let template = &deployment["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    // kubernetes-validate needs a name; the ReplicaSet's generateName stays, as the API server
    // keeps it.
    metadata["generateName"] = serde_json::json!(format!("{name}-5d8f7c9b4-"));
    metadata["name"] = serde_json::json!(format!("{name}-5d8f7c9b4-x7k2p"));
    metadata["namespace"] = serde_json::json!("default");
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
}

fn review(group: &str, kind: &str, namespace: &str, object: &serde_json::Value) -> Vec<u8> {
    let version = object["apiVersion"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin"},
            "object": object,
            "dryRun": false,
        }
    }))
    .unwrap()
}

/// POSTs a review to the webhook until pilot has its certificate (it asks the CA after start).
fn post(addr: &str, root: &std::path::Path, path: &str, body: &[u8]) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match weft_tests::https_post(addr, root, WEBHOOK_NAME, &[b"http/1.1"], path, body) {
            Ok(r) => {
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                let review: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(
                    review["response"]["uid"],
                    "e911857d-c318-11e8-bbad-025000000001"
                );
                return review["response"].clone();
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("webhook not answering yet: {e:#}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("webhook never answered: {e:#}"),
        }
    }
}

#[test]
fn the_webhook_patches_the_seeds_pods_into_pilot_injects_output_over_verified_tls() {
    use base64::Engine;
    weft_tests::init();
    let validator = venv().join("bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh",
        validator.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let plane =
        weft_tests::ControlPlane::start(dir.path(), &["--webhook-listen", "127.0.0.1:0"]).unwrap();
    let addr = plane
        .pilot
        .announced("webhook")
        .expect("pilot announces the webhook address");

    for name in ["httpbin-v1", "httpbin-v2", "sleep"] {
        let pod = seed_pod(name);
        let response = post(
            &addr,
            &plane.root,
            "/inject",
            &review("", "Pod", "default", &pod),
        );
        assert_eq!(response["allowed"], true, "{response}");
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("a base64 patch"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();

        // The same pod through `pilot inject -f`.
        let pod_file = dir.path().join(format!("{name}-pod.json"));
        std::fs::write(&pod_file, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
        let (ok, stdout, stderr) = run(Command::new(bin("pilot"))
            .arg("inject")
            .arg("-f")
            .arg(&pod_file))
        .unwrap();
        assert!(ok, "pilot inject: {stderr}");
        let offline: serde_json::Value = serde_saphyr::from_str(&stdout).unwrap();
        assert_eq!(
            patched, offline,
            "{name}: the webhook's pod differs from pilot inject's"
        );

        let patched_file = dir.path().join(format!("{name}-patched.json"));
        std::fs::write(&patched_file, serde_json::to_vec_pretty(&patched).unwrap()).unwrap();
        let (ok, out, err) =
            run(Command::new(&validator).arg("--strict").arg(&patched_file)).unwrap();
        assert!(
            ok,
            "kubernetes-validate --strict rejects the patched {name} pod:\n{out}{err}"
        );
        assert!(!out.contains("ERROR"), "{out}");

        // Submitted again (the API server re-invokes webhooks): already injected, no patch.
        let again = post(
            &addr,
            &plane.root,
            "/inject",
            &review("", "Pod", "default", &patched),
        );
        assert_eq!(again["allowed"], true);
        assert!(again.get("patch").is_none(), "{again}");
    }
    // Opt-out by annotation: no patch.
    let mut opted_out = seed_pod("sleep");
    opted_out["metadata"]["annotations"] = serde_json::json!({"sidecar.istio.io/inject": "false"});
    let response = post(
        &addr,
        &plane.root,
        "/inject",
        &review("", "Pod", "default", &opted_out),
    );
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn the_webhook_certificate_names_the_service_and_nothing_else() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane =
        weft_tests::ControlPlane::start(dir.path(), &["--webhook-listen", "127.0.0.1:0"]).unwrap();
    let addr = plane.pilot.announced("webhook").unwrap();
    let body = review("", "Pod", "default", &seed_pod("sleep"));
    post(&addr, &plane.root, "/inject", &body);
    for name in [
        "weft-pilot",
        "weft-pilot.weft-system",
        "weft-pilot.weft-system.svc.cluster.local",
    ] {
        let r = weft_tests::https_post(&addr, &plane.root, name, &[b"http/1.1"], "/inject", &body)
            .unwrap();
        assert_eq!(r.status, 200, "{name}");
    }
    for name in [
        "weft-pilot.default.svc",
        "pilot.weft-system.svc",
        "localhost",
    ] {
        let err =
            weft_tests::https_post(&addr, &plane.root, name, &[b"http/1.1"], "/inject", &body)
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("certificate"),
            "{name}: {err:#}"
        );
    }
    // HTTP/2 is offered (the API server prefers it); HTTP/1.1 when the client asks for it alone.
    let h2 =
        weft_tests::tls_connect(&addr, &plane.root, WEBHOOK_NAME, &[b"h2", b"http/1.1"]).unwrap();
    assert_eq!(h2.conn.alpn_protocol(), Some(&b"h2"[..]));
    let h1 = weft_tests::https_post(
        &addr,
        &plane.root,
        WEBHOOK_NAME,
        &[b"http/1.1"],
        "/inject",
        b"{",
    )
    .unwrap();
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.status, 400, "malformed JSON");
    assert!(String::from_utf8_lossy(&h1.body).starts_with("not an AdmissionReview"));
}

#[test]
fn kubectl_apply_of_a_bad_virtual_service_is_refused_with_pilot_applys_message() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane =
        weft_tests::ControlPlane::start(dir.path(), &["--webhook-listen", "127.0.0.1:0"]).unwrap();
    let addr = plane.pilot.announced("webhook").unwrap();
    let text =
        std::fs::read_to_string(format!("{SAMPLES}/virtual-service-reviews-80-20.yaml")).unwrap();
    let bad = text.replace("weight: 20", "weight: -20");
    let mut vs: serde_json::Value = serde_saphyr::from_str(&bad).unwrap();
    vs["metadata"]["namespace"] = serde_json::json!("bookinfo");

    let response = post(
        &addr,
        &plane.root,
        "/validate",
        &review("networking.istio.io", "VirtualService", "bookinfo", &vs),
    );
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "VirtualService bookinfo/reviews: spec.http[0].route[1].weight: must not be negative, got -20"
    );

    // `pilot apply` of the same object: the same object, field path and problem.
    let file = dir.path().join("bad-vs.yaml");
    std::fs::write(&file, &bad).unwrap();
    let (ok, _out, err) = plane
        .pilot_cmd(&["apply", "-n", "bookinfo", "-f", file.to_str().unwrap()])
        .unwrap();
    assert!(!ok);
    let (object, problem) = message.split_once(": ").unwrap();
    assert!(
        err.contains(&format!("({object}): {problem}")),
        "pilot apply said:\n{err}"
    );

    let good = serde_saphyr::from_str::<serde_json::Value>(&text).unwrap();
    let response = post(
        &addr,
        &plane.root,
        "/validate",
        &review("networking.istio.io", "VirtualService", "bookinfo", &good),
    );
    assert_eq!(response["allowed"], true, "{response}");
}

/// The leaf certificate the webhook serves (DER), verified for [`WEBHOOK_NAME`].
fn webhook_leaf(addr: &str, root: &std::path::Path) -> Vec<u8> {
    let tls = weft_tests::tls_connect(addr, root, WEBHOOK_NAME, &[b"http/1.1"]).unwrap();
    tls.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// A control plane whose pilot serves the webhooks (with `extra` flags), and their address, after
/// one `/inject` answered.
fn webhook_plane(dir: &std::path::Path, extra: &[&str]) -> (weft_tests::ControlPlane, String) {
    let mut args = vec!["--webhook-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let plane = weft_tests::ControlPlane::start(dir, &args).unwrap();
    let addr = plane.pilot.announced("webhook").unwrap();
    post(
        &addr,
        &plane.root,
        "/inject",
        &review("", "Pod", "default", &seed_pod("sleep")),
    );
    (plane, addr)
}

#[test]
fn the_webhook_certificate_is_renewed_with_its_names() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    // A 4 s certificate is renewed at about 2 s (discovery's too, from the same flag).
    let (plane, addr) = webhook_plane(dir.path(), &["--cert-ttl", "4s"]);
    let first = webhook_leaf(&addr, &plane.root);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let renewed = loop {
        // Every handshake verifies the names: a renewal without them would fail here.
        let leaf = webhook_leaf(&addr, &plane.root);
        if leaf != first {
            break leaf;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook certificate was never renewed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&renewed).unwrap();
    let validity = cert.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    // notBefore is backdated 60 s for clock skew.
    assert!((60..=70).contains(&lifetime), "lifetime {lifetime} s");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "URI(spiffe://cluster.local/ns/weft-system/sa/pilot)",
            "DNSName(weft-pilot)",
            "DNSName(weft-pilot.weft-system)",
            "DNSName(weft-pilot.weft-system.svc)",
            "DNSName(weft-pilot.weft-system.svc.cluster.local)",
        ]
    );
}

#[test]
fn sigterm_with_the_webhooks_open_exits_0_within_the_drain() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (mut plane, addr) = webhook_plane(dir.path(), &["--drain-duration", "1s"]);
    // A client that keeps a connection open without a request: it must not hold up the exit.
    let idle = weft_tests::tls_connect(&addr, &plane.root, WEBHOOK_NAME, &[b"http/1.1"]).unwrap();
    let started = std::time::Instant::now();
    assert!(
        plane
            .pilot
            .terminate(std::time::Duration::from_secs(5))
            .unwrap(),
        "pilot exited with an error"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}
