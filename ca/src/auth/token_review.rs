//! `--auth kubernetes`: projected service-account tokens checked by the API server, with a
//! TokenReview (`authentication.k8s.io/v1`), as istiod does.
//!
//! The review asks for the CA's audience (`spec.audiences`), and the answer must list it in
//! `status.audiences`; the identity is `status.user.username`, which must be
//! `system:serviceaccount:NS:SA` (a node's or a person's token is refused).
//!
//! A token bound to a pod that no longer exists is refused by the API server itself: for bound
//! tokens the TokenReview looks the bound object up and answers `authenticated: false` with an
//! error such as `pod "x" not found`, which the caller gets verbatim. That check lives there, not
//! here, and is why this mode costs an API call per CSR.
//!
//! Availability: an unreachable API server, a 5xx or 429, or no answer within the timeout is
//! [`ReviewError::is_unavailable`] (gRPC UNAVAILABLE: the caller retries), never a refusal.
//!
//! No cache of positive reviews: Istio keeps none by default, a workload asks for a certificate
//! about twice a day, and a cache would let a token outlive its pod's deletion by the cache's
//! lifetime.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use crate::token::MAX_TOKEN_LEN;

/// How long a TokenReview may take before the caller is told to retry.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a TokenReview did not authenticate the caller.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Bigger than the token limit; not sent to the API server.
    #[error("token is {0} bytes; at most 8192 are accepted")]
    TooLarge(usize),
    /// The API server could not be reached or failed (5xx, 429, transport).
    #[error("cannot review the token with the Kubernetes API server (retry): {0}")]
    Unavailable(String),
    /// No answer in time.
    #[error("the Kubernetes API server did not answer the TokenReview within {0:?} (retry)")]
    Timeout(Duration),
    /// The API server refused the CA's own request (4xx): the CA's credentials or RBAC.
    #[error(
        "the Kubernetes API server refused the CA's TokenReview ({code}: {message}); the CA needs RBAC to create tokenreviews"
    )]
    Refused {
        /// HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// The API server says the token is not valid (expired, revoked, bound pod gone, ...).
    #[error("the Kubernetes API server did not authenticate the token: {0}")]
    NotAuthenticated(String),
    /// The token is valid but not for the CA's audience.
    #[error(
        "token audiences {got:?} (per the API server) do not include {want:?}; mount a projected token with audience {want:?}"
    )]
    Audience {
        /// `status.audiences`.
        got: Vec<String>,
        /// `--token-audience`.
        want: String,
    },
    /// The token belongs to something other than a service account.
    #[error("token user {0:?} is not a service account (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount(String),
    /// The Kubernetes client could not be configured (start-up only).
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
}

impl ReviewError {
    /// The API server did not decide; the caller should retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }
}

/// Reviews tokens with the API server.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    timeout: Duration,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews with `client`, for `audience`, each review bounded by `timeout`.
    pub fn new(client: kube::Client, audience: impl Into<String>, timeout: Duration) -> Self {
        Self {
            client,
            audience: audience.into(),
            timeout,
        }
    }

    /// A client from the environment: the pod's service account in a cluster, else `KUBECONFIG`.
    pub async fn from_environment(
        audience: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, ReviewError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| ReviewError::Config(e.to_string()))?;
        Self::from_config(config, audience, timeout)
    }

    /// A client for the API server `config` describes. kube's own retries of 429/503/504 are
    /// turned off: they would spend the whole timeout and hide the API server's answer, while the
    /// caller (a sidecar with its own backoff) retries on UNAVAILABLE anyway.
    pub fn from_config(
        mut config: kube::Config,
        audience: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, ReviewError> {
        config.default_retry = false;
        let client =
            kube::Client::try_from(config).map_err(|e| ReviewError::Config(e.to_string()))?;
        Ok(Self::new(client, audience, timeout))
    }

    /// The namespace and service account `token` belongs to, per the API server.
    pub async fn review(&self, token: &str) -> Result<(String, String), ReviewError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(ReviewError::TooLarge(token.len()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: Some(token.to_owned()),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| ReviewError::Timeout(self.timeout))?
                .map_err(classify)?;
        self.judge(answer.status.unwrap_or_default())
    }

    fn judge(&self, status: TokenReviewStatus) -> Result<(String, String), ReviewError> {
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the token is not valid".to_owned());
            return Err(ReviewError::NotAuthenticated(why));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(ReviewError::Audience {
                got: audiences,
                want: self.audience.clone(),
            });
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let (ns, sa) = super::parse_service_account(&username)
            .ok_or_else(|| ReviewError::NotServiceAccount(username.clone()))?;
        Ok((ns.to_owned(), sa.to_owned()))
    }
}

/// Sorts a client error into "retry" (transport, 5xx, 429) and "the CA's request is refused".
fn classify(err: kube::Error) -> ReviewError {
    match err {
        kube::Error::Api(status) if status.code >= 500 || status.code == 429 => {
            ReviewError::Unavailable(format!("{} {}", status.code, status.message))
        }
        kube::Error::Api(status) => ReviewError::Refused {
            code: status.code,
            message: status.message,
        },
        other => ReviewError::Unavailable(crate::cli::report_chain(&other)),
    }
}

#[cfg(test)]
mod tests;
