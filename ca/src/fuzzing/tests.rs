//! The committed `ca_csr` and `ca_token` corpora, replayed through the fuzz targets' own functions;
//! and the generator of their seeds (real CSRs and tokens, made by this crate's code).

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

use super::*;
use crate::csr;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

#[test]
fn ca_csr_corpus() {
    replay_corpus("ca_csr", 4, csr);
}

#[test]
fn ca_token_corpus() {
    replay_corpus("ca_token", 4, token);
}

#[test]
fn ca_jwt_corpus() {
    replay_corpus("ca_jwt", 6, jwt);
}

#[test]
fn the_jwt_seeds_reach_past_the_signature_checks() {
    use crate::auth::jwks::testkeys::{ISSUER, Signer, issuer};
    let keys = crate::auth::jwks::Jwks::parse(
        issuer()
            .jwks(&[(Signer::Rsa, JWT_RSA_KID), (Signer::Ec, JWT_EC_KID)])
            .as_bytes(),
    )
    .unwrap();
    let expected = crate::auth::jwks::Expected {
        issuer: ISSUER.into(),
        audience: "istio-ca".into(),
    };
    for seed in ["rs256-valid", "es256-valid"] {
        let data = std::fs::read_to_string(corpus("ca_jwt").join(seed)).unwrap();
        let v = crate::auth::jwks::verify(&keys, &data[1..], &expected, now()).unwrap();
        assert_eq!(v.service_account, "sleep", "{seed}");
    }
}

#[test]
fn the_seeds_reach_past_the_signature_checks() {
    // A seed that no longer verifies would leave the fuzzer outside the interesting checks.
    let (_, verifier) = keys().unwrap();
    let valid = std::fs::read_to_string(corpus("ca_token").join("valid")).unwrap();
    let identity = verifier.verify(&valid[1..], now()).unwrap();
    assert_eq!(identity.service_account, "sleep");
    let pem = std::fs::read_to_string(corpus("ca_csr").join("p256-pem")).unwrap();
    let id = SpiffeId::parse(IDENTITY).unwrap();
    crate::authority::fuzzing::parse_csr(&pem[1..], &id).unwrap();
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn with_form(form: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![form];
    out.extend_from_slice(body);
    out
}

/// Writes `fuzz/corpus/ca_csr/` and `fuzz/corpus/ca_token/`. Run by hand:
/// `cargo test -p weft-ca write_ca_seeds -- --ignored`.
#[test]
#[ignore = "writes the corpus"]
fn write_ca_seeds() {
    let id = SpiffeId::parse(IDENTITY).unwrap();
    let mut csrs = Vec::new();
    let real = csr::generate(&id).unwrap().csr_pem;
    csrs.push(("p256-pem", with_form(1, real.as_bytes())));
    csrs.push(("p256-der", with_form(0, &der_of(&real))));
    let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/httpbin").unwrap();
    let other = csr::generate(&other).unwrap().csr_pem;
    csrs.push(("other-identity-der", with_form(0, &der_of(&other))));
    // P-384 with a DNS SAN beside the URI; Ed25519 (a key type the CA refuses).
    for (name, alg) in [
        ("p384-dns-der", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519-der", &rcgen::PKCS_ED25519),
    ] {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![
            SanType::URI(IDENTITY.try_into().unwrap()),
            SanType::DnsName("sleep.default.svc".try_into().unwrap()),
        ];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        csrs.push((name, with_form(0, &der_of(&pem))));
    }
    let (signer, _) = keys().unwrap();
    let now = now();
    let mut tokens = Vec::new();
    let valid = signer
        .issue("default", "sleep", Duration::from_secs(3600), now)
        .unwrap();
    tokens.push(("valid", with_form(0, valid.as_bytes())));
    let expired = signer
        .issue(
            "default",
            "sleep",
            Duration::from_secs(60),
            now - Duration::from_secs(7200),
        )
        .unwrap();
    tokens.push(("expired", with_form(0, expired.as_bytes())));
    let claims = |aud: &str, sub: &str| {
        format!(
            r#"{{"iss":"weft-ca","sub":"{sub}","aud":{aud},"iat":{NOW_SECS},"nbf":{NOW_SECS},"exp":{}}}"#,
            NOW_SECS + 3600
        )
    };
    let one_aud = claims(r#""istio-ca""#, "system:serviceaccount:ns:sa");
    tokens.push(("claims-one-aud", with_form(1, one_aud.as_bytes())));
    let wrong = claims(r#"["a","b"]"#, "system:serviceaccount:ns:sa:extra");
    tokens.push(("claims-wrong", with_form(1, wrong.as_bytes())));
    let mut none_alg = br#"{"alg":"none"}"#.to_vec();
    none_alg.push(0xff);
    none_alg.extend_from_slice(one_aud.as_bytes());
    tokens.push(("header-alg-none", with_form(1, &none_alg)));
    for (dir, seeds) in [("ca_csr", csrs), ("ca_token", tokens)] {
        std::fs::create_dir_all(corpus(dir)).unwrap();
        for (name, data) in seeds {
            std::fs::write(corpus(dir).join(name), data).unwrap();
        }
    }
}

/// Writes `fuzz/corpus/ca_jwt/`. Run by hand: `cargo test -p weft-ca write_jwt_seeds -- --ignored`.
#[test]
#[ignore = "writes the corpus"]
fn write_jwt_seeds() {
    use crate::auth::jwks::testkeys::{Signer, claims, issuer};
    let i = issuer();
    let valid = claims(
        "default",
        "sleep",
        "istio-ca",
        NOW_SECS - 10,
        NOW_SECS + 3600,
    );
    let expired = claims(
        "default",
        "sleep",
        "istio-ca",
        NOW_SECS - 7200,
        NOW_SECS - 3600,
    );
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "jwks-both",
            with_form(0, i.jwks(&[(Signer::Rsa, JWT_RSA_KID), (Signer::Ec, JWT_EC_KID)]).as_bytes()),
        ),
        (
            "jwks-mixed",
            with_form(
                0,
                br#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"},{"kty":"EC","crv":"P-256","x":"","y":""},{"kty":"RSA","n":"AQAB","e":"AQAB","use":"enc"}]}"#,
            ),
        ),
        (
            "rs256-valid",
            with_form(1, i.token(Signer::Rsa, JWT_RSA_KID, &valid).as_bytes()),
        ),
        (
            "es256-valid",
            with_form(1, i.token(Signer::Ec, JWT_EC_KID, &valid).as_bytes()),
        ),
        (
            "es256-expired",
            with_form(1, i.token(Signer::Ec, JWT_EC_KID, &expired).as_bytes()),
        ),
        ("claims-valid", with_form(2, valid.to_string().as_bytes())),
    ];
    let mut none = br#"{"alg":"none"}"#.to_vec();
    none.push(0xff);
    none.extend_from_slice(valid.to_string().as_bytes());
    seeds.push(("header-alg-none", with_form(2, &none)));
    let mut other_ns = valid.clone();
    other_ns["kubernetes.io"]["namespace"] = serde_json::json!("kube-system");
    seeds.push((
        "claims-namespace-mismatch",
        with_form(2, other_ns.to_string().as_bytes()),
    ));
    std::fs::create_dir_all(corpus("ca_jwt")).unwrap();
    for (name, data) in seeds {
        std::fs::write(corpus("ca_jwt").join(name), data).unwrap();
    }
}
