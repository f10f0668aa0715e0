//! A fake service-account issuer with fixed keys (checked in under `auth/testdata`, made once with
//! `openssl genpkey`; ring cannot generate RSA keys), for the JWKS tests and the fuzz target's
//! seeds: it prints a JWKS like `/openid/v1/jwks` and signs tokens like the API server's.

// Test support: a key that does not load is a broken checkout, and a panic says so.
#![allow(clippy::expect_used)]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

/// The issuer the fake tokens name (a cluster's default `--service-account-issuer`).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Which of the fake issuer's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// RSA 2048 (what most clusters use).
    Rsa,
    /// Another RSA 2048 key (the key after a rotation).
    RsaNext,
    /// ECDSA P-256.
    Ec,
}

/// The fake issuer's keys.
pub struct TestIssuer {
    rsa: RsaKeyPair,
    rsa_next: RsaKeyPair,
    ec: EcdsaKeyPair,
    rng: SystemRandom,
}

fn pkcs8(pem: &str) -> Vec<u8> {
    // ok: fixed test keys checked in (this module is built for tests and fuzzing only)
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("test key PEM"); // ok: see above
    match key {
        PrivateKeyDer::Pkcs8(der) => der.secret_pkcs8_der().to_vec(),
        _ => panic!("test key is not PKCS#8"),
    }
}

/// The fake issuer (loaded once).
pub fn issuer() -> &'static TestIssuer {
    static ISSUER_KEYS: OnceLock<TestIssuer> = OnceLock::new();
    ISSUER_KEYS.get_or_init(|| {
        let rng = SystemRandom::new();
        TestIssuer {
            rsa: RsaKeyPair::from_pkcs8(&pkcs8(include_str!("../testdata/rsa-2048.pem")))
                .expect("RSA test key"), // ok: fixed test keys checked in (built for tests and fuzzing only)
            rsa_next: RsaKeyPair::from_pkcs8(&pkcs8(include_str!("../testdata/rsa-2048-b.pem")))
                .expect("second RSA test key"), // ok: fixed test keys checked in (built for tests and fuzzing only)
            ec: EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &pkcs8(include_str!("../testdata/p256.pem")),
                &rng,
            )
            .expect("P-256 test key"), // ok: fixed test keys checked in (built for tests and fuzzing only)
            rng,
        }
    })
}

/// Claims as the API server writes them into a pod-bound projected token.
pub fn claims(namespace: &str, service_account: &str, audience: &str, iat: u64, exp: u64) -> Value {
    json!({
        "aud": [audience],
        "exp": exp,
        "iat": iat,
        "nbf": iat,
        "iss": ISSUER,
        "jti": "0b0f1a2c-3d4e-4f50-8a6b-7c8d9e0f1a2b",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "worker-1", "uid": "5e6f7a8b-1c2d-4e3f-9a0b-1c2d3e4f5a6b"},
            "pod": {"name": format!("{service_account}-7d9c8b6f5-x2x4z"), "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"},
            "serviceaccount": {"name": service_account, "uid": "1f2e3d4c-5b6a-4978-8a6b-5c4d3e2f1a0b"},
            "warnafter": iat + 3000
        },
        "sub": format!("system:serviceaccount:{namespace}:{service_account}")
    })
}

impl TestIssuer {
    /// The public JWK of `signer` under `kid`.
    pub fn jwk(&self, signer: Signer, kid: &str) -> Value {
        let rsa = |k: &RsaKeyPair| {
            let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(k.public());
            json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
                   "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
        };
        match signer {
            Signer::Rsa => rsa(&self.rsa),
            Signer::RsaNext => rsa(&self.rsa_next),
            Signer::Ec => {
                let point = self.ec.public_key().as_ref();
                json!({"use": "sig", "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                       "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                       "y": URL_SAFE_NO_PAD.encode(&point[33..65])})
            }
        }
    }

    /// A JWKS document of these keys.
    pub fn jwks(&self, keys: &[(Signer, &str)]) -> String {
        let keys: Vec<Value> = keys.iter().map(|&(s, kid)| self.jwk(s, kid)).collect();
        json!({ "keys": keys }).to_string()
    }

    /// A compact JWS of `header` and `claims` bytes as given, signed by `signer`.
    pub fn sign_raw(&self, signer: Signer, header: &[u8], claims: &[u8]) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let sig = match signer {
            Signer::Rsa | Signer::RsaNext => {
                let key = if signer == Signer::Rsa {
                    &self.rsa
                } else {
                    &self.rsa_next
                };
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    token.as_bytes(),
                    &mut sig,
                )
                .expect("RSA signing"); // ok: fixed test keys checked in (built for tests and fuzzing only)
                sig
            }
            Signer::Ec => self
                .ec
                .sign(&self.rng, token.as_bytes())
                .expect("ECDSA signing") // ok: a fixed test key signs (built for tests and fuzzing only)
                .as_ref()
                .to_vec(),
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        token
    }

    /// A token with the right `alg` for `signer`, key id `kid`, and `claims`.
    pub fn token(&self, signer: Signer, kid: &str, claims: &Value) -> String {
        let alg = if signer == Signer::Ec {
            "ES256"
        } else {
            "RS256"
        };
        let header = json!({"alg": alg, "kid": kid});
        self.sign_raw(
            signer,
            header.to_string().as_bytes(),
            claims.to_string().as_bytes(),
        )
    }
}
