//! Bootstrap tokens: how a workload proves who it is to the CA before it has a certificate.
//!
//! A token is a compact JWS (ES256 JWT) signed by the CA's signing key, shaped like a Kubernetes
//! projected service-account token: `sub` = `system:serviceaccount:<ns>:<sa>`, `aud` = the CA's
//! audience (`istio-ca`, Istio's `TOKEN_AUDIENCES` default, so the same audience works for a projected
//! Kubernetes token later), `iat`/`nbf`/`exp` in seconds. Only the signature, audience, validity window
//! and subject are trusted; the certificate identity is derived from `sub`, never from the CSR.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The audience tokens are issued for and checked against (Istio's default CA audience).
pub const AUDIENCE: &str = "istio-ca";
/// Issuer name written into tokens.
pub const ISSUER: &str = "weft-ca";
/// Tokens longer than this are refused before any parsing (a Kubernetes SA token is ~1 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Clock skew tolerated on `nbf`/`iat`/`exp`.
pub const LEEWAY: Duration = Duration::from_secs(60);
use crate::auth::SERVICE_ACCOUNT_PREFIX as SA_PREFIX;

/// Why a token was refused. Messages are for the CA's log; callers see an opaque Unauthenticated.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Bigger than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; at most 8192 are accepted")]
    TooLarge(usize),
    /// Not three base64url parts, or bad JSON.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than ES256.
    #[error("token algorithm {0:?} is not accepted; only ES256")]
    Algorithm(String),
    /// Signature does not verify against the CA's key.
    #[error("token signature does not verify against the CA key")]
    Signature,
    /// `aud` does not contain the CA's audience.
    #[error("token audience {got:?} does not include {AUDIENCE:?}")]
    Audience {
        /// The audiences the token carries.
        got: Vec<String>,
    },
    /// Past `exp`.
    #[error("token expired {0} s ago")]
    Expired(u64),
    /// Before `nbf`.
    #[error("token is not valid for another {0} s")]
    NotYetValid(u64),
    /// `sub` is not `system:serviceaccount:<ns>:<sa>`.
    #[error("token subject {0:?} is not system:serviceaccount:<namespace>:<name>")]
    Subject(String),
    /// A token was requested for an identity that is not a valid SPIFFE workload ID.
    #[error(
        "cannot issue a token for namespace {namespace:?}, service account {service_account:?}: {reason}"
    )]
    InvalidIdentity {
        /// Requested namespace.
        namespace: String,
        /// Requested service account.
        service_account: String,
        /// Why the identity is invalid.
        reason: crate::spiffe::SpiffeIdError,
    },
    /// The key could not be used for signing.
    #[error("signing key is not an ECDSA P-256 PKCS#8 key: {0}")]
    Key(String),
    /// Signing failed (the system RNG failed).
    #[error("signing the token failed")]
    Sign,
}

/// The identity a valid token vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    iat: u64,
    nbf: u64,
    exp: u64,
}

/// JWT `aud` is a string or an array of strings.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Signs tokens with the CA's ECDSA P-256 key.
#[derive(Debug)]
pub struct TokenSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl TokenSigner {
    /// Loads the signer from the CA key in PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| TokenError::Key(e.to_string()))?;
        Ok(Self { key, rng })
    }

    /// The verifier matching this signer.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            public_key: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Issues a token for `namespace`/`service_account`, valid from `now` for `ttl`.
    pub fn issue(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let iat = epoch_secs(now);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: format!("{SA_PREFIX}{namespace}:{service_account}"),
            aud: Audience::Many(vec![AUDIENCE.into()]),
            iat,
            nbf: iat,
            exp: iat.saturating_add(ttl.as_secs()),
        };
        self.sign_claims(&claims)
    }

    fn sign_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
        };
        let mut token = encode_json(&header)?;
        token.push('.');
        token.push_str(&encode_json(claims)?);
        let sig = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| TokenError::Sign)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }
}

/// Verifies tokens against the CA's public key.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    public_key: Vec<u8>,
}

impl TokenVerifier {
    /// Checks size, form, algorithm, signature, audience, validity window and subject, in that order.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<TokenIdentity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header: Header = decode_json(h, "header")?;
        if header.alg != "ES256" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed_len = h.len() + 1 + c.len();
        let key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public_key);
        key.verify(&token.as_bytes()[..signed_len], &sig)
            .map_err(|_| TokenError::Signature)?;

        let claims: Claims = decode_json(c, "claims")?;
        let auds = match claims.aud {
            Audience::One(a) => vec![a],
            Audience::Many(a) => a,
        };
        if !auds.iter().any(|a| a == AUDIENCE) {
            return Err(TokenError::Audience { got: auds });
        }
        let now = epoch_secs(now);
        let leeway = LEEWAY.as_secs();
        if now > claims.exp.saturating_add(leeway) {
            return Err(TokenError::Expired(now - claims.exp));
        }
        if claims.nbf > now.saturating_add(leeway) {
            return Err(TokenError::NotYetValid(claims.nbf - now));
        }
        let (namespace, service_account) = crate::auth::parse_service_account(&claims.sub)
            .ok_or_else(|| TokenError::Subject(claims.sub.clone()))?;
        Ok(TokenIdentity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            expires_at: claims.exp,
        })
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn encode_json<T: Serialize>(v: &T) -> Result<String, TokenError> {
    let json = serde_json::to_vec(v).map_err(|_| TokenError::Malformed("unserializable claims"))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

fn decode_json<T: for<'de> Deserialize<'de>>(
    part: &str,
    what: &'static str,
) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        TokenError::Malformed(if what == "header" {
            "header is not base64url"
        } else {
            "claims are not base64url"
        })
    })?;
    // JSON is UTF-8 (RFC 8259): serde_json skips an unknown field's string without checking it, so
    // the whole text is checked first.
    let text = std::str::from_utf8(&bytes).map_err(|_| TokenError::Malformed("not UTF-8 JSON"))?;
    serde_json::from_str(text).map_err(|_| {
        TokenError::Malformed(if what == "header" {
            "header is not the expected JSON"
        } else {
            "claims are not the expected JSON"
        })
    })
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

    fn signer() -> TokenSigner {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        TokenSigner::from_pkcs8(&key.serialize_der()).unwrap()
    }

    #[test]
    fn claims_that_are_not_utf8_are_refused() {
        // Found by the ca_token fuzz target: invalid UTF-8 inside an unknown field's string was
        // skipped by serde_json, and a token whose claims are not JSON verified.
        let s = signer();
        let mut claims = br#"{"iss":"weft-ca","sub":"system:serviceaccount:ns:sa","x":""#.to_vec();
        claims.extend_from_slice(&[0xa1, 0xa1]);
        claims.extend_from_slice(br#"","aud":"istio-ca","iat":10,"nbf":10,"exp":100}"#);
        let token = fuzzing::sign_raw(&s, br#"{"alg":"ES256"}"#, &claims).unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(50);
        assert!(matches!(
            s.verifier().verify(&token, at),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn issued_token_verifies_to_its_identity() {
        let s = signer();
        let now = SystemTime::now();
        let t = s
            .issue("default", "sleep", Duration::from_secs(3600), now)
            .unwrap();
        let id = s.verifier().verify(&t, now).unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "sleep");
    }

    #[test]
    fn refuses_forged_expired_and_garbage_tokens() {
        let s = signer();
        let other = signer();
        let now = SystemTime::now();
        let t = s.issue("ns", "sa", Duration::from_secs(60), now).unwrap();
        let v = s.verifier();

        let forged = other
            .issue("ns", "sa", Duration::from_secs(60), now)
            .unwrap();
        assert!(matches!(v.verify(&forged, now), Err(TokenError::Signature)));

        let later = now + Duration::from_secs(60 + 61);
        assert!(matches!(v.verify(&t, later), Err(TokenError::Expired(_))));
        let earlier = now - Duration::from_secs(61 + 1);
        assert!(matches!(
            v.verify(&t, earlier),
            Err(TokenError::NotYetValid(_))
        ));

        // Swap the claims for others that name a different account: the signature no longer holds.
        let parts: Vec<&str> = t.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(
            br#"{"iss":"weft-ca","sub":"system:serviceaccount:ns:admin","aud":"istio-ca","iat":0,"nbf":0,"exp":99999999999}"#,
        );
        let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
        assert!(matches!(
            v.verify(&tampered, now),
            Err(TokenError::Signature)
        ));

        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(matches!(
            v.verify(&none_alg, now),
            Err(TokenError::Algorithm(a)) if a == "none"
        ));
        for garbage in ["", "a", "a.b", "a.b.c.d", "!!.??.**"] {
            assert!(
                matches!(v.verify(garbage, now), Err(TokenError::Malformed(_))),
                "{garbage:?}"
            );
        }
        let wrong_aud = s
            .sign_claims(&Claims {
                iss: ISSUER.into(),
                sub: "system:serviceaccount:ns:sa".into(),
                aud: Audience::One("kube-apiserver".into()),
                iat: epoch_secs(now),
                nbf: epoch_secs(now),
                exp: epoch_secs(now) + 60,
            })
            .unwrap();
        assert!(matches!(
            v.verify(&wrong_aud, now),
            Err(TokenError::Audience { got }) if got == ["kube-apiserver"]
        ));
        let bad_sub = s
            .sign_claims(&Claims {
                iss: ISSUER.into(),
                sub: "admin".into(),
                aud: Audience::One(AUDIENCE.into()),
                iat: epoch_secs(now),
                nbf: epoch_secs(now),
                exp: epoch_secs(now) + 60,
            })
            .unwrap();
        assert!(matches!(
            v.verify(&bad_sub, now),
            Err(TokenError::Subject(_))
        ));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(v.verify(&huge, now), Err(TokenError::TooLarge(_))));
    }
}
