//! Stage 3: what the request becomes. A redirect rule answers here; otherwise a weighted
//! destination is picked and the route's and destination's header operations, the path rewrite and
//! the authority rewrite apply. The response's header operations run on the way back.

use http::uri::PathAndQuery;
use http::{Response, Uri};

use crate::errors::ProxyError;
use crate::http::body::{Body, empty_body};
use crate::route::{Action, Redirect, Route, StringMatch, WeightedCluster, split_authority};

/// Where the request goes.
#[derive(Debug)]
pub enum Destination<'r> {
    /// The route redirects: this is the answer.
    Redirect(Response<Body>),
    /// The weighted destination picked.
    Forward(&'r WeightedCluster),
}

/// Answers a redirect rule, or picks the weighted destination.
pub fn destination<'r>(
    route: &'r Route,
    authority: &str,
    uri: &Uri,
) -> Result<Destination<'r>, ProxyError> {
    match &route.action {
        Action::Redirect(r) => Ok(Destination::Redirect(redirect(r, authority, uri))),
        Action::Forward { total_weight, .. } => route
            .pick(fastrand::u32(..*total_weight))
            .map(Destination::Forward)
            .ok_or(ProxyError::NoRoute),
    }
}

/// The route's request header operations, then the destination's.
pub fn request_headers(route: &Route, dest: &WeightedCluster, headers: &mut http::HeaderMap) {
    if !route.request_headers.is_empty() {
        route.request_headers.apply(headers);
    }
    if !dest.request_headers.is_empty() {
        dest.request_headers.apply(headers);
    }
}

/// The route's response header operations, then the destination's.
pub fn response_headers(route: &Route, dest: &WeightedCluster, headers: &mut http::HeaderMap) {
    route.response_headers.apply(headers);
    dest.response_headers.apply(headers);
}

/// The authority to send: the rewrite's, or the caller's.
pub fn authority(route: &Route, caller: String) -> String {
    match route.rewrite.as_ref().and_then(|r| r.authority.clone()) {
        Some(a) => a,
        None => caller,
    }
}

/// The path (and query) to send upstream: the request's own (shared, not copied) unless the route
/// rewrites it.
pub fn path(route: &Route, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
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
        if let Some(StringMatch::Prefix(p)) = &m.uri
            && let Some(rest) = path.strip_prefix(p.as_str())
        {
            return format!("{new}{rest}{query}");
        }
    }
    format!("{new}{query}")
}

fn redirect(r: &Redirect, authority: &str, uri: &Uri) -> Response<Body> {
    let (host, port) = split_authority(authority, 80);
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
