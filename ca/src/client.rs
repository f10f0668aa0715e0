//! The CA client: obtains a workload certificate with a bootstrap token, over TLS verified against
//! the mesh root and the CA's SPIFFE ID.

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use weft_proto::ca::IstioCertificateRequest;
use weft_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::grpc::{ChannelError, tls_channel};
use crate::spiffe::SpiffeId;
use crate::tls::{self, Credentials, SvidError, TrustBundle};

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad CA address.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// TLS material unusable.
    #[error(transparent)]
    Tls(#[from] SvidError),
    /// Key or CSR generation failed.
    #[error("key/CSR generation: {0}")]
    Csr(#[from] rcgen::Error),
    /// The token cannot be sent as metadata (e.g. it has a newline).
    #[error("token is not valid as gRPC metadata")]
    TokenFormat,
    /// The CA refused or could not be reached. (Not a `#[source]`: the status is fully rendered
    /// here, and a source would print it a second time in `{:#}` chains.)
    #[error("CA request failed: {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The CA answered with a certificate for someone else.
    #[error("CA issued a certificate for {got}, expected {expected}")]
    WrongIdentity {
        /// What the certificate says.
        got: SpiffeId,
        /// What was asked for.
        expected: SpiffeId,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

/// A client of the CA service.
#[derive(Debug, Clone)]
pub struct CaClient {
    inner: IstioCertificateServiceClient<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
}

impl CaClient {
    /// A client for the CA at `addr`, which must present `ca_identity` chained to `bundle`.
    pub fn new(
        addr: &str,
        bundle: &TrustBundle,
        ca_identity: SpiffeId,
        token: &str,
    ) -> Result<Self, ClientError> {
        let config = tls::client_config(None, bundle, vec![ca_identity], &[tls::ALPN_H2])?;
        let channel = tls_channel(addr, Arc::new(config))?;
        let token = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ClientError::TokenFormat)?;
        Ok(Self {
            inner: IstioCertificateServiceClient::new(channel),
            token,
        })
    }

    /// Sends a raw request: `csr_pem` for `validity` (zero = the CA's default). Returns the chain.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, ClientError> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        req.metadata_mut()
            .insert("authorization", self.token.clone());
        let resp = self.inner.clone().create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }

    /// Generates a key, has the CA certify it for `identity`, and returns ready credentials.
    pub async fn fetch_credentials(
        &self,
        identity: &SpiffeId,
        validity: Duration,
    ) -> Result<Credentials, ClientError> {
        let kc = crate::csr::generate(identity)?;
        let chain = self.create_certificate(&kc.csr_pem, validity).await?;
        let creds = Credentials::from_pem(&chain, &kc.key_pem)?;
        if creds.identity() != identity {
            return Err(ClientError::WrongIdentity {
                got: creds.identity().clone(),
                expected: identity.clone(),
            });
        }
        Ok(creds)
    }
}

/// Gets a first certificate, retrying with capped exponential backoff (200 ms to 15 s) until the CA
/// answers; `None` if `stop` completes first. Start-up uses this: a workload starting before its CA
/// waits for it instead of failing.
pub async fn fetch_with_retry(
    client: &CaClient,
    identity: &SpiffeId,
    validity: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Credentials> {
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.fetch_credentials(identity, validity).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(%identity, error = %e, retry_in = ?backoff, "cannot get a certificate yet")
            }
        }
        tokio::select! {
            () = &mut stop => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

/// When to renew credentials that are valid for `lifetime` from now: at half of it, with ±1% jitter so
/// a fleet started together does not renew together (Istio's `SECRET_GRACE_PERIOD_RATIO` 0.5, jitter 0.01).
pub fn renew_after(lifetime: Duration, jitter_seed: u64) -> Duration {
    // jitter in [-0.01, +0.01] of the lifetime, from the seed (any well-mixed u64 will do).
    let unit = (jitter_seed % 2001) as f64 / 1000.0 - 1.0;
    lifetime.mul_f64((0.5 + 0.01 * unit).clamp(0.0, 1.0))
}

/// Keeps `store` fresh for ever: renews at about half the certificate's lifetime; if the CA cannot be
/// reached, keeps the valid certificate and retries with capped exponential backoff (500 ms to 150 s,
/// as ztunnel's identity manager). Run it as a task; it ends only when the task is dropped.
pub async fn keep_rotated(
    client: CaClient,
    identity: SpiffeId,
    validity: Duration,
    store: Arc<tls::CredentialStore>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut seed = u64::from(std::process::id());
    loop {
        let left = store
            .current()
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(renew_after(left, seed >> 11)).await;
        loop {
            match client.fetch_credentials(&identity, validity).await {
                Ok(creds) => {
                    tracing::info!(%identity, "certificate rotated");
                    store.rotate(creds);
                    backoff = Duration::from_millis(500);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%identity, error = %e, retry_in = ?backoff, "certificate renewal failed; keeping the current one");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(150));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_within_one_percent() {
        let life = Duration::from_secs(24 * 3600);
        for seed in [0, 1, 1000, 2000, u64::MAX, 12345678901] {
            let at = renew_after(life, seed).as_secs_f64() / life.as_secs_f64();
            assert!((0.49..=0.51).contains(&at), "seed {seed}: {at}");
        }
        assert_eq!(renew_after(Duration::ZERO, 7), Duration::ZERO);
    }
}
