//! Upstream connections from this sidecar to endpoints.
//!
//! To a peer sidecar: mTLS (verifying that the peer presents the SPIFFE ID pilot gave for the endpoint)
//! carrying HTTP/2, so every request to that endpoint shares one connection. Pools are keyed by the dialled
//! address and the expected identity, never by the request's authority (which is often a VIP; pitfall
//! P11); the HTTP/2 itself is in [`crate::http::peer`]. To an endpoint without a sidecar, or with TLS disabled
//! by a DestinationRule: plaintext HTTP/1.1 through hyper-util's pooled client.

// Looked up on every request with keys pilot chose (a request can only miss, never insert): foldhash
// is several times cheaper than SipHash here and flooding is not a concern.
use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, CredentialStore, TrustBundle};

use crate::http::peer::{Connection, Windows};

pub mod balance;
pub mod limits;
pub mod outlier;
pub mod replay;
pub mod state;

pub use crate::http::body::{Body, BodyError, boxed};
pub use crate::stream::TcpOrTls;

/// Why an upstream request failed before a response arrived.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The peer refused the stream (HTTP/2 REFUSED_STREAM): it processed nothing.
    #[error("upstream {addr} refused the stream")]
    Refused {
        /// Endpoint.
        addr: SocketAddr,
    },
    /// The connection to the peer ended (closed, broken, or going away) before the response.
    #[error("upstream {addr}: connection terminated: {reason}")]
    Closed {
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

/// One pooled HTTP/2 peer (an address and the identity it must prove): its live connection, taken
/// without waiting on the request path, and the lock that the first dialler holds while
/// connecting (concurrent first requests share one handshake).
///
/// Once the peer has failed (a connect or handshake failure, or a connection whose peer stopped
/// answering pings: a lost node), no request waits on it any more: for a hold that doubles with
/// each failure in a row ([`hold`]: 0.5 s up to 5 s) requests fail at once, and after it one
/// probe dials in the background while requests keep failing at once; the probe's success puts
/// the peer back. A request that fails so is retried on another endpoint where the route's
/// policy allows (`connect-failure`, in Istio's default policy), so a lost endpoint costs no
/// waiting where there is another, and a fast 503 UF where there is not.
struct Peer {
    identity: SpiffeId,
    sender: Option<Connection>,
    /// Requests handed the current connection (for `maxRequestsPerConnection`).
    handed: u32,
    /// When the current connection was last handed out (kept only under an idle timeout).
    last_used: Option<tokio::time::Instant>,
    /// The first dial's lock.
    dial: Arc<tokio::sync::Mutex<()>>,
    /// The last failure to reach the peer, until a connection succeeds.
    failure: Option<Failure>,
    /// A background probe is dialling.
    probing: bool,
    /// The highest cluster-definition epoch a request has asked for (see `upstream::state`).
    epoch: u64,
}

/// Failures to reach a peer in a row.
#[derive(Debug, Clone)]
struct Failure {
    at: tokio::time::Instant,
    err: UpstreamError,
    streak: u32,
}

impl Failure {
    fn after(previous: Option<&Failure>, err: UpstreamError) -> Self {
        Self {
            at: tokio::time::Instant::now(),
            err,
            streak: previous.map_or(1, |f| f.streak.saturating_add(1)),
        }
    }
}

/// How long requests fail at once after `streak` failures in a row before a probe dials again.
pub fn hold(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(4);
    (FAILURE_HOLD * (1u32 << doublings)).min(MAX_FAILURE_HOLD)
}

/// HTTP/2 flow control between sidecars, in both directions (the inbound server uses it too). What the
/// peer may send before we read it: hyper's defaults (2 MiB per stream, 5 MiB per connection) let one
/// bulk response park megabytes in each proxy; a loopback or LAN hop needs far less to stay at full
/// speed. The connection-wide window is a few streams' worth; a stream may queue 64 KiB for sending
/// before it waits for the socket.
pub const H2_WINDOWS: Windows = Windows {
    stream: 256 * 1024,
    connection: 1024 * 1024,
    max_send_buf: 64 * 1024,
    keepalive: crate::http::peer::KEEPALIVE,
};

/// How long a failed connect is remembered before the endpoint is tried again (a light form of
/// Envoy's outlier ejection; without it a dead mirror target or endpoint costs a connect per request).
pub const FAILURE_HOLD: Duration = Duration::from_millis(500);
/// The longest hold: how late, at worst, a restored peer is dialled again.
pub const MAX_FAILURE_HOLD: Duration = Duration::from_secs(5);

/// How long a plaintext connection to an endpoint without a sidecar stays pooled unused, unless
/// the cluster sets `idleTimeout`.
const PLAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connection pools to upstream endpoints.
pub struct Upstreams {
    creds: Arc<CredentialStore>,
    bundle: TrustBundle,
    /// Each peer gets one HTTP/2 connection; the per-key async mutex makes concurrent first requests
    /// share one handshake instead of racing several.
    h2: Arc<Mutex<HashMap<SocketAddr, Vec<Peer>>>>,
    /// hyper-util clients by (connect timeout, idle timeout): a connector and a pool carry one of
    /// each, and clusters set their own (most share the defaults' client).
    plain: Mutex<HashMap<(Duration, Duration), Client<HttpConnector, Body>>>,
    /// rustls client configs per expected identity (building one per request would cost a verifier
    /// allocation each time).
    configs: Mutex<HashMap<(SpiffeId, bool), Arc<rustls::ClientConfig>>>,
}

/// How a cluster uses its pooled connections (DestinationRule `connectionPool.http`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolSettings {
    /// Requests per connection before a new one is dialled (0: unlimited).
    pub max_requests_per_connection: u32,
    /// A connection handed to no request for this long leaves the pool and closes once its
    /// streams end (`None`: kept while it lives, the peer's keepalive watching it).
    pub idle_timeout: Option<Duration>,
    /// The cluster definition's epoch: a connection opened before a higher one is replaced.
    pub epoch: u64,
}

/// Takes a pooled connection out of the pool once nobody has been handed it for `timeout`; without
/// the pool's handle (and its requests' ones) its h2 connection closes. Ends when the connection
/// is replaced or gone.
async fn reap_when_idle(
    pool: Arc<Mutex<HashMap<SocketAddr, Vec<Peer>>>>,
    addr: SocketAddr,
    identity: SpiffeId,
    conn: usize,
    timeout: Duration,
) {
    let mut check_at = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(check_at).await;
        let mut map = pool.lock().unwrap_or_else(|p| p.into_inner());
        let Some(peer) = map
            .get_mut(&addr)
            .and_then(|peers| peers.iter_mut().find(|p| p.identity == identity))
        else {
            return;
        };
        if peer.sender.as_ref().map(Connection::id) != Some(conn) {
            return;
        }
        match peer.last_used {
            Some(used) if used.elapsed() < timeout => check_at = used + timeout,
            _ => {
                tracing::debug!(%addr, "closing an idle upstream connection");
                peer.sender = None;
                return;
            }
        }
    }
}

/// ALPN for opaque TCP carried over mTLS between sidecars (Istio's value for TCP in the mesh).
pub const ALPN_TCP: &[u8] = b"istio";

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Pools presenting `creds` and trusting `bundle`.
    pub fn new(creds: Arc<CredentialStore>, bundle: TrustBundle) -> Self {
        Self {
            creds,
            bundle,
            h2: Arc::default(),
            plain: Mutex::default(),
            configs: Mutex::new(HashMap::default()),
        }
    }

    /// The plaintext client for a cluster's connect and idle timeouts.
    fn plain_client(
        &self,
        connect_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> Client<HttpConnector, Body> {
        let idle = idle_timeout.unwrap_or(PLAIN_IDLE_TIMEOUT);
        let mut clients = self.plain.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry((connect_timeout, idle))
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                http.set_connect_timeout(Some(connect_timeout));
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(idle)
                    .pool_timer(TokioTimer::new())
                    .build(http)
            })
            .clone()
    }

    /// Sends `req` to `addr` in plaintext HTTP/1.1 (the URI must carry the authority to dial),
    /// connecting within `connect_timeout` and closing connections idle for `idle_timeout`.
    pub async fn send_plain(
        &self,
        addr: SocketAddr,
        req: http::Request<Body>,
        connect_timeout: Duration,
        idle_timeout: Option<Duration>,
    ) -> Result<http::Response<Body>, UpstreamError> {
        self.plain_client(connect_timeout, idle_timeout)
            .request(req)
            .await
            .map(|r| r.map(boxed))
            .map_err(|e| classify_legacy(addr, &e))
    }

    /// Sends `req` on an HTTP/2 connection from [`Upstreams::h2_sender`]. `Err(Ok(req))`: the
    /// connection is going away and the request was not sent (it may go to another connection).
    pub async fn send_h2(
        sender: Connection,
        addr: SocketAddr,
        req: http::Request<Body>,
    ) -> Result<http::Response<Body>, Result<http::Request<Body>, UpstreamError>> {
        sender.send(req).await.map_err(|e| match e {
            crate::http::peer::SendError::NotSent(req, _) => Ok(*req),
            crate::http::peer::SendError::Failed(e)
                if e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
            {
                Err(UpstreamError::Refused { addr })
            }
            crate::http::peer::SendError::Failed(e) if e.is_io() || e.is_go_away() => {
                Err(UpstreamError::Closed {
                    addr,
                    reason: e.to_string(),
                })
            }
            crate::http::peer::SendError::Failed(e) => Err(UpstreamError::Http {
                addr,
                reason: e.to_string(),
            }),
        })
    }

    /// A ready HTTP/2 connection over mTLS to the sidecar at `addr`, which must prove `identity`:
    /// the pooled one, or a new one. Connect and TLS failures surface here, before any request is
    /// committed to the connection, so the caller can still try another endpoint.
    pub async fn h2_sender(
        self: &Arc<Self>,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
        pool: PoolSettings,
    ) -> Result<Connection, UpstreamError> {
        // The common case, a live connection, costs one short lock and no allocation.
        if let Some(sender) = self.live_sender(addr, identity, pool) {
            return Ok(sender);
        }
        // Boxed: the dial path's future is large, and inline it would be copied on every request.
        Box::pin(self.dial_h2(addr, identity, connect_timeout, pool)).await
    }

    /// The slow path of [`Upstreams::h2_sender`]: the first dial, shared by whoever waits for it;
    /// after failures, an immediate error and at most one background probe (see [`Peer`]).
    async fn dial_h2(
        self: &Arc<Self>,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
        pool: PoolSettings,
    ) -> Result<Connection, UpstreamError> {
        let dial = {
            let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            let peers = map.entry(addr).or_default();
            let peer = match peers.iter().position(|p| p.identity == *identity) {
                Some(i) => &mut peers[i],
                None => {
                    peers.push(Peer {
                        identity: identity.clone(),
                        sender: None,
                        handed: 0,
                        last_used: None,
                        dial: Arc::default(),
                        failure: None,
                        probing: false,
                        epoch: pool.epoch,
                    });
                    let last = peers.len() - 1;
                    &mut peers[last]
                }
            };
            if let Some(failure) = &peer.failure {
                let err = failure.err.clone();
                if !peer.probing && failure.at.elapsed() >= hold(failure.streak) {
                    peer.probing = true;
                    tokio::spawn(
                        self.clone()
                            .probe(addr, identity.clone(), connect_timeout, pool),
                    );
                }
                return Err(err);
            }
            peer.dial.clone()
        };
        let _dialling = dial.lock().await;
        // Whoever held the dial lock before us may have connected, or failed.
        if let Some(sender) = self.live_sender(addr, identity, pool) {
            return Ok(sender);
        }
        if let Some(err) = self.failure(addr, identity) {
            return Err(err);
        }
        let result = self.connect_h2(addr, identity, connect_timeout).await;
        self.settle(addr, identity, &result, pool);
        result
    }

    /// A background dial to a peer that failed; requests meanwhile fail at once.
    async fn probe(
        self: Arc<Self>,
        addr: SocketAddr,
        identity: SpiffeId,
        connect_timeout: Duration,
        pool: PoolSettings,
    ) {
        let result = self.connect_h2(addr, &identity, connect_timeout).await;
        match &result {
            Ok(_) => tracing::info!(%addr, "peer reachable again"),
            Err(e) => tracing::debug!(%addr, error = %e, "peer still unreachable"),
        }
        // The probe's connection is pooled, not handed to a request: nobody has counted it.
        self.settle(addr, &identity, &result, pool);
        let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map
            .get_mut(&addr)
            .and_then(|peers| peers.iter_mut().find(|p| p.identity == identity))
        {
            p.probing = false;
            if result.is_ok() {
                p.handed = 0;
            }
        }
    }

    /// The last failure to reach a peer, if it is failing.
    fn failure(&self, addr: SocketAddr, identity: &SpiffeId) -> Option<UpstreamError> {
        let map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&addr)?
            .iter()
            .find(|p| p.identity == *identity)?
            .failure
            .as_ref()
            .map(|f| f.err.clone())
    }

    /// Records a dial's result in the pool.
    fn settle(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        result: &Result<Connection, UpstreamError>,
        pool: PoolSettings,
    ) {
        let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = map
            .get_mut(&addr)
            .and_then(|peers| peers.iter_mut().find(|p| p.identity == *identity))
        else {
            return;
        };
        match result {
            Ok(conn) => {
                p.failure = None;
                // This request is the new connection's first; with one request per connection
                // it is never pooled.
                p.sender = Some(conn.clone()).filter(|_| pool.max_requests_per_connection != 1);
                p.handed = 1;
                p.last_used = pool.idle_timeout.map(|_| tokio::time::Instant::now());
                if let Some(timeout) = pool.idle_timeout {
                    tokio::spawn(reap_when_idle(
                        self.h2.clone(),
                        addr,
                        identity.clone(),
                        conn.id(),
                        timeout,
                    ));
                }
            }
            Err(e) => {
                p.sender = None;
                p.failure = Some(Failure::after(p.failure.as_ref(), e.clone()));
            }
        }
    }

    fn live_sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        pool: PoolSettings,
    ) -> Option<Connection> {
        let mut map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        let peer = map
            .get_mut(&addr)?
            .iter_mut()
            .find(|p| p.identity == *identity)?;
        if pool.epoch > peer.epoch {
            // The cluster's definition changed since this connection opened: a new one, and this
            // one closes when its streams end.
            peer.epoch = pool.epoch;
            peer.sender = None;
            return None;
        }
        let sender = peer.sender.as_ref()?;
        if sender.is_closed() {
            // A peer that stopped answering pings may be gone: no request waits on a dial to it
            // until a probe has reached it.
            if sender.is_lost() {
                peer.failure = Some(Failure::after(
                    peer.failure.as_ref(),
                    UpstreamError::Http {
                        addr,
                        reason: "the peer stopped answering on its connection".into(),
                    },
                ));
            }
            peer.sender = None;
            return None;
        }
        if let Some(_timeout) = pool.idle_timeout {
            peer.last_used = Some(tokio::time::Instant::now());
        }
        if pool.max_requests_per_connection == 0 {
            return Some(sender.clone());
        }
        // The connection's last request takes it out of the pool: the next request dials anew,
        // and this one ends when its streams do.
        peer.handed += 1;
        if peer.handed >= pool.max_requests_per_connection {
            return peer.sender.take();
        }
        Some(sender.clone())
    }

    fn client_config(
        &self,
        identity: &SpiffeId,
        tcp: bool,
    ) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        let key = (identity.clone(), tcp);
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let alpn: &[&[u8]] = if tcp { &[ALPN_TCP] } else { &[tls::ALPN_H2] };
        let c = tls::client_config(
            Some(self.creds.clone()),
            &self.bundle,
            vec![identity.clone()],
            alpn,
        )
        .map_err(|e| UpstreamError::Tls {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: e.to_string(),
        })?;
        let c = Arc::new(c);
        configs.insert(key, c.clone());
        Ok(c)
    }

    /// Opens an opaque TCP stream to `addr`: over mTLS (ALPN `istio`) to a sidecar that must prove
    /// `identity`, or plain when there is none.
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
        identity: Option<&SpiffeId>,
        connect_timeout: Duration,
    ) -> Result<TcpOrTls, UpstreamError> {
        self.dial(addr, identity, true, connect_timeout).await
    }

    /// TCP connect, then (with an identity) the mTLS handshake, each bounded by `connect_timeout`;
    /// `tcp` picks the ALPN (`istio` for opaque TCP, `h2` otherwise).
    async fn dial(
        &self,
        addr: SocketAddr,
        identity: Option<&SpiffeId>,
        tcp_alpn: bool,
        connect_timeout: Duration,
    ) -> Result<TcpOrTls, UpstreamError> {
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
        let Some(identity) = identity else {
            return Ok(TcpOrTls::Tcp(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(self.client_config(identity, tcp_alpn)?);
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
        Ok(TcpOrTls::Tls(Box::new(tls)))
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        connect_timeout: Duration,
    ) -> Result<Connection, UpstreamError> {
        let tls = self
            .dial(addr, Some(identity), false, connect_timeout)
            .await?;
        Connection::handshake(tls, H2_WINDOWS)
            .await
            .map_err(|e| UpstreamError::Http {
                addr,
                reason: e.to_string(),
            })
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
    } else if std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_incomplete_message() || h.is_closed())
    {
        // The endpoint closed the connection before its answer (flag UC).
        UpstreamError::Closed {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_or_tls_writes_every_slice_of_a_vectored_write() {
        // h2 hands over a frame head and its payload as two slices; the trait's default would
        // write only the head, and the payload would go in a TLS record and a send of its own.
        use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut server, _) = accepted.unwrap();
        let mut stream = TcpOrTls::Tcp(client.unwrap());
        assert!(stream.is_write_vectored());
        let slices = [
            std::io::IoSlice::new(b"head"),
            std::io::IoSlice::new(b"payload"),
        ];
        assert_eq!(stream.write_vectored(&slices).await.unwrap(), 11);
        let mut got = [0u8; 11];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headpayload");
    }

    #[tokio::test]
    async fn a_failing_endpoint_fails_at_once_while_one_probe_dials_in_the_background() {
        weft_ca::tls::install_default_provider();
        // A CA and credentials, so the pool can be built.
        let dir = tempfile::tempdir().unwrap();
        let ca = weft_ca::authority::Authority::load_or_create(
            dir.path(),
            weft_ca::authority::AuthorityOptions::default(),
        )
        .unwrap();
        let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
        let kc = weft_ca::csr::generate(&id).unwrap();
        let chain = ca
            .sign_csr(&kc.csr_pem, &id, 0, std::time::SystemTime::now())
            .unwrap();
        let creds = weft_ca::tls::Credentials::from_pem(&chain, &kc.key_pem).unwrap();
        let pool = Arc::new(Upstreams::new(
            CredentialStore::new(creds),
            TrustBundle::from_pem(ca.root_pem()).unwrap(),
        ));
        // Accepts TCP but never speaks TLS: every dial costs the whole handshake timeout. Counts
        // the dials.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = dials.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(tcp);
            }
        });
        let dialled = || dials.load(std::sync::atomic::Ordering::SeqCst);
        let timeout = Duration::from_millis(300);
        let ask = || pool.h2_sender(addr, &id, timeout, PoolSettings::default());
        // The first request waits for the first dial, which fails.
        let first = tokio::time::Instant::now();
        assert!(ask().await.is_err());
        assert!(first.elapsed() >= timeout);
        assert_eq!(dialled(), 1);
        // Within the hold the failure is answered at once, without another dial.
        let second = tokio::time::Instant::now();
        let err = ask().await.unwrap_err();
        assert!(second.elapsed() < timeout, "waited within the hold");
        assert!(matches!(err, UpstreamError::Tls { .. }), "{err}");
        assert_eq!(dialled(), 1, "dialled within the hold");
        // After the hold, a request still fails at once, and one probe dials in the background;
        // requests during the probe fail at once and start no other.
        tokio::time::sleep(hold(1)).await;
        let third = tokio::time::Instant::now();
        assert!(ask().await.is_err());
        assert!(ask().await.is_err());
        assert!(third.elapsed() < timeout, "a request waited on the probe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while dialled() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no probe dialled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(timeout * 2).await;
        assert_eq!(dialled(), 2, "more than one probe");
        // The probe failed too: the hold doubles.
        assert!(ask().await.is_err());
        tokio::time::sleep(hold(1)).await;
        assert!(ask().await.is_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(dialled(), 2, "probed again within the doubled hold");
    }

    #[test]
    fn the_hold_doubles_up_to_its_cap() {
        let holds: Vec<u64> = (1..=7).map(|s| hold(s).as_millis() as u64).collect();
        assert_eq!(holds, vec![500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }
}
