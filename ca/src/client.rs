//! The CA client: obtains a workload certificate with a bootstrap token, over TLS verified against
//! the mesh root and the CA's SPIFFE ID.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use weft_proto::ca::IstioCertificateRequest;
use weft_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::files::RootFile;
use crate::grpc::{ChannelError, Keepalive, tls_channel};
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
    /// The token file could not be read.
    #[error("cannot read the token file {}: {source}", path.display())]
    TokenRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
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
    token: Arc<TokenSource>,
    roots: Option<RootFile>,
    /// DNS SANs asked for with every certificate (pilot's webhook names); usually none.
    dns_names: Arc<[String]>,
}

/// Where the bearer token comes from.
#[derive(Debug)]
enum TokenSource {
    /// Fixed at construction (one-shot tools and tests).
    Fixed(MetadataValue<tonic::metadata::Ascii>),
    /// Read again for every request: projected tokens are rotated in place and expire.
    File(PathBuf),
}

fn bearer(token: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ClientError::TokenFormat)
}

impl CaClient {
    /// A client for the CA at `addr`, which must present `ca_identity` chained to `bundle`, sending
    /// the fixed `token` with every request (for one-shot use: a token read once expires).
    pub fn new(
        addr: &str,
        bundle: &TrustBundle,
        ca_identity: SpiffeId,
        token: &str,
    ) -> Result<Self, ClientError> {
        let token = TokenSource::Fixed(bearer(token)?);
        Self::build(
            addr,
            bundle,
            ca_identity,
            token,
            None,
            &Keepalive::default(),
        )
    }

    /// A long-lived workload's client: the token file is read for every request, and the root file
    /// is reloaded before every request (so the CA's new root is trusted as soon as it is mounted).
    pub fn with_files(
        addr: &str,
        roots: &RootFile,
        ca_identity: SpiffeId,
        token_file: &Path,
        keepalive: &Keepalive,
    ) -> Result<Self, ClientError> {
        let token = TokenSource::File(token_file.to_owned());
        Self::build(
            addr,
            roots.bundle(),
            ca_identity,
            token,
            Some(roots.clone()),
            keepalive,
        )
    }

    fn build(
        addr: &str,
        bundle: &TrustBundle,
        ca_identity: SpiffeId,
        token: TokenSource,
        roots: Option<RootFile>,
        keepalive: &Keepalive,
    ) -> Result<Self, ClientError> {
        let config = tls::client_config(None, bundle, vec![ca_identity], &[tls::ALPN_H2])?;
        let channel = tls_channel(addr, Arc::new(config), keepalive)?;
        Ok(Self {
            inner: IstioCertificateServiceClient::new(channel),
            token: Arc::new(token),
            roots,
            dns_names: Arc::from([]),
        })
    }

    /// This client asks for `names` as DNS SANs in every certificate it requests (renewals
    /// included). The CA allows them only for the control plane's own Service names
    /// ([`crate::dns`]).
    #[must_use]
    pub fn with_dns_names(mut self, names: Vec<String>) -> Self {
        self.dns_names = Arc::from(names);
        self
    }

    async fn authorization(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
        match &*self.token {
            TokenSource::Fixed(v) => Ok(v.clone()),
            TokenSource::File(path) => {
                let text = tokio::fs::read_to_string(path).await.map_err(|source| {
                    ClientError::TokenRead {
                        path: path.clone(),
                        source,
                    }
                })?;
                bearer(&text)
            }
        }
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
            .insert("authorization", self.authorization().await?);
        let resp = self.inner.clone().create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }

    /// Generates a key, has the CA certify it for `identity`, and returns ready credentials.
    pub async fn fetch_credentials(
        &self,
        identity: &SpiffeId,
        validity: Duration,
    ) -> Result<Credentials, ClientError> {
        if let Some(roots) = &self.roots {
            roots.reload().await;
        }
        let kc = crate::csr::generate_with_dns(identity, &self.dns_names)?;
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

/// How long to wait after the `failures`-th failed renewal in a row of a certificate that lives
/// `lifetime`: 500 ms doubling, capped at a quarter of the lifetime within [500 ms, 30 s] (so a 24 h
/// certificate is retried every 30 s and a 10 s test certificate every 2.5 s, many times before it
/// expires), then scaled by `jitter` in [0.5, 1] so a fleet cut off together does not retry together.
pub fn retry_after(failures: u32, lifetime: Duration, jitter: f64) -> Duration {
    let cap = (lifetime / 4).clamp(Duration::from_millis(500), Duration::from_secs(30));
    let exp = Duration::from_millis(500).saturating_mul(1u32 << failures.min(16));
    exp.min(cap).mul_f64(jitter.clamp(0.5, 1.0))
}

/// Keeps `store` fresh for ever: renews at about half the certificate's lifetime; when a renewal
/// fails (CA unreachable, token expired or unreadable) keeps the valid certificate and retries with
/// [`retry_after`] until one succeeds, also past expiry (ztunnel's semantics). The expiry itself is
/// logged once as an error; readiness reads it from the store. Run it as a task; it ends only when
/// the task is dropped.
pub async fn keep_rotated(
    client: CaClient,
    identity: SpiffeId,
    validity: Duration,
    store: Arc<tls::CredentialStore>,
) {
    let mut seed = u64::from(std::process::id());
    let mut next_random = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 11
    };
    loop {
        let lifetime = time_left(&store);
        tokio::time::sleep(renew_after(lifetime, next_random())).await;
        let mut failures = 0u32;
        let mut expired_logged = false;
        loop {
            match client.fetch_credentials(&identity, validity).await {
                Ok(creds) => {
                    store.rotate(creds);
                    if expired_logged {
                        tracing::warn!(%identity, "certificate renewed after it had expired; ready again");
                    } else {
                        tracing::info!(%identity, "certificate rotated");
                    }
                    break;
                }
                Err(e) => {
                    store.record_failure();
                    let wait = retry_after(
                        failures,
                        lifetime,
                        0.5 + (next_random() % 1000) as f64 / 2000.0,
                    );
                    failures = failures.saturating_add(1);
                    if !expired_logged && !store.valid_at(SystemTime::now()) {
                        expired_logged = true;
                        tracing::error!(%identity, error = %e, "certificate expired and cannot be renewed: mesh handshakes fail and readiness is false until a renewal succeeds");
                    }
                    tracing::warn!(%identity, error = %e, retry_in = ?wait, "certificate renewal failed; keeping the current one");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

fn time_left(store: &tls::CredentialStore) -> Duration {
    store
        .current()
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
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

    #[test]
    fn retries_double_up_to_a_quarter_of_the_lifetime_within_bounds() {
        let ms = |n| Duration::from_millis(n);
        let day = Duration::from_secs(86400);
        let waits: Vec<_> = (0..8).map(|n| retry_after(n, day, 1.0)).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000].map(ms)
        );
        assert_eq!(retry_after(u32::MAX, day, 1.0), ms(30000));
        // A 10 s certificate is retried at least every 2.5 s, so several times before it expires.
        assert_eq!(retry_after(9, Duration::from_secs(10), 1.0), ms(2500));
        // Even an expired certificate (lifetime 0) is retried, at the floor.
        assert_eq!(retry_after(5, Duration::ZERO, 1.0), ms(500));
        assert_eq!(retry_after(3, day, 0.5), ms(2000));
        assert_eq!(retry_after(3, day, 0.0), ms(2000), "jitter clamped");
    }
}
