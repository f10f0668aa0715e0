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
    let mut p = Seed::transparent(&[]).unwrap();
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

    // Prometheus, in a pod of its own without a sidecar, scrapes v1's merged metrics on the pod
    // IP's port 15020: `sidecar init` leaves the port uncaptured, so the sidecar itself answers.
    let scraper = p.topo.as_mut().unwrap().host("prometheus").unwrap();
    let v1_ip = p.sidecars[0].host.as_ref().unwrap().ip.clone();
    let (ok, metrics, err) = run(scraper.command("curl").args([
        "-sf",
        "-m",
        "10",
        &format!("http://{v1_ip}:15020/stats/prometheus"),
    ]))
    .unwrap();
    assert!(ok, "scraping {v1_ip}:15020: {err}");
    assert!(
        metrics.contains("istio_requests_total{reporter=\"destination\",")
            && metrics.contains("destination_workload=\"httpbin-v1\""),
        "{metrics}"
    );

    // Cleanup (the seed's kubectl delete) restores default balancing.
    let (v1, v2) = p.cleanup_and_send().unwrap();
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

const ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000))
s.listen(16)
print("listening on 0.0.0.0:9000", flush=True)
def serve(c):
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const ECHO_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 9000), timeout=10)
c.sendall(b"hello weft\n")
got = b""
while len(got) < 11:
    d = c.recv(64)
    if not d:
        break
    got += d
print(got.decode().strip())
"#;

#[test]
fn opaque_tcp_crosses_the_mesh_and_passes_through() {
    if !netns::available("opaque_tcp_crosses_the_mesh_and_passes_through") {
        return;
    }
    let mut p = Seed::transparent(&[]).unwrap();
    p.apply_yaml(
        "echo.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  selector:\n    app: echo\n  ports:\n  - name: tcp-echo\n    port: 9000\n    targetPort: 9000\n",
    )
    .unwrap();
    let echo = p.topo.as_mut().unwrap().host("echo").unwrap();
    let python = weft_tests::venv().join("bin/python");
    let mut server = echo.command(&python);
    server.args(["-c", ECHO_SERVER]);
    let (_server, _) = weft_tests::Proc::spawn_listening("echo-app", server, p.dir.path()).unwrap();
    let echo_sidecar = weft_tests::Sidecar::transparent(
        p.topo.as_ref().unwrap(),
        &p.plane,
        &echo,
        "echo-1",
        "echo",
        "app=echo",
    )
    .unwrap();
    p.wait_config("the echo endpoint", |d| {
        d.to_string().contains("default/echo-1")
    })
    .unwrap();
    let sleep_ns = p.sleep.host.clone().unwrap();
    let client = |target: &str| {
        let (ok, out, err) =
            run(sleep_ns.command(&python).args(["-c", ECHO_CLIENT, target])).unwrap();
        assert!(ok, "echo client to {target}: {err}");
        out.trim().to_owned()
    };
    // By Service name: captured, carried over mTLS (ALPN istio) to the echo pod's sidecar.
    assert_eq!(client("echo"), "hello weft");
    // Straight to the pod IP (not a Service): passed through, and accepted in plaintext (PERMISSIVE).
    assert_eq!(client(&echo.ip), "hello weft");
    // Under STRICT the plaintext path is refused while the Service path (mTLS) keeps working: the
    // named connection really was mTLS.
    p.apply_yaml(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    let refused = (0..200).any(|_| {
        let (_, out, _) = run(sleep_ns
            .command(&python)
            .args(["-c", ECHO_CLIENT, &echo.ip]))
        .unwrap();
        let r = out.trim() != "hello weft";
        if !r {
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    });
    assert!(refused, "STRICT never refused plaintext TCP");
    assert_eq!(client("echo"), "hello weft");
    // Every connection went through the echo pod's inbound listener.
    let stats = echo_sidecar.stats().unwrap();
    let opened = stats
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(opened >= 2, "{stats}");
    // Their bytes too, as the app saw them: one more call through the mesh adds "hello weft\n"
    // each way (counted when the connection ends, which the sidecar may see a moment after the
    // client), the bytes read while the sniffer decided included.
    let tcp_bytes = || {
        let stats = echo_sidecar.stats().unwrap();
        let bytes = |name: &str| {
            stats
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{reporter=\"destination\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (
            bytes("istio_tcp_received_bytes_total"),
            bytes("istio_tcp_sent_bytes_total"),
            stats,
        )
    };
    // Earlier connections may still be ending: wait for the counts to settle.
    let mut before = tcp_bytes();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = tcp_bytes();
        if (now.0, now.1) == (before.0, before.1) {
            break;
        }
        before = now;
    }
    assert_eq!(client("echo"), "hello weft");
    let want = "hello weft\n".len() as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (received, sent, stats) = tcp_bytes();
        if received == before.0 + want && sent == before.1 + want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "want +{want} each way from {before:?}:\n{stats}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
