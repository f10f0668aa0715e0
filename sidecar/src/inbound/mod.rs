//! The inbound listener: connections from peers (mTLS) or, where policy allows, plaintext clients.
//!
//! Each connection's first bytes decide: a TLS ClientHello is terminated with the mesh certificate,
//! requiring a client certificate under STRICT and verifying it if sent under PERMISSIVE; anything
//! else is plaintext, refused under STRICT. Then, per connection, [`identity`] works out who called
//! from the verified certificate alone; per request, [`forward`] stamps that identity on the
//! request (`x-forwarded-client-cert`, never the caller's own) and sends it to the app on localhost
//! ([`app`]). Opaque streams from peers take [`opaque`].

pub mod app;
pub mod forward;
pub mod identity;
pub mod opaque;

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use weft_ca::SpiffeId;

use crate::errors::refused_body;
use crate::http::h1::framing::{Findings, Guard};
use crate::http::sniff::Verdict;
use crate::inbound::identity::{Caller, caller_context};
use crate::listener::Edge;
use crate::route::MtlsMode;
use crate::snapshot::Snapshots;
use crate::telemetry::record::Sinks;
use crate::telemetry::{Counted, Labels, Workload, workload_labels};

/// Where inbound requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppTarget {
    /// The port the peer dialled (transparent capture; from SO_ORIGINAL_DST).
    OriginalPort,
    /// A fixed app port (explicit mode).
    Port(u16),
    /// No app receives traffic (explicit mode without --app-port, e.g. a pure client like sleep).
    None,
}

/// The inbound TLS configs: PeerAuthentication's mode picks one per connection.
#[derive(Debug, Clone)]
pub struct InboundTls {
    /// Requires a client certificate (STRICT).
    pub strict: Arc<ServerConfig>,
    /// Verifies a client certificate if one is sent (PERMISSIVE).
    pub permissive: Arc<ServerConfig>,
}

/// Shared state of the inbound side.
pub struct Inbound {
    /// Current config (for the PeerAuthentication mode).
    pub snapshots: Snapshots,
    /// The two TLS server configs.
    pub tls: InboundTls,
    /// Where requests go.
    pub target: AppTarget,
    /// This workload's identity (the `By=` of XFCC).
    pub identity: SpiffeId,
    /// The proxy's own ports: a connection aimed at them is a loop.
    pub own_ports: Vec<u16>,
    /// Spans, metrics and access log.
    pub sinks: Sinks,
    unknown_source: Labels,
    /// Connections to the app.
    app: crate::inbound::app::App,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("target", &self.target)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// Builds the inbound side.
    pub fn new(
        snapshots: Snapshots,
        tls: InboundTls,
        target: AppTarget,
        identity: SpiffeId,
        own_ports: Vec<u16>,
        sinks: Sinks,
    ) -> Self {
        Self {
            snapshots,
            tls,
            target,
            identity,
            own_ports,
            sinks,
            unknown_source: workload_labels("source", &Workload::default()),
            app: crate::inbound::app::App::new(),
        }
    }
}

/// Accepts connections until the drain starts.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, edge: Edge) {
    crate::listener::accept_loop("inbound", listener, edge, move |tcp, peer, edge| {
        connection(tcp, peer, inbound.clone(), edge)
    })
    .await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    inbound: Arc<Inbound>,
    edge: Edge,
) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let app_port = match inbound.target {
        AppTarget::Port(p) => p,
        AppTarget::None => return Err("this pod has no application port".into()),
        AppTarget::OriginalPort => {
            let dst = crate::capture::original_dst(&tcp).map_err(|e| e.to_string())?;
            if inbound.own_ports.contains(&dst.port()) {
                return Err(format!(
                    "refusing a connection to the proxy's own port {dst}"
                ));
            }
            dst.port()
        }
    };
    let mode = inbound.snapshots.borrow().routes.inbound.mode_for(app_port);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(edge.limits.head_timeout, tcp.peek(&mut first))
        .await
        .map_err(|_| {
            edge.stats
                .timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            "no bytes within the head timeout".to_string()
        })?
        .map_err(|e| e.to_string())?;
    // 0x16 = TLS handshake record: a ClientHello.
    if n == 1 && first[0] == 0x16 {
        let config = if mode == MtlsMode::Strict {
            inbound.tls.strict.clone()
        } else {
            inbound.tls.permissive.clone()
        };
        // Counted into `istio_tcp_*` only once known to be opaque (see `opaque::from_peer`).
        let tls = tokio::time::timeout(
            edge.limits.head_timeout,
            tokio_rustls::TlsAcceptor::from(config).accept(tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
        let caller = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(weft_ca::tls::peer_identity);
        if tls.get_ref().1.alpn_protocol() == Some(crate::upstream::ALPN_TCP) {
            // An opaque stream from a peer sidecar: spliced to the app, unless it carries HTTP
            // (an upgrade, or a CONNECT tunnel's content), which goes through the HTTP path.
            let conn = caller_context(&inbound, app_port, caller, peer)?;
            return opaque::from_peer(tls, inbound, app_port, conn, &edge).await;
        }
        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(weft_ca::tls::ALPN_H2);
        let conn = caller_context(&inbound, app_port, caller, peer)?;
        if is_h2 {
            // The HTTP/2 hop from a peer sidecar: h2 driven directly (see `peer`).
            return crate::http::peer::serve(
                tls,
                crate::upstream::H2_WINDOWS,
                edge.drain.signal(),
                move |req| {
                    let inbound = inbound.clone();
                    let conn = conn.clone();
                    async move { inbound.handle(req, app_port, &conn).await }
                },
            )
            .await
            .map_err(|e| e.to_string());
        }
        serve_http(tls, inbound, app_port, conn, &edge).await
    } else {
        if mode == MtlsMode::Strict {
            return Err(format!("plaintext refused: port {app_port} is STRICT"));
        }
        let verdict = crate::http::sniff::peek_verdict(&tcp, edge.limits.head_timeout)
            .await
            .ok_or("closed before its first line")?;
        if verdict == Verdict::Opaque {
            // Plaintext that cannot be HTTP (PERMISSIVE): splice it to the app.
            let tcp = Counted::new(tcp, inbound.sinks.metrics.clone(), true);
            let app = TcpStream::connect(("127.0.0.1", app_port))
                .await
                .map_err(|e| format!("app 127.0.0.1:{app_port}: {e}"))?;
            return crate::listener::splice(tcp, app, &edge)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        let conn = caller_context(&inbound, app_port, None, peer)?;
        serve_http(tcp, inbound, app_port, conn, &edge).await
    }
}

/// HTTP/1.1 (plaintext, PERMISSIVE, or an opaque stream that carries HTTP) or HTTP/2 over TLS
/// without ALPN `h2`, through hyper, its HTTP/1.1 framing judged by [`Guard`].
pub(crate) async fn serve_http<IO>(
    io: IO,
    inbound: Arc<Inbound>,
    app_port: u16,
    conn: Arc<Caller>,
    edge: &Edge,
) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let verdict = Arc::new(Findings::default());
    let judged = verdict.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (inbound, conn, judged) = (inbound.clone(), conn.clone(), judged.clone());
        // Boxed so that hyper moves a pointer, not the whole request future (see outbound).
        Box::pin(async move {
            let req = req.map(crate::http::body::boxed);
            let resp = inbound.handle(req, app_port, &conn).await;
            Ok::<_, std::convert::Infallible>(refused_body(&judged).unwrap_or(resp))
        })
    });
    let io = TokioIo::new(Guard::new(io, verdict));
    crate::listener::serve_hyper(io, svc, edge, crate::upstream::H2_WINDOWS).await
}
