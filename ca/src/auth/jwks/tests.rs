#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::testkeys::{ISSUER, Signer, claims, issuer};
use super::*;

const NOW: u64 = 1_800_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn expected() -> Expected {
    Expected {
        issuer: ISSUER.into(),
        audience: "istio-ca".into(),
    }
}

fn both_keys() -> Jwks {
    Jwks::parse(
        issuer()
            .jwks(&[(Signer::Rsa, "rsa-1"), (Signer::Ec, "ec-1")])
            .as_bytes(),
    )
    .unwrap()
}

fn good(signer: Signer, kid: &str) -> String {
    issuer().token(
        signer,
        kid,
        &claims("default", "sleep", "istio-ca", NOW - 10, NOW + 3600),
    )
}

#[test]
fn rs256_and_es256_tokens_verify_to_their_service_account() {
    let jwks = both_keys();
    for (signer, kid) in [(Signer::Rsa, "rsa-1"), (Signer::Ec, "ec-1")] {
        let v = verify(&jwks, &good(signer, kid), &expected(), at(NOW)).unwrap();
        assert_eq!(v.namespace, "default");
        assert_eq!(v.service_account, "sleep");
        assert_eq!(v.pod.as_deref(), Some("sleep-7d9c8b6f5-x2x4z"));
        assert_eq!(v.expires_at, NOW + 3600);
    }
    // A single string audience, no pod binding (a token for a Secret or a bare service account).
    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["aud"] = json!("istio-ca");
    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    let t = issuer().token(Signer::Rsa, "rsa-1", &c);
    assert_eq!(verify(&jwks, &t, &expected(), at(NOW)).unwrap().pod, None);
}

#[test]
fn time_checks_have_a_small_leeway() {
    let jwks = both_keys();
    let t = good(Signer::Rsa, "rsa-1");
    let leeway = LEEWAY.as_secs();
    assert!(verify(&jwks, &t, &expected(), at(NOW + 3600 + leeway)).is_ok());
    let err = verify(&jwks, &t, &expected(), at(NOW + 3600 + leeway + 1)).unwrap_err();
    assert!(matches!(err, JwtError::Expired(61)), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");

    let not_yet = issuer().token(
        Signer::Ec,
        "ec-1",
        &claims("default", "sleep", "istio-ca", NOW + 600, NOW + 3600),
    );
    let err = verify(&jwks, &not_yet, &expected(), at(NOW)).unwrap_err();
    assert!(matches!(err, JwtError::NotYetValid(600)), "{err}");

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 3600);
    c["iat"] = json!(NOW + 3000);
    let t = issuer().token(Signer::Ec, "ec-1", &c);
    let err = verify(&jwks, &t, &expected(), at(NOW)).unwrap_err();
    assert!(matches!(err, JwtError::IssuedInFuture(3000)), "{err}");

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW);
    c.as_object_mut().unwrap().remove("exp");
    let t = issuer().token(Signer::Ec, "ec-1", &c);
    assert!(matches!(
        verify(&jwks, &t, &expected(), at(NOW)),
        Err(JwtError::NoExpiry)
    ));
}

#[test]
fn issuer_and_audience_must_match() {
    let jwks = both_keys();
    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["iss"] = json!("https://other-cluster.example");
    let t = issuer().token(Signer::Rsa, "rsa-1", &c);
    let err = verify(&jwks, &t, &expected(), at(NOW)).unwrap_err();
    assert!(matches!(&err, JwtError::Issuer { got, .. } if got == "https://other-cluster.example"));
    assert!(err.to_string().contains(ISSUER), "{err}");

    // The default kubelet token (audience = the API server) is not for the CA.
    let t = issuer().token(
        Signer::Rsa,
        "rsa-1",
        &claims(
            "default",
            "sleep",
            "https://kubernetes.default.svc",
            NOW,
            NOW + 60,
        ),
    );
    let err = verify(&jwks, &t, &expected(), at(NOW)).unwrap_err();
    assert!(
        matches!(&err, JwtError::Audience { got, .. } if got == &["https://kubernetes.default.svc"])
    );
    assert!(err.to_string().contains("audience \"istio-ca\""), "{err}");
    let other_aud = Expected {
        audience: "https://kubernetes.default.svc".into(),
        ..expected()
    };
    assert!(verify(&jwks, &t, &other_aud, at(NOW)).is_ok());
}

#[test]
fn keys_algorithms_and_signatures() {
    let jwks = both_keys();
    let c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    let err = verify(
        &jwks,
        &issuer().token(Signer::Rsa, "rotated-away", &c),
        &expected(),
        at(NOW),
    )
    .unwrap_err();
    assert!(
        matches!(&err, JwtError::UnknownKeyId(k) if k == "rotated-away"),
        "{err}"
    );

    // alg none: no signature at all.
    let body = URL_SAFE_NO_PAD.encode(c.to_string());
    let none = format!(
        "{}.{body}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"rsa-1"}"#)
    );
    assert!(matches!(
        verify(&jwks, &none, &expected(), at(NOW)),
        Err(JwtError::Algorithm(a)) if a == "none"
    ));
    // HS256 "signed" with the public key as the HMAC secret: the classic confusion, refused by name.
    for alg in ["HS256", "RS512", "PS256", "ES384", "EdDSA"] {
        let header = json!({"alg": alg, "kid": "rsa-1"}).to_string();
        let t = issuer().sign_raw(Signer::Rsa, header.as_bytes(), c.to_string().as_bytes());
        assert!(
            matches!(verify(&jwks, &t, &expected(), at(NOW)), Err(JwtError::Algorithm(a)) if a == alg)
        );
    }
    // ES256 under the RSA key's id.
    let header = json!({"alg": "ES256", "kid": "rsa-1"}).to_string();
    let t = issuer().sign_raw(Signer::Ec, header.as_bytes(), c.to_string().as_bytes());
    assert!(matches!(
        verify(&jwks, &t, &expected(), at(NOW)),
        Err(JwtError::KeyMismatch { alg: "ES256", .. })
    ));
    // Signed by another key under a known id; and claims swapped after signing.
    let t = issuer().token(Signer::RsaNext, "rsa-1", &c);
    assert!(matches!(
        verify(&jwks, &t, &expected(), at(NOW)),
        Err(JwtError::Signature)
    ));
    let good = good(Signer::Ec, "ec-1");
    let parts: Vec<&str> = good.split('.').collect();
    let evil = URL_SAFE_NO_PAD
        .encode(claims("kube-system", "admin", "istio-ca", NOW, NOW + 60).to_string());
    let tampered = format!("{}.{evil}.{}", parts[0], parts[2]);
    assert!(matches!(
        verify(&jwks, &tampered, &expected(), at(NOW)),
        Err(JwtError::Signature)
    ));
    let header = json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}).to_string();
    let t = issuer().sign_raw(Signer::Rsa, header.as_bytes(), c.to_string().as_bytes());
    assert!(matches!(
        verify(&jwks, &t, &expected(), at(NOW)),
        Err(JwtError::Critical)
    ));
    // No kid: fine with one key of the algorithm, ambiguous with two.
    let t = issuer().sign_raw(Signer::Ec, br#"{"alg":"ES256"}"#, c.to_string().as_bytes());
    assert!(verify(&jwks, &t, &expected(), at(NOW)).is_ok());
    let two_rsa = Jwks::parse(
        issuer()
            .jwks(&[(Signer::Rsa, "a"), (Signer::RsaNext, "b")])
            .as_bytes(),
    )
    .unwrap();
    let t = issuer().sign_raw(Signer::Rsa, br#"{"alg":"RS256"}"#, c.to_string().as_bytes());
    assert!(matches!(
        verify(&two_rsa, &t, &expected(), at(NOW)),
        Err(JwtError::NoKeyId("RS256"))
    ));
    for garbage in ["", "a", "a.b", "a.b.c.d", "!!.??.**"] {
        assert!(
            matches!(
                verify(&jwks, garbage, &expected(), at(NOW)),
                Err(JwtError::Malformed(_))
            ),
            "{garbage:?}"
        );
    }
    let huge = "a".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(
        verify(&jwks, &huge, &expected(), at(NOW)),
        Err(JwtError::TooLarge(_))
    ));
}

#[test]
fn subject_must_agree_with_the_kubernetes_claims() {
    let jwks = both_keys();
    let refuse = |c: &serde_json::Value| {
        let t = issuer().token(Signer::Rsa, "rsa-1", c);
        verify(&jwks, &t, &expected(), at(NOW)).unwrap_err()
    };
    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["sub"] = json!("system:node:worker-1");
    assert!(matches!(refuse(&c), JwtError::Subject(_)));

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["kubernetes.io"]["namespace"] = json!("kube-system");
    let err = refuse(&c);
    assert!(matches!(err, JwtError::KubernetesClaims(_)), "{err}");
    assert!(err.to_string().contains("kube-system"), "{err}");

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
    assert!(matches!(refuse(&c), JwtError::KubernetesClaims(_)));

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c["kubernetes.io"]["pod"] = json!({"name": "sleep-1"});
    assert!(matches!(refuse(&c), JwtError::KubernetesClaims(_)));

    let mut c = claims("default", "sleep", "istio-ca", NOW, NOW + 60);
    c.as_object_mut().unwrap().remove("kubernetes.io");
    assert!(matches!(refuse(&c), JwtError::KubernetesClaims(_)));
}

#[test]
fn jwks_documents_are_bounded_and_need_a_usable_key() {
    let good = issuer().jwks(&[(Signer::Rsa, "rsa-1")]);
    assert_eq!(Jwks::parse(good.as_bytes()).unwrap().len(), 1);

    // Unknown key types are skipped, not fatal (a future issuer may publish more).
    let mut mixed: serde_json::Value = serde_json::from_str(&good).unwrap();
    mixed["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AAAA"}));
    let jwks = Jwks::parse(mixed.to_string().as_bytes()).unwrap();
    assert_eq!((jwks.len(), jwks.skipped().len()), (1, 1));

    let mut short_rsa = issuer().jwk(Signer::Rsa, "short");
    short_rsa["n"] = json!(URL_SAFE_NO_PAD.encode([0xc5; 128]));
    for (doc, want) in [
        (r#"{"keys":[]}"#.to_owned(), "empty"),
        (json!({"keys": [short_rsa]}).to_string(), "1024 bits"),
        (
            json!({"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]}).to_string(),
            "P-384",
        ),
        (r#"{"keys": 5}"#.to_owned(), "JSON"),
        ("[]".to_owned(), "JSON"),
    ] {
        let err = Jwks::parse(doc.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(want), "{doc}: {err}");
    }
    let mut sig_for_enc = issuer().jwk(Signer::Ec, "enc");
    sig_for_enc["use"] = json!("enc");
    assert!(Jwks::parse(json!({"keys": [sig_for_enc]}).to_string().as_bytes()).is_err());

    let many: Vec<_> = (0..=MAX_KEYS)
        .map(|i| issuer().jwk(Signer::Ec, &i.to_string()))
        .collect();
    assert!(matches!(
        Jwks::parse(json!({"keys": many}).to_string().as_bytes()),
        Err(JwksError::TooManyKeys(65))
    ));
    let huge = format!("{{\"keys\":[],\"x\":\"{}\"}}", "a".repeat(MAX_JWKS_LEN));
    assert!(matches!(
        Jwks::parse(huge.as_bytes()),
        Err(JwksError::TooLarge(_))
    ));
}

fn write(path: &Path, text: &str) {
    // As the kubelet updates a mounted ConfigMap: a new file renamed over the old one.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_rotated_jwks_file_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write(&path, &issuer().jwks(&[(Signer::Rsa, "old")]));
    let file = JwksFile::load(&path).unwrap();
    let auth = JwksAuthenticator::new(file.clone(), expected());
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let c = claims("default", "sleep", "istio-ca", secs, secs + 3600);
    let old = issuer().token(Signer::Rsa, "old", &c);
    let new = issuer().token(Signer::RsaNext, "new", &c);
    assert!(auth.authenticate(&old, now).await.is_ok());
    let err = auth.authenticate(&new, now).await.unwrap_err();
    assert!(
        matches!(&err, JwtError::UnknownKeyId(k) if k == "new"),
        "{err}"
    );

    // The issuer rotates: both keys published for a while, then the old one dropped.
    write(
        &path,
        &issuer().jwks(&[(Signer::Rsa, "old"), (Signer::RsaNext, "new")]),
    );
    assert!(file.reload().await, "the poll sees the change");
    assert!(!file.reload().await, "and nothing more");
    assert_eq!(
        auth.authenticate(&new, now).await.unwrap(),
        ("default".into(), "sleep".into())
    );
    write(&path, &issuer().jwks(&[(Signer::RsaNext, "new")]));
    // No poll in between: the unknown... known-then-dropped key is refused once the file is read.
    assert!(file.reload().await);
    assert!(matches!(
        auth.authenticate(&old, now).await,
        Err(JwtError::UnknownKeyId(_))
    ));

    // A bad write keeps the keys in force.
    write(&path, "{\"keys\": [");
    assert!(!file.reload().await);
    std::fs::remove_file(&path).unwrap();
    assert!(!file.reload().await);
    assert!(auth.authenticate(&new, now).await.is_ok());
}

#[tokio::test]
async fn an_unknown_key_id_reads_the_file_before_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write(&path, &issuer().jwks(&[(Signer::Rsa, "old")]));
    let auth = JwksAuthenticator::new(JwksFile::load(&path).unwrap(), expected());
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let t = issuer().token(
        Signer::Ec,
        "ec-new",
        &claims("default", "sleep", "istio-ca", secs, secs + 3600),
    );
    write(
        &path,
        &issuer().jwks(&[(Signer::Rsa, "old"), (Signer::Ec, "ec-new")]),
    );
    assert!(auth.authenticate(&t, now).await.is_ok(), "no poll ran");

    // Forced reads are rate limited: a second unknown id within the gap does not read the file.
    write(
        &path,
        &issuer().jwks(&[(Signer::Ec, "ec-new"), (Signer::RsaNext, "next")]),
    );
    let next = issuer().token(
        Signer::RsaNext,
        "next",
        &claims("default", "sleep", "istio-ca", secs, secs + 3600),
    );
    assert!(matches!(
        auth.authenticate(&next, now).await,
        Err(JwtError::UnknownKeyId(_))
    ));
    tokio::time::sleep(FORCED_RELOAD_MIN_GAP).await;
    assert!(auth.authenticate(&next, now).await.is_ok());
}

#[tokio::test]
async fn the_watch_task_polls_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write(&path, &issuer().jwks(&[(Signer::Rsa, "a")]));
    let file = JwksFile::load(&path).unwrap();
    let task = tokio::spawn(file.clone().watch(Duration::from_millis(20)));
    write(
        &path,
        &issuer().jwks(&[(Signer::Rsa, "a"), (Signer::Ec, "b")]),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while file.keys().len() != 2 {
        assert!(Instant::now() < deadline, "the watch never reloaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    assert!(JwksFile::load(&dir.path().join("missing")).is_err());
}
