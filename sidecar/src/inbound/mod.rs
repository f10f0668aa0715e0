//! The inbound listener: connections from peers (mTLS) or, where policy allows, plaintext clients.
//!
//! Each connection's first bytes decide: a TLS ClientHello is terminated with the mesh certificate,
//! requiring a client certificate under STRICT and verifying it if sent under PERMISSIVE; anything
//! else is plaintext, refused under STRICT. Requests then go to the app on localhost, with
//! `x-forwarded-client-cert` set from the verified peer (and any client-supplied one removed).

pub mod app;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_ca::SpiffeId;

use crate::errors::{ProxyError, rescue};
use crate::http::body::Body;
use crate::http::h1::framing::{Findings, Guard, refused_body};
use crate::http::headers::{check_framing, strip_hop_by_hop, strip_mesh_internal};
use crate::http::sniff::Verdict;
use crate::listener::Edge;
use crate::route::{MtlsMode, RouteTable};
use crate::telemetry::trace::{Hop, Kind, Span, Tracer, ensure_request_id};
use crate::telemetry::{
    AccessLog, Counted, LogEntry, Metrics, Reporter, RequestMetric, content_length, workload_labels,
};

/// Header naming the verified caller, as Envoy sets it on sidecar inbound.
const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

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

/// What the inbound side reports through.
#[derive(Debug, Clone)]
pub struct InboundTelemetry {
    /// Span export.
    pub tracer: Tracer,
    /// Fallback `service.name` (the pod name).
    pub pod_name: Arc<str>,
    /// Istio metrics.
    pub metrics: Arc<Metrics>,
    /// Access-log format.
    pub access_log: AccessLog,
}

/// Shared state of the inbound side.
pub struct Inbound {
    /// Current config (for the PeerAuthentication mode).
    pub tables: watch::Receiver<Arc<RouteTable>>,
    /// The two TLS server configs.
    pub tls: InboundTls,
    /// Where requests go.
    pub target: AppTarget,
    /// This workload's identity (the `By=` of XFCC).
    pub identity: SpiffeId,
    /// The proxy's own ports: a connection aimed at them is a loop.
    pub own_ports: Vec<u16>,
    /// Spans, metrics and access log.
    pub telemetry: InboundTelemetry,
    unknown_source: crate::telemetry::Labels,
    unknown_service: crate::telemetry::Labels,
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
        tables: watch::Receiver<Arc<RouteTable>>,
        tls: InboundTls,
        target: AppTarget,
        identity: SpiffeId,
        own_ports: Vec<u16>,
        telemetry: InboundTelemetry,
    ) -> Self {
        Self {
            tables,
            tls,
            target,
            identity,
            own_ports,
            telemetry,
            unknown_source: workload_labels("source", "", "", "", "", ""),
            unknown_service: crate::telemetry::service_labels(""),
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
    let mode = inbound.tables.borrow().inbound.mode_for(app_port);
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
        let tcp = Counted::new(tcp, inbound.telemetry.metrics.clone(), true);
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
            return opaque_from_peer(tls, inbound, app_port, conn, &edge).await;
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
                    async move {
                        match inbound.forward(req, app_port, &conn).await {
                            Ok(r) => r,
                            Err(e) => rescue(&e),
                        }
                    }
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
            let tcp = Counted::new(tcp, inbound.telemetry.metrics.clone(), true);
            let app = TcpStream::connect(("127.0.0.1", app_port))
                .await
                .map_err(|e| format!("app 127.0.0.1:{app_port}: {e}"))?;
            return crate::listener::splice(tcp, app, &edge)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        let tcp = Counted::new(tcp, inbound.telemetry.metrics.clone(), true);
        let conn = caller_context(&inbound, app_port, None, peer)?;
        serve_http(tcp, inbound, app_port, conn, &edge).await
    }
}

/// An opaque (ALPN `istio`) stream from a peer sidecar. The app's answer flows back from the start
/// (server-first protocols work), while the peer's first bytes are held until [`crate::http::sniff`]
/// decides: a stream that cannot be HTTP is spliced; one that is HTTP (a peer's upgrade request, or
/// what a caller sent through a `CONNECT` tunnel) is served as HTTP with the verified caller, so no
/// request reaches the app with a header the mesh did not check. A stream whose app already spoke
/// first stays opaque: an HTTP server never does.
async fn opaque_from_peer<S>(
    stream: S,
    inbound: Arc<Inbound>,
    app_port: u16,
    conn: Arc<Caller>,
    edge: &Edge,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TcpStream::connect(("127.0.0.1", app_port))
        .await
        .map_err(|e| format!("app 127.0.0.1:{app_port}: {e}"))?;
    let (mut app_r, app_w) = app.into_split();
    let (mut peer_r, peer_w) = tokio::io::split(stream);
    // The app → peer direction runs in its own task from the start; it can be stopped and give its
    // halves back only between two whole writes, so nothing it read is lost.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let to_peer = tokio::spawn(async move {
        let mut peer_w = peer_w;
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        loop {
            tokio::select! {
                biased;
                Ok(()) = &mut stop_rx => return Ok((app_r, peer_w, sent)),
                r = app_r.read(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        let _ = peer_w.shutdown().await;
                        return Ok((app_r, peer_w, sent));
                    }
                    peer_w.write_all(buf.get(..n).unwrap_or_default()).await?;
                    sent += n as u64;
                }
            }
        }
    });
    let mut first = bytes::BytesMut::new();
    let verdict =
        crate::http::sniff::read_verdict(&mut peer_r, &mut first, edge.limits.head_timeout).await;
    // Decided: the app → peer task gives its halves back (between two whole writes).
    let _ = stop_tx.send(());
    let (app_r, peer_w, sent) = to_peer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e: std::io::Error| e.to_string())?;
    let stream = peer_r.unsplit(peer_w);
    let mut app = app_r.reunite(app_w).map_err(|e| e.to_string())?;
    // An app that spoke first is no HTTP server: the stream stays opaque whatever the peer sent.
    if verdict == Some(Verdict::Http) && sent == 0 {
        drop(app);
        let io = crate::http::h1::server::Replay::new(stream, first.freeze());
        return serve_http(io, inbound, app_port, conn, edge).await;
    }
    app.write_all(&first).await.map_err(|e| e.to_string())?;
    crate::listener::splice(stream, app, edge)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What the requests of one connection share, worked out once.
fn caller_context(
    inbound: &Inbound,
    app_port: u16,
    caller: Option<SpiffeId>,
    peer: SocketAddr,
) -> Result<Arc<Caller>, String> {
    // The caller's metric labels, once per connection: its identity comes from the handshake.
    let source = match &caller {
        Some(id) => workload_labels("source", "", id.namespace(), id.as_str(), "", ""),
        None => inbound.unknown_source.clone(),
    };
    // XFCC and the app's URI authority are the same for every request of this connection.
    let xfcc = caller.as_ref().and_then(|c| {
        http::HeaderValue::from_str(&format!("By={};URI={}", inbound.identity, c)).ok()
    });
    let app_authority = http::uri::Authority::try_from(format!("127.0.0.1:{app_port}"))
        .map_err(|e| format!("app authority: {e}"))?;
    Ok(Arc::new(Caller {
        identity: caller,
        xfcc,
        source,
        app_authority,
        peer,
    }))
}

/// HTTP/1.1 (plaintext, PERMISSIVE, or an opaque stream that carries HTTP) or HTTP/2 over TLS
/// without ALPN `h2`, through hyper, its HTTP/1.1 framing judged by [`Guard`].
async fn serve_http<IO>(
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
            let resp = match inbound.forward(req, app_port, &conn).await {
                Ok(r) => r,
                Err(e) => rescue(&e),
            };
            Ok::<_, std::convert::Infallible>(refused_body(&judged).unwrap_or(resp))
        })
    });
    let io = TokioIo::new(Guard::new(io, verdict));
    crate::listener::serve_hyper(io, svc, edge, crate::upstream::H2_WINDOWS).await
}

/// What every request of one inbound connection shares: who called, as the handshake proved it.
struct Caller {
    /// The peer's SPIFFE ID (mTLS only).
    identity: Option<SpiffeId>,
    /// The `x-forwarded-client-cert` value naming it.
    xfcc: Option<http::HeaderValue>,
    /// Its metric labels.
    source: crate::telemetry::Labels,
    /// `127.0.0.1:<app port>`.
    app_authority: http::uri::Authority,
    /// The connection's remote address.
    peer: SocketAddr,
}

impl Inbound {
    /// Envoy's name for the inbound cluster of a port.
    fn inbound_cluster(&self, port: u16) -> String {
        format!("inbound|{port}||")
    }

    async fn forward(
        &self,
        req: Request<Body>,
        app_port: u16,
        conn: &Caller,
    ) -> Result<Response<Body>, ProxyError> {
        let (caller, source, peer) = (conn.identity.as_ref(), &conn.source, conn.peer);
        check_framing(req.headers()).map_err(ProxyError::BadRequest)?;
        let start = SystemTime::now();
        let (mut parts, body) = req.into_parts();
        // An HTTP/2 request from a peer sidecar carries the host in :authority; the app speaks
        // HTTP/1.1 and needs it as Host.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let upgrade = crate::http::tunnel::is_upgrade(&parts.headers).then(|| {
            parts
                .headers
                .get(http::header::UPGRADE)
                .cloned()
                .unwrap_or_else(|| http::HeaderValue::from_static("websocket"))
        });
        strip_hop_by_hop(&mut parts.headers);
        if caller.is_none() {
            // From outside the mesh: its claims in the mesh's own headers go, as Envoy strips
            // `x-envoy-*` from external requests.
            strip_mesh_internal(&mut parts.headers);
        }
        // Only a mesh peer (mTLS) may say the app speaks HTTP/2; the hint never reaches the app.
        let h2_app = parts
            .headers
            .remove(crate::outbound::APP_PROTOCOL_HEADER)
            .is_some_and(|v| v == "h2")
            && caller.is_some();
        // Never pass on a caller's claim about who it is; only the handshake says that. (`insert`
        // replaces every value a caller sent.)
        match &conn.xfcc {
            Some(v) => {
                parts.headers.insert(XFCC, v.clone());
            }
            None => {
                parts.headers.remove(XFCC);
            }
        }
        if let Some(protocol) = upgrade {
            return Box::pin(self.upgrade_app(parts, body, protocol, authority, app_port)).await;
        }
        // Room for what this hop adds (XFCC, Host, request id, five trace headers): one growth of
        // the map instead of several. (http's limit, 32,768 entries, is far above what the 64 KiB
        // header-list limit or hyper's 100 headers let in, so this cannot be refused in practice.)
        let _ = parts.headers.try_reserve(8);
        if let Some(a) = authority
            .as_deref()
            .and_then(|a| http::HeaderValue::from_str(a).ok())
        {
            parts.headers.insert(http::header::HOST, a);
        }
        // The server span: the caller's sidecar sent its client span as parent; a caller outside the
        // mesh gets a new trace started here. The app sees this span's context.
        let table = self.tables.borrow().clone();
        let hop = Hop::from_request(&parts.headers, table.tracing.sampling_percent);
        ensure_request_id(&mut parts.headers);
        hop.inject(&mut parts.headers);
        let span = (self.telemetry.tracer.enabled() && hop.sampled).then(|| {
            (
                parts.method.to_string(),
                parts.uri.path().to_owned(),
                authority.clone().unwrap_or_default(),
            )
        });
        let request_bytes = content_length(&parts.headers);
        let log = (self.telemetry.access_log != AccessLog::Off).then(|| {
            let h = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            (
                parts.method.to_string(),
                parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                h("x-forwarded-for"),
                h("user-agent"),
                h("x-request-id"),
            )
        });
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(conn.app_authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        let uri = http::Uri::from_parts(uri)
            .map_err(|_| ProxyError::BadRequest("unrepresentable request URI"))?;
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = parts.headers;
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        // Boxed so that this future (moved on every request) does not carry the exchange's state.
        let result = Box::pin(self.app.send(app_addr, out, h2_app))
            .await
            .map_err(|e| {
                tracing::debug!(%peer, error = %e, "app request failed");
                app_error(e)
            });
        let (code, flags) = match &result {
            Ok(r) => (r.status().as_u16(), "-"),
            Err(e) => (e.status().as_u16(), e.flag()),
        };
        let response_bytes = result
            .as_ref()
            .map(|r| content_length(r.headers()))
            .unwrap_or(0);
        let elapsed = start.elapsed().unwrap_or_default();
        let (metrics, access_log) = (&self.telemetry.metrics, self.telemetry.access_log);
        let host = authority.as_deref().map(|a| {
            crate::route::split_authority(a, app_port)
                .0
                .to_ascii_lowercase()
        });
        let service = host
            .as_deref()
            .and_then(|h| table.service_by_host(h))
            .map_or_else(|| self.unknown_service.clone(), |s| s.metric_labels.clone());
        metrics.record(RequestMetric {
            reporter: Reporter::Destination,
            source: source.clone(),
            destination: metrics.this_destination.clone(),
            service,
            code,
            mtls: caller.is_some(),
            duration: elapsed,
            request_bytes,
            response_bytes,
        });
        if let Some((method, full_path, xff, user_agent, request_id)) = &log {
            access_log.write(&LogEntry {
                start: Some(start),
                method,
                path: full_path,
                protocol: "HTTP/1.1",
                code,
                flags,
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
                duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                xff: xff.as_deref(),
                user_agent: user_agent.as_deref(),
                request_id: request_id.as_deref(),
                authority: authority.as_deref(),
                upstream_host: Some(app_addr.to_string()),
                upstream_cluster: Some(self.inbound_cluster(app_port).as_str()),
                downstream_remote: Some(peer.to_string()),
                route: Some("default"),
            });
        }
        if let Some((method, path, host)) = span {
            let status = code;
            let service: Arc<str> = if table.tracing.service_name.is_empty() {
                self.telemetry.pod_name.clone()
            } else {
                Arc::from(table.tracing.service_name.as_str())
            };
            let mut attributes = vec![
                ("http.request.method", method),
                ("url.path", path),
                ("server.address", host),
                ("server.port", app_port.to_string()),
            ];
            attributes.push(("weft.response_flags", flags.to_owned()));
            attributes.push((
                "weft.destination.workload",
                self.telemetry.pod_name.to_string(),
            ));
            if let Some(c) = caller {
                attributes.push(("weft.peer.identity", c.to_string()));
            }
            self.telemetry.tracer.record(Span {
                hop,
                name: format!("inbound|{app_port}"),
                kind: Kind::Server,
                service,
                start,
                end: SystemTime::now(),
                status,
                attributes,
            });
        }
        let mut resp = result?;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}

impl Inbound {
    /// An upgrade request (WebSocket and the like), its identity headers already set: sent to the
    /// app on a connection of its own, spliced with the caller's after `101`.
    async fn upgrade_app(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        protocol: http::HeaderValue,
        authority: Option<String>,
        app_port: u16,
    ) -> Result<Response<Body>, ProxyError> {
        let downstream = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(ProxyError::BadRequest("this connection cannot be upgraded"))?;
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        let app = TcpStream::connect(app_addr).await.map_err(|e| {
            app_error(crate::inbound::app::AppError::Connect {
                addr: app_addr,
                reason: e.to_string(),
            })
        })?;
        let headers = &mut parts.headers;
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        headers.insert(http::header::UPGRADE, protocol);
        if let Some(a) = authority
            .as_deref()
            .and_then(|a| http::HeaderValue::from_str(a).ok())
        {
            headers.insert(http::header::HOST, a);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = http::Uri::from(path);
        *req.headers_mut() = parts.headers;
        crate::http::tunnel::upgrade_over(app, req, downstream)
            .await
            .map_err(|e| {
                app_error(crate::inbound::app::AppError::Exchange {
                    addr: app_addr,
                    reason: e.to_string(),
                    reset: false,
                })
            })
    }
}

/// What a failed request to the app becomes. An HTTP/2 stream the app reset before its response
/// headers is Envoy's "upstream reset before headers" (503, flag UR); anything else is a failure to
/// reach the app (502, UF). The reason is the whole cause chain: hyper's own text for a reset is
/// only "http2 error", the reset's reason is in its source.
fn app_error(e: crate::inbound::app::AppError) -> ProxyError {
    use crate::inbound::app::AppError;
    match e {
        AppError::Exchange {
            reason,
            reset: true,
            ..
        } => ProxyError::UpstreamReset(reason),
        AppError::Connect { addr, reason } | AppError::Exchange { addr, reason, .. } => {
            ProxyError::Connect(crate::upstream::UpstreamError::Connect { addr, reason })
        }
    }
}
