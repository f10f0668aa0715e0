#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CA service over real gRPC/TLS on loopback: issuance, and every refusal with its status.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Code;
use weft_ca::authority::{Authority, AuthorityOptions, TOKEN_KEY_FILE};
use weft_ca::client::{CaClient, ClientError};
use weft_ca::server::{ca_identity, serve};
use weft_ca::tls::TrustBundle;
use weft_ca::token::TokenSigner;
use weft_ca::{SpiffeId, csr};

struct Running {
    addr: String,
    authority: Arc<Authority>,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(max_ttl: Duration) -> Running {
    weft_ca::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let authority = Arc::new(
        Authority::load_or_create(
            dir.path(),
            AuthorityOptions {
                trust_domain: "cluster.local".into(),
                default_ttl: Duration::from_secs(3600),
                max_ttl,
            },
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let a = authority.clone();
    tokio::spawn(async move {
        serve(listener, a, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        authority,
        dir,
        stop: Some(tx),
    }
}

fn client(ca: &Running, token: &str) -> CaClient {
    let bundle = TrustBundle::from_pem(ca.authority.root_pem()).unwrap();
    CaClient::new(
        &ca.addr,
        &bundle,
        ca_identity("cluster.local").unwrap(),
        token,
    )
    .unwrap()
}

fn sid(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn status(err: ClientError) -> tonic::Status {
    match err {
        ClientError::Status(s) => s,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test]
async fn issues_a_certificate_for_the_token_identity() {
    let ca = start(Duration::from_secs(90 * 86400)).await;
    let token = ca
        .authority
        .issue_token("default", "sleep", Duration::from_secs(600))
        .unwrap();
    let c = client(&ca, &token);
    let me = sid("default", "sleep");
    let creds = c
        .fetch_credentials(&me, Duration::from_secs(1200))
        .await
        .unwrap();
    assert_eq!(creds.identity(), &me);
    let left = creds
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((1190..=1200).contains(&left), "validity left {left}");

    // A 10-year request is capped at the maximum (here 90 days).
    let kc = csr::generate(&me).unwrap();
    let chain = c
        .create_certificate(&kc.csr_pem, Duration::from_secs(10 * 365 * 86400))
        .await
        .unwrap();
    assert_eq!(
        chain.last().map(String::as_str),
        Some(ca.authority.root_pem())
    );
    let creds = weft_ca::tls::Credentials::from_pem(&chain, &kc.key_pem).unwrap();
    let left = creds
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(left <= 90 * 86400 && left > 90 * 86400 - 60, "{left}");
}

#[tokio::test]
async fn refuses_callers_without_a_valid_token() {
    let ca = start(Duration::from_secs(86400)).await;
    let me = sid("default", "sleep");
    let kc = csr::generate(&me).unwrap();

    // No token at all (a client whose bearer is blank sends none).
    let err = client(&ca, " ")
        .create_certificate(&kc.csr_pem, Duration::ZERO)
        .await
        .unwrap_err();
    let s = status(err);
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("no bearer token"), "{}", s.message());

    // Forged: a token from another CA.
    let other = tempfile::tempdir().unwrap();
    let forger = Authority::load_or_create(other.path(), AuthorityOptions::default()).unwrap();
    let forged = forger
        .issue_token("default", "sleep", Duration::from_secs(60))
        .unwrap();
    let s = status(
        client(&ca, &forged)
            .create_certificate(&kc.csr_pem, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("signature"), "{}", s.message());

    // Expired: signed by the right key an hour ago, valid for a minute.
    let pem = std::fs::read_to_string(ca.dir.path().join(TOKEN_KEY_FILE)).unwrap();
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let signer = TokenSigner::from_pkcs8(der.secret_der()).unwrap();
    let expired = signer
        .issue(
            "default",
            "sleep",
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(3600),
        )
        .unwrap();
    let s = status(
        client(&ca, &expired)
            .create_certificate(&kc.csr_pem, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("expired"), "{}", s.message());

    let s = status(
        client(&ca, "not-a-jwt")
            .create_certificate(&kc.csr_pem, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn refuses_another_identity_bad_csrs_and_impersonation() {
    let ca = start(Duration::from_secs(86400)).await;
    let token = ca
        .authority
        .issue_token("default", "sleep", Duration::from_secs(600))
        .unwrap();
    let c = client(&ca, &token);

    let admin = csr::generate(&sid("default", "admin")).unwrap();
    let s = status(
        c.create_certificate(&admin.csr_pem, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message()
            .contains("spiffe://cluster.local/ns/default/sa/admin")
            && s.message()
                .contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{}",
        s.message()
    );

    let s = status(
        c.create_certificate("garbage", Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("PEM"), "{}", s.message());

    // Negative validity through the raw API.
    use weft_proto::ca::IstioCertificateRequest;
    use weft_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
    let bundle = TrustBundle::from_pem(ca.authority.root_pem()).unwrap();
    let cfg = weft_ca::tls::client_config(
        None,
        &bundle,
        vec![ca_identity("cluster.local").unwrap()],
        &[weft_ca::tls::ALPN_H2],
    )
    .unwrap();
    let channel = weft_ca::grpc::tls_channel(&ca.addr, Arc::new(cfg), &Default::default()).unwrap();
    let mut raw = IstioCertificateServiceClient::new(channel);
    let me = csr::generate(&sid("default", "sleep")).unwrap();
    let request = |validity: i64, metadata: Option<prost_types::Struct>| {
        let mut r = tonic::Request::new(IstioCertificateRequest {
            csr: me.csr_pem.clone(),
            validity_duration: validity,
            metadata,
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let s = raw.create_certificate(request(-5, None)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("negative"), "{}", s.message());

    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "ImpersonatedIdentity".to_string(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/default/sa/admin".into(),
            )),
        },
    );
    let s = raw
        .create_certificate(request(0, Some(prost_types::Struct { fields })))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("impersonation"), "{}", s.message());

    // Still serving after all that.
    raw.create_certificate(request(0, None)).await.unwrap();
}

#[tokio::test]
async fn refuses_oversized_requests_without_buffering_them() {
    let ca = start(Duration::from_secs(86400)).await;
    let token = ca
        .authority
        .issue_token("default", "sleep", Duration::from_secs(600))
        .unwrap();
    let huge = "A".repeat(4 * 1024 * 1024);
    let s = status(
        client(&ca, &token)
            .create_certificate(&huge, Duration::ZERO)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("too large"), "{}", s.message());
}

#[tokio::test]
async fn clients_verify_the_ca_against_their_root() {
    let ca = start(Duration::from_secs(86400)).await;
    let token = ca
        .authority
        .issue_token("default", "sleep", Duration::from_secs(600))
        .unwrap();
    let other = tempfile::tempdir().unwrap();
    let wrong = Authority::load_or_create(other.path(), AuthorityOptions::default()).unwrap();
    let bundle = TrustBundle::from_pem(wrong.root_pem()).unwrap();
    let c = CaClient::new(
        &ca.addr,
        &bundle,
        ca_identity("cluster.local").unwrap(),
        &token,
    )
    .unwrap();
    let me = sid("default", "sleep");
    let s = status(c.fetch_credentials(&me, Duration::ZERO).await.unwrap_err());
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");

    // Right root, wrong expected identity: also refused before the token is sent.
    let bundle = TrustBundle::from_pem(ca.authority.root_pem()).unwrap();
    let c = CaClient::new(&ca.addr, &bundle, sid("weft-system", "impostor"), &token).unwrap();
    let s = status(c.fetch_credentials(&me, Duration::ZERO).await.unwrap_err());
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
}

#[tokio::test]
async fn credentials_rotate_at_half_life_and_survive_a_ca_outage() {
    let ca = start(Duration::from_secs(86400)).await;
    let token = ca
        .authority
        .issue_token("default", "sleep", Duration::from_secs(600))
        .unwrap();
    let c = client(&ca, &token);
    let me = sid("default", "sleep");
    let creds = c
        .fetch_credentials(&me, Duration::from_secs(2))
        .await
        .unwrap();
    let store = weft_ca::tls::CredentialStore::new(creds);
    let first = store.current();
    let task = tokio::spawn(weft_ca::client::keep_rotated(
        c.clone(),
        me.clone(),
        Duration::from_secs(2),
        store.clone(),
    ));
    // Renewal is due after about 1 s; allow generous scheduling slack but a bounded wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::ptr_eq(&first, &store.current()) {
        assert!(tokio::time::Instant::now() < deadline, "no rotation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = store.current();
    // Validity is whole seconds: a renewal within the same second may end at the same instant.
    assert!(second.not_after() >= first.not_after());
    assert_eq!(second.identity(), &me);

    // CA gone: the store keeps the last good certificate (no panic, no removal).
    drop(ca);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.current().identity(), &me);
    task.abort();
}

#[tokio::test]
async fn a_client_with_files_reads_the_token_and_the_roots_again_for_every_request() {
    let ca = start(Duration::from_secs(86400)).await;
    let dir = tempfile::tempdir().unwrap();
    let (token_file, root_file) = (dir.path().join("token"), dir.path().join("root.pem"));
    let token_for = |sa: &str| {
        ca.authority
            .issue_token("default", sa, Duration::from_secs(600))
            .unwrap()
    };
    std::fs::write(&token_file, token_for("sleep")).unwrap();
    std::fs::write(&root_file, ca.authority.root_pem()).unwrap();
    let roots = weft_ca::files::RootFile::load(&root_file).unwrap();
    let c = CaClient::with_files(
        &ca.addr,
        &roots,
        ca_identity("cluster.local").unwrap(),
        &token_file,
        &weft_ca::grpc::Keepalive::default(),
    )
    .unwrap();
    let ttl = Duration::from_secs(60);
    c.fetch_credentials(&sid("default", "sleep"), ttl)
        .await
        .unwrap();

    // The file now holds another service account's token: that is what the next request sends.
    std::fs::write(&token_file, token_for("other")).unwrap();
    let err = c
        .fetch_credentials(&sid("default", "sleep"), ttl)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Status(_)), "{err}");
    c.fetch_credentials(&sid("default", "other"), ttl)
        .await
        .unwrap();

    // A token file gone is an error of its own, and the request is not sent.
    std::fs::remove_file(&token_file).unwrap();
    let err = c
        .fetch_credentials(&sid("default", "other"), ttl)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TokenRead { .. }), "{err}");

    // A root added to the file is trusted from the next request on.
    let other = tempfile::tempdir().unwrap();
    let second = Authority::load_or_create(
        other.path(),
        AuthorityOptions {
            trust_domain: "cluster.local".into(),
            ..AuthorityOptions::default()
        },
    )
    .unwrap();
    let both = format!("{}{}", ca.authority.root_pem(), second.root_pem());
    std::fs::write(&root_file, both).unwrap();
    std::fs::write(&token_file, token_for("sleep")).unwrap();
    assert_eq!(roots.bundle().len(), 1);
    c.fetch_credentials(&sid("default", "sleep"), ttl)
        .await
        .unwrap();
    assert_eq!(roots.bundle().len(), 2);
}
