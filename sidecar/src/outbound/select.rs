//! Stage 1: which Service and route a request is for. The Service comes from the connection's
//! original destination (a Service VIP) or the request's authority; the route is the Service port's
//! first whose match holds (`route::matching`).

use std::net::SocketAddr;

use http::Request;

use crate::errors::ProxyError;
use crate::route::{RequestView, Route, RouteTable, Service, ServicePort};

/// What the request is for.
#[derive(Debug)]
pub struct Target<'t> {
    /// The Service.
    pub service: &'t Service,
    /// Its port.
    pub port: &'t ServicePort,
    /// The route that matched.
    pub route: &'t Route,
    /// The request's authority as the caller wrote it.
    pub authority: String,
}

/// Finds the Service and route of `req`.
pub fn target<'t, B>(
    table: &'t RouteTable,
    req: &Request<B>,
    original_dst: Option<SocketAddr>,
) -> Result<Target<'t>, ProxyError> {
    let authority = request_authority(req).ok_or(ProxyError::BadRequest("no Host"))?;
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
    let view = RequestView {
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let route = port.route(&view).ok_or(ProxyError::NoRoute)?;
    Ok(Target {
        service,
        port,
        route,
        authority,
    })
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
