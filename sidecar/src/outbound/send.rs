//! Stage 5: the request leaves. An endpoint of the cluster is picked (`upstream::balance`), the
//! pooled connection to it taken (`upstream`), and the request sent; connect and TLS failures,
//! which happen before the request is committed, are tried again on another endpoint.

use std::net::SocketAddr;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};

use crate::errors::ProxyError;
use crate::http::body::Body;
use crate::outbound::APP_PROTOCOL_HEADER;
use crate::route::{Cluster, Endpoint, Route, TlsMode};
use crate::snapshot::Snapshot;
use crate::telemetry::record::{Flags, Record};
use crate::telemetry::trace::Hop;
use crate::upstream::balance::{self, InFlight};
use crate::upstream::{UpstreamError, Upstreams};

/// What the upstream request says beyond the caller's head: where it goes and its trace context.
#[derive(Clone, Copy, Debug)]
pub struct NextHop<'a> {
    /// `:authority` / Host.
    pub authority: &'a str,
    /// Path and query.
    pub path: &'a PathAndQuery,
    /// The trace context to pass on.
    pub hop: &'a Hop,
}

/// How the request ended upstream.
#[derive(Debug)]
pub struct Outcome {
    /// The response, or why there is none.
    pub result: Result<Response<Body>, ProxyError>,
    /// The endpoint (index in the cluster) the last try went to.
    endpoint: Option<usize>,
    /// Whether the last try was mTLS.
    mtls: bool,
    /// Flags beyond the error's own.
    flags: Flags,
}

impl Outcome {
    /// An outcome without any try (the route timeout fired first, or nothing could be tried).
    pub fn failed(e: ProxyError) -> Self {
        Self {
            result: Err(e),
            endpoint: None,
            mtls: false,
            flags: Flags::default(),
        }
    }

    /// Puts what the request learnt upstream into its record.
    pub fn report<'s>(
        &self,
        snapshot: &'s Snapshot,
        cluster: &'s Cluster,
        record: &mut Record<'s>,
    ) {
        record.flags.set(self.flags);
        record.mtls = self.mtls;
        if let Some(idx) = self.endpoint {
            record.upstream_host = cluster.endpoints.get(idx).map(|e| e.dial);
            record.destination = snapshot.labels.endpoint(cluster.index, idx).cloned();
            if let Some(e) = cluster.endpoints.get(idx) {
                record.attribute("weft.destination.workload", || e.workload.clone());
            }
        }
    }
}

/// Sends to an endpoint of `cluster`. Connection and TLS failures (which happen before the
/// request is committed, so the body is still in hand) are retried on another endpoint, up to the
/// route's retry attempts; once sent, the outcome is final (a streamed body cannot be replayed).
pub async fn send(
    upstreams: &Upstreams,
    snapshot: &Snapshot,
    cluster: &Cluster,
    route: &Route,
    mut parts: http::request::Parts,
    mut body: Body,
    next: &NextHop<'_>,
) -> Outcome {
    let Some(state) = snapshot.upstream.cluster(cluster.index) else {
        return Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    let attempts = 1 + route.retries.as_ref().map_or(0, |r| r.attempts);
    let mut skip = None;
    let mut last_err = None;
    // A request a draining peer never saw is tried again without using up an attempt, once.
    let (mut tries, mut requeued) = (0, false);
    while tries < attempts {
        tries += 1;
        let Some((idx, endpoint)) = balance::pick(cluster, state, skip) else {
            return Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone()));
        };
        let _in_flight = InFlight::new(state, idx);
        let identity = match cluster.tls {
            TlsMode::Disable => None,
            TlsMode::Auto | TlsMode::IstioMutual => endpoint.identity.as_ref(),
        };
        let Some(identity) = identity else {
            let result = match build_request(parts, body, next, endpoint, false) {
                Ok(req) => Box::pin(upstreams.send_plain(endpoint.dial, req))
                    .await
                    .map_err(ProxyError::Connect),
                Err(e) => Err(e),
            };
            return Outcome {
                result,
                endpoint: Some(idx),
                mtls: false,
                flags: Flags::default(),
            };
        };
        match upstreams
            .h2_sender(endpoint.dial, identity, cluster.connect_timeout)
            .await
        {
            Ok(sender) => {
                let req = match build_request(parts, body, next, endpoint, true) {
                    Ok(req) => req,
                    Err(e) => return Outcome::failed(e),
                };
                match Upstreams::send_h2(sender, endpoint.dial, req).await {
                    Ok(r) => {
                        return Outcome {
                            result: Ok(r),
                            endpoint: Some(idx),
                            mtls: true,
                            flags: Flags::default(),
                        };
                    }
                    Err(Err(e)) => {
                        return Outcome {
                            result: Err(ProxyError::Connect(e)),
                            endpoint: Some(idx),
                            mtls: true,
                            flags: Flags::default(),
                        };
                    }
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
    Outcome::failed(ProxyError::Connect(last_err.unwrap_or(
        UpstreamError::Http {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no attempt made".into(),
        },
    )))
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
