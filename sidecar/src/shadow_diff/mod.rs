//! Shadow-diff: does the mirrored version behave like the primary? (issue 20)
//!
//! Istio and Envoy send a mirror copy and drop its answer. When a route's mirror has `compare`
//! (pilot's translation of the VirtualService's `weft.io/mirror-compare*` annotations), this sidecar
//! reads the copy's answer instead and compares it with the primary's: status, headers, body, as
//! the route asks. One comparison per mirrored request:
//!
//! - the **primary** side ([`PrimaryProbe`]) observes the primary's answer as it passes to the
//!   caller: status and headers from the head, the body hashed chunk by chunk by a wrapper around
//!   the response body ([`ObservedBody`]), latency to the last byte. The caller never waits for
//!   anything shadow-diff does; the wrapper only hashes what it forwards anyway.
//! - the **copy** side ([`Comparing`], carried by the mirror copy's task in `outbound/mirror.rs`)
//!   reads the copy's answer into an [`observe::Observer`] under the copy timeout (the route's
//!   timeout when it has one, else [`DEFAULT_COPY_TIMEOUT`]), then waits (at most as long again)
//!   for the primary's observation, and concludes: [`report::RouteState::conclude`] learns noise,
//!   compares ([`compare::compare`]) and counts.
//!
//! Outcomes: `match`, `status`, `headers`, `body` (with the JSON paths that differed, `$` for a
//! body compared by hash), `mirror_error` (no endpoint, connect failure, reset, or a 5xx the mesh
//! itself answered, marked `x-weft-error`, as a UF/UH would be), `timeout` (the copy's answer was
//! not complete within the copy timeout; the primary is never touched), `skipped` (the pending
//! table was full, or the primary's answer failed or was abandoned).
//!
//! Noise is learned from primaries (Diffy's method): see [`noise`].
//!
//! Bounds: at most [`MAX_PENDING`] comparisons in flight per sidecar (a semaphore: the "table" is
//! its permits; over it the copy is still sent, fire and forget, and counted `skipped`); JSON bodies
//! kept only up to [`observe::JSON_PREFIX_MAX`] each (longer ones are hashed as they stream);
//! [`report::MAX_SHAPES`] request shapes per route (then `{other}`), [`noise::MAX_NOISY`] noisy
//! headers and JSON paths per route, [`MAX_ROUTES`] routes. A comparison lives at most twice its
//! copy timeout. Latencies run from the start of each request (the copy's starts once the primary's
//! request body has passed, so for large uploads the delta leans negative).
//! Headers never compared: the route's `ignore_headers` (pilot adds `date`, `server`,
//! `x-request-id` and the trace headers) and the framing and hop-by-hop ones (`content-length`,
//! `transfer-encoding`, `connection`, …: they describe a hop, and the copy's hop differs).
//!
//! Only the first mirror of a route that has `compare` is compared; further mirrors of the same
//! route are sent as usual. A route without `compare` takes none of this: no allocation, no
//! wrapper, no lock.

pub mod compare;
pub mod noise;
pub mod observe;
pub mod report;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use weft_proto::discovery as pb;

use crate::http::body::{Body, Watch, Watched};
use crate::route::compare::Compare;
use crate::telemetry::trace::{Event, Span, Tracer, Value};
use compare::{Copied, Verdict};
use observe::Observer;
use report::{RequestFacts, RouteState};

/// Comparisons in flight per sidecar.
pub const MAX_PENDING: usize = 1024;
/// Routes counted per sidecar (route names change with config over the sidecar's life); the
/// comparisons of further routes are not counted.
pub const MAX_ROUTES: usize = 256;
/// The copy timeout of a route without a timeout of its own.
pub const DEFAULT_COPY_TIMEOUT: Duration = Duration::from_secs(5);

/// Shadow-diff state of one sidecar: the pending bound and every route's counts.
#[derive(Debug)]
pub struct ShadowDiff {
    pending: Arc<Semaphore>,
    /// Per route name. Locked only for a comparison's conclusion and a report, never across an
    /// await.
    routes: Mutex<HashMap<String, RouteState>>,
    /// Bumped on every conclusion, so the report goes out only when a count changed.
    generation: AtomicU64,
    /// `source_workload` label value (escaped).
    source_workload: String,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl ShadowDiff {
    /// Shadow-diff for the workload `source_workload`.
    pub fn new(source_workload: &str) -> Self {
        Self {
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            routes: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            source_workload: esc(source_workload),
        }
    }

    /// Comparisons in flight now.
    pub fn pending(&self) -> usize {
        MAX_PENDING - self.pending.available_permits()
    }

    /// Changes so far (compare with an earlier value to know whether to report).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn with_route<T>(&self, route: &str, service: &str, f: impl FnOnce(&mut RouteState) -> T) -> T {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if !routes.contains_key(route) && routes.len() < MAX_ROUTES {
            routes.insert(route.to_owned(), RouteState::new(service.to_owned()));
        }
        // Over the bound: compared, not kept (allocates nothing until used).
        let mut uncounted = RouteState::new(String::new());
        let state = routes.get_mut(route).unwrap_or(&mut uncounted);
        let out = f(state);
        drop(routes);
        self.generation.fetch_add(1, Ordering::Relaxed);
        out
    }

    /// Counts a request that is not compared (the pending table is full, or too many copies are in
    /// flight to send this one) as `skipped`.
    pub fn skip(&self, target: &Target) {
        self.with_route(&target.route, &target.service, |r| {
            r.skipped(&target.facts.shape)
        });
    }

    /// Starts a comparison of one request, or counts it `skipped` when the table is full.
    /// `hold_span`: whether the request's client span is held until the comparison concludes.
    pub fn begin(
        self: &Arc<Self>,
        spec: &Arc<Compare>,
        target: Target,
        copy_timeout: Duration,
        hold_span: bool,
        tracer: &Tracer,
    ) -> Option<(PrimaryProbe, Comparing)> {
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            self.skip(&target);
            return None;
        };
        let (tx, rx) = oneshot::channel();
        let (span_tx, span_rx) = if hold_span {
            let (a, b) = oneshot::channel();
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        Some((
            PrimaryProbe {
                spec: spec.clone(),
                tx,
                start: Instant::now(),
                span: span_tx,
            },
            Comparing {
                shadow: self.clone(),
                spec: spec.clone(),
                target: Some(target),
                primary: rx,
                span: span_rx,
                tracer: tracer.clone(),
                copy_timeout,
                permit: Some(permit),
            },
        ))
    }

    /// The sidecar's report, routes sorted by name.
    pub fn report(&self) -> pb::MirrorReport {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        pb::MirrorReport {
            routes: names.into_iter().map(|n| routes[n].report(n)).collect(),
        }
    }

    /// Appends `weft_mirror_compare_total`, the latency-delta histogram and the pending gauge.
    pub fn render(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        let labels = |n: &str| {
            format!(
                "source_workload=\"{}\",destination_service=\"{}\",route=\"{}\"",
                self.source_workload,
                esc(routes[n].destination_service()),
                esc(n)
            )
        };
        crate::telemetry::family(
            out,
            "weft_mirror_compare_total",
            "counter",
            "Mirror copies compared with their primary (shadow-diff), by outcome.",
        );
        for n in &names {
            routes[*n].render_total(out, &labels(n));
        }
        crate::telemetry::family(
            out,
            "weft_mirror_compare_latency_delta_milliseconds",
            "histogram",
            "Mirror latency minus primary latency (to the last body byte) of compared copies.",
        );
        for n in &names {
            routes[*n].render_delta(out, &labels(n));
        }
        crate::telemetry::family(
            out,
            "weft_mirror_compare_pending",
            "gauge",
            "Comparisons waiting for an answer (bounded).",
        );
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!("weft_mirror_compare_pending {}\n", self.pending()),
        );
    }

    /// The report as JSON, for the admin endpoint `/mirror_report` (the proto's field names).
    pub fn report_json(&self) -> serde_json::Value {
        let r = self.report();
        serde_json::json!({
            "routes": r.routes.iter().map(|rc| serde_json::json!({
                "route": rc.route,
                "destination_service": rc.destination_service,
                "outcomes": rc.outcomes.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "paths": rc.paths.iter().map(|p| serde_json::json!({
                    "path": p.path,
                    "outcomes": p.outcomes.iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "sample": p.sample.as_ref().map(|s| serde_json::json!({
                        "request_id": s.request_id,
                        "outcome": s.outcome,
                        "primary_status": s.primary_status,
                        "mirror_status": s.mirror_status,
                        "headers": s.headers,
                        "json_paths": s.json_paths,
                        "latency_delta_us": s.latency_delta_us,
                    })),
                })).collect::<Vec<_>>(),
                "noisy_headers": rc.noisy_headers,
                "noisy_json": rc.noisy_json,
            })).collect::<Vec<_>>(),
            "pending": self.pending(),
        })
    }
}

/// Which route and request a comparison is about.
#[derive(Debug, Clone)]
pub struct Target {
    /// Route name.
    pub route: String,
    /// The primary's destination service FQDN.
    pub service: String,
    /// Request id and shape.
    pub facts: RequestFacts,
}

/// The primary's side of a comparison, taken by the request path.
#[derive(Debug)]
pub struct PrimaryProbe {
    spec: Arc<Compare>,
    tx: oneshot::Sender<Finished>,
    start: Instant,
    span: Option<oneshot::Sender<Span>>,
}

impl PrimaryProbe {
    /// Where the request's record sends its client span, to be held until the comparison ends.
    pub fn take_span_hold(&mut self) -> Option<oneshot::Sender<Span>> {
        self.span.take()
    }

    /// Wraps the primary's answer so that its body is observed as it streams to the caller.
    pub fn observe(self, resp: http::Response<Body>) -> http::Response<Body> {
        let (parts, body) = resp.into_parts();
        let observer = Observer::new(self.spec, parts.status, &parts.headers);
        let mut wrapped = Watched::new(
            body,
            Observing {
                observer: Some(observer),
                tx: Some(self.tx),
                start: self.start,
            },
        );
        // A body that is over before it starts (HEAD, 204, an empty body) may never be polled.
        if wrapped.is_end_stream() {
            wrapped.watch.done();
        }
        http::Response::from_parts(parts, wrapped.boxed())
    }
}

/// A primary's answer, observed to its end `.1` after the request started.
#[derive(Debug)]
struct Finished(Observer, Duration);

/// The primary's response body on its way to the caller, hashed as it passes.
struct Observing {
    observer: Option<Observer>,
    tx: Option<oneshot::Sender<Finished>>,
    start: Instant,
}

impl Observing {
    fn done(&mut self) {
        if let (Some(o), Some(tx)) = (self.observer.take(), self.tx.take()) {
            // Only the clock is read here: parsing a kept JSON body is the comparison task's work,
            // off the primary's path.
            let _ = tx.send(Finished(o, self.start.elapsed()));
        }
    }
}

impl Watch for Observing {
    fn frame(&mut self, frame: &Frame<Bytes>, ended: bool) {
        if let (Some(data), Some(o)) = (frame.data_ref(), self.observer.as_mut()) {
            o.data(data);
        }
        if ended {
            self.done();
        }
    }

    fn end(&mut self) {
        self.done();
    }

    /// A failed primary is not compared (its sender dropped: `skipped`).
    fn failed(&mut self) {
        self.tx = None;
        self.observer = None;
    }
}

/// The copy's side of a comparison: travels with the mirror copy into its task. Dropped without
/// concluding (the copy was never sent: its request body was too large or failed), it counts
/// `skipped` and lets the held span go.
#[derive(Debug)]
pub struct Comparing {
    shadow: Arc<ShadowDiff>,
    spec: Arc<Compare>,
    target: Option<Target>,
    primary: oneshot::Receiver<Finished>,
    span: Option<oneshot::Receiver<Span>>,
    tracer: Tracer,
    copy_timeout: Duration,
    /// The pending table's entry; given back as the comparison is counted.
    permit: Option<OwnedSemaphorePermit>,
}

impl Comparing {
    /// The spec the copy's answer is observed under.
    pub fn spec(&self) -> &Arc<Compare> {
        &self.spec
    }

    /// How long the copy may take.
    pub fn copy_timeout(&self) -> Duration {
        self.copy_timeout
    }

    /// Concludes with the copy's side: waits (bounded) for the primary's observation, compares,
    /// counts, and adds the divergence event to the held client span.
    pub async fn conclude(mut self, copy: Copied) {
        let primary = match tokio::time::timeout(self.copy_timeout, &mut self.primary).await {
            Ok(Ok(Finished(o, latency))) => Some(o.finish(latency)),
            _ => None,
        };
        let span = match self.span.take() {
            // The record sends it when the primary's head is answered: normally long before.
            Some(rx) => tokio::time::timeout(self.copy_timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let Some(target) = self.target.take() else {
            return;
        };
        let primary_latency = primary.as_ref().map(|p| p.latency);
        // No longer pending once counted: a report never shows a concluded comparison as pending.
        drop(self.permit.take());
        let verdict = self.shadow.with_route(&target.route, &target.service, |r| {
            r.conclude(&self.spec, &target.facts, primary, &copy)
        });
        if let Some(mut span) = span {
            if verdict.outcome.diverged() {
                span.events
                    .push(divergence_event(&verdict, &copy, primary_latency));
                span.attributes
                    .push(("weft.mirror.compare", verdict.outcome.as_str().into()));
            }
            self.tracer.record(span);
        }
    }
}

impl Drop for Comparing {
    fn drop(&mut self) {
        if let Some(rx) = &mut self.span
            && let Ok(span) = rx.try_recv()
        {
            self.tracer.record(span);
        }
        drop(self.permit.take());
        if let Some(target) = self.target.take() {
            self.shadow.with_route(&target.route, &target.service, |r| {
                r.skipped(&target.facts.shape)
            });
        }
    }
}

/// The `weft.mirror.divergence` span event: what differed.
fn divergence_event(verdict: &Verdict, copy: &Copied, primary: Option<Duration>) -> Event {
    let mut attributes = vec![("outcome", Value::from(verdict.outcome.as_str()))];
    if !verdict.headers.is_empty() {
        attributes.push(("headers", verdict.headers.join(",").into()));
    }
    if !verdict.json_paths.is_empty() {
        attributes.push(("json_paths", verdict.json_paths.join(",").into()));
    }
    match copy {
        Copied::Answered(m) => {
            attributes.push(("mirror_status", Value::Number(u64::from(m.status))));
            if let Some(p) = primary {
                let delta = m.latency.as_micros() as i128 - p.as_micros() as i128;
                let delta =
                    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
                attributes.push(("latency_delta_us", Value::Signed(delta)));
            }
        }
        Copied::Failed(Some(s)) => attributes.push(("mirror_status", Value::Number(u64::from(*s)))),
        Copied::Failed(None) | Copied::TimedOut => {}
    }
    Event {
        name: "weft.mirror.divergence",
        time: SystemTime::now(),
        attributes,
    }
}

/// Reads a copy's answer into an observation (a mesh error answer is a failure).
pub async fn observe_copy(
    spec: Arc<Compare>,
    resp: http::Response<Body>,
    start: Instant,
) -> Copied {
    let status = resp.status();
    if status.is_server_error() && resp.headers().contains_key(crate::errors::ERROR_HEADER) {
        let _ = resp.into_body().collect().await;
        return Copied::Failed(Some(status.as_u16()));
    }
    let mut observer = Observer::new(spec, status, resp.headers());
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    observer.data(d);
                }
            }
            Err(_) => return Copied::Failed(Some(status.as_u16())),
        }
    }
    Copied::Answered(observer.finish(start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use compare::Outcome;
    use http_body_util::Full;

    fn spec() -> Arc<Compare> {
        Compare::everything()
    }

    fn target(rid: &str) -> Target {
        Target {
            route: "default/httpbin/0".into(),
            service: "httpbin.default.svc.cluster.local".into(),
            facts: RequestFacts {
                request_id: rid.into(),
                shape: "GET /json".into(),
            },
        }
    }

    fn body(s: &'static str) -> Body {
        Full::new(Bytes::from_static(s.as_bytes()))
            .map_err(|never| match never {})
            .boxed()
    }

    #[tokio::test]
    async fn the_primary_body_is_observed_as_it_passes_and_a_divergence_is_counted() {
        let shadow = Arc::new(ShadowDiff::new("sleep"));
        let (probe, comparing) = shadow
            .begin(
                &spec(),
                target("r1"),
                Duration::from_secs(1),
                false,
                &Tracer::disabled(),
            )
            .unwrap();
        assert_eq!(shadow.pending(), 1);
        let resp = probe.observe(http::Response::new(body("{\"a\":1}")));
        // The caller gets the bytes unchanged.
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"{\"a\":1}");
        let mut copy = Observer::new(spec(), http::StatusCode::OK, &http::HeaderMap::new());
        copy.data(b"{\"a\":2}");
        comparing
            .conclude(Copied::Answered(copy.finish(Duration::ZERO)))
            .await;
        assert_eq!(shadow.pending(), 0);
        let report = shadow.report();
        assert_eq!(report.routes[0].outcomes["body"], 1);
        let mut text = String::new();
        shadow.render(&mut text);
        assert!(
            text.contains("weft_mirror_compare_total{source_workload=\"sleep\",destination_service=\"httpbin.default.svc.cluster.local\",route=\"default/httpbin/0\",outcome=\"body\"} 1"),
            "{text}"
        );
        assert_eq!(
            shadow.report_json()["routes"][0]["paths"][0]["sample"]["request_id"],
            "r1"
        );
    }

    #[tokio::test]
    async fn a_full_table_skips_and_a_copy_never_sent_counts_skipped() {
        let shadow = Arc::new(ShadowDiff::new("sleep"));
        let mut held = Vec::new();
        for i in 0..MAX_PENDING {
            held.push(
                shadow
                    .begin(
                        &spec(),
                        target(&i.to_string()),
                        Duration::from_secs(1),
                        false,
                        &Tracer::disabled(),
                    )
                    .unwrap(),
            );
        }
        assert!(
            shadow
                .begin(
                    &spec(),
                    target("over"),
                    Duration::from_secs(1),
                    false,
                    &Tracer::disabled()
                )
                .is_none()
        );
        assert_eq!(shadow.pending(), MAX_PENDING);
        drop(held);
        assert_eq!(shadow.pending(), 0);
        assert_eq!(
            shadow.report().routes[0].outcomes["skipped"],
            MAX_PENDING as u64 + 1
        );
    }

    #[tokio::test]
    async fn a_primary_that_never_ends_is_skipped_after_the_timeout() {
        let shadow = Arc::new(ShadowDiff::new("sleep"));
        let (probe, comparing) = shadow
            .begin(
                &spec(),
                target("r"),
                Duration::from_millis(50),
                false,
                &Tracer::disabled(),
            )
            .unwrap();
        let _kept = probe; // never observed
        comparing.conclude(Copied::TimedOut).await;
        assert_eq!(shadow.report().routes[0].outcomes["skipped"], 1);
        assert_eq!(shadow.pending(), 0);
    }

    #[tokio::test]
    async fn an_empty_primary_body_is_observed_at_once() {
        let shadow = Arc::new(ShadowDiff::new("sleep"));
        let (probe, comparing) = shadow
            .begin(
                &spec(),
                target("r"),
                Duration::from_secs(1),
                false,
                &Tracer::disabled(),
            )
            .unwrap();
        let _resp = probe.observe(http::Response::new(body("")));
        let copy = Observer::new(spec(), http::StatusCode::OK, &http::HeaderMap::new());
        comparing
            .conclude(Copied::Answered(copy.finish(Duration::ZERO)))
            .await;
        assert_eq!(shadow.report().routes[0].outcomes["match"], 1);
    }

    #[tokio::test]
    async fn a_mesh_error_answer_is_a_mirror_error_and_an_app_error_an_answer() {
        let answer = |mesh: bool| {
            let mut r = http::Response::new(body("upstream connect error"));
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            if mesh {
                r.headers_mut().insert(
                    crate::errors::ERROR_HEADER,
                    http::HeaderValue::from_static("no healthy endpoint"),
                );
            }
            r
        };
        let got = observe_copy(spec(), answer(true), Instant::now()).await;
        assert!(matches!(got, Copied::Failed(Some(503))), "{got:?}");
        let got = observe_copy(spec(), answer(false), Instant::now()).await;
        match got {
            Copied::Answered(o) => {
                assert_eq!((o.status, o.body_len), (503, 22));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn routes_beyond_the_bound_are_not_kept() {
        let shadow = Arc::new(ShadowDiff::new("sleep"));
        for i in 0..MAX_ROUTES + 5 {
            let mut t = target("r");
            t.route = format!("route-{i}");
            shadow.skip(&t);
        }
        assert_eq!(shadow.report().routes.len(), MAX_ROUTES);
    }

    #[test]
    fn the_divergence_event_names_what_differed() {
        let v = Verdict {
            outcome: Outcome::Body,
            headers: vec![],
            json_paths: vec!["$.a".into(), "$.b[0]".into()],
        };
        let mut m = Observer::new(spec(), http::StatusCode::OK, &http::HeaderMap::new())
            .finish(Duration::from_millis(30));
        m.status = 200;
        let e = divergence_event(&v, &Copied::Answered(m), Some(Duration::from_millis(10)));
        assert_eq!(e.name, "weft.mirror.divergence");
        let get = |k: &str| {
            e.attributes
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_text())
        };
        assert_eq!(get("outcome").as_deref(), Some("body"));
        assert_eq!(get("json_paths").as_deref(), Some("$.a,$.b[0]"));
        assert_eq!(get("latency_delta_us").as_deref(), Some("20000"));
        assert_eq!(get("headers"), None);
    }
}
