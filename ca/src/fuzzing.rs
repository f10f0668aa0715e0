//! Thin wrappers over the CA's parsers of bytes from outside (CSRs, bootstrap tokens and Kubernetes
//! service-account tokens, all sent by workloads before they are trusted; the issuer's JWKS file), for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`)
//! and for [`tests`], which replays the committed corpora through the same functions.

// A broken invariant panics on purpose here: a panic is what libFuzzer reports.
#![allow(clippy::expect_used)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::*;

use crate::spiffe::SpiffeId;
use crate::token::{self, MAX_TOKEN_LEN, TokenError, TokenSigner, TokenVerifier};

/// A throwaway P-256 key, used only here: the committed token seeds are signed with it, so that
/// the fuzzer starts past the signature check.
const FUZZ_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjGsL9PZcSj6l7YqA
zZA6YpCvYzUGyOKqTkKMlCNBLxChRANCAATG8ElMfqqWYO6k0aHxZdShR4omVEAU
qV768PGLsZnYvDQAIQH3hZbA2k+zBDC428vikMFZoWPVZcXsw/NtfL81
-----END PRIVATE KEY-----
";

/// The clock tokens are checked at (fixed, so that a seed stays valid).
pub const NOW_SECS: u64 = 1_800_000_000;

/// The identity CSRs are checked against (the caller's, from its token).
pub const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// The signer of [`FUZZ_KEY_PEM`] and its verifier.
pub fn keys() -> Option<&'static (TokenSigner, TokenVerifier)> {
    static KEYS: OnceLock<Option<(TokenSigner, TokenVerifier)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let PrivateKeyDer::Pkcs8(der) =
            PrivateKeyDer::from_pem_slice(FUZZ_KEY_PEM.as_bytes()).ok()?
        else {
            return None;
        };
        let signer = TokenSigner::from_pkcs8(der.secret_pkcs8_der()).ok()?;
        let verifier = signer.verifier();
        Some((signer, verifier))
    })
    .as_ref()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// Token verification. The first byte picks the form: even, the rest is a token as a workload sends
/// it; odd, the rest is header and claims (split at the first 0xff byte, else the claims under an
/// ES256 header), signed here with the fuzzing key so that every check after the signature is
/// reached. An accepted token must say what the verifier claims it said.
pub fn token(data: &[u8]) {
    let (Some((&form, rest)), Some((signer, verifier))) = (data.split_first(), keys()) else {
        return;
    };
    let text = if form & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&br#"{"alg":"ES256","typ":"JWT"}"#[..], rest),
        };
        let Some(text) = token::fuzzing::sign_raw(signer, header, claims) else {
            return;
        };
        text
    };
    let verified = verifier.verify(&text, now());
    assert_eq!(
        matches!(verified, Err(TokenError::TooLarge(_))),
        text.len() > MAX_TOKEN_LEN
    );
    let Ok(identity) = verified else {
        return;
    };
    let claims = reread_claims(&text);
    assert_eq!(
        claims["sub"].as_str(),
        Some(
            format!(
                "system:serviceaccount:{}:{}",
                identity.namespace, identity.service_account
            )
            .as_str()
        )
    );
    assert!(!identity.namespace.is_empty() && !identity.service_account.is_empty());
    assert_for_the_ca(&claims["aud"]);
    let leeway = token::LEEWAY.as_secs();
    assert_eq!(claims["exp"].as_u64(), Some(identity.expires_at));
    assert!(
        NOW_SECS <= identity.expires_at.saturating_add(leeway),
        "expired"
    );
    let nbf = claims["nbf"].as_u64().expect("nbf"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
    assert!(nbf <= NOW_SECS + leeway, "not yet valid");
    // The CA derives the certificate identity from these: never a panic.
    let _ = SpiffeId::new(
        "cluster.local",
        &identity.namespace,
        &identity.service_account,
    );
}

/// CSR parsing and vetting. The first byte picks the form: even, the rest is DER, sent as PEM;
/// odd, the rest is PEM text as given. An accepted CSR asks for no identity but the caller's and
/// certifies a key of an accepted type.
pub fn csr(data: &[u8]) {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let Ok(identity) = SpiffeId::parse(IDENTITY) else {
        return;
    };
    let pem = if form & 1 == 0 {
        let body = STANDARD.encode(rest);
        let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE REQUEST-----\n");
        pem
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    };
    let Ok((key, alg)) = crate::authority::fuzzing::parse_csr(&pem, &identity) else {
        return;
    };
    assert!(!key.is_empty(), "an empty key certified");
    assert!(
        ["ECDSA_P256_SHA256", "ECDSA_P384_SHA384", "RSA_SHA256"]
            .iter()
            .any(|a| alg.contains(a)),
        "key algorithm {alg}"
    );
    // Read the request again, independently: every URI SAN is the caller's.
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .expect("accepted PEM"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
    let (_, request) = X509CertificationRequest::from_der(der.as_ref()).expect("accepted DER"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
    for ext in request.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    assert_eq!(*uri, IDENTITY, "a CSR for another identity accepted");
                }
            }
        }
    }
}

/// Service-account tokens and the JWKS (`--auth jwks`). The first byte picks the form, modulo 3:
/// 0, the rest is a JWKS document; 1, the rest is a token as a workload sends it, checked against
/// the fake issuer's keys (`auth::jwks::testkeys`); 2, the rest is header and claims (split at the
/// first 0xff byte, else the claims under an ES256 header with the EC key's id), signed here with
/// the fake issuer's P-256 key so that every check after the signature is reached. An accepted
/// token must say what the verifier claims it said.
pub fn jwt(data: &[u8]) {
    use crate::auth::jwks::testkeys::{self, Signer};
    use crate::auth::jwks::{self, Expected, Jwks};

    static JWKS: OnceLock<Option<Jwks>> = OnceLock::new();
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    if form % 3 == 0 {
        if let Ok(parsed) = Jwks::parse(rest) {
            assert!(rest.len() <= jwks::MAX_JWKS_LEN);
            assert!(!parsed.is_empty() && parsed.len() <= jwks::MAX_KEYS);
        }
        return;
    }
    let issuer = testkeys::issuer();
    let Some(keys) = JWKS
        .get_or_init(|| {
            Jwks::parse(
                issuer
                    .jwks(&[(Signer::Rsa, JWT_RSA_KID), (Signer::Ec, JWT_EC_KID)])
                    .as_bytes(),
            )
            .ok()
        })
        .as_ref()
    else {
        return;
    };
    let text = if form % 3 == 1 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        let default_header = format!(r#"{{"alg":"ES256","kid":"{JWT_EC_KID}"}}"#);
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (default_header.as_bytes(), rest),
        };
        issuer.sign_raw(Signer::Ec, header, claims)
    };
    let expected = Expected {
        issuer: testkeys::ISSUER.into(),
        audience: token::AUDIENCE.into(),
    };
    let verified = jwks::verify(keys, &text, &expected, now());
    assert_eq!(
        matches!(verified, Err(jwks::JwtError::TooLarge(_))),
        text.len() > MAX_TOKEN_LEN
    );
    let Ok(v) = verified else {
        return;
    };
    let claims = reread_claims(&text);
    assert_eq!(claims["iss"].as_str(), Some(testkeys::ISSUER));
    assert_eq!(
        claims["sub"].as_str(),
        Some(
            format!(
                "system:serviceaccount:{}:{}",
                v.namespace, v.service_account
            )
            .as_str()
        )
    );
    assert_eq!(
        claims["kubernetes.io"]["namespace"].as_str(),
        Some(v.namespace.as_str())
    );
    assert_eq!(
        claims["kubernetes.io"]["serviceaccount"]["name"].as_str(),
        Some(v.service_account.as_str())
    );
    assert_for_the_ca(&claims["aud"]);
    assert_eq!(claims["exp"].as_u64(), Some(v.expires_at));
    assert!(
        NOW_SECS <= v.expires_at.saturating_add(token::LEEWAY.as_secs()),
        "expired"
    );
    let _ = SpiffeId::new("cluster.local", &v.namespace, &v.service_account);
}

/// The claims of an accepted compact JWS, read again independently of the verifiers' types.
fn reread_claims(token: &str) -> serde_json::Value {
    token
        .split('.')
        .nth(1)
        .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
        .expect("accepted claims are JSON") // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
}

/// An accepted token's `aud` (a string or an array) names the CA's audience.
fn assert_for_the_ca(aud: &serde_json::Value) {
    let audiences: Vec<&str> = match aud {
        serde_json::Value::String(a) => vec![a.as_str()],
        serde_json::Value::Array(all) => all.iter().filter_map(|a| a.as_str()).collect(),
        other => panic!("accepted aud {other}"),
    };
    assert!(audiences.contains(&token::AUDIENCE));
}

/// The key ids of the fake issuer's keys in the [`jwt`] target's JWKS.
pub const JWT_RSA_KID: &str = "rsa-fuzz";
/// See [`JWT_RSA_KID`].
pub const JWT_EC_KID: &str = "ec-fuzz";

/// Runs `target` over every file of the repository's `fuzz/corpus/<name>/`, which must hold at
/// least `min` files, and fails naming the first file it panics on. The crates' corpus tests use it
/// (the sidecar's through a dev-dependency with this feature).
pub fn replay_corpus(name: &str, min: usize, target: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| Some(entry.ok()?.path()))
        .collect();
    files.sort();
    assert!(
        files.len() >= min,
        "{}: {} seeds",
        dir.display(),
        files.len()
    );
    for file in files {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let run = std::panic::catch_unwind(|| target(&data));
        assert!(run.is_ok(), "{name}: {} fails", file.display());
    }
}

#[cfg(test)]
mod tests;
