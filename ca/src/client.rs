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
