//! The `ca` binary as a process: serve, token, root, restart, plug-in CA, bad invocations.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use weft_ca::SpiffeId;
use weft_ca::client::CaClient;
use weft_ca::server::ca_identity;
use weft_ca::tls::TrustBundle;
use weft_tests::{Proc, bin, run};

fn serve(dir: &std::path::Path, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin("ca"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra);
    let (p, addr) = Proc::spawn_listening("ca", cmd, dir).unwrap();
    (p, addr.to_string())
}

fn ca_cmd(args: &[&str]) -> (bool, String, String) {
    run(Command::new(bin("ca")).args(args)).unwrap()
}

fn token(dir: &std::path::Path, ns: &str, sa: &str) -> String {
    let d = dir.to_str().unwrap();
    let (ok, out, err) = ca_cmd(&[
        "token",
        "--data-dir",
        d,
        "--namespace",
        ns,
        "--service-account",
        sa,
    ]);
    assert!(ok, "ca token failed: {err}");
    out.trim().to_owned()
}

fn root(dir: &std::path::Path) -> String {
    let (ok, out, err) = ca_cmd(&["root", "--data-dir", dir.to_str().unwrap()]);
    assert!(ok, "ca root failed: {err}");
    out
}

async fn fetch(
    addr: &str,
    root_pem: &str,
    token: &str,
    ns: &str,
    sa: &str,
) -> Result<weft_ca::tls::Credentials, String> {
    let bundle = TrustBundle::from_pem(root_pem).unwrap();
    let client =
        CaClient::new(addr, &bundle, ca_identity("cluster.local").unwrap(), token).unwrap();
    client
        .fetch_credentials(
            &SpiffeId::new("cluster.local", ns, sa).unwrap(),
            Duration::from_secs(600),
        )
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn serve_token_root_issue_and_restart_keep_the_same_root() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (mut ca, addr) = serve(dir.path(), &[]);
    let root1 = root(dir.path());
    assert!(root1.starts_with("-----BEGIN CERTIFICATE-----"), "{root1}");
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let t = token(dir.path(), "default", "sleep");
    let creds = fetch(&addr, &root1, &t, "default", "sleep").await.unwrap();
    assert_eq!(
        creds.identity().as_str(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    // The token names sleep: asking for httpbin is refused with both identities named.
    let err = fetch(&addr, &root1, &t, "default", "httpbin")
        .await
        .unwrap_err();
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
    assert!(
        err.contains("sa/httpbin") && err.contains("sa/sleep"),
        "{err}"
    );

    assert!(
        ca.terminate(Duration::from_secs(10)).unwrap(),
        "ca exited uncleanly on SIGTERM"
    );
    let (_ca2, addr2) = serve(dir.path(), &[]);
    assert_eq!(root(dir.path()), root1, "restart must keep the root");
    // The old token and the old root still work against the restarted CA.
    let creds = fetch(&addr2, &root1, &t, "default", "sleep").await.unwrap();
    assert_eq!(creds.identity().service_account(), "sleep");
}

#[tokio::test]
async fn plugged_in_operator_intermediate() {
    weft_tests::init();
    let (root_cert, int_cert, int_key) = operator_ca();

    let src = tempfile::tempdir().unwrap();
    let chain = src.path().join("cert-chain.pem");
    let key = src.path().join("ca-key.pem");
    std::fs::write(&chain, format!("{}{}", int_cert.pem(), root_cert.pem())).unwrap();
    std::fs::write(&key, int_key.serialize_pem()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (_ca, addr) = serve(
        dir.path(),
        &[
            "--root-cert",
            chain.to_str().unwrap(),
            "--root-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(root(dir.path()), root_cert.pem());
    let t = token(dir.path(), "default", "httpbin");
    // Clients trust only the operator's root; the chain carries the intermediate.
    let creds = fetch(&addr, &root_cert.pem(), &t, "default", "httpbin")
        .await
        .unwrap();
    assert_eq!(creds.identity().service_account(), "httpbin");
}

#[test]
fn bad_invocations_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();

    let (ok, _, err) = ca_cmd(&[
        "serve",
        "--data-dir",
        d,
        "--listen",
        "127.0.0.1:0",
        "--root-cert",
        "x.pem",
    ]);
    assert!(!ok);
    assert!(err.contains("--root-key"), "{err}");

    let (ok, _, err) = ca_cmd(&[
        "serve",
        "--data-dir",
        d,
        "--listen",
        "127.0.0.1:0",
        "--max-cert-ttl",
        "1h",
    ]);
    assert!(!ok);
    assert!(err.contains("exceeds --max-cert-ttl"), "{err}");

    let (ok, _, err) = ca_cmd(&[
        "serve",
        "--data-dir",
        d,
        "--listen",
        "127.0.0.1:0",
        "--workload-cert-ttl",
        "soon",
    ]);
    assert!(!ok);
    assert!(err.contains("invalid duration"), "{err}");

    let (ok, _, err) = ca_cmd(&[
        "token",
        "--data-dir",
        d,
        "--namespace",
        "default",
        "--service-account",
        "a/b",
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot issue a token") && err.contains("\"a/b\""),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = ca_cmd(&["root", "--data-dir", empty.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("has `ca serve"), "{err}");

    // A port already in use is a startup error, not a silent retry.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let (ok, _, err) = ca_cmd(&["serve", "--data-dir", d, "--listen", &port]);
    assert!(!ok);
    assert!(err.contains("cannot listen"), "{err}");
}

#[test]
fn request_command_fetches_a_certificate_like_a_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, addr) = serve(dir.path(), &[]);
    let root_file = dir.path().join("root-cert.pem");
    let token_file = dir.path().join("sleep.token");
    std::fs::write(&token_file, token(dir.path(), "default", "sleep")).unwrap();
    let cert = dir.path().join("out/cert.pem");
    let key = dir.path().join("out/key.pem");
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let args = |sa: &str| {
        vec![
            "request".to_string(),
            "--ca".into(),
            addr.clone(),
            "--ca-root".into(),
            root_file.to_str().unwrap().into(),
            "--token-file".into(),
            token_file.to_str().unwrap().into(),
            "--namespace".into(),
            "default".into(),
            "--service-account".into(),
            sa.into(),
            "--ttl".into(),
            "1h".into(),
            "--cert-out".into(),
            cert.to_str().unwrap().into(),
            "--key-out".into(),
            key.to_str().unwrap().into(),
        ]
    };
    let (ok, out, err) = run(Command::new(bin("ca")).args(args("sleep"))).unwrap();
    assert!(ok, "{err}");
    assert!(
        out.starts_with(
            "issued spiffe://cluster.local/ns/default/sa/sleep (chain of 2 certificates"
        ),
        "{out}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let chain = std::fs::read_to_string(&cert).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);

    let (ok, _, err) = run(Command::new(bin("ca")).args(args("httpbin"))).unwrap();
    assert!(!ok);
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
}

/// An HTTP/2 client that completes TLS and the connection preface, then never reads or closes: it
/// ignores the GOAWAY a draining server sends, as a stuck or slow peer would.
fn stuck_h2_client(
    addr: &str,
    root_pem: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::Write;
    let bundle = TrustBundle::from_pem(root_pem).unwrap();
    let config = weft_ca::tls::client_config(
        None,
        &bundle,
        vec![ca_identity("cluster.local").unwrap()],
        &[weft_ca::tls::ALPN_H2],
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("ca.invalid").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The preface and an empty SETTINGS frame: from here the server holds an HTTP/2 connection.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    tls.flush().unwrap();
    tls
}

#[tokio::test]
async fn sigterm_drains_for_the_drain_duration_and_exits_0() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (mut ca, addr) = serve(dir.path(), &["--drain-duration", "1s"]);
    let root_pem = root(dir.path());
    let t = token(dir.path(), "default", "sleep");
    fetch(&addr, &root_pem, &t, "default", "sleep")
        .await
        .unwrap();
    let _stuck = stuck_h2_client(&addr, &root_pem);
    let start = std::time::Instant::now();
    assert!(
        ca.terminate(Duration::from_secs(10)).unwrap(),
        "ca exited uncleanly on SIGTERM"
    );
    let took = start.elapsed();
    eprintln!("ca stopped {took:?} after SIGTERM");
    // The stuck connection holds the drain open until its deadline, no longer.
    assert!(
        took >= Duration::from_millis(900),
        "ca stopped after {took:?}, before the drain ended"
    );
    assert!(
        took < Duration::from_millis(2500),
        "ca took {took:?} to stop"
    );
}

/// An operator's root and an intermediate for weft (with its key), as an operator would bring them.
fn operator_ca() -> (rcgen::Certificate, rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = rp.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(rp, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let int_cert = ip.signed_by(&int_key, &root_issuer).unwrap();
    (root_cert, int_cert, int_key)
}

/// An operator root and intermediate written in Istio's `cacerts` layout into `dir`; returns the
/// root (PEM).
fn write_cacerts(dir: &std::path::Path) -> String {
    let (root_cert, int_cert, int_key) = operator_ca();
    std::fs::write(dir.join("ca-cert.pem"), int_cert.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int_cert.pem(), root_cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.join("root-cert.pem"), root_cert.pem()).unwrap();
    root_cert.pem()
}

#[tokio::test]
async fn replicas_on_one_cacerts_secret_take_service_account_tokens_offline() {
    use weft_ca::auth::jwks::testkeys::{ISSUER, Signer, claims, issuer};
    weft_tests::init();
    let cacerts = tempfile::tempdir().unwrap();
    let root_pem = write_cacerts(cacerts.path());
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    std::fs::write(&jwks, issuer().jwks(&[(Signer::Ec, "k1")])).unwrap();
    let replica = |name: &str| {
        let mut cmd = Command::new(bin("ca"));
        cmd.arg("serve")
            .arg("--cacerts")
            .arg(cacerts.path())
            .args(["--listen", "127.0.0.1:0", "--auth", "jwks", "--jwks"])
            .arg(&jwks)
            .args(["--token-issuer", ISSUER, "--jwks-poll-interval", "100ms"]);
        let (p, addr) = Proc::spawn_listening(name, cmd, keys.path()).unwrap();
        (p, addr.to_string())
    };
    let (_a, addr_a) = replica("ca-a");
    let (_b, addr_b) = replica("ca-b");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sleep = issuer().token(
        Signer::Ec,
        "k1",
        &claims("default", "sleep", "istio-ca", now, now + 600),
    );
    // Both replicas serve and issue under the operator's root (clients trust only it).
    for addr in [&addr_a, &addr_b] {
        let creds = fetch(addr, &root_pem, &sleep, "default", "sleep")
            .await
            .unwrap();
        assert_eq!(creds.identity().service_account(), "sleep");
        let err = fetch(addr, &root_pem, &sleep, "default", "httpbin")
            .await
            .unwrap_err();
        assert!(
            err.contains("sa/httpbin") && err.contains("sa/sleep"),
            "{err}"
        );
    }
    let expired = issuer().token(
        Signer::Ec,
        "k1",
        &claims("default", "sleep", "istio-ca", now - 7200, now - 3600),
    );
    let err = fetch(&addr_a, &root_pem, &expired, "default", "sleep")
        .await
        .unwrap_err();
    assert!(err.contains("expired"), "{err}");

    // The issuer's keys rotate: the file is replaced (as the kubelet does) and read again.
    let rotated = issuer().token(
        Signer::RsaNext,
        "k2",
        &claims("default", "sleep", "istio-ca", now, now + 600),
    );
    let err = fetch(&addr_b, &root_pem, &rotated, "default", "sleep")
        .await
        .unwrap_err();
    assert!(err.contains("key id \"k2\""), "{err}");
    let tmp = keys.path().join("jwks.json.tmp");
    std::fs::write(&tmp, issuer().jwks(&[(Signer::RsaNext, "k2")])).unwrap();
    std::fs::rename(&tmp, &jwks).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match fetch(&addr_b, &root_pem, &rotated, "default", "sleep").await {
            Ok(creds) => {
                assert_eq!(creds.identity().service_account(), "sleep");
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "rotated key never accepted: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = fetch(&addr_b, &root_pem, &sleep, "default", "sleep")
        .await
        .unwrap_err();
    assert!(err.contains("key id \"k1\""), "{err}");
}

#[test]
fn kubernetes_modes_refuse_bad_start_up_material() {
    let cacerts = tempfile::tempdir().unwrap();
    write_cacerts(cacerts.path());
    let c = cacerts.path().to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--cacerts", c];
        args.extend_from_slice(extra);
        ca_cmd(&args)
    };
    let (ok, _, err) = serve(&["--auth", "jwks", "--token-issuer", "https://i"]);
    assert!(!ok);
    assert!(err.contains("--jwks"), "{err}");
    let (ok, _, err) = serve(&[
        "--auth",
        "jwks",
        "--token-issuer",
        "https://i",
        "--jwks",
        "/nonexistent/jwks.json",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/jwks.json"), "{err}");
    let (ok, _, err) = serve(&[]);
    assert!(!ok);
    assert!(err.contains("--data-dir"), "{err}");

    // A key that is not ca-cert.pem's.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(cacerts.path().join("ca-key.pem"), other.serialize_pem()).unwrap();
    let (ok, _, err) = serve(&["--auth", "kubernetes"]);
    assert!(!ok);
    assert!(err.contains("key does not match"), "{err}");
}
