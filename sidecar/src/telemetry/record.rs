//! One record per request, on both sides: started when the head arrives, filled in by the stages
//! as they learn things (route, cluster, endpoint, response flags), and finished exactly once, when
//! it feeds the Istio metrics, the access log and the span from the same facts.
//!
//! What only the access log or the span needs is copied from the head only when that sink is on
//! (the log enabled, the trace sampled), so a request nobody logs or traces costs a few words.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::access_log::{AccessLog, LogEntry};
use super::metrics::{Labels, Metrics, Reporter, RequestMetric};
use super::trace::{Hop, Kind, Span, Tracer};
use crate::http::body::{Body, Watch, Watched};
use http_body::Body as _;

/// Envoy's response flags, as a set (`%RESPONSE_FLAGS%` and Istio's `response_flags` label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    /// No healthy upstream (no endpoint, or every one ejected).
    pub const UH: Flags = Flags(1);
    /// Upstream connection failure.
    pub const UF: Flags = Flags(1 << 1);
    /// Upstream overflow (circuit breaker).
    pub const UO: Flags = Flags(1 << 2);
    /// No route.
    pub const NR: Flags = Flags(1 << 3);
    /// Retry limit exceeded (the last try failed and was retriable).
    pub const URX: Flags = Flags(1 << 4);
    /// Upstream request timeout (route timeout or per-try timeout).
    pub const UT: Flags = Flags(1 << 5);
    /// Upstream connection terminated before the response.
    pub const UC: Flags = Flags(1 << 6);
    /// Downstream disconnected before the response.
    pub const DC: Flags = Flags(1 << 7);
    /// Fault injection: aborted.
    pub const FI: Flags = Flags(1 << 8);
    /// Fault injection: delayed.
    pub const DI: Flags = Flags(1 << 9);
    /// Upstream remote reset (a stream reset before response headers).
    pub const UR: Flags = Flags(1 << 10);
    /// No cluster (no config yet).
    pub const NC: Flags = Flags(1 << 11);
    /// Downstream protocol error (refused framing).
    pub const DPE: Flags = Flags(1 << 12);

    /// Envoy's order when several are set (its flag table's order).
    const NAMES: [(Flags, &'static str); 13] = [
        (Flags::UH, "UH"),
        (Flags::UT, "UT"),
        (Flags::UR, "UR"),
        (Flags::UF, "UF"),
        (Flags::UC, "UC"),
        (Flags::UO, "UO"),
        (Flags::NR, "NR"),
        (Flags::DI, "DI"),
        (Flags::FI, "FI"),
        (Flags::DC, "DC"),
        (Flags::URX, "URX"),
        (Flags::DPE, "DPE"),
        (Flags::NC, "NC"),
    ];

    /// Adds `other`.
    pub fn set(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// Whether none is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Writes the flags as Envoy prints them: `-` for none, else comma-separated. (Into a `String`
    /// or export's fixed scratch buffer, which fits all of them at once: neither fails.)
    pub fn write(self, out: &mut impl std::fmt::Write) {
        if self.0 == 0 {
            let _ = out.write_str("-"); // ok: see above
            return;
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.0 & flag.0 != 0 {
                if !first {
                    let _ = out.write_str(","); // ok: see above
                }
                let _ = out.write_str(name); // ok: see above
                first = false;
            }
        }
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

/// Where a request's facts go: shared by every request of one side of the proxy.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// Span export.
    pub tracer: Tracer,
    /// Istio metrics.
    pub metrics: Arc<Metrics>,
    /// Access-log format.
    pub access_log: AccessLog,
    /// `service.name` until pilot's first push names it (`<canonical service>.<namespace>`, as
    /// pilot does; see `span_tags::service_name`).
    pub service_name: Arc<str>,
    /// Labels for a side nobody could name (no endpoint reached, a caller outside the mesh).
    pub unknown: Unknown,
}

impl Sinks {
    /// `service.name` of the spans: pilot's name for this workload once pushed, else the one the
    /// sidecar started with.
    pub fn service_name(&self, routes: &crate::route::RouteTable) -> Arc<str> {
        routes
            .tracing
            .service_name
            .clone()
            .unwrap_or_else(|| self.service_name.clone())
    }
}

/// Istio's `unknown` labels, built once.
#[derive(Debug, Clone)]
pub struct Unknown {
    source: Labels,
    destination: Labels,
    service: Labels,
}

impl Default for Unknown {
    fn default() -> Self {
        Self {
            source: super::workload_labels("source", &super::Workload::default()),
            destination: super::workload_labels("destination", &super::Workload::default()),
            service: super::service_labels("", "", ""),
        }
    }
}

/// What the access log copies from the request head.
#[derive(Debug)]
struct HeadLog {
    method: String,
    path: String,
    protocol: &'static str,
    xff: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
}

/// The span being recorded, when the request's trace is sampled.
#[derive(Debug)]
pub struct SpanFacts {
    /// Identity within the trace.
    pub hop: Hop,
    /// Operation name.
    pub name: String,
    /// `service.name`.
    pub service: Arc<str>,
    /// Attributes the stages add.
    pub attributes: super::attribute::Attributes,
    /// The caller's `tracestate`.
    pub trace_state: Option<String>,
}

/// The facts of one request. Finished exactly once: by [`Record::finish`] with the response, or,
/// when the request's future is dropped first (the downstream went away), on drop with status 0 and
/// flag `DC`, as Envoy logs a downstream disconnect.
#[derive(Debug)]
pub struct Record<'a> {
    sinks: &'a Sinks,
    done: bool,
    start: SystemTime,
    reporter: Reporter,
    // Boxed, like the span: a request nobody logs or traces carries two null pointers, and the
    // record (which lives in every request's future and is moved into `finish`) stays small.
    log: Option<Box<HeadLog>>,
    /// Response flags.
    pub flags: Flags,
    /// The authority the request is for (after rewrites on the outbound side).
    pub authority: Option<String>,
    /// Route name.
    pub route: Option<&'a str>,
    /// Upstream cluster name.
    pub cluster: Option<&'a str>,
    /// The endpoint (or app address) the response came from.
    pub upstream_host: Option<SocketAddr>,
    /// The downstream peer.
    pub downstream: Option<SocketAddr>,
    /// Istio `source_*` labels.
    pub source: Option<Labels>,
    /// Istio `destination_*` workload labels.
    pub destination: Option<Labels>,
    /// Istio `destination_service*` labels.
    pub service: Option<Labels>,
    /// Whether the hop between sidecars was mTLS.
    pub mtls: bool,
    /// Request body bytes (Content-Length).
    pub request_bytes: u64,
    /// Whether the request is gRPC (Istio's `request_protocol="grpc"`).
    grpc: bool,
    /// The response's `grpc-status`, when its head carried one.
    grpc_status: Option<u16>,
    /// The span, when sampled and a tracer is on.
    pub span: Option<Box<SpanFacts>>,
    /// Where the finished span goes instead of the tracer: shadow-diff holds a compared request's
    /// client span until the comparison concludes (and records it then, with its event).
    pub span_hold: Option<tokio::sync::oneshot::Sender<Span>>,
}

impl<'a> Record<'a> {
    /// Starts the record of a request whose head is `parts`.
    pub fn start(reporter: Reporter, sinks: &'a Sinks, parts: &http::request::Parts) -> Self {
        let log = (sinks.access_log != AccessLog::Off).then(|| {
            let h = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            Box::new(HeadLog {
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
            })
        });
        Self {
            sinks,
            done: false,
            start: SystemTime::now(),
            reporter,
            log,
            flags: Flags::default(),
            authority: None,
            route: None,
            cluster: None,
            upstream_host: None,
            downstream: None,
            source: None,
            destination: None,
            service: None,
            mtls: false,
            request_bytes: super::content_length(&parts.headers),
            grpc: is_grpc(&parts.headers),
            grpc_status: None,
            span: None,
            span_hold: None,
        }
    }

    /// Takes the request id the proxy may just have added (the access log shows the id the
    /// request travelled with, as Envoy's `%REQ(X-REQUEST-ID)%`).
    pub fn note_request_id(&mut self, headers: &http::HeaderMap) {
        if let Some(log) = &mut self.log
            && log.request_id.is_none()
        {
            log.request_id = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
    }

    /// The protocol the access log names, where it is not the wire's (the inbound side names the
    /// protocol the calling app spoke, as Istio's inbound log does, not the HTTP/2 hop between
    /// sidecars).
    pub fn set_protocol(&mut self, protocol: &'static str) {
        if let Some(log) = &mut self.log {
            log.protocol = protocol;
        }
    }

    /// When the request started.
    pub fn started(&self) -> SystemTime {
        self.start
    }

    /// Adds a span attribute, if the request is traced (the value is built only then).
    pub fn attribute(
        &mut self,
        key: &'static str,
        value: impl FnOnce() -> super::attribute::Value,
    ) {
        if let Some(span) = &mut self.span {
            span.attributes.push((key, value()));
        }
    }

    /// Finishes the record with the response's status and size: one metric sample, one access-log
    /// line, one span.
    pub fn finish(mut self, code: u16, response_bytes: u64) {
        self.emit(code, response_bytes);
    }

    /// Finishes the record with the answer the caller gets.
    pub fn answered<B>(mut self, resp: &http::Response<B>) {
        // A gRPC error answered at once ("trailers-only") carries its status in the head.
        self.grpc_status = grpc_status(resp.headers());
        let bytes = super::content_length(resp.headers());
        self.finish(resp.status().as_u16(), bytes);
    }

    /// [`Record::answered`] for an answer whose body is about to go to the caller. A gRPC answer
    /// whose status is still to come, in its trailers (every call that does not fail at once), gets
    /// its body wrapped, and its metric sample waits for the trailers (or the body's end), so that
    /// `grpc_response_status` is the call's; the access log and span are written now, with the
    /// head, as for any answer. Other answers pass through untouched.
    pub fn answer(mut self, resp: http::Response<Body>) -> http::Response<Body> {
        self.grpc_status = grpc_status(resp.headers());
        let code = resp.status().as_u16();
        let bytes = super::content_length(resp.headers());
        if !self.grpc || self.grpc_status.is_some() || resp.body().is_end_stream() {
            self.finish(code, bytes);
            return resp;
        }
        let elapsed = self.start.elapsed().unwrap_or_default();
        let metric = self.metric(code, bytes, elapsed);
        self.log_and_span(code, bytes, elapsed);
        let metrics = self.sinks.metrics.clone();
        resp.map(|inner| {
            Body::new(Watched::new(
                inner,
                GrpcStatus {
                    pending: Some((metrics, metric)),
                },
            ))
        })
    }

    fn emit(&mut self, code: u16, response_bytes: u64) {
        let elapsed = self.start.elapsed().unwrap_or_default();
        let metric = self.metric(code, response_bytes, elapsed);
        self.sinks.metrics.record(metric);
        self.log_and_span(code, response_bytes, elapsed);
    }

    /// The request's metric sample (marks the record finished).
    fn metric(
        &mut self,
        code: u16,
        response_bytes: u64,
        elapsed: std::time::Duration,
    ) -> RequestMetric {
        self.done = true;
        let sinks = self.sinks;
        let unknown = &sinks.unknown;
        RequestMetric {
            reporter: self.reporter,
            source: self.source.take().unwrap_or_else(|| unknown.source.clone()),
            destination: self
                .destination
                .take()
                .unwrap_or_else(|| unknown.destination.clone()),
            service: self
                .service
                .take()
                .unwrap_or_else(|| unknown.service.clone()),
            code,
            grpc: self.grpc,
            grpc_status: self.grpc_status,
            flags: self.flags,
            mtls: self.mtls,
            duration: elapsed,
            request_bytes: self.request_bytes,
            response_bytes,
        }
    }

    /// The access-log line and the span of the finished request.
    fn log_and_span(&mut self, code: u16, response_bytes: u64, elapsed: std::time::Duration) {
        let sinks = self.sinks;
        if let Some(log) = &self.log {
            let mut flags = String::new();
            self.flags.write(&mut flags);
            sinks.access_log.write(&LogEntry {
                start: Some(self.start),
                method: &log.method,
                path: &log.path,
                protocol: log.protocol,
                code,
                flags: &flags,
                bytes_received: self.request_bytes,
                bytes_sent: response_bytes,
                duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                xff: log.xff.as_deref(),
                user_agent: log.user_agent.as_deref(),
                request_id: log.request_id.as_deref(),
                authority: self.authority.as_deref(),
                upstream_host: self.upstream_host.map(|h| h.to_string()),
                upstream_cluster: self.cluster,
                downstream_remote: self.downstream.map(|d| d.to_string()),
                route: self.route,
            });
        }
        if let Some(span) = self.span.take() {
            let mut span = *span;
            let kind = match self.reporter {
                Reporter::Source => Kind::Client,
                Reporter::Destination => Kind::Server,
            };
            super::span_tags::outcome(
                &mut span.attributes,
                &super::span_tags::Outcome {
                    code,
                    flags: self.flags,
                    request_size: self.request_bytes,
                    response_size: response_bytes,
                    cluster: self.cluster,
                    peer: self.downstream,
                },
            );
            let span = Span {
                hop: span.hop,
                name: span.name,
                kind,
                service: span.service,
                start: self.start,
                end: SystemTime::now(),
                status: code,
                attributes: span.attributes,
                events: Vec::new(),
                trace_state: span.trace_state,
            };
            match self.span_hold.take() {
                Some(hold) => {
                    // The comparison is gone already: record it as usual.
                    if let Err(span) = hold.send(span) {
                        sinks.tracer.record(span);
                    }
                }
                None => sinks.tracer.record(span),
            }
        }
    }
}

/// A gRPC answer's body on its way to the caller: holds the call's metric sample until the
/// trailers say its `grpc-status` (recorded without one if the body ends, fails or is dropped
/// first).
struct GrpcStatus {
    pending: Option<(Arc<Metrics>, RequestMetric)>,
}

impl GrpcStatus {
    fn record(&mut self, status: Option<u16>) {
        if let Some((metrics, mut metric)) = self.pending.take() {
            metric.grpc_status = status;
            metrics.record(metric);
        }
    }
}

impl Watch for GrpcStatus {
    fn frame(&mut self, frame: &http_body::Frame<bytes::Bytes>, _ended: bool) {
        if let Some(trailers) = frame.trailers_ref() {
            self.record(grpc_status(trailers));
        }
    }

    fn end(&mut self) {
        self.record(None);
    }

    fn failed(&mut self) {
        self.record(None);
    }
}

impl Drop for GrpcStatus {
    fn drop(&mut self) {
        self.record(None);
    }
}

/// Whether a request head is gRPC's: content-type `application/grpc` or `application/grpc+*`
/// (Istio's `request_protocol="grpc"`; gRPC-Web stays `http`, as Envoy's gRPC check).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    let Some(t) = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
    else {
        return false;
    };
    t.get(..16)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        && matches!(t.get(16), None | Some(b'+' | b';'))
}

/// A response head's `grpc-status`, when it has a numeric one.
fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.flags.set(Flags::DC);
            self.emit(0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics only (no spans, no log), with `workload` on both sides.
    fn sinks(workload: &super::super::Workload<'_>, service: &str) -> Sinks {
        Sinks {
            tracer: Tracer::disabled(),
            metrics: Arc::new(Metrics::new(
                super::super::workload_labels("source", workload),
                super::super::workload_labels("destination", workload),
            )),
            access_log: AccessLog::Off,
            service_name: Arc::from(service),
            unknown: Unknown::default(),
        }
    }

    #[test]
    fn grpc_is_told_by_the_content_type() {
        let head = |ct: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ct),
            );
            h
        };
        assert!(is_grpc(&head("application/grpc")));
        assert!(is_grpc(&head("application/grpc+proto")));
        assert!(is_grpc(&head("Application/GRPC;charset=utf-8")));
        assert!(!is_grpc(&head("application/grpc-web")));
        assert!(!is_grpc(&head("application/json")));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    #[test]
    fn grpc_status_comes_from_the_response_head() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&h), Some(14));
        h.insert("grpc-status", http::HeaderValue::from_static("x"));
        assert_eq!(grpc_status(&h), None);
    }

    #[test]
    fn metrics_name_grpc_requests_and_their_status() {
        let sinks = sinks(&super::super::Workload::default(), "a");
        let req = http::Request::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let resp = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        Record::start(Reporter::Source, &sinks, &parts).answered(&resp);
        let (plain, ()) = http::Request::new(()).into_parts();
        Record::start(Reporter::Source, &sinks, &plain).answered(&http::Response::new(()));
        let text = sinks.metrics.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert!(
            lines.iter().any(|l| l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"5\"")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.contains("request_protocol=\"http\"")
                && l.contains("grpc_response_status=\"\"")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_grpc_status_in_trailers_is_the_calls_and_is_counted_once_the_trailers_pass() {
        use http_body_util::BodyExt;
        let sinks = sinks(&super::super::Workload::default(), "a");
        let (parts, ()) = http::Request::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
            .into_parts();
        let count = |status: &str| {
            sinks
                .metrics
                .render()
                .lines()
                .filter(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains(&format!("grpc_response_status=\"{status}\""))
                })
                .count()
        };
        // A call whose status comes in its trailers: counted when they pass, with their status.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, crate::http::body::BodyError>(http_body::Frame::data(
                bytes::Bytes::from_static(b"msg"),
            )),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        let resp = http::Response::new(Body::new(body));
        let resp = Record::start(Reporter::Source, &sinks, &parts).answer(resp);
        assert_eq!(count("7"), 0, "not before the trailers");
        let collected = resp.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_some());
        assert_eq!(count("7"), 1);
        // A call whose body goes away without trailers: counted once, with no status.
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<
            _,
            crate::http::body::BodyError,
        >(
            http_body::Frame::data(bytes::Bytes::from_static(b"msg")),
        )]));
        let resp = Record::start(Reporter::Source, &sinks, &parts)
            .answer(http::Response::new(Body::new(body)));
        drop(resp);
        assert_eq!(count(""), 1);
        // Not gRPC: finished at once.
        let (plain, ()) = http::Request::new(()).into_parts();
        let _resp = Record::start(Reporter::Source, &sinks, &plain)
            .answer(http::Response::new(crate::http::body::empty_body()));
        assert_eq!(
            sinks
                .metrics
                .render()
                .lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .count(),
            3
        );
    }

    #[test]
    fn flags_print_as_envoy_does() {
        assert_eq!(Flags::default().to_string(), "-");
        let mut f = Flags::URX;
        f.set(Flags::UF);
        assert_eq!(f.to_string(), "UF,URX");
        assert!(f.contains(Flags::UF) && !f.contains(Flags::UO));
        let mut f = Flags::default();
        f.set(Flags::UO);
        assert_eq!(f.to_string(), "UO");
    }

    #[test]
    fn a_request_dropped_before_its_answer_is_recorded_as_a_downstream_disconnect() {
        let sleep = super::super::Workload {
            name: "sleep",
            namespace: "default",
            app: "sleep",
            ..Default::default()
        };
        let sinks = sinks(&sleep, "sleep");
        let (parts, ()) = http::Request::new(()).into_parts();
        let record = Record::start(Reporter::Source, &sinks, &parts);
        drop(record);
        let mut finished = Record::start(Reporter::Source, &sinks, &parts);
        finished.flags.set(Flags::UT);
        finished.finish(504, 0);
        let text = sinks.metrics.render();
        let line = |code: &str, flags: &str| {
            text.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
                    && l.contains(&format!("response_flags=\"{flags}\""))
                    && l.ends_with(" 1")
            })
        };
        assert!(line("0", "DC"), "{text}");
        assert!(
            line("504", "UT"),
            "finished once, not again on drop: {text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .count(),
            2,
            "{text}"
        );
    }
}
