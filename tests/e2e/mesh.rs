//! The data plane end to end in explicit mode (no root needed): real CA, pilot and sidecars as
//! processes, the real httpbin under gunicorn as the apps, curl as the client through its sidecar.
//! Every hop between sidecars is mTLS with SPIFFE identities.

use weft_tests::seed::{Seed, has_vs_route};

#[test]
fn seed_routing_default_balance_then_all_to_v1_with_mtls_identities() {
    let m = Seed::explicit(&[]).unwrap();

    // Without a VirtualService, Kubernetes-style balancing over both versions.
    let (v1, v2) = m.send(20, &[]).unwrap();
    assert_eq!(v1 + v2, 20);
    assert!(
        v1 > 0 && v2 > 0,
        "default balancing hit v1 {v1} and v2 {v2} times"
    );

    // The seed's rule: all traffic to v1.
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("the all-to-v1 route is in", has_vs_route)
        .unwrap();
    assert_eq!(m.send(10, &[]).unwrap(), (10, 0));

    // What httpbin saw: the caller's Host, and the caller's identity as proven by mTLS.
    let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &[]).unwrap();
    assert_eq!(code, 200);
    let headers: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &headers["headers"];
    assert_eq!(h["Host"], "httpbin:8000", "{body}");
    assert_eq!(
        h["X-Forwarded-Client-Cert"].as_str().unwrap_or_default(),
        "By=spiffe://cluster.local/ns/default/sa/httpbin;URI=spiffe://cluster.local/ns/default/sa/sleep",
        "{body}"
    );

    // Cleanup (the seed's last step) restores default balancing.
    let (v1, v2) = m.cleanup_and_send().unwrap();
    assert!(v1 > 0 && v2 > 0, "after cleanup v1 {v1}, v2 {v2}");
}

#[test]
fn weighted_split_header_match_and_spoofed_identity_headers() {
    let m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.apply_yaml(
        "split.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n    route:\n    - destination:\n        host: httpbin\n        subset: v2\n  - route:\n    - destination:\n        host: httpbin\n        subset: v1\n      weight: 75\n    - destination:\n        host: httpbin\n        subset: v2\n      weight: 25\n",
    )
    .unwrap();
    m.wait_routes("the split is in", |r| r.len() == 2).unwrap();
    // Header match: every jason request to v2.
    assert_eq!(m.send(10, &["-H", "end-user: jason"]).unwrap(), (0, 10));
    // 75/25 over 200 requests: v2's share within a wide tolerance (binomial sd about 6).
    let (v1, v2) = m.send(200, &[]).unwrap();
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
    let m = Seed::explicit(&[]).unwrap();
    let direct = format!("http://{}/get", m.sidecars[1].inbound);
    let plain = || {
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
        out
    };
    // PERMISSIVE (the default): a client outside the mesh may talk plaintext to the inbound port.
    assert_eq!(plain(), "200");
    m.apply_yaml(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    // Wait (bounded) until the v2 sidecar enforces it: plaintext refused before reaching the app.
    let refused = (0..200).any(|_| {
        let r = plain() == "000";
        if !r {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        r
    });
    assert!(refused, "STRICT never refused plaintext");
    // mTLS from the mesh still works under STRICT.
    assert_eq!(m.sleep.curl("http://httpbin:8000/get", &[]).unwrap().0, 200);

    // Errors the mesh makes are explained: an unknown host, a subset with no workload.
    let (code, body) = m.sleep.curl("http://nosuch:8000/", &["-i"]).unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("x-weft-error: no service for nosuch:8000"),
        "{body}"
    );
    m.apply_yaml(
        "v3.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: httpbin\nspec:\n  hosts:\n  - httpbin\n  http:\n  - route:\n    - destination:\n        host: httpbin\n        subset: v3\n",
    )
    .unwrap();
    m.wait_routes("the v3 route is in", has_vs_route).unwrap();
    let (code, body) = m.sleep.curl("http://httpbin:8000/get", &["-i"]).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no healthy endpoint in outbound|8000|v3|httpbin.default.svc.cluster.local"),
        "{body}"
    );
}

#[test]
fn traffic_keeps_flowing_when_pilot_dies() {
    let mut m = Seed::explicit(&[]).unwrap();
    m.apply("all-v1.yaml").unwrap();
    m.wait_routes("the all-to-v1 route is in", has_vs_route)
        .unwrap();
    m.plane.pilot.kill().unwrap();
    assert_eq!(
        m.send(10, &[]).unwrap(),
        (10, 0),
        "the last config must stay in force"
    );
}
