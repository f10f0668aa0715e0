//! The CA's gRPC service: `CreateCertificate`, authenticated by bearer token (see [`crate::auth`]),
//! over TLS.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use weft_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use weft_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

use crate::auth::{AuthError, Authenticator};
use crate::authority::{Authority, SignError};
use crate::spiffe::SpiffeId;
use crate::tls::{self, ClientAuth, CredentialStore, Credentials, SvidError, TrustBundle};

pub mod metrics;
pub use metrics::CaMetrics;

/// Namespace of the CA's own identity.
pub const CA_NAMESPACE: &str = "weft-system";
/// Service account of the CA's own identity.
pub const CA_SERVICE_ACCOUNT: &str = "weft-ca";
/// Largest request message accepted; anything bigger is refused by tonic before it is buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Validity of the CA's serving certificate; re-issued at every start.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long open connections may finish their requests after shutdown begins, unless
/// `--drain-duration` says otherwise (Istio's terminationDrainDuration default).
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Metadata key of Istio's impersonation request.
const IMPERSONATION_KEY: &str = "ImpersonatedIdentity";

/// The identity the CA serves with in `trust_domain`, which clients verify.
pub fn ca_identity(trust_domain: &str) -> Result<SpiffeId, crate::spiffe::SpiffeIdError> {
    SpiffeId::new(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}

/// Why `CreateCertificate` failed; converted to a gRPC status in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// No `authorization: Bearer` metadata.
    #[error("authentication failed: no bearer token in the authorization metadata")]
    MissingToken,
    /// The token was refused, or could not be checked.
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// The caller asked to act as another identity.
    #[error("authentication failed: impersonation is not allowed (no trusted node authorizer)")]
    Impersonation,
    /// The CSR or validity was refused.
    #[error(transparent)]
    Sign(#[from] SignError),
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        let msg = e.to_string();
        match e {
            // The CA could not decide (API server down): the caller retries, as for any outage.
            CaError::Auth(e) if e.is_unavailable() => Status::unavailable(msg),
            CaError::Auth(e) if e.is_ca_misconfigured() => Status::internal(msg),
            CaError::MissingToken | CaError::Auth(_) | CaError::Impersonation => {
                Status::unauthenticated(msg)
            }
            CaError::Sign(SignError::IdentityMismatch { .. } | SignError::DnsName(_)) => {
                Status::permission_denied(msg)
            }
            CaError::Sign(SignError::CaExpired) => Status::failed_precondition(msg),
            CaError::Sign(SignError::Sign(_)) => Status::internal(msg),
            CaError::Sign(_) => Status::invalid_argument(msg),
        }
    }
}

/// Failures starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The serving identity could not be issued or loaded.
    #[error("serving certificate: {0}")]
    Identity(String),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(#[from] SvidError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The `IstioCertificateService` implementation.
#[derive(Debug, Clone)]
pub struct CaService {
    authority: Arc<Authority>,
    authenticator: Arc<Authenticator>,
    metrics: Arc<CaMetrics>,
}

impl CaService {
    /// Serves certificates from `authority` to callers with its own bootstrap tokens (`--auth weft`).
    pub fn new(authority: Arc<Authority>) -> Self {
        let authenticator = Arc::new(weft_tokens(&authority));
        Self::with_authenticator(authority, authenticator)
    }

    /// Serves certificates from `authority` to callers `authenticator` accepts.
    pub fn with_authenticator(
        authority: Arc<Authority>,
        authenticator: Arc<Authenticator>,
    ) -> Self {
        let metrics = Arc::new(CaMetrics::new(&authority));
        Self {
            authority,
            authenticator,
            metrics,
        }
    }

    /// What this service counts (for `--monitoring-listen`).
    pub fn metrics(&self) -> Arc<CaMetrics> {
        self.metrics.clone()
    }

    /// [`Self::create`], counted: every request, and each issuance or refusal with its reason.
    pub async fn create_counted(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, CaError> {
        self.metrics.request();
        let result = self.create(metadata, req).await;
        self.metrics.outcome(result.as_ref().map(|_| ()));
        result
    }

    /// Authenticates the caller from `metadata` and signs its CSR: the whole `CreateCertificate`.
    pub async fn create(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, CaError> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(CaError::MissingToken)?;
        let now = SystemTime::now();
        let identity = self
            .authenticator
            .authenticate(token, self.authority.trust_domain(), now)
            .await?;
        if req
            .metadata
            .as_ref()
            .is_some_and(|m| m.fields.contains_key(IMPERSONATION_KEY))
        {
            return Err(CaError::Impersonation);
        }
        let chain = self
            .authority
            .sign_csr(&req.csr, &identity, req.validity_duration, now)?;
        tracing::info!(%identity, validity_secs = req.validity_duration, "issued certificate");
        Ok(chain)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        match self
            .create_counted(request.metadata(), request.get_ref())
            .await
        {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(e) => {
                tracing::info!(error = %e, "certificate request refused");
                Err(e.into())
            }
        }
    }
}

/// Issues the CA's own serving credentials (identity [`ca_identity`]) from its authority.
pub fn serving_credentials(authority: &Authority) -> Result<Credentials, ServeError> {
    let id =
        ca_identity(authority.trust_domain()).map_err(|e| ServeError::Identity(e.to_string()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServeError::Identity(e.to_string()))?;
    let chain = authority
        .issue_for_key(&key, &id, SERVING_CERT_TTL, SystemTime::now())
        .map_err(|e| ServeError::Identity(e.to_string()))?;
    Ok(Credentials::from_pem(&chain, &key.serialize_pem())?)
}

/// [`serve_draining`] with the default drain of [`DRAIN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    authority: Arc<Authority>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_draining(listener, authority, shutdown, DRAIN_GRACE).await
}

/// `--auth weft`: the authority's own bootstrap tokens.
pub fn weft_tokens(authority: &Authority) -> Authenticator {
    Authenticator::Weft(crate::auth::weft::WeftTokens::new(
        authority.token_verifier().clone(),
    ))
}

/// [`serve_with`] for callers with the authority's own bootstrap tokens (`--auth weft`).
pub async fn serve_draining(
    listener: TcpListener,
    authority: Arc<Authority>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let service = CaService::new(authority);
    serve_with(listener, service, shutdown, drain).await
}

/// Serves `service` (its authority's CA) on `listener` over TLS until `shutdown` completes, then drains: the listener stops
/// accepting, open HTTP/2 connections get GOAWAY (tonic's graceful shutdown) so clients reconnect
/// elsewhere, and in-flight requests get `drain` to finish. Idle clients keep HTTP/2 connections
/// open indefinitely, so a purely graceful stop could wait forever: at the deadline the rest close.
pub async fn serve_with(
    listener: TcpListener,
    service: CaService,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let creds = serving_credentials(&service.authority)?;
    let bundle = TrustBundle::from_pem(service.authority.root_pem())?;
    let config = tls::server_config(
        CredentialStore::new(creds),
        &bundle,
        ClientAuth::None,
        &[tls::ALPN_H2],
    )?;
    let incoming = crate::grpc::tls_incoming(listener, Arc::new(config));
    let service =
        IstioCertificateServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => return Ok(res?),
        () = shutdown => {}
    }
    let _ = stop_tx.send(());
    tracing::info!(?drain, "draining");
    match tokio::time::timeout(drain, server).await {
        Ok(res) => res?,
        Err(_) => tracing::info!("drain grace elapsed; closing remaining connections"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
