//! What the outbound side carries without routing it as HTTP: opaque TCP to a Service or the
//! original destination, `CONNECT` tunnels (explicit mode) and HTTP/1.1 upgrades (WebSocket).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Outbound;
use crate::errors::ProxyError;
use crate::http::body::{Body, empty_body};
use crate::listener::Edge;
use crate::route::{Cluster, Service, ServicePort};
use crate::snapshot::Snapshot;
use crate::upstream::UpstreamError;
use crate::upstream::balance;
use crate::upstream::limits::Limits;

/// Where an opaque stream to a Service port goes: an endpoint of its default cluster, with the identity
/// its sidecar must prove (none when TLS is disabled or the endpoint has no sidecar).
/// Where an opaque stream goes, and the pool limits of its cluster.
type TcpTarget = (
    SocketAddr,
    Option<weft_ca::SpiffeId>,
    Duration,
    Option<Arc<Limits>>,
);

fn tcp_target(snapshot: &Snapshot, svc: &Service, port: &ServicePort) -> Option<TcpTarget> {
    let cluster = snapshot
        .routes
        .cluster(&format!("outbound|{}||{}", port.port, svc.hostname))?;
    let state = snapshot.upstream.cluster(cluster.index)?;
    let (_, e) = balance::pick(cluster, state, None)?;
    let identity = cluster.peer_identity(e).cloned();
    Some((
        e.dial,
        identity,
        cluster.connect_timeout,
        Some(state.limits.clone()),
    ))
}

/// Carries a non-HTTP connection: to an endpoint of the Service whose VIP it was dialled at (mTLS
/// to its sidecar), or straight to the original destination when that is not a Service (Istio's
/// PassthroughCluster).
pub(super) async fn forward_tcp(
    outbound: &Outbound,
    tcp: TcpStream,
    dst: SocketAddr,
    edge: &Edge,
) -> Result<(), String> {
    let target = {
        let snapshot = outbound.snapshots.borrow();
        snapshot
            .routes
            .by_vip(dst)
            .and_then(|(svc, port)| tcp_target(&snapshot, svc, port))
    };
    let (addr, identity, timeout, limits) =
        target.unwrap_or((dst, None, Duration::from_secs(10), None));
    // An opaque connection takes a place in its cluster's pool for its whole life
    // (`tcp.maxConnections`); over the bound it waits in the pending queue, or is closed at once.
    let _admitted = match limits.filter(|l| !l.is_unlimited()) {
        Some(limits) => Some(
            limits
                .admit()
                .await
                .map_err(|_| format!("connection pool of {addr}'s cluster is full (UO)"))?,
        ),
        None => None,
    };
    let upstream = outbound
        .upstreams
        .connect_tcp(addr, identity.as_ref(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    let tcp = crate::telemetry::Counted::new(tcp, outbound.sinks.metrics.clone(), false);
    crate::listener::splice(tcp, upstream, edge)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An HTTP/1.1 Upgrade (WebSocket and the like): HTTP/2 between sidecars cannot carry it, so the
/// request goes over an opaque mTLS stream (ALPN `istio`) that the peer sidecar parses as HTTP again;
/// after `101 Switching Protocols` both upgraded connections are spliced together.
pub(super) async fn upgrade(
    outbound: &Outbound,
    snapshot: &Snapshot,
    mut parts: http::request::Parts,
    cluster: &Cluster,
    authority: &str,
) -> Result<Response<Body>, ProxyError> {
    let downstream = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(ProxyError::BadRequest("this connection cannot be upgraded"))?;
    let state = snapshot
        .upstream
        .cluster(cluster.index)
        .ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
    let (_, endpoint) = balance::pick(cluster, state, None)
        .ok_or_else(|| ProxyError::NoEndpoint(cluster.name.clone()))?;
    let identity = cluster.peer_identity(endpoint);
    let stream = outbound
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
pub(super) async fn connect(
    outbound: &Outbound,
    mut req: Request<Body>,
    snapshot: &Snapshot,
) -> Result<Response<Body>, ProxyError> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    let target = snapshot
        .routes
        .by_authority(&authority, 443)
        .and_then(|(svc, port)| tcp_target(snapshot, svc, port));
    let (addr, identity, timeout) = match target {
        Some((addr, identity, timeout, _)) => (addr, identity, timeout),
        None => {
            let addr = tokio::net::lookup_host(&authority)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ProxyError::NoService(authority.clone()))?;
            (addr, None, Duration::from_secs(10))
        }
    };
    let upstream = outbound
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
