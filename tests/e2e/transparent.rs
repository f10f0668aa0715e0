//! Transparent mode in real network namespaces: each pod a namespace on a bridge, `sidecar init`
//! installing iptables capture, the sidecar as uid 1337, gunicorn+httpbin bound to 0.0.0.0:80 as in
//! the seed, and curl inside the sleep pod calling `http://httpbin:8000` by name (the sidecar's DNS
//! proxy answers). Needs root; without it each test prints why it skips.

use std::time::Duration;

use weft_tests::netns::{self, Host};
use weft_tests::run;
use weft_tests::seed::{Seed, has_vs_route};

#[test]
fn the_seed_walkthrough_in_captured_pods() {
    if !netns::available("the_seed_walkthrough_in_captured_pods") {
        return;
    }
    let p = Seed::transparent(&[]).unwrap();
    let sleep_ns = p.sleep.host.clone().unwrap();

    // The pod resolves the Service name through the sidecar's DNS proxy.
    let (ok, out, err) = run(sleep_ns.command("getent").args(["hosts", "httpbin"])).unwrap();
    assert!(ok, "getent: {err}");
    assert!(out.starts_with("10.96."), "httpbin resolved to {out}");

    // Default balancing, then the seed's all-to-v1, exactly as the seed's curl does it.
    let (v1, v2) = p.send(20, &[]).unwrap();
    assert_eq!(v1 + v2, 20);
    assert!(v1 > 0 && v2 > 0, "v1 {v1}, v2 {v2}");
    p.apply("all-v1.yaml").unwrap();
    p.wait_routes("the all-to-v1 route is in", has_vs_route)
        .unwrap();
    assert_eq!(p.send(10, &[]).unwrap(), (10, 0));

    // httpbin saw the original Host, and mTLS proved sleep's identity on the way.
    let (_, body) = p.sleep.curl("http://httpbin:8000/headers", &[]).unwrap();
    assert!(body.contains("\"Host\": \"httpbin:8000\""), "{body}");
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{body}"
    );
    // The seed's mirror step: both logs grow, v2's entry carries the shadow host, curl's answer is v1's.
    p.apply("mirror-v2.yaml").unwrap();
    p.wait_mirroring(true).unwrap();
    let v2_before = p.v2.log_lines().len();
    assert_eq!(p.send(1, &[]).unwrap().0, 1, "the primary goes to v1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.v2.log_lines().len() < v2_before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never reached v2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let shadow = p.v2.log_lines().last().cloned().unwrap_or_default();
    assert!(shadow.ends_with("host=httpbin-shadow:8000"), "{shadow}");

    // The app's access log shows the request from localhost, as in the seed.
    let last = p.v1.log_lines().last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("127.0.0.1 ") && last.contains("\"GET /headers HTTP/1.1\" 200"),
        "{last}"
    );

    // Cleanup (the seed's kubectl delete) restores default balancing.
    let (ok, _, err) = p
        .plane
        .pilot_cmd(&["delete", "virtualservice", "httpbin"])
        .unwrap();
    assert!(ok, "{err}");
    p.wait_routes("the VirtualService is gone", |r| !has_vs_route(r))
        .unwrap();
    let (v1, v2) = p.send(20, &[]).unwrap();
    assert!(v1 > 0 && v2 > 0, "after cleanup v1 {v1}, v2 {v2}");
}

#[test]
fn strict_refuses_pods_without_a_sidecar_and_loops_are_refused() {
    if !netns::available("strict_refuses_pods_without_a_sidecar_and_loops_are_refused") {
        return;
    }
    let mut p = Seed::transparent(&[]).unwrap();
    let outsider = p.topo.as_mut().unwrap().host("outsider").unwrap();
    let v1_host = p.hosts[0].clone();
    let target = format!("http://{}:80/get", v1_host.ip);
    let code = |host: &Host| {
        let (_, out, _) = run(host.command("curl").args([
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &target,
        ]))
        .unwrap();
        out
    };
    // PERMISSIVE (default): plaintext from outside the mesh reaches the app through the inbound port.
    assert_eq!(code(&outsider), "200");

    p.apply_yaml(
        "strict.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    let refused = (0..200).any(|_| {
        let r = code(&outsider) == "000";
        if !r {
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    });
    assert!(refused, "STRICT never refused the plaintext client");
    // Once enforced, refused requests never reach the app.
    let before = p.v1.log_lines().len();
    for _ in 0..3 {
        assert_eq!(code(&outsider), "000");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        p.v1.log_lines().len(),
        before,
        "a refused request reached the app"
    );
    // The mesh client still gets through.
    assert_eq!(p.sleep.curl("http://httpbin:8000/get", &[]).unwrap().0, 200);

    // An app calling its own sidecar's inbound port is a loop and is refused.
    let (_, out, _) = run(v1_host.command("curl").args([
        "-s",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:15006/get",
    ]))
    .unwrap();
    assert_eq!(
        out, "000",
        "a request to the proxy's own inbound port must not be served"
    );
}
