//! Upstream connections from this sidecar to endpoints.
//!
//! To a peer sidecar: mTLS (verifying that the peer presents the SPIFFE ID pilot gave for the endpoint)
//! carrying HTTP/2, so every request to that endpoint shares one connection. Pools are keyed by the dialled
//! address and the expected identity, never by the request's authority (which is often a VIP; pitfall
//! P11). To an endpoint without a sidecar, or with TLS disabled by a DestinationRule: plaintext HTTP/1.1
//! through hyper-util's pooled client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, CredentialStore, TrustBundle};

/// The body type the proxy moves around: streamed, boxed once per request.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Why an upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed or timed out.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// Endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// TLS handshake failed (includes a peer with the wrong identity).
    #[error("TLS to {addr} failed: {reason}")]
    Tls {
        /// Endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("upstream {addr}: {reason}")]
    Http {
        /// Endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// One pooled HTTP/2 connection slot.
type H2Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>>;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    identity: SpiffeId,
}

/// Connection pools to upstream endpoints.
pub struct Upstreams {
    creds: Arc<CredentialStore>,
    bundle: TrustBundle,
    /// Each peer gets one HTTP/2 connection; the per-key async mutex makes concurrent first requests
    /// share one handshake instead of racing several.
    h2: Mutex<HashMap<Key, H2Slot>>,
    plain: Client<HttpConnector, Body>,
    /// rustls client configs per expected identity (building one per request would cost a verifier
    /// allocation each time).
    configs: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Pools presenting `creds` and trusting `bundle`.
    pub fn new(creds: Arc<CredentialStore>, bundle: TrustBundle) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let plain = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(http);
        Self {
            creds,
            bundle,
            h2: Mutex::new(HashMap::new()),
            plain,
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `addr` in plaintext HTTP/1.1 (the URI must carry the authority to dial).
    pub async fn send_plain(
        &self,
        addr: SocketAddr,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        self.plain
            .request(req)
            .await
            .map_err(|e| classify_legacy(addr, &e))
    }

    /// Sends `req` on an HTTP/2 connection from [`Upstreams::h2_sender`].
    pub async fn send_h2(
        mut sender: SendRequest<Body>,
        addr: SocketAddr,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Http {
                addr,
                reason: e.to_string(),
            })
    }

    /// A ready HTTP/2 connection over mTLS to the sidecar at `addr`, which must prove `identity`:
    /// the pooled one, or a new one. Connect and TLS failures surface here, before any request is
    /// committed to the connection, so the caller can still try another endpoint.
    pub async fn h2_sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
    ) -> Result<SendRequest<Body>, UpstreamError> {
        let key = Key {
            addr,
            identity: identity.clone(),
        };
        let slot = {
            let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let sender = self.connect_h2(addr, identity, connect_timeout).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    fn client_config(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(identity) {
            return Ok(c.clone());
        }
        let c = tls::client_config(
            Some(self.creds.clone()),
            &self.bundle,
            vec![identity.clone()],
            &[tls::ALPN_H2],
        )
        .map_err(|e| UpstreamError::Tls {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: e.to_string(),
        })?;
        let c = Arc::new(c);
        configs.insert(identity.clone(), c.clone());
        Ok(c)
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
    ) -> Result<SendRequest<Body>, UpstreamError> {
        let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::Connect {
                addr,
                reason: format!("timed out after {connect_timeout:?}"),
            })?
            .map_err(|e| UpstreamError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let config = self.client_config(identity)?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::Tls {
                addr,
                reason: "handshake timed out".into(),
            })?
            .map_err(|e| UpstreamError::Tls {
                addr,
                reason: e.to_string(),
            })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| UpstreamError::Http {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream connection closed");
            }
        });
        Ok(sender)
    }
}

fn classify_legacy(addr: SocketAddr, e: &hyper_util::client::legacy::Error) -> UpstreamError {
    if e.is_connect() {
        UpstreamError::Connect {
            addr,
            reason: std::error::Error::source(e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
        }
    } else {
        UpstreamError::Http {
            addr,
            reason: std::error::Error::source(e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string()),
        }
    }
}
