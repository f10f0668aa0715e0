//! Stage 5: the request leaves: pool limits (`upstream::limits`), an endpoint of the cluster
//! (`upstream::balance`, skipping ejected ones: `upstream::outlier`), the pooled connection to it
//! (`upstream`), the request, and retries as the route's policy says (`route::retry`) with the body
//! kept for replay (`upstream::replay`).

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};

use http_body::Body as _;
use http_body_util::BodyExt;

use crate::errors::ProxyError;
use crate::http::body::{Body, empty_body};
use crate::outbound::APP_PROTOCOL_HEADER;
use crate::route::retry;
use crate::route::{Cluster, Endpoint, Route};
use crate::snapshot::Snapshot;
use crate::telemetry::record::{Flags, Record};
use crate::telemetry::trace::Hop;
use crate::upstream::balance::{self, InFlight};
use crate::upstream::outlier;
use crate::upstream::replay::{self, ReplayBody};
use crate::upstream::state::ClusterState;
use crate::upstream::{PoolSettings, UpstreamError, Upstreams};

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
                record.attribute("weft.destination.workload", || e.workload.clone().into());
            }
        }
    }
}

/// Sends to an endpoint of `cluster`, as the route's retry policy and the cluster's limits and
/// outlier detection say:
/// - the request waits for a place in the cluster's pool, or is refused at once (`UO`);
/// - each try goes to an endpoint the balancer picks, preferring one not tried before and never an
///   ejected one;
/// - a try ends as a connect failure, a refused or reset stream, a per-try timeout, or a response;
///   the outcome is reported to outlier detection and, while the policy says so and a retry is in
///   the cluster's retry budget, another try follows after a jittered backoff (`URX` when the
///   tries run out on a retriable outcome);
/// - a request body is kept for replay up to [`replay::DEFAULT_MAX_BYTES`]; past that, no retry.
pub async fn send(
    upstreams: &Arc<Upstreams>,
    snapshot: &Snapshot,
    cluster: &Cluster,
    route: &Route,
    parts: http::request::Parts,
    body: Body,
    next: &NextHop<'_>,
) -> Outcome {
    let Some(state) = snapshot.upstream.cluster(cluster.index) else {
        return Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    // Held until the response head: the place this request takes in the cluster's pool.
    let _admitted = if state.limits.is_unlimited() {
        None
    } else {
        match state.limits.admit().await {
            Ok(admitted) => Some(admitted),
            Err(_) => return overflow(cluster),
        }
    };
    match &route.retries {
        None => once(upstreams, cluster, state, parts, body, next).await,
        Some(policy) => {
            Box::pin(with_retries(
                upstreams, cluster, state, policy, parts, body, next,
            ))
            .await
        }
    }
}

fn overflow(cluster: &Cluster) -> Outcome {
    let mut outcome = Outcome::failed(ProxyError::Overflow(cluster.name.clone()));
    outcome.flags.set(Flags::UO);
    outcome
}

/// One try, no retries (the route's `attempts: 0`): the head and body are moved, never copied.
async fn once(
    upstreams: &Arc<Upstreams>,
    cluster: &Cluster,
    state: &ClusterState,
    parts: http::request::Parts,
    body: Body,
    next: &NextHop<'_>,
) -> Outcome {
    let Some((idx, endpoint)) = balance::pick(cluster, state, None) else {
        return Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone()));
    };
    let tried = attempt(
        upstreams, cluster, state, idx, endpoint, parts, body, next, None,
    )
    .await;
    report_outlier(cluster, state, idx, &tried.result);
    tried.into_outcome(idx, Flags::default())
}

/// Tries until the policy, the tries or the retry budget say stop.
async fn with_retries(
    upstreams: &Arc<Upstreams>,
    cluster: &Cluster,
    state: &ClusterState,
    policy: &retry::Policy,
    parts: http::request::Parts,
    body: Body,
    next: &NextHop<'_>,
) -> Outcome {
    let mut tries = policy.tries();
    // A request without a body (most) needs nothing kept: a retry sends another empty body.
    let mut body = if body.is_end_stream() {
        Replayable::Empty(Some(body))
    } else {
        match ReplayBody::try_new(body, replay::DEFAULT_MAX_BYTES) {
            Ok(b) => Replayable::Kept(b),
            Err(b) => Replayable::Once(b),
        }
    };
    // What the retry conditions read of the request (Envoy's request-side retry headers): kept
    // apart, so the last try can take the head itself instead of a copy.
    let retry_headers = retry::request_headers(&parts.headers);
    let mut parts = Some(parts);
    let mut skip = None;
    let mut flags = Flags::default();
    // Held while a retry is outstanding (`http.maxRetries`).
    let mut _budget = None;
    loop {
        let Some((idx, endpoint)) = balance::pick(cluster, state, skip) else {
            let mut outcome = Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone()));
            outcome.flags.set(flags);
            return outcome;
        };
        let (this_body, next_body) = body.split();
        // A copy of the head for every try that may be followed by another; the last try (and
        // one whose body cannot be replayed) takes the head itself.
        let head = match (&parts, tries.retries_left() > 0 && next_body.is_some()) {
            (Some(p), true) => p.clone(),
            _ => match parts.take() {
                Some(p) => p,
                None => return Outcome::failed(ProxyError::NoEndpoint(cluster.name.clone())),
            },
        };
        let tried = attempt(
            upstreams,
            cluster,
            state,
            idx,
            endpoint,
            head,
            this_body,
            next,
            policy.per_try_timeout,
        )
        .await;
        report_outlier(cluster, state, idx, &tried.result);
        let kind = match &tried.result {
            Ok(resp) => retry::Attempt::Response {
                status: resp.status().as_u16(),
                headers: resp.headers(),
            },
            Err(e) => e.attempt(),
        };
        let decision = tries.next(policy, &kind, tried.sent_any, &retry_headers);
        match (decision, next_body) {
            (retry::Decision::Retry(wait), Some(replay)) if parts.is_some() => {
                let Some(budget) = state.limits.try_retry() else {
                    flags.set(Flags::URX);
                    return tried.into_outcome(idx, flags);
                };
                _budget = Some(budget);
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.dial, ?wait, "retrying");
                drop(tried);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                body = replay;
                skip = Some(idx);
            }
            (retry::Decision::LimitExceeded, _) => {
                flags.set(Flags::URX);
                return tried.into_outcome(idx, flags);
            }
            _ => return tried.into_outcome(idx, flags),
        }
    }
}

/// A request body as the retry loop holds it.
enum Replayable {
    /// No body: the first try sends the request's own, a retry a new empty one.
    Empty(Option<Body>),
    /// A body kept for replay.
    Kept(ReplayBody),
    /// A body too large to keep: one try only.
    Once(Body),
    /// Already sent and not replayable.
    Gone,
}

impl Replayable {
    /// The body for this try, and what the next try would send (`None`: no next try possible).
    fn split(&mut self) -> (Body, Option<Replayable>) {
        match std::mem::replace(self, Replayable::Gone) {
            Replayable::Empty(body) => (
                body.unwrap_or_else(empty_body),
                Some(Replayable::Empty(None)),
            ),
            Replayable::Kept(b) => {
                let next = b.try_clone().map(Replayable::Kept);
                (b.boxed(), next)
            }
            Replayable::Once(b) => (b, None),
            Replayable::Gone => (empty_body(), None),
        }
    }
}

/// One try's result.
struct Tried {
    result: Result<Response<Body>, TryError>,
    mtls: bool,
    /// Whether any of the request left towards the endpoint.
    sent_any: bool,
}

impl Tried {
    fn into_outcome(self, idx: usize, mut flags: Flags) -> Outcome {
        let result = self.result.map_err(|e| {
            if matches!(e, TryError::Timeout(_)) {
                flags.set(Flags::UT);
            }
            e.into_proxy_error()
        });
        Outcome {
            result,
            endpoint: Some(idx),
            mtls: self.mtls,
            flags,
        }
    }
}

/// Why a try got no response.
#[derive(Debug)]
enum TryError {
    /// TCP or TLS to the endpoint failed.
    Connect(UpstreamError),
    /// The peer refused the stream (nothing processed).
    Refused(UpstreamError),
    /// The exchange failed after the request was (perhaps partly) sent.
    Reset(UpstreamError),
    /// The per-try timeout fired.
    Timeout(std::time::Duration),
    /// The request could not be built.
    Local(ProxyError),
}

impl TryError {
    fn attempt(&self) -> retry::Attempt<'static> {
        match self {
            TryError::Connect(_) | TryError::Local(_) => retry::Attempt::ConnectFailure,
            TryError::Refused(_) => retry::Attempt::RefusedStream,
            TryError::Reset(_) => retry::Attempt::Reset,
            TryError::Timeout(_) => retry::Attempt::PerTryTimeout,
        }
    }

    fn into_proxy_error(self) -> ProxyError {
        match self {
            TryError::Connect(e) => ProxyError::Connect(e),
            TryError::Reset(e @ UpstreamError::Closed { .. }) => {
                ProxyError::UpstreamClosed(e.to_string())
            }
            TryError::Refused(e) | TryError::Reset(e) => ProxyError::UpstreamReset(e.to_string()),
            TryError::Timeout(t) => ProxyError::Timeout(t),
            TryError::Local(e) => e,
        }
    }
}

/// Tells outlier detection how a try ended at endpoint `idx` (only what came from the endpoint:
/// an answer, or a local-origin failure to reach or hear it).
fn report_outlier(
    cluster: &Cluster,
    state: &ClusterState,
    idx: usize,
    result: &Result<Response<Body>, TryError>,
) {
    let Some(detector) = &state.outlier else {
        return;
    };
    let outcome = match result {
        Ok(resp) => outlier::Outcome::Status(resp.status().as_u16()),
        Err(TryError::Local(_)) => return,
        Err(_) => outlier::Outcome::LocalOrigin,
    };
    if let Some(ejection) = detector.report(idx, outcome, std::time::Instant::now()) {
        state
            .ejections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            cluster = %cluster.name,
            endpoint = %cluster.endpoints.get(idx).map_or_else(String::new, |e| e.dial.to_string()),
            kind = ejection.kind.as_str(),
            ejected_for = ?ejection.returns_in,
            times_ejected = ejection.times_ejected,
            ejected_now = ejection.ejected_now,
            "outlier detection ejected an endpoint"
        );
    }
}

/// One try at endpoint `idx`: the connection (pooled HTTP/2 over mTLS to its sidecar, or plaintext
/// HTTP/1.1), the request, the response head, bounded by `per_try`.
#[allow(clippy::too_many_arguments)] // one try's inputs, each from a different owner
async fn attempt(
    upstreams: &Arc<Upstreams>,
    cluster: &Cluster,
    state: &ClusterState,
    idx: usize,
    endpoint: &Endpoint,
    parts: http::request::Parts,
    body: Body,
    next: &NextHop<'_>,
    per_try: Option<std::time::Duration>,
) -> Tried {
    let _in_flight = InFlight::new(state, idx);
    let identity = cluster.peer_identity(endpoint);
    let exchange = async {
        let Some(identity) = identity else {
            let mut req =
                build_request(parts, body, next, endpoint, false).map_err(TryError::Local)?;
            if last_on_connection(cluster, state) {
                req.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            return Box::pin(upstreams.send_plain(
                endpoint.dial,
                req,
                cluster.connect_timeout,
                cluster.idle_timeout,
            ))
            .await
            .map_err(|e| match e {
                UpstreamError::Connect { .. } => TryError::Connect(e),
                _ => TryError::Reset(e),
            });
        };
        let (mut parts, mut body) = (parts, body);
        // A request a draining peer never saw goes to a new connection, once, without counting
        // as a try (Envoy's pool would simply pick another connection).
        for _ in 0..2 {
            let sender = upstreams
                .h2_sender(
                    endpoint.dial,
                    identity,
                    cluster.connect_timeout,
                    PoolSettings {
                        max_requests_per_connection: cluster.max_requests_per_connection,
                        idle_timeout: cluster.idle_timeout,
                        epoch: state.pool_epoch,
                    },
                )
                .await
                .map_err(TryError::Connect)?;
            let req = build_request(parts, body, next, endpoint, true).map_err(TryError::Local)?;
            match Upstreams::send_h2(sender, endpoint.dial, req).await {
                Ok(r) => return Ok(r),
                Err(Err(e @ UpstreamError::Refused { .. })) => return Err(TryError::Refused(e)),
                Err(Err(e)) => return Err(TryError::Reset(e)),
                Err(Ok(unsent)) => {
                    tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.dial, "peer going away; trying again");
                    (parts, body) = unsent.into_parts();
                }
            }
        }
        Err(TryError::Refused(UpstreamError::Http {
            addr: endpoint.dial,
            reason: "peer is going away".into(),
        }))
    };
    let result = match per_try {
        Some(t) => tokio::time::timeout(t, exchange)
            .await
            .unwrap_or(Err(TryError::Timeout(t))),
        None => exchange.await,
    };
    let sent_any = !matches!(
        result,
        Err(TryError::Connect(_) | TryError::Refused(_) | TryError::Local(_))
    );
    Tried {
        result,
        mtls: identity.is_some(),
        sent_any,
    }
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

/// Whether a plaintext request should close its connection after it, for the cluster's
/// `maxRequestsPerConnection`: every request at 1; at N, every Nth request of the cluster, which
/// is exact for one connection at a time and approximate under concurrency (hyper-util's pool,
/// used to endpoints without a sidecar, does not count requests per connection).
fn last_on_connection(cluster: &Cluster, state: &ClusterState) -> bool {
    match cluster.max_requests_per_connection {
        0 => false,
        1 => true,
        n => {
            let sent = state
                .plain_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (sent + 1).is_multiple_of(n)
        }
    }
}
