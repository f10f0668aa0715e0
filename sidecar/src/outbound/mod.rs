//! The outbound listener: the pod's own requests, on their way out.
//!
//! Transparent mode: iptables redirected the connection here and `SO_ORIGINAL_DST` says where it was
//! going (a Service VIP:port, or a pod). Explicit mode: the app uses us as its HTTP proxy
//! (`http_proxy=http://127.0.0.1:15001`) and the absolute-form URI names the destination.
//!
//! A request then goes through these stages, in this order, each in the module of its name:
//! [`select`] (Service, then the first matching route) → [`fault`] (injected delay or abort) →
//! [`rewrite`] (redirect, weighted destination, header operations, path and authority) → the
//! trace context → [`mirror`] (copies, with the `-shadow` host) → [`send`] (pool limits, balancing,
//! outlier ejection, retries, the connection). One [`Record`] follows it and feeds metrics, access
//! log and span when it ends; every failure is answered by `errors::rescue`. Opaque TCP, `CONNECT`
//! and upgrades take [`opaque`].

pub mod fault;
pub mod mirror;
pub mod opaque;
pub mod rewrite;
pub mod select;
pub mod send;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::errors::refused_body;
use crate::errors::{ProxyError, rescue};
use crate::http::body::Body;
use crate::http::h1::framing::{Findings, Guard};
use crate::http::h1::server::{Outcome, Replay};
use crate::http::headers::{check_framing, strip_hop_by_hop};
use crate::listener::Edge;
use crate::outbound::mirror::Mirrors;
use crate::snapshot::{Snapshot, Snapshots};
use crate::telemetry::Reporter;
use crate::telemetry::record::{Flags, Record, Sinks, SpanFacts};
use crate::telemetry::span_tags;
use crate::telemetry::trace::{Hop, ensure_request_id};
use crate::upstream::Upstreams;

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
    pub snapshots: Snapshots,
    /// Upstream pools.
    pub upstreams: Arc<Upstreams>,
    /// Listener mode.
    pub mode: Mode,
    /// The proxy's own ports: a request aimed at them is a loop.
    pub own_ports: Vec<u16>,
    /// Mirroring.
    pub mirrors: Arc<Mirrors>,
    /// Metrics, access log, spans.
    pub sinks: Sinks,
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
        return opaque::forward_tcp(&outbound, tcp, dst, edge).await;
    }
    // Not counted into `istio_tcp_*`: Istio counts opaque TCP there, and HTTP per request.
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

/// How long a captured connection may stay silent before it is taken for a server-first protocol,
/// and how long an incomplete first line may take before it is parsed as HTTP.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a captured connection carries HTTP: a Service port declared `tcp` never does; otherwise the
/// first bytes decide (Istio's protocol sniffing, by [`crate::http::sniff`]'s rule), and silence means a
/// server-first protocol.
async fn is_http(tcp: &TcpStream, outbound: &Outbound, dst: SocketAddr) -> bool {
    let declared_tcp = {
        let snapshot = outbound.snapshots.borrow();
        snapshot
            .routes
            .by_vip(dst)
            .is_some_and(|(_, p)| p.protocol == "tcp")
    };
    if declared_tcp {
        return false;
    }
    crate::http::sniff::peek_verdict(tcp, SNIFF_TIMEOUT).await
        == Some(crate::http::sniff::Verdict::Http)
}

impl Outbound {
    /// Handles one request end to end; never fails (errors become responses).
    pub async fn handle(
        &self,
        req: Request<Body>,
        original_dst: Option<SocketAddr>,
        downstream: Option<SocketAddr>,
    ) -> Response<Body> {
        // One Arc clone; never held across anything but this request.
        let snapshot = self.snapshots.borrow().clone();
        let (parts, body) = req.into_parts();
        let mut record = Record::start(Reporter::Source, &self.sinks, &parts);
        record.downstream = downstream;
        record.source = Some(self.sinks.metrics.this_source.clone());
        let result = self
            .forward(
                &snapshot,
                Request::from_parts(parts, body),
                original_dst,
                &mut record,
            )
            .await;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "outbound request failed");
                record.flags.set(e.flag());
                rescue(&e)
            }
        };
        if record.flags.contains(Flags::UO) {
            resp.headers_mut().insert(
                crate::http::headers::X_ENVOY_OVERLOADED,
                http::HeaderValue::from_static("true"),
            );
        }
        record.answer(resp)
    }

    /// The stages, in order.
    async fn forward<'s>(
        &self,
        snapshot: &'s Snapshot,
        req: Request<Body>,
        original_dst: Option<SocketAddr>,
        record: &mut Record<'s>,
    ) -> Result<Response<Body>, ProxyError> {
        check_framing(req.headers()).map_err(ProxyError::BadRequest)?;
        if req.method() == http::Method::CONNECT {
            // Boxed, like the other rare paths below: an inline future would make every request's
            // future (copied on each move) as large as the largest path.
            return Box::pin(opaque::connect(self, req, snapshot)).await;
        }
        let target = select::target(&snapshot.routes, &req, original_dst)?;
        record.route = Some(&target.route.name);
        record.service = snapshot.labels.service(target.service.index).cloned();
        fault::inject(target.route.fault.as_ref(), record).await?;
        let dest = match rewrite::destination(target.route, &target.authority, req.uri())? {
            rewrite::Destination::Redirect(resp) => return Ok(resp),
            rewrite::Destination::Forward(dest) => dest,
        };
        record.cluster = Some(&dest.cluster.name);
        record.service = snapshot.labels.cluster(dest.cluster.index).cloned();
        let (mut parts, mut body) = req.into_parts();
        if crate::http::tunnel::is_upgrade(&parts.headers) {
            return Box::pin(opaque::upgrade(
                self,
                snapshot,
                parts,
                &dest.cluster,
                &target.authority,
            ))
            .await;
        }
        strip_hop_by_hop(&mut parts.headers);
        rewrite::request_headers(target.route, dest, &mut parts.headers);
        let authority = rewrite::authority(target.route, target.authority);
        let path = rewrite::path(target.route, &parts.uri)?;
        // This hop's client span: continue the caller's trace or start one, and tell the next hop.
        let hop = Hop::from_request(&parts.headers, snapshot.routes.tracing.sampling_percent);
        ensure_request_id(&mut parts.headers);
        record.note_request_id(&parts.headers);
        let service_name = self.sinks.service_name(&snapshot.routes);
        if self.sinks.tracer.enabled() && hop.sampled {
            let mut attributes = span_tags::request(&parts, &authority, path.as_str());
            attributes.push(("weft.route", target.route.name.clone().into()));
            attributes.push(("weft.subset", dest.cluster.subset.clone().into()));
            record.span = Some(Box::new(SpanFacts {
                hop,
                name: span_tags::operation(&target.service.hostname, target.port.port),
                service: service_name.clone(),
                attributes,
                trace_state: span_tags::trace_state(&parts.headers),
            }));
        }
        // Shadow-diff's primary side, when a mirror of the route compares (None otherwise: nothing
        // is allocated for it).
        let mut probe = None;
        if !target.route.mirrors.is_empty() {
            let hold_span = record.span.is_some();
            body = mirror::start(
                &self.mirrors,
                snapshot,
                target.route,
                &parts,
                body,
                mirror::Primary {
                    authority: &authority,
                    path: path.as_str(),
                    hop: &hop,
                    service: &dest.cluster.service_hostname,
                    hold_span,
                },
                &self.sinks.tracer,
                &service_name,
                &mut probe,
            );
            if let Some(p) = &mut probe {
                record.span_hold = p.take_span_hold();
            }
        }
        if target.port.protocol == "grpc" || target.port.protocol == "http2" {
            // The peer's sidecar talks to its app in HTTP/1.1 unless told the app speaks HTTP/2
            // (Istio's protocol selection: port name or appProtocol).
            parts
                .headers
                .insert(APP_PROTOCOL_HEADER, http::HeaderValue::from_static("h2"));
        }
        record.authority = Some(authority);
        let authority = record.authority.as_deref().unwrap_or_default();
        let next = send::NextHop {
            authority,
            path: &path,
            hop: &hop,
        };
        // Boxed: inline, the send future would sit in this one (and be copied with it) up to three
        // times: as a local, as the timeout's argument and inside the timeout.
        let sent = Box::pin(send::send(
            &self.upstreams,
            snapshot,
            &dest.cluster,
            target.route,
            parts,
            body,
            &next,
        ));
        let outcome = match target.route.timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or_else(|_| send::Outcome::failed(ProxyError::Timeout(t))),
            None => sent.await,
        };
        outcome.report(snapshot, &dest.cluster, record);
        let mut resp = outcome.result?;
        if let Some(probe) = probe {
            // The answer as the upstream gave it, before this route's response header operations
            // (the copy's answer never gets them).
            resp = probe.observe(resp);
        }
        strip_hop_by_hop(resp.headers_mut());
        rewrite::response_headers(target.route, dest, resp.headers_mut());
        Ok(resp)
    }
}
