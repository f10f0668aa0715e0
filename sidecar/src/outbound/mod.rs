//! The outbound listener: the pod's own requests, on their way out.
//!
//! Transparent mode: iptables redirected the connection here and `SO_ORIGINAL_DST` says where it was
//! going (a Service VIP:port, or a pod). Explicit mode: the app uses us as its HTTP proxy
//! (`http_proxy=http://127.0.0.1:15001`) and the absolute-form URI names the destination. Either way the
//! request then goes: Service → route (first match) → weighted destination → cluster → endpoint →
//! mTLS/HTTP/2 to the peer sidecar (or plaintext where policy says so). Every failure is answered by
//! `errors::rescue`.

pub mod mirror;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::http::body::empty_body;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::errors::{ProxyError, rescue};
use crate::http::body::Body;
use crate::http::h1::framing::{Findings, Guard, refused_body};
use crate::http::h1::server::{Outcome, Replay};
use crate::http::headers::{check_framing, strip_hop_by_hop};
use crate::listener::Edge;
use crate::outbound::mirror::Mirrors;
use crate::route::{Action, Cluster, Endpoint, RequestView, Route, RouteTable, TlsMode};
use crate::telemetry::trace::{Hop, Kind, Span, Tracer, ensure_request_id};
use crate::telemetry::{AccessLog, LogEntry, Metrics, Reporter, RequestMetric, content_length};
use crate::upstream::balance::{self, InFlight};
use crate::upstream::{UpstreamError, Upstreams};

/// Tells the peer sidecar (over mTLS only) that its app speaks HTTP/2 (gRPC, h2c).
pub const APP_PROTOCOL_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-weft-app-protocol");

/// How the outbound listener learns destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// iptables REDIRECT; destination from SO_ORIGINAL_DST.
    Transparent,
    /// HTTP proxy; destination from the request.
    Explicit,
}

/// Shared state of the outbound side.
#[derive(Debug)]
pub struct Outbound {
    /// Current config.
    pub tables: watch::Receiver<Arc<RouteTable>>,
    /// Upstream pools.
    pub upstreams: Arc<Upstreams>,
    /// Listener mode.
    pub mode: Mode,
    /// The proxy's own ports: a request aimed at them is a loop.
    pub own_ports: Vec<u16>,
    /// Mirroring.
    pub mirrors: Arc<Mirrors>,
    /// Span export.
    pub tracer: Tracer,
    /// Fallback `service.name` (the pod name) until pilot names the workload's service.
    pub pod_name: Arc<str>,
    /// Istio metrics.
    pub metrics: Arc<Metrics>,
    /// Access-log format.
    pub access_log: AccessLog,
    /// Metric labels for a destination that was never reached.
    pub unknown: crate::telemetry::Labels,
}

/// What an access-log line needs from the request head, captured before the head is consumed.
struct RequestLog {
    method: String,
    path: String,
    protocol: &'static str,
    xff: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
}

impl RequestLog {
    fn new(parts: &http::request::Parts) -> Self {
        let h = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            protocol: match parts.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            xff: h("x-forwarded-for"),
            user_agent: h("user-agent"),
            request_id: h("x-request-id"),
        }
    }
}

/// Accepts connections until the drain starts.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>, edge: Edge) {
    crate::listener::accept_loop("outbound", listener, edge, move |tcp, peer, edge| {
        connection(tcp, peer, outbound.clone(), edge)
    })
    .await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    outbound: Arc<Outbound>,
    edge: Edge,
) -> Result<(), String> {
    let edge = &edge;
    let _ = tcp.set_nodelay(true);
    let original_dst = match outbound.mode {
        Mode::Transparent => Some(crate::capture::original_dst(&tcp).map_err(|e| e.to_string())?),
        Mode::Explicit => None,
    };
    if let Some(dst) = original_dst
        && dst.ip().is_loopback()
        && outbound.own_ports.contains(&dst.port())
    {
        return Err(format!(
            "refusing a connection to the proxy's own port {dst}"
        ));
    }
    if let Some(dst) = original_dst
        && !is_http(&tcp, &outbound, dst).await
    {
        return outbound.forward_tcp(tcp, dst, edge).await;
    }
    let tcp = crate::telemetry::Counted::new(tcp, outbound.metrics.clone(), false);
    // Requests without a body are served without hyper; the first other request (or anything this
    // server does not parse) hands the connection to hyper.
    let served = crate::http::h1::server::serve(tcp, edge.bounds(), |req| {
        outbound.handle(req, original_dst, Some(peer))
    })
    .await
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            edge.stats
                .timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        e.to_string()
    })?;
    let (tcp, read) = match served {
        Outcome::Closed => return Ok(()),
        Outcome::HandOver(tcp, read) => (tcp, read),
    };
    // The request future is large (every local of `forward` that lives across an await): boxed,
    // hyper moves a pointer instead of copying kilobytes of future state on each request.
    let verdict = Arc::new(Findings::default());
    let judged = verdict.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (outbound, judged) = (outbound.clone(), judged.clone());
        Box::pin(async move {
            let req = req.map(crate::http::body::boxed);
            let resp = outbound.handle(req, original_dst, Some(peer)).await;
            Ok::<_, std::convert::Infallible>(refused_body(&judged).unwrap_or(resp))
        })
    });
    crate::listener::serve_hyper(
        TokioIo::new(Guard::new(Replay::new(tcp, read), verdict)),
        svc,
        edge,
        crate::upstream::H2_WINDOWS,
    )
    .await
}

/// Where an opaque stream to a Service port goes: an endpoint of its default cluster, with the identity
/// its sidecar must prove (none when TLS is disabled or the endpoint has no sidecar).
fn tcp_target(
    table: &RouteTable,
    svc: &crate::route::Service,
    port: &crate::route::ServicePort,
) -> Option<(SocketAddr, Option<weft_ca::SpiffeId>, Duration)> {
    let cluster = table.cluster(&format!("outbound|{}||{}", port.port, svc.hostname))?;
    let (_, e) = balance::pick(cluster, None)?;
    let identity = match cluster.tls {
        TlsMode::Disable => None,
        TlsMode::Auto | TlsMode::IstioMutual => e.identity.clone(),
    };
    Some((e.dial, identity, cluster.connect_timeout))
}

/// How long a captured connection may stay silent before it is taken for a server-first protocol,
/// and how long an incomplete first line may take before it is parsed as HTTP.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a captured connection carries HTTP: a Service port declared `tcp` never does; otherwise the
/// first bytes decide (Istio's protocol sniffing, by [`crate::http::sniff`]'s rule), and silence means a
/// server-first protocol.
async fn is_http(tcp: &TcpStream, outbound: &Outbound, dst: SocketAddr) -> bool {
    let declared_tcp = {
        let table = outbound.tables.borrow();
        table.by_vip(dst).is_some_and(|(_, p)| p.protocol == "tcp")
    };
    if declared_tcp {
        return false;
    }
    crate::http::sniff::peek_verdict(tcp, SNIFF_TIMEOUT).await
        == Some(crate::http::sniff::Verdict::Http)
}

impl Outbound {
    /// Carries a non-HTTP connection: to an endpoint of the Service whose VIP it was dialled at (mTLS
    /// to its sidecar), or straight to the original destination when that is not a Service (Istio's
    /// PassthroughCluster).
    async fn forward_tcp(
        &self,
        tcp: TcpStream,
        dst: SocketAddr,
        edge: &Edge,
    ) -> Result<(), String> {
        let target = {
            let table = self.tables.borrow();
            table
                .by_vip(dst)
                .and_then(|(svc, port)| tcp_target(&table, svc, port))
        };
        let (addr, identity, timeout) = target.unwrap_or((dst, None, Duration::from_secs(10)));
        let upstream = self
            .upstreams
            .connect_tcp(addr, identity.as_ref(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        let tcp = crate::telemetry::Counted::new(tcp, self.metrics.clone(), false);
        crate::listener::splice(tcp, upstream, edge)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// An HTTP/1.1 Upgrade (WebSocket and the like): HTTP/2 between sidecars cannot carry it, so the
    /// request goes over an opaque mTLS stream (ALPN `istio`) that the peer sidecar parses as HTTP again;
    /// after `101 Switching Protocols` both upgraded connections are spliced together.
    async fn upgrade(
        &self,
        mut parts: http::request::Parts,
        cluster: &Cluster,
        authority: &str,
    ) -> Result<Response<Body>, ProxyError> {
        let downstream = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(ProxyError::BadRequest("this connection cannot be upgraded"))?;
        let (_, endpoint) = balance::pick(cluster, None)
            .ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
        let identity = match cluster.tls {
            TlsMode::Disable => None,
            TlsMode::Auto | TlsMode::IstioMutual => endpoint.identity.as_ref(),
        };
        let stream = self
            .upstreams
            .connect_tcp(endpoint.dial, identity, cluster.connect_timeout)
            .await
            .map_err(ProxyError::Connect)?;
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut req = Request::new(empty_body());
        *req.method_mut() = parts.method;
        *req.headers_mut() = parts.headers;
        *req.uri_mut() = path
            .parse()
            .map_err(|_| ProxyError::BadRequest("unrepresentable request URI"))?;
        if let Ok(v) = http::HeaderValue::from_str(authority) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        crate::http::tunnel::upgrade_over(stream, req, downstream)
            .await
            .map_err(|e| {
                ProxyError::Connect(UpstreamError::Http {
                    addr: endpoint.dial,
                    reason: e.to_string(),
                })
            })
    }

    /// `CONNECT host:port` (explicit mode): a TCP tunnel to an endpoint of that Service (mTLS to its
    /// sidecar) or, for a host that is not a Service, to the host itself.
    async fn connect(
        &self,
        mut req: Request<Body>,
        table: &RouteTable,
    ) -> Result<Response<Body>, ProxyError> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
        let target = table
            .by_authority(&authority, 443)
            .and_then(|(svc, port)| tcp_target(table, svc, port));
        let (addr, identity, timeout) = match target {
            Some(t) => t,
            None => {
                let addr = tokio::net::lookup_host(&authority)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| ProxyError::NoService(authority.clone()))?;
                (addr, None, Duration::from_secs(10))
            }
        };
        let upstream = self
            .upstreams
            .connect_tcp(addr, identity.as_ref(), timeout)
            .await
            .map_err(ProxyError::Connect)?;
        let downstream = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(down) = downstream.await {
                let _ = upstream.splice(&mut TokioIo::new(down)).await;
            }
        });
        Ok(Response::new(empty_body()))
    }

    fn service_name(&self, table: &RouteTable) -> Arc<str> {
        if table.tracing.service_name.is_empty() {
            self.pod_name.clone()
        } else {
            Arc::from(table.tracing.service_name.as_str())
        }
    }

    /// Handles one request end to end; never fails (errors become responses).
    pub async fn handle(
        &self,
        req: Request<Body>,
        original_dst: Option<SocketAddr>,
        downstream: Option<SocketAddr>,
    ) -> Response<Body> {
        match self.forward(req, original_dst, downstream).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "outbound request failed");
                rescue(&e)
            }
        }
    }

    async fn forward(
        &self,
        req: Request<Body>,
        original_dst: Option<SocketAddr>,
        downstream: Option<SocketAddr>,
    ) -> Result<Response<Body>, ProxyError> {
        check_framing(req.headers()).map_err(ProxyError::BadRequest)?;
        // One Arc clone; never held across anything but this request.
        let table = self.tables.borrow().clone();
        if req.method() == http::Method::CONNECT {
            // Boxed, like the other rare paths below: an inline future would make every request's
            // future (copied on each move) as large as the largest path.
            return Box::pin(self.connect(req, &table)).await;
        }
        let authority = request_authority(&req).ok_or(ProxyError::BadRequest("no Host"))?;
        let found = match original_dst {
            Some(dst) => table
                .by_vip(dst)
                .or_else(|| table.by_authority(&authority, dst.port())),
            None => table.by_authority(&authority, 80),
        };
        let Some((service, port)) = found else {
            if table.version.is_empty() {
                return Err(ProxyError::NoConfig);
            }
            return Err(ProxyError::NoService(authority));
        };
        let route = {
            let view = RequestView {
                method: req.method().as_str(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
            };
            port.route(&view).ok_or(ProxyError::NoRoute)?
        };
        if let Some(fault) = &route.fault {
            if let Some((delay, pct)) = fault.delay
                && roll(pct)
            {
                Box::pin(tokio::time::sleep(delay)).await;
            }
            if let Some((status, pct)) = fault.abort
                && roll(pct)
            {
                return Err(ProxyError::FaultAbort(status));
            }
        }
        let dest = match &route.action {
            Action::Redirect(r) => return Ok(redirect(r, &authority, req.uri())),
            Action::Forward { total_weight, .. } => route
                .pick(fastrand::u32(..*total_weight))
                .ok_or(ProxyError::NoRoute)?,
        };
        let start = SystemTime::now();
        let (mut parts, mut body) = req.into_parts();
        if crate::http::tunnel::is_upgrade(&parts.headers) {
            return Box::pin(self.upgrade(parts, &dest.cluster, &authority)).await;
        }
        strip_hop_by_hop(&mut parts.headers);
        apply_route_headers(route, &dest.request_headers, &mut parts.headers);
        let authority = match route.rewrite.as_ref().and_then(|r| r.authority.clone()) {
            Some(a) => a,
            None => authority,
        };
        let path = rewrite_path(route, &parts.uri)?;
        // This hop's client span: continue the caller's trace or start one, and tell the next hop.
        let hop = Hop::from_request(&parts.headers, table.tracing.sampling_percent);
        ensure_request_id(&mut parts.headers);
        let service_name: Arc<str> = self.service_name(&table);
        if !route.mirrors.is_empty() {
            let copies = self.mirrors.prepare(
                route,
                &parts,
                &authority,
                path.as_str(),
                &hop,
                table.mirror_shadow_suffix,
            );
            if !copies.is_empty() {
                if body.is_end_stream() {
                    self.mirrors
                        .send(copies, Bytes::new(), &self.tracer, &service_name);
                } else {
                    body = self.mirrors.tee(body, copies, &self.tracer, &service_name);
                }
            }
        }
        if port.protocol == "grpc" || port.protocol == "http2" {
            // The peer's sidecar talks to its app in HTTP/1.1 unless told the app speaks HTTP/2
            // (Istio's protocol selection: port name or appProtocol).
            parts
                .headers
                .insert(APP_PROTOCOL_HEADER, http::HeaderValue::from_static("h2"));
        }
        let method = self.tracer.enabled().then(|| parts.method.to_string());
        let request_bytes = content_length(&parts.headers);
        let log = (self.access_log != AccessLog::Off).then(|| RequestLog::new(&parts));
        let next = NextHop {
            authority: &authority,
            path: &path,
            hop: &hop,
        };
        // Boxed: inline, the send future would sit in this one (and be copied with it) up to three
        // times: as a local, as the timeout's argument and inside the timeout.
        let sent = Box::pin(self.send(&dest.cluster, route, parts, body, &next));
        let result = match route.timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .map_err(|_| ProxyError::Timeout(t))
                .and_then(|r| r),
            None => sent.await,
        };
        let endpoint = result
            .as_ref()
            .ok()
            .and_then(|(_, idx, _)| dest.cluster.endpoints.get(*idx));
        let (code, flags) = match &result {
            Ok((r, _, _)) => (r.status().as_u16(), "-"),
            Err(e) => (e.status().as_u16(), e.flag()),
        };
        let response_bytes = result
            .as_ref()
            .map(|(r, _, _)| content_length(r.headers()))
            .unwrap_or(0);
        let elapsed = start.elapsed().unwrap_or_default();
        self.metrics.record(RequestMetric {
            reporter: Reporter::Source,
            source: self.metrics.this_source.clone(),
            destination: endpoint.map_or_else(|| self.unknown.clone(), |e| e.metric_labels.clone()),
            service: dest.cluster.metric_labels.clone(),
            code,
            mtls: result.as_ref().is_ok_and(|(_, _, mtls)| *mtls),
            duration: elapsed,
            request_bytes,
            response_bytes,
        });
        if let Some(log) = log {
            self.access_log.write(&LogEntry {
                start: Some(start),
                method: &log.method,
                path: &log.path,
                protocol: log.protocol,
                code,
                flags,
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
                duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                xff: log.xff.as_deref(),
                user_agent: log.user_agent.as_deref(),
                request_id: log.request_id.as_deref(),
                authority: Some(&authority),
                upstream_host: endpoint.map(|e| e.dial.to_string()),
                upstream_cluster: Some(&dest.cluster.name),
                downstream_remote: downstream.map(|d| d.to_string()),
                route: Some(&route.name),
            });
        }
        if let Some(method) = method
            && hop.sampled
        {
            let status = code;
            self.tracer.record(Span {
                hop,
                name: format!("{}:{}/*", service.hostname, port.port),
                kind: Kind::Client,
                service: service_name,
                start,
                end: SystemTime::now(),
                status,
                attributes: vec![
                    ("http.request.method", method),
                    ("url.path", path.as_str().to_owned()),
                    ("server.address", authority),
                    ("weft.route", route.name.clone()),
                    ("weft.upstream_cluster", dest.cluster.name.clone()),
                    ("weft.subset", dest.cluster.subset.clone()),
                    ("weft.response_flags", flags.to_owned()),
                    ("weft.source.workload", self.pod_name.to_string()),
                    (
                        "weft.destination.workload",
                        endpoint.map_or_else(|| "unknown".to_owned(), |e| e.workload.clone()),
                    ),
                ],
            });
        }
        let (mut resp, _, _) = result?;
        strip_hop_by_hop(resp.headers_mut());
        route.response_headers.apply(resp.headers_mut());
        dest.response_headers.apply(resp.headers_mut());
        Ok(resp)
    }

    /// Sends to an endpoint of `cluster`. Connection and TLS failures (which happen before the
    /// request is committed, so the body is still in hand) are retried on another endpoint, up to the
    /// route's retry attempts; once sent, the outcome is final (a streamed body cannot be replayed).
    async fn send(
        &self,
        cluster: &Cluster,
        route: &Route,
        mut parts: http::request::Parts,
        mut body: Body,
        next: &NextHop<'_>,
    ) -> Result<(Response<Body>, usize, bool), ProxyError> {
        let attempts = 1 + route.retries.as_ref().map_or(0, |r| r.attempts);
        let mut skip = None;
        let mut last_err = None;
        // A request a draining peer never saw is tried again without using up an attempt, once.
        let (mut tries, mut requeued) = (0, false);
        while tries < attempts {
            tries += 1;
            let (idx, endpoint) = balance::pick(cluster, skip)
                .ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
            let _in_flight = InFlight::new(endpoint);
            let identity = match cluster.tls {
                TlsMode::Disable => None,
                TlsMode::Auto | TlsMode::IstioMutual => endpoint.identity.as_ref(),
            };
            let Some(identity) = identity else {
                let req = build_request(parts, body, next, endpoint, false)?;
                return Box::pin(self.upstreams.send_plain(endpoint.dial, req))
                    .await
                    .map(|r| (r, idx, false))
                    .map_err(ProxyError::Connect);
            };
            match self
                .upstreams
                .h2_sender(endpoint.dial, identity, cluster.connect_timeout)
                .await
            {
                Ok(sender) => {
                    let req = build_request(parts, body, next, endpoint, true)?;
                    match Upstreams::send_h2(sender, endpoint.dial, req).await {
                        Ok(r) => return Ok((r, idx, true)),
                        Err(Err(e)) => return Err(ProxyError::Connect(e)),
                        // The peer is draining (GOAWAY) and the request never left: it goes to a
                        // new connection, or another endpoint, like a failed connect.
                        Err(Ok(unsent)) => {
                            tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.dial, "peer going away; trying again");
                            (parts, body) = unsent.into_parts();
                            if !requeued {
                                requeued = true;
                                tries -= 1;
                            }
                            last_err = Some(UpstreamError::Http {
                                addr: endpoint.dial,
                                reason: "peer is going away".into(),
                            });
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "connect failed; trying another endpoint");
                    skip = Some(idx);
                    last_err = Some(e);
                }
            }
        }
        Err(ProxyError::Connect(last_err.unwrap_or(
            UpstreamError::Http {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                reason: "no attempt made".into(),
            },
        )))
    }
}

fn roll(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

/// The request's authority: absolute-form URI first (explicit proxy), then Host.
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
}

fn apply_route_headers(
    route: &Route,
    dest: &crate::route::HeaderOps,
    headers: &mut http::HeaderMap,
) {
    if !route.request_headers.is_empty() {
        route.request_headers.apply(headers);
    }
    if !dest.is_empty() {
        dest.apply(headers);
    }
}

/// The path (and query) to send upstream: the request's own (shared, not copied) unless the route
/// rewrites it.
fn rewrite_path(route: &Route, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let Some(new) = route.rewrite.as_ref().and_then(|r| r.uri.as_deref()) else {
        return Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    };
    PathAndQuery::try_from(rewritten(route, new, uri))
        .map_err(|_| ProxyError::BadRequest("unrepresentable rewritten path"))
}

fn rewritten(route: &Route, new: &str, uri: &Uri) -> String {
    // Replace the matched prefix if a prefix match selected the route, else the whole path.
    let path = uri.path();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    for m in &route.matches {
        if let Some(crate::route::StringMatch::Prefix(p)) = &m.uri
            && let Some(rest) = path.strip_prefix(p.as_str())
        {
            return format!("{new}{rest}{query}");
        }
    }
    format!("{new}{query}")
}

/// What the upstream request says beyond the caller's head: where it goes and its trace context.
#[derive(Clone, Copy)]
struct NextHop<'a> {
    authority: &'a str,
    path: &'a PathAndQuery,
    hop: &'a Hop,
}

/// Builds the upstream request, moving the head (no per-request copy of the headers): it runs once,
/// after the connection is ready, so connect retries never need the head twice.
fn build_request(
    parts: http::request::Parts,
    body: Body,
    next: &NextHop<'_>,
    endpoint: &Endpoint,
    h2: bool,
) -> Result<Request<Body>, ProxyError> {
    let NextHop {
        authority,
        path,
        hop,
    } = *next;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.headers_mut() = parts.headers;
    let authority = if h2 {
        // HTTP/2 to the peer sidecar: :authority carries the original host; Host would be redundant.
        req.headers_mut().remove(http::header::HOST);
        hop.inject_mesh(req.headers_mut());
        *req.version_mut() = http::Version::HTTP_2;
        Authority::try_from(authority)
    } else {
        // HTTP/1.1 straight to the endpoint: dial its address, keep the caller's Host; the hint is
        // for a peer sidecar only.
        req.headers_mut().remove(APP_PROTOCOL_HEADER);
        hop.inject(req.headers_mut());
        if let Ok(v) = http::HeaderValue::from_str(authority) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        Authority::try_from(endpoint.dial.to_string())
    }
    .map_err(|_| ProxyError::BadRequest("unrepresentable request authority"))?;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path.clone());
    *req.uri_mut() =
        Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("unrepresentable request URI"))?;
    Ok(req)
}

fn redirect(r: &crate::route::Redirect, authority: &str, uri: &Uri) -> Response<Body> {
    let (host, port) = crate::route::split_authority(authority, 80);
    let host = r.authority.as_deref().unwrap_or(host);
    let port = r.port.unwrap_or(port);
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let path = r
        .uri
        .as_deref()
        .unwrap_or_else(|| uri.path_and_query().map_or("/", |p| p.as_str()));
    let default_port = if scheme == "https" { 443 } else { 80 };
    let location = if port == default_port {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    };
    let mut resp = Response::new(empty_body());
    *resp.status_mut() =
        http::StatusCode::from_u16(r.code).unwrap_or(http::StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = http::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}
