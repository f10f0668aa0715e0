//! Traffic mirroring (shadowing), fire and forget.
//!
//! A mirrored request is a copy of the primary's finished request head (after route header operations
//! and trace injection, as Envoy copies it) with `-shadow` appended to the host part of its authority
//! (`httpbin:8000` → `httpbin-shadow:8000`; a mesh-wide switch turns this off, as Istio 1.28+ does),
//! `x-envoy-internal: true`, this pod's address appended to `x-forwarded-for`, the same `x-request-id`
//! and trace id, and a span of its own. Like Envoy's classic shadowing, the copy is sent once the whole
//! request body has passed through to the primary: the body is teed into a buffer of at most
//! `max_body` bytes; a larger body is not mirrored (counted), the primary never notices.
//!
//! Nothing about a copy can touch the primary: the request path only clones headers, copies body
//! chunks it forwards anyway, and takes a permit without waiting; copies beyond the in-flight bound
//! are dropped and counted; the copy's response is read and discarded in its own task, and its
//! failures are counted, never returned.
//!
//! A mirror with `compare` (shadow-diff, [`crate::shadow_diff`]) reads the copy's answer into an
//! observation instead of dropping it, under the copy timeout, and concludes the comparison with
//! the primary's answer, which [`start`] hands back as a [`PrimaryProbe`] for the send stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Semaphore, oneshot};

use crate::http::body::{Body, Watch, Watched};
use crate::route::{Cluster, Route, shadow_authority};
use crate::shadow_diff::compare::Copied;
use crate::shadow_diff::report::RequestFacts;
use crate::shadow_diff::{Comparing, PrimaryProbe, ShadowDiff, Target};
use crate::snapshot::Snapshot;
use crate::telemetry::record::Flags;
use crate::telemetry::span_tags;
use crate::telemetry::trace::{Hop, Kind, Span, Tracer};
use crate::upstream::Upstreams;
use crate::upstream::balance;
use crate::upstream::state::ClusterState;

/// Default cap on a mirrored request body (Envoy's connection buffer limit).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Default number of copies in flight per sidecar.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// A copy that takes longer than this is abandoned (Istio leaves mirrors without timeout by default;
/// a bound keeps a dead mirror target from holding permits forever).
const COPY_TIMEOUT: Duration = Duration::from_secs(30);

/// Counters, for `/stats/prometheus`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Copies sent and answered (any status).
    pub sent: AtomicU64,
    /// Copies that failed (connect, TLS, reset, timeout) or found no endpoint.
    pub failed: AtomicU64,
    /// Copies not sent because too many were in flight.
    pub dropped_busy: AtomicU64,
    /// Copies not sent because the body exceeded the buffer.
    pub dropped_too_large: AtomicU64,
}

/// The mirroring machinery of one sidecar.
#[derive(Debug)]
pub struct Mirrors {
    upstreams: Arc<Upstreams>,
    permits: Arc<Semaphore>,
    max_body: usize,
    /// This pod's IP, appended to `x-forwarded-for` of copies.
    node_ip: String,
    /// Counters.
    pub stats: Arc<MirrorStats>,
    /// Shadow-diff: comparisons of copies with their primaries.
    pub shadow: Arc<ShadowDiff>,
}

/// One copy, ready to go once its body is known.
#[derive(Debug)]
pub struct Copy {
    cluster: Arc<Cluster>,
    state: Arc<ClusterState>,
    head: http::request::Parts,
    authority: String,
    path: String,
    hop: Hop,
    permit: tokio::sync::OwnedSemaphorePermit,
    /// The comparison this copy's answer concludes (shadow-diff), if its mirror compares.
    compare: Option<Comparing>,
}

impl Mirrors {
    /// Mirroring through `upstreams`, with the given bounds.
    pub fn new(
        upstreams: Arc<Upstreams>,
        node_ip: String,
        max_body: usize,
        max_in_flight: usize,
        shadow: Arc<ShadowDiff>,
    ) -> Self {
        Self {
            upstreams,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_body,
            node_ip,
            stats: Arc::new(MirrorStats::default()),
            shadow,
        }
    }

    /// The copies `route` wants for this request (each rolled against its percentage), built from the
    /// primary's final head. Empty for most requests, so it allocates nothing then. The first copy
    /// whose mirror compares starts a comparison; its primary side goes to `probe`.
    pub fn prepare(
        &self,
        snapshot: &Snapshot,
        route: &Route,
        head: &http::request::Parts,
        primary: Primary<'_>,
        tracer: &Tracer,
        probe: &mut Option<PrimaryProbe>,
    ) -> Vec<Copy> {
        let Primary {
            authority,
            path,
            hop: parent,
            service,
            hold_span,
        } = primary;
        let shadow_suffix = snapshot.routes.mirror_shadow_suffix;
        let mut copies = Vec::new();
        for m in &route.mirrors {
            if !(m.percent >= 100.0 || fastrand::f64() * 100.0 < m.percent) {
                continue;
            }
            let Some(state) = snapshot.upstream.cluster(m.cluster.index) else {
                continue;
            };
            // Only built for a mirror that compares (never on other routes' requests).
            let target = match &m.compare {
                Some(_) if probe.is_none() => Some(Target {
                    route: route.name.clone(),
                    service: service.to_owned(),
                    facts: RequestFacts {
                        request_id: head
                            .headers
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned(),
                        shape: format!(
                            "{} {}",
                            head.method,
                            crate::shadow_diff::noise::template(path)
                        ),
                    },
                }),
                _ => None,
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed);
                if let Some(target) = &target {
                    self.shadow.skip(target);
                }
                continue;
            };
            let compare = match (&m.compare, target) {
                (Some(spec), Some(target)) => {
                    // The route's timeout bounds the copy too: an answer later than the primary
                    // could ever be is a timeout, not a result.
                    let timeout = route
                        .timeout
                        .unwrap_or(crate::shadow_diff::DEFAULT_COPY_TIMEOUT)
                        .min(COPY_TIMEOUT);
                    match self.shadow.begin(spec, target, timeout, hold_span, tracer) {
                        Some((p, c)) => {
                            *probe = Some(p);
                            Some(c)
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            let mut copy = http::Request::new(());
            *copy.method_mut() = head.method.clone();
            *copy.headers_mut() = head.headers.clone();
            let (mut parts, ()) = copy.into_parts();
            let hop = parent.child();
            hop.inject(&mut parts.headers);
            parts
                .headers
                .insert("x-envoy-internal", http::HeaderValue::from_static("true"));
            let xff = match parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {}", self.node_ip),
                None => self.node_ip.clone(),
            };
            if let Ok(v) = http::HeaderValue::from_str(&xff) {
                parts.headers.insert("x-forwarded-for", v);
            }
            copies.push(Copy {
                cluster: m.cluster.clone(),
                state: state.clone(),
                head: parts,
                authority: if shadow_suffix {
                    shadow_authority(authority)
                } else {
                    authority.to_owned()
                },
                path: path.to_owned(),
                hop,
                permit,
                compare,
            });
        }
        copies
    }

    /// Sends `copies` with `body`, each in its own task.
    pub fn send(&self, copies: Vec<Copy>, body: Bytes, tracer: &Tracer, service: &Arc<str>) {
        for mut copy in copies {
            let upstreams = self.upstreams.clone();
            let stats = self.stats.clone();
            let tracer = tracer.clone();
            let service = service.clone();
            let body = body.clone();
            let body_len = body.len() as u64;
            tokio::spawn(async move {
                let start = SystemTime::now();
                let name = format!(
                    "mirror {}:{}/*",
                    copy.cluster.service_hostname, copy.cluster.port
                );
                let status = match copy.compare.take() {
                    None => tokio::time::timeout(COPY_TIMEOUT, send_copy(&upstreams, &copy, body))
                        .await
                        .unwrap_or(None),
                    Some(comparing) => {
                        let began = Instant::now();
                        let spec = comparing.spec().clone();
                        let answer = async {
                            match request_copy(&upstreams, &copy, body).await {
                                Some(resp) => {
                                    crate::shadow_diff::observe_copy(spec, resp, began).await
                                }
                                None => Copied::Failed(None),
                            }
                        };
                        let copied = tokio::time::timeout(comparing.copy_timeout(), answer)
                            .await
                            .unwrap_or(Copied::TimedOut);
                        let status = match &copied {
                            Copied::Answered(o) => Some(o.status),
                            Copied::Failed(s) => *s,
                            Copied::TimedOut => None,
                        };
                        comparing.conclude(copied).await;
                        status
                    }
                };
                match status {
                    Some(_) => stats.sent.fetch_add(1, Ordering::Relaxed),
                    None => stats.failed.fetch_add(1, Ordering::Relaxed),
                };
                if tracer.enabled() && copy.hop.sampled {
                    tracer.record(Span {
                        hop: copy.hop,
                        name,
                        kind: Kind::Client,
                        service,
                        start,
                        end: SystemTime::now(),
                        status: status.unwrap_or(0),
                        attributes: {
                            let mut tags =
                                span_tags::request(&copy.head, &copy.authority, &copy.path);
                            span_tags::outcome(
                                &mut tags,
                                &span_tags::Outcome {
                                    code: status.unwrap_or(0),
                                    flags: Flags::default(),
                                    request_size: body_len,
                                    response_size: 0,
                                    cluster: Some(&copy.cluster.name),
                                    peer: None,
                                },
                            );
                            tags.push(("weft.mirror", "true".into()));
                            tags
                        },
                        events: Vec::new(),
                        trace_state: span_tags::trace_state(&copy.head.headers),
                    });
                }
                drop(copy.permit);
            });
        }
    }

    /// Wraps the primary's body so that, once it has streamed through in full, the copies are sent
    /// with the bytes it carried (up to the buffer limit).
    pub fn tee(&self, body: Body, copies: Vec<Copy>, tracer: &Tracer, service: &Arc<str>) -> Body {
        let (tx, rx) = oneshot::channel();
        let this = Watched::new(
            body,
            Tee {
                buf: Some(BytesMut::new()),
                limit: self.max_body,
                done: Some(tx),
            },
        );
        let stats = self.stats.clone();
        let n = copies.len() as u64;
        let mirrors = Mirrors {
            upstreams: self.upstreams.clone(),
            permits: self.permits.clone(),
            max_body: self.max_body,
            node_ip: self.node_ip.clone(),
            stats: self.stats.clone(),
            shadow: self.shadow.clone(),
        };
        let tracer = tracer.clone();
        let service = service.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(COPY_TIMEOUT, rx).await {
                Ok(Ok(Some(bytes))) => mirrors.send(copies, bytes, &tracer, &service),
                // Too large for the buffer.
                Ok(Ok(None)) => {
                    stats.dropped_too_large.fetch_add(n, Ordering::Relaxed);
                }
                // The primary's body failed, was abandoned, or never finished.
                _ => {
                    stats.failed.fetch_add(n, Ordering::Relaxed);
                }
            }
        });
        this.boxed()
    }
}

async fn send_copy(upstreams: &Arc<Upstreams>, copy: &Copy, body: Bytes) -> Option<u16> {
    let resp = request_copy(upstreams, copy, body).await?;
    let status = resp.status().as_u16();
    // Read and drop the response, so the connection is reusable; its content never matters.
    let _ = resp.into_body().collect().await;
    Some(status)
}

/// Sends a copy; its answer's head (`None`: no endpoint, or the send failed).
async fn request_copy(
    upstreams: &Arc<Upstreams>,
    copy: &Copy,
    body: Bytes,
) -> Option<http::Response<Body>> {
    let (_, endpoint) = balance::pick(&copy.cluster, &copy.state, None)?;
    let identity = copy.cluster.peer_identity(endpoint);
    let mut req = http::Request::new(Full::new(body).map_err(|never| match never {}).boxed());
    *req.method_mut() = copy.head.method.clone();
    *req.headers_mut() = copy.head.headers.clone();
    let resp = match identity {
        Some(id) => {
            req.headers_mut().remove(http::header::HOST);
            *req.version_mut() = http::Version::HTTP_2;
            *req.uri_mut() = format!("http://{}{}", copy.authority, copy.path)
                .parse()
                .ok()?;
            let sender = upstreams
                .h2_sender(
                    endpoint.dial,
                    id,
                    copy.cluster.connect_timeout,
                    Default::default(),
                )
                .await
                .ok()?;
            Upstreams::send_h2(sender, endpoint.dial, req).await.ok()?
        }
        None => {
            if let Ok(v) = http::HeaderValue::from_str(&copy.authority) {
                req.headers_mut().insert(http::header::HOST, v);
            }
            *req.uri_mut() = format!("http://{}{}", endpoint.dial, copy.path)
                .parse()
                .ok()?;
            upstreams
                .send_plain(
                    endpoint.dial,
                    req,
                    copy.cluster.connect_timeout,
                    copy.cluster.idle_timeout,
                )
                .await
                .ok()?
        }
    };
    Some(resp)
}

/// Keeps a copy of up to `limit` bytes of a body passing through unchanged; reports the copy (or
/// `None` if it grew too large) when the body ends.
struct Tee {
    buf: Option<BytesMut>,
    limit: usize,
    done: Option<oneshot::Sender<Option<Bytes>>>,
}

impl Tee {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(self.buf.take().map(BytesMut::freeze));
        }
    }
}

impl Watch for Tee {
    fn frame(&mut self, frame: &Frame<Bytes>, ended: bool) {
        if let (Some(data), Some(buf)) = (frame.data_ref(), self.buf.as_mut()) {
            if buf.len() + data.len() > self.limit {
                // Too large: free what we had and stop copying.
                self.buf = None;
            } else {
                buf.extend_from_slice(data);
            }
        }
        if ended {
            self.finish();
        }
    }

    fn end(&mut self) {
        self.finish();
    }

    /// The copy is abandoned: its sender goes.
    fn failed(&mut self) {
        self.done = None;
    }
}

/// The primary request's final target, which the copies take over.
#[derive(Debug, Clone, Copy)]
pub struct Primary<'a> {
    /// The authority sent upstream (before the `-shadow` suffix).
    pub authority: &'a str,
    /// Path and query sent upstream.
    pub path: &'a str,
    /// The primary's trace context; each copy is a child span.
    pub hop: &'a Hop,
    /// The primary's destination service FQDN (shadow-diff's `destination_service`).
    pub service: &'a str,
    /// Whether the request's client span is recorded (shadow-diff then holds it).
    pub hold_span: bool,
}

/// Stage 4: rolls `route`'s mirrors for this request and starts the copies: at once for a request
/// without a body, else once the primary's body has passed (the returned body tees it). When one of
/// the copies is compared, `probe` receives the primary's side of the comparison.
#[allow(clippy::too_many_arguments)] // the stage's inputs, each from a different owner
pub fn start(
    mirrors: &Mirrors,
    snapshot: &Snapshot,
    route: &Route,
    head: &http::request::Parts,
    body: Body,
    primary: Primary<'_>,
    tracer: &Tracer,
    service: &Arc<str>,
    probe: &mut Option<PrimaryProbe>,
) -> Body {
    let copies = mirrors.prepare(snapshot, route, head, primary, tracer, probe);
    if copies.is_empty() {
        return body;
    }
    if body.is_end_stream() {
        mirrors.send(copies, Bytes::new(), tracer, service);
        body
    } else {
        mirrors.tee(body, copies, tracer, service)
    }
}
