//! `--auth weft` (the default): bootstrap tokens signed by the CA's own token key (`ca token`).

use std::time::SystemTime;

use crate::token::{TokenError, TokenIdentity, TokenVerifier};

/// Checks weft bootstrap tokens against the CA's token key.
#[derive(Debug, Clone)]
pub struct WeftTokens {
    verifier: TokenVerifier,
}

impl WeftTokens {
    /// Checks tokens with `verifier` (the authority's, see `Authority::token_verifier`).
    pub fn new(verifier: TokenVerifier) -> Self {
        Self { verifier }
    }

    /// The namespace and service account `token` vouches for.
    pub fn authenticate(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<(String, String), TokenError> {
        let TokenIdentity {
            namespace,
            service_account,
            ..
        } = self.verifier.verify(token, now)?;
        Ok((namespace, service_account))
    }
}
