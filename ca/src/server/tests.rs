//! The service over real gRPC/TLS on loopback with the Kubernetes authenticators: the token decides
//! the identity through the whole CSR path, and refusals reach the caller with their reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::UNIX_EPOCH;

use tonic::Code;

use super::*;
use crate::auth::jwks::testkeys::{ISSUER, Signer, claims, issuer};
use crate::auth::jwks::{Expected, JwksAuthenticator, JwksFile};
use crate::authority::AuthorityOptions;
use crate::client::{CaClient, ClientError};

struct Running {
    addr: String,
    authority: Arc<Authority>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(authenticator: Authenticator) -> Running {
    crate::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let authority =
        Arc::new(Authority::load_or_create(dir.path(), AuthorityOptions::default()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let a = authority.clone();
    tokio::spawn(async move {
        serve_with(
            listener,
            CaService::with_authenticator(a, Arc::new(authenticator)),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    });
    Running {
        addr,
        authority,
        _dir: dir,
        stop: Some(tx),
    }
}

fn jwks_authenticator(dir: &std::path::Path) -> Authenticator {
    let path = dir.join("jwks.json");
    std::fs::write(
        &path,
        issuer().jwks(&[(Signer::Rsa, "k1"), (Signer::Ec, "k2")]),
    )
    .unwrap();
    Authenticator::Jwks(JwksAuthenticator::new(
        JwksFile::load(&path).unwrap(),
        Expected {
            issuer: ISSUER.into(),
            audience: "istio-ca".into(),
        },
    ))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sa_token(signer: Signer, kid: &str, ns: &str, sa: &str, iat: u64, exp: u64) -> String {
    issuer().token(signer, kid, &claims(ns, sa, "istio-ca", iat, exp))
}

async fn request(ca: &Running, token: &str, id: &SpiffeId) -> Result<Vec<String>, tonic::Status> {
    let bundle = TrustBundle::from_pem(ca.authority.root_pem()).unwrap();
    let client = CaClient::new(
        &ca.addr,
        &bundle,
        ca_identity("cluster.local").unwrap(),
        token,
    )
    .unwrap();
    let kc = crate::csr::generate(id).unwrap();
    client
        .create_certificate(&kc.csr_pem, Duration::ZERO)
        .await
        .map_err(|e| match e {
            ClientError::Status(s) => s,
            other => panic!("expected a gRPC status, got {other}"),
        })
}

#[tokio::test]
async fn a_service_account_token_gets_its_own_identity_and_no_other() {
    let keys = tempfile::tempdir().unwrap();
    let ca = start(jwks_authenticator(keys.path())).await;
    let now = now_secs();
    let sleep = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
    for (signer, kid) in [(Signer::Rsa, "k1"), (Signer::Ec, "k2")] {
        let token = sa_token(signer, kid, "default", "sleep", now, now + 3600);
        let chain = request(&ca, &token, &sleep).await.unwrap();
        // rustls accepts the leaf against the root alone, and it names the token's identity.
        let leaf = crate::authority::tests::verify_leaf(&chain, ca.authority.root_pem());
        assert_eq!(
            crate::tls::check_svid(&leaf, crate::tls::Purpose::ClientAuth).unwrap(),
            sleep
        );
    }

    // sleep's valid token with a CSR for another service account: refused by the signing path.
    let token = sa_token(Signer::Rsa, "k1", "default", "sleep", now, now + 3600);
    let admin = SpiffeId::new("cluster.local", "default", "admin").unwrap();
    let s = request(&ca, &token, &admin).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(
        s.message().contains("ns/default/sa/admin") && s.message().contains("ns/default/sa/sleep"),
        "{}",
        s.message()
    );
}

#[tokio::test]
async fn refusals_say_what_was_wrong() {
    let keys = tempfile::tempdir().unwrap();
    let ca = start(jwks_authenticator(keys.path())).await;
    let now = now_secs();
    let sleep = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
    let cases = [
        (
            sa_token(
                Signer::Rsa,
                "k1",
                "default",
                "sleep",
                now - 7200,
                now - 3600,
            ),
            "expired",
        ),
        (
            issuer().token(
                Signer::Rsa,
                "k1",
                &claims(
                    "default",
                    "sleep",
                    "https://kubernetes.default.svc",
                    now,
                    now + 60,
                ),
            ),
            "audience",
        ),
        (
            sa_token(Signer::RsaNext, "gone", "default", "sleep", now, now + 60),
            "key id \"gone\"",
        ),
        // A weft bootstrap token (ES256, no key id) is not signed by the cluster's issuer.
        (
            ca.authority
                .issue_token("default", "sleep", Duration::from_secs(60))
                .unwrap(),
            "signature does not verify",
        ),
    ];
    for (token, reason) in cases {
        let s = request(&ca, &token, &sleep).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());
        assert!(s.message().contains(reason), "{reason}: {}", s.message());
    }
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_to_the_caller() {
    crate::tls::install_default_provider();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let reviewer = crate::auth::token_review::TokenReviewer::from_config(
        kube::Config::new(closed.parse().unwrap()),
        "istio-ca",
        Duration::from_secs(2),
    )
    .unwrap();
    let ca = start(Authenticator::Kubernetes(reviewer)).await;
    let sleep = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
    let s = request(&ca, "a-projected-token", &sleep).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(s.message().contains("retry"), "{}", s.message());
}
