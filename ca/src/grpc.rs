//! gRPC over mesh TLS: client channels that verify the server's SPIFFE ID, and a TLS accept loop for
//! tonic servers. Shared by the CA, pilot and the sidecar.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect timeout of client channels.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 keepalive of client channels: a PING every `interval`, the connection dropped (and the
/// channel reconnecting) when one is not answered within `timeout`. A server that vanished without a
/// FIN (a partition, a node that died) is thus noticed within `interval + timeout` even on an idle
/// stream, where TCP alone would wait for its retransmission timeout (about 15 minutes on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between pings (sent on idle connections too).
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// Istio's for its xDS channel (the Envoy bootstrap's `connection_keepalive`): 30 s, 10 s.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Keepalive {
    /// The longest a silent server goes unnoticed.
    pub fn detection_bound(&self) -> Duration {
        self.interval + self.timeout
    }
}

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// `addr` is not `host:port`.
    #[error("invalid address {0:?}: expected host:port")]
    Address(String),
}

/// A lazily connecting gRPC channel to `addr` (`host:port`, optionally `https://host:port`) over TLS
/// with `config`; it reconnects on its own after failures, including a ping `keepalive` gave up on.
pub fn tls_channel(
    addr: &str,
    config: Arc<ClientConfig>,
    keepalive: &Keepalive,
) -> Result<Channel, ChannelError> {
    let addr = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr)
        .trim_end_matches('/')
        .to_owned();
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ChannelError::Address(addr.clone()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| ChannelError::Address(addr.clone()))?;
    // The URI only names the :authority; the connector below dials `addr` itself.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ChannelError::Address(addr.clone()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .keep_alive_while_idle(true);
    let connector = TlsConnector::from(config);
    let dial = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let addr = addr.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(dial))
}

/// Accepts TCP connections on `listener` and yields those that complete a TLS handshake, for
/// `tonic::transport::Server::serve_with_incoming`. Handshakes run concurrently, each bounded by
/// [`HANDSHAKE_TIMEOUT`], so a slow or hostile client cannot stall the accept loop; failed
/// handshakes are logged and dropped, never surfaced as server errors.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
