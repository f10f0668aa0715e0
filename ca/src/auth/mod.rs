//! Who is calling? The CA's authenticators turn the bearer token of a `CreateCertificate` call into
//! the SPIFFE ID the certificate may name, or a typed refusal. Whatever the mode, the identity comes
//! from the token, never from the CSR: `Authority::sign_csr` then refuses a CSR naming anyone else.
//!
//! Modes (`ca serve --auth`):
//! - [`weft`]: tokens signed by the CA's own token key (`ca token`), checked in process.
//! - [`token_review`]: Kubernetes projected service-account tokens, checked by the API server with a
//!   TokenReview (the API server also checks that the pod the token is bound to still exists).
//! - [`jwks`]: the same tokens checked offline against the cluster's service-account issuer keys
//!   (no API call per CSR; a deleted bound pod cannot be seen, expiry bounds the window).

use std::time::SystemTime;

use crate::spiffe::{SpiffeId, SpiffeIdError};
use crate::token::TokenError;

pub mod jwks;
pub mod token_review;
pub mod weft;

/// Kubernetes' username prefix of service accounts (`system:serviceaccount:<ns>:<name>`).
pub const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Splits `system:serviceaccount:<ns>:<name>` into namespace and name; anything else is `None`.
pub fn parse_service_account(username: &str) -> Option<(&str, &str)> {
    username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
}

/// Why a caller was not authenticated. [`AuthError::is_unavailable`] separates "try again later"
/// (the CA could not decide) from "this token is refused" (the caller must get another token).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A weft bootstrap token was refused.
    #[error(transparent)]
    Weft(#[from] TokenError),
    /// A service-account token was refused by the offline (JWKS) check.
    #[error(transparent)]
    Jwt(#[from] jwks::JwtError),
    /// The TokenReview refused the token, or could not be made.
    #[error(transparent)]
    Review(#[from] token_review::ReviewError),
    /// The token is valid but its service account is not a SPIFFE identity this CA can issue.
    #[error("token identity {namespace}/{service_account} cannot become a SPIFFE ID: {reason}")]
    Identity {
        /// Namespace from the token.
        namespace: String,
        /// Service account from the token.
        service_account: String,
        /// Why it is not a valid ID.
        reason: SpiffeIdError,
    },
}

impl AuthError {
    /// The CA could not reach a decision (API server down, timed out, overloaded): the caller should
    /// retry, and the gRPC status is UNAVAILABLE rather than a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Review(e) if e.is_unavailable())
    }

    /// The CA itself is misconfigured (e.g. lacks RBAC to create TokenReviews): not the caller's
    /// fault, nothing it can change.
    pub fn is_ca_misconfigured(&self) -> bool {
        matches!(
            self,
            Self::Review(token_review::ReviewError::Refused { .. })
        )
    }
}

/// The CA's authenticator, chosen by `ca serve --auth`. An enum rather than a trait object: three
/// closed cases, and the async check needs no boxing.
#[derive(Debug)]
pub enum Authenticator {
    /// Tokens signed by the CA's token key.
    Weft(weft::WeftTokens),
    /// TokenReview against the Kubernetes API server.
    Kubernetes(token_review::TokenReviewer),
    /// Offline check against the service-account issuer's JWKS.
    Jwks(jwks::JwksAuthenticator),
}

impl Authenticator {
    /// The identity `token` proves in `trust_domain`, as of `now`.
    pub async fn authenticate(
        &self,
        token: &str,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<SpiffeId, AuthError> {
        let (namespace, service_account) = match self {
            Self::Weft(w) => w.authenticate(token, now)?,
            Self::Kubernetes(r) => r.review(token).await?,
            Self::Jwks(j) => j.authenticate(token, now).await?,
        };
        SpiffeId::new(trust_domain, &namespace, &service_account).map_err(|reason| {
            AuthError::Identity {
                namespace,
                service_account,
                reason,
            }
        })
    }

    /// The mode's name, for logs.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Weft(_) => "weft",
            Self::Kubernetes(_) => "kubernetes",
            Self::Jwks(_) => "jwks",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, UNIX_EPOCH};

    use super::jwks::testkeys::{ISSUER, Signer, claims, issuer};
    use super::*;

    #[tokio::test]
    async fn a_valid_token_for_an_identity_the_ca_cannot_issue_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, issuer().jwks(&[(Signer::Ec, "k")])).unwrap();
        let auth = Authenticator::Jwks(jwks::JwksAuthenticator::new(
            jwks::JwksFile::load(&path).unwrap(),
            jwks::Expected {
                issuer: ISSUER.into(),
                audience: "istio-ca".into(),
            },
        ));
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ok = issuer().token(
            Signer::Ec,
            "k",
            &claims("default", "sleep", "istio-ca", 1_800_000_000, 1_800_000_600),
        );
        let id = auth.authenticate(&ok, "cluster.local", at).await.unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/sleep");
        // Consistent claims, but a namespace with a slash would make another path in the URI.
        let odd = issuer().token(
            Signer::Ec,
            "k",
            &claims("a/b", "sleep", "istio-ca", 1_800_000_000, 1_800_000_600),
        );
        let err = auth
            .authenticate(&odd, "cluster.local", at)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::Identity { .. }), "{err}");
        assert!(!err.is_unavailable());
    }

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:default:sleep"),
            Some(("default", "sleep"))
        );
        for bad in [
            "system:serviceaccount:default",
            "system:serviceaccount::sleep",
            "system:serviceaccount:default:",
            "system:serviceaccount:a:b:c",
            "system:node:worker-1",
            "alice",
        ] {
            assert_eq!(parse_service_account(bad), None, "{bad}");
        }
    }
}
