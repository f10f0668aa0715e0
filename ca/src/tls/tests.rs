//! Real rustls handshakes (over an in-memory duplex) between certificates made here: the ones the
//! authority issues, and hand-made bad ones it never would (two URI SANs, CA:TRUE leaves, no EKU...).

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use std::time::Duration;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A test CA that can make any leaf, including ones the real authority refuses to.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl TestCa {
    fn new() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(p, key),
            root_pem: cert.pem(),
        }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.root_pem).unwrap()
    }

    /// A good SVID for `uri`, then `tweak` to break it.
    fn leaf(&self, uri: &str, tweak: impl FnOnce(&mut CertificateParams)) -> (Vec<String>, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(3600);
        tweak(&mut p);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.pem()], key.serialize_pem())
    }

    /// Credentials for a hand-made leaf, bypassing `Credentials`' own SVID check.
    fn raw_store(&self, leaf: &(Vec<String>, String)) -> Arc<CredentialStore> {
        let chain: Vec<CertificateDer<'static>> = leaf
            .0
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(leaf.1.as_bytes()).unwrap();
        let certified = CertifiedKey::from_der(chain, key, &provider()).unwrap();
        CredentialStore::new(Credentials {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/x/sa/x").unwrap(),
            not_after: SystemTime::now(),
            certified: Arc::new(certified),
        })
    }

    fn store(&self, ns: &str, sa: &str) -> Arc<CredentialStore> {
        let leaf = self.leaf(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"), |_| {});
        CredentialStore::new(Credentials::from_pem(&leaf.0, &leaf.1).unwrap())
    }
}

fn sid(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

/// Runs one handshake; returns (client error, server error, identity the server saw).
async fn handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> (Option<String>, Option<String>, Option<SpiffeId>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(Arc::new(client));
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let name = ServerName::try_from("httpbin.default.svc.cluster.local").unwrap();
    let (cr, sr) = tokio::join!(
        async {
            let mut tls = connector.connect(name, c).await?;
            // Drive the handshake to completion in TLS 1.3 (the server's verdict on the client
            // certificate arrives after the client thinks it is done).
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tls.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        },
        async {
            let mut tls = acceptor.accept(s).await?;
            let id = tls.get_ref().1.peer_certificates().and_then(peer_identity);
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(b"pong").await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(id)
        }
    );
    let seen = sr.as_ref().ok().cloned().flatten();
    (
        cr.err().map(|e| e.to_string()),
        sr.err().map(|e| e.to_string()),
        seen,
    )
}

fn mesh_server(ca: &TestCa, store: Arc<CredentialStore>) -> ServerConfig {
    server_config(store, &ca.bundle(), ClientAuth::Required, &[ALPN_H2]).unwrap()
}

fn mesh_client(ca: &TestCa, store: Arc<CredentialStore>, expect: SpiffeId) -> ClientConfig {
    client_config(Some(store), &ca.bundle(), vec![expect], &[ALPN_H2]).unwrap()
}

#[tokio::test]
async fn mutual_tls_between_two_identities() {
    let ca = TestCa::new();
    let (ce, se, seen) = handshake(
        mesh_client(&ca, ca.store("default", "sleep"), sid("default", "httpbin")),
        mesh_server(&ca, ca.store("default", "httpbin")),
    )
    .await;
    assert_eq!((ce, se), (None, None));
    assert_eq!(seen, Some(sid("default", "sleep")));
}

#[tokio::test]
async fn client_refuses_an_unexpected_server_identity() {
    let ca = TestCa::new();
    let (ce, _, _) = handshake(
        mesh_client(&ca, ca.store("default", "sleep"), sid("default", "httpbin")),
        mesh_server(&ca, ca.store("default", "impostor")),
    )
    .await;
    let ce = ce.expect("client must abort");
    assert!(
        ce.contains("peer is spiffe://cluster.local/ns/default/sa/impostor, expected spiffe://cluster.local/ns/default/sa/httpbin"),
        "{ce}"
    );
}

#[tokio::test]
async fn foreign_roots_are_refused_both_ways() {
    let ca = TestCa::new();
    let evil = TestCa::new();
    // Server from another root.
    let (ce, _, _) = handshake(
        mesh_client(&ca, ca.store("default", "sleep"), sid("default", "httpbin")),
        mesh_server(&ca, evil.store("default", "httpbin")),
    )
    .await;
    assert!(ce.is_some(), "client accepted a foreign server");
    // Client from another root.
    let client = client_config(
        Some(evil.store("default", "sleep")),
        &ca.bundle(),
        vec![sid("default", "httpbin")],
        &[ALPN_H2],
    )
    .unwrap();
    let (_, se, seen) = handshake(client, mesh_server(&ca, ca.store("default", "httpbin"))).await;
    assert!(se.is_some(), "server accepted a foreign client");
    assert_eq!(seen, None);
}

#[tokio::test]
async fn strict_server_refuses_clients_without_certificates() {
    let ca = TestCa::new();
    let client = client_config(None, &ca.bundle(), vec![sid("default", "httpbin")], &[]).unwrap();
    let (_, se, _) = handshake(client, mesh_server(&ca, ca.store("default", "httpbin"))).await;
    assert!(se.is_some());
    // PERMISSIVE over TLS: the same client gets in, with no identity.
    let client = client_config(None, &ca.bundle(), vec![sid("default", "httpbin")], &[]).unwrap();
    let server = server_config(
        ca.store("default", "httpbin"),
        &ca.bundle(),
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    let (ce, se, seen) = handshake(client, server).await;
    assert_eq!((ce, se, seen), (None, None, None));
}

/// Each bad leaf, presented by the server (client verifies) and by the client (server verifies).
#[tokio::test]
async fn bad_svids_are_refused_in_both_directions() {
    let ca = TestCa::new();
    let httpbin = "spiffe://cluster.local/ns/default/sa/httpbin";
    let past = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    type Tweak = Box<dyn Fn(&mut CertificateParams)>;
    let cases: Vec<(&str, &str, Tweak, &str)> = vec![
        (
            "two URI SANs",
            httpbin,
            Box::new(|p| {
                p.subject_alt_names.push(SanType::URI(
                    "spiffe://cluster.local/ns/default/sa/other"
                        .try_into()
                        .unwrap(),
                ))
            }),
            "2 URI SANs",
        ),
        (
            "CA:TRUE leaf",
            httpbin,
            Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            "",
        ),
        (
            "keyCertSign leaf",
            httpbin,
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            "CA certificate",
        ),
        (
            "no EKU",
            httpbin,
            Box::new(|p| p.extended_key_usages.clear()),
            "extended key usage",
        ),
        (
            "emailProtection only",
            httpbin,
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection]),
            "",
        ),
        (
            "expired",
            httpbin,
            Box::new(move |p| {
                p.not_before = past - Duration::from_secs(3600);
                p.not_after = past;
            }),
            "expired",
        ),
        (
            "ID only in a DNS SAN",
            httpbin,
            Box::new(|p| {
                p.subject_alt_names =
                    vec![SanType::DnsName("spiffe.cluster.local".try_into().unwrap())]
            }),
            "0 URI SANs",
        ),
        (
            "uppercase trust domain",
            "spiffe://Cluster.local/ns/default/sa/httpbin",
            Box::new(|_| {}),
            "not a workload SPIFFE ID",
        ),
    ];
    for (what, uri, tweak, want) in cases {
        let bad = ca.leaf(uri, |p| tweak(p));
        // Bad server certificate.
        let (ce, _, _) = handshake(
            mesh_client(&ca, ca.store("default", "sleep"), sid("default", "httpbin")),
            mesh_server(&ca, ca.raw_store(&bad)),
        )
        .await;
        let ce = ce.unwrap_or_else(|| panic!("{what}: client accepted the server"));
        assert!(ce.contains(want), "{what}: {ce}");
        // Bad client certificate.
        let client = client_config(
            Some(ca.raw_store(&bad)),
            &ca.bundle(),
            vec![sid("default", "httpbin")],
            &[],
        )
        .unwrap();
        let (_, se, seen) =
            handshake(client, mesh_server(&ca, ca.store("default", "httpbin"))).await;
        let se = se.unwrap_or_else(|| panic!("{what}: server accepted the client"));
        assert!(se.contains(want), "{what}: {se}");
        assert_eq!(seen, None);
    }
}

#[tokio::test]
async fn server_refuses_other_trust_domains_including_lookalikes() {
    let ca = TestCa::new();
    for td in ["clusterset.local", "cluster.local.evil"] {
        let leaf = ca.leaf(&format!("spiffe://{td}/ns/default/sa/sleep"), |_| {});
        let client = client_config(
            Some(ca.raw_store(&leaf)),
            &ca.bundle(),
            vec![sid("default", "httpbin")],
            &[],
        )
        .unwrap();
        let (_, se, _) = handshake(client, mesh_server(&ca, ca.store("default", "httpbin"))).await;
        let se = se.unwrap_or_else(|| panic!("{td}: accepted"));
        assert!(
            se.contains("outside trust domain cluster.local"),
            "{td}: {se}"
        );
    }
}

#[tokio::test]
async fn rotation_changes_the_certificate_of_new_handshakes() {
    let ca = TestCa::new();
    let store = ca.store("default", "sleep");
    let first = store.current();
    let leaf = ca.leaf("spiffe://cluster.local/ns/default/sa/sleep", |_| {});
    store.rotate(Credentials::from_pem(&leaf.0, &leaf.1).unwrap());
    assert!(!Arc::ptr_eq(&first, &store.current()));
    let (ce, se, seen) = handshake(
        mesh_client(&ca, store, sid("default", "httpbin")),
        mesh_server(&ca, ca.store("default", "httpbin")),
    )
    .await;
    assert_eq!((ce, se), (None, None));
    assert_eq!(seen, Some(sid("default", "sleep")));
}

/// A root rotation as the sidecar sees it: configs built once from a bundle pick up roots added to
/// and removed from it for the next handshake, in both directions.
#[tokio::test]
async fn configs_follow_the_bundle_as_roots_are_added_and_removed() {
    let old = TestCa::new();
    let new = TestCa::new();
    let bundle = old.bundle();
    let server = |store| server_config(store, &bundle, ClientAuth::Required, &[ALPN_H2]).unwrap();
    let client = |store| {
        client_config(
            Some(store),
            &bundle,
            vec![sid("default", "httpbin")],
            &[ALPN_H2],
        )
        .unwrap()
    };
    // Built before the new root is known.
    let old_server = server(old.store("default", "httpbin"));
    let new_client = client(new.store("default", "sleep"));
    let (ce, se, _) = handshake(new_client.clone(), old_server.clone()).await;
    assert!(
        ce.is_some() || se.is_some(),
        "a root not yet in the bundle was trusted"
    );

    // Step 1: both roots. The same configs now accept the new root, and the old still works.
    let both = format!("{}{}", old.root_pem, new.root_pem);
    assert!(bundle.replace_pem(&both).unwrap());
    assert!(!bundle.replace_pem(&both).unwrap(), "same roots: no change");
    assert_eq!(bundle.len(), 2);
    let (ce, se, seen) = handshake(new_client.clone(), old_server.clone()).await;
    assert_eq!((ce, se), (None, None));
    assert_eq!(seen, Some(sid("default", "sleep")));
    let new_server = server(new.store("default", "httpbin"));
    let old_client = client(old.store("default", "sleep"));
    let (ce, se, _) = handshake(old_client.clone(), new_server.clone()).await;
    assert_eq!((ce, se), (None, None));

    // Step 3: the old root is gone: its leaves are refused by server and client verifiers alike.
    assert!(bundle.replace_pem(&new.root_pem).unwrap());
    let (_, se, seen) = handshake(old_client, new_server.clone()).await;
    assert!(se.is_some(), "server still trusts the removed root");
    assert_eq!(seen, None);
    let (ce, _, _) = handshake(new_client.clone(), old_server).await;
    assert!(ce.is_some(), "client still trusts the removed root");
    let (ce, se, _) = handshake(new_client, new_server).await;
    assert_eq!((ce, se), (None, None));

    // Garbage keeps the roots in force.
    assert!(bundle.replace_pem("not a certificate").is_err());
    assert_eq!(bundle.len(), 1);
}

#[test]
fn credentials_refuse_non_svids_and_mismatched_keys() {
    let ca = TestCa::new();
    let two = ca.leaf("spiffe://cluster.local/ns/a/sa/b", |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/a/sa/c".try_into().unwrap(),
        ))
    });
    assert!(matches!(
        Credentials::from_pem(&two.0, &two.1),
        Err(SvidError::UriSanCount(2))
    ));
    let a = ca.leaf("spiffe://cluster.local/ns/a/sa/b", |_| {});
    let b = ca.leaf("spiffe://cluster.local/ns/a/sa/b", |_| {});
    assert!(matches!(
        Credentials::from_pem(&a.0, &b.1),
        Err(SvidError::Key(_))
    ));
    assert!(matches!(
        Credentials::from_pem(&[], &a.1),
        Err(SvidError::EmptyChain)
    ));
}

#[test]
fn aes_128_gcm_is_offered_first_and_nothing_is_dropped() {
    let ours = provider();
    assert_eq!(
        ours.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    let mut defaults: Vec<_> = rustls::crypto::ring::default_provider()
        .cipher_suites
        .iter()
        .map(|s| s.suite())
        .collect();
    let mut mine: Vec<_> = ours.cipher_suites.iter().map(|s| s.suite()).collect();
    defaults.sort_by_key(|s| u16::from(*s));
    mine.sort_by_key(|s| u16::from(*s));
    assert_eq!(mine, defaults);
}
