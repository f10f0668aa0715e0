//! The identity an app sees is only ever the one the mesh verified (issue 15, defect 2): requests
//! dressed up to look like something else (leading CRLF, an unknown or lowercase method, a pause
//! after the first byte) still go through the HTTP path, where a caller's
//! `x-forwarded-client-cert` and `x-envoy-*` headers are dropped; and a `CONNECT` tunnel through a
//! client's sidecar is parsed as HTTP at the other end, so the app is told the tunnel's real,
//! verified caller. In explicit mode and in captured pods, with the real httpbin as the app.

use std::time::Duration;

use weft_tests::netns::{self, Host};
use weft_tests::raw_http::paused_exchange;
use weft_tests::seed::Seed;
use weft_tests::{Sidecar, venv};

const FORGED: &str = "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/default/sa/admin";

/// The byte sequences the issue reproduced with, each split where the client pauses.
fn forgeries() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let request = |prefix: &str, method: &str| {
        format!(
            "{prefix}{method} /headers HTTP/1.1\r\nHost: httpbin:8000\r\n{FORGED}\r\nx-envoy-internal: true\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let slow = request("", "GET");
    vec![
        ("leading CRLF", vec![request("\r\n", "GET")]),
        ("PROPFIND", vec![request("", "PROPFIND")]),
        ("QUERY", vec![request("", "QUERY")]),
        ("lowercase method", vec![request("", "get")]),
        (
            "300 ms pause after the first byte",
            vec![slow[..1].to_vec(), slow[1..].to_vec()],
        ),
    ]
}

/// Requests the sidecar's inbound side has handled as HTTP (its `istio_requests_total` as reporter
/// `destination`).
fn inbound_requests(sidecar: &Sidecar) -> f64 {
    sidecar
        .stats()
        .unwrap()
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends every forgery as plaintext to the inbound port at `addr` (PERMISSIVE) with `python` (in
/// the right namespace) and checks that each went through the HTTP path and that no forged identity
/// reached the app.
fn forgeries_never_reach_the_app(
    m: &Seed,
    python: impl Fn() -> std::process::Command,
    addr: (&str, u16),
) {
    let sidecar = &m.sidecars[0];
    for (what, parts) in forgeries() {
        let before = inbound_requests(sidecar);
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let reply = paused_exchange(python(), addr, &parts, Duration::from_millis(300)).unwrap();
        let text = reply.text();
        assert!(reply.status().is_some(), "{what}: no answer: {text}");
        assert!(!text.contains("sa/admin"), "{what}: the app echoed: {text}");
        // Counted by the sidecar's HTTP path: parsed, not spliced.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while inbound_requests(sidecar) < before + 1.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            inbound_requests(sidecar),
            before + 1.0,
            "{what}: not handled as HTTP by the sidecar ({text})"
        );
    }
    // What the app itself logged: the header of every request it saw, never the forged identity nor
    // an outsider's x-envoy-internal.
    let log = m.v1.log_lines().join("\n");
    assert!(!log.contains("sa/admin"), "{log}");
    assert!(log.contains("\"PROPFIND /headers HTTP/1.1\""), "{log}");
    assert!(log.contains("\"QUERY /headers HTTP/1.1\""), "{log}");
    assert!(!log.contains("internal=true"), "{log}");
}

/// Under STRICT, a `CONNECT` tunnel through the client's own sidecar carries a request with a forged
/// XFCC: the server side parses the tunnel as HTTP and names the tunnel's verified caller (sleep).
fn connect_tunnel_is_parsed_as_http(m: &Seed, extra: &[&str]) {
    m.apply_yaml(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    m.wait_config("STRICT is in", |d| d.to_string().contains("STRICT"))
        .unwrap();
    let mut args = vec!["-p", "-H", FORGED];
    args.extend_from_slice(extra);
    let (code, body) = m.sleep.curl("http://httpbin:8000/headers", &args).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("sa/admin"), "{body}");
    assert!(
        body.contains("By=spiffe://cluster.local/ns/default/sa/httpbin;URI=spiffe://cluster.local/ns/default/sa/sleep"),
        "{body}"
    );
}

#[test]
fn forged_identity_headers_never_reach_the_app_explicit() {
    let m = Seed::explicit(&[]).unwrap();
    let inbound = m.sidecars[0].inbound.clone();
    let (ip, port) = inbound.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    forgeries_never_reach_the_app(
        &m,
        || std::process::Command::new(venv().join("bin/python")),
        (ip, port),
    );
    connect_tunnel_is_parsed_as_http(&m, &[]);
}

#[test]
fn forged_identity_headers_never_reach_the_app_transparent() {
    if !netns::available("forged_identity_headers_never_reach_the_app_transparent") {
        return;
    }
    let mut m = Seed::transparent(&[]).unwrap();
    let outsider: Host = m.topo.as_mut().unwrap().host("outsider").unwrap();
    let v1_ip = m.hosts[0].ip.clone();
    forgeries_never_reach_the_app(
        &m,
        || outsider.command(venv().join("bin/python")),
        (&v1_ip, 80),
    );
    connect_tunnel_is_parsed_as_http(&m, &["-x", "http://httpbin:8000"]);
}
