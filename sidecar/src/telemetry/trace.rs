//! Tracing: B3 (and W3C) context in, context out, and spans exported over OTLP.
//!
//! Reading (istio-semantics.md §5): the single `b3` header wins over the multi-header form, which wins
//! over W3C `traceparent`; a context needs both a trace id and a span id; malformed values start a new
//! trace instead of failing the request. Each sidecar makes its own span whose parent is the caller's
//! span (Istio's `shared_span_context: false`) and hands the next hop `X-B3-TraceId`, `X-B3-SpanId`,
//! `X-B3-ParentSpanId`, `X-B3-Sampled` (Envoy's multi-header form) plus `traceparent`.
//!
//! Export: finished spans go to `Tracer::record` (`export/`: a bounded queue, batching, OTLP with the
//! OpenTelemetry environment contract); `request` here turns a batch into the OTLP request's types,
//! for OTLP/JSON (protobuf is written without them: `export::protobuf`).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otlp;

pub use super::attribute::{Attributes, Value};
pub use super::export::{TraceStats, Tracer};

// Header names, parsed once: a `&str` name is parsed and validated again on every lookup, and these
// are looked up on every request.
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-request-id`, Envoy's per-request id.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub use crate::http::headers::MESH_IDS;

/// A trace context read from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// 128-bit trace id (64-bit B3 ids are zero-padded, as OTel does).
    pub trace_id: u128,
    /// The caller's span: our span's parent.
    pub span_id: u64,
    /// The caller's sampling decision, if it made one.
    pub sampled: Option<bool>,
}

/// Up to 16 hex digits as a number (`from_str_radix` costs several times more, on every request that
/// carries a trace context).
fn hex_digits(s: &[u8]) -> Option<u64> {
    if s.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

fn hex_u128(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    let v = match b.len() {
        16 => u128::from(hex_digits(b)?),
        32 => {
            let (high, low) = b.split_at(16);
            (u128::from(hex_digits(high)?) << 64) | u128::from(hex_digits(low)?)
        }
        _ => return None,
    };
    (v != 0).then_some(v)
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex_digits(s.as_bytes()).filter(|v| *v != 0)
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Writes the low `out.len()` nibbles of `v` as lowercase hex (what `{:0Nx}` does, without the
/// formatting machinery, which cost more than the rest of the trace path together).
fn put_hex(v: u128, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut v = v;
    for b in out.iter_mut().rev() {
        // The mask keeps the index below 16.
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// A header value for an id that is new on every request. Marked sensitive so HPACK sends it as a
/// literal instead of inserting it into the connection's dynamic table, where it could never be
/// reused and would only evict entries that could.
fn id_value(bytes: &[u8]) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_bytes(bytes).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn sampled_flag(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Reads the caller's context; `None` (start a new trace) when absent or malformed. A lone sampling
/// decision (`b3: 0`, `X-B3-Sampled` without ids) is returned as `Err(decision)`.
pub fn extract(h: &HeaderMap) -> Result<Context, Option<bool>> {
    if let Some(b3) = header(h, &B3) {
        let mut parts = b3.split('-');
        let first = parts.next().unwrap_or_default();
        if let (Some(trace_id), Some(span)) = (hex_u128(first), parts.next()) {
            if let Some(span_id) = hex_u64(span) {
                let sampled = parts.next().and_then(sampled_flag);
                return Ok(Context {
                    trace_id,
                    span_id,
                    sampled,
                });
            }
            return Err(None);
        }
        // `b3: 0` / `b3: 1` / `b3: d`: a decision only.
        return Err(sampled_flag(first));
    }
    let sampled = header(h, &X_B3_SAMPLED)
        .and_then(sampled_flag)
        .or_else(|| (header(h, &X_B3_FLAGS) == Some("1")).then_some(true));
    match (header(h, &X_B3_TRACEID), header(h, &X_B3_SPANID)) {
        (Some(t), Some(s)) => {
            return match (hex_u128(t), hex_u64(s)) {
                (Some(trace_id), Some(span_id)) => Ok(Context {
                    trace_id,
                    span_id,
                    sampled,
                }),
                _ => Err(sampled),
            };
        }
        (Some(_), None) | (None, Some(_)) => return Err(sampled),
        (None, None) if sampled.is_some() => return Err(sampled),
        (None, None) => {}
    }
    if let Some(tp) = header(h, &TRACEPARENT) {
        let f: Vec<&str> = tp.split('-').collect();
        if let [version, trace, span, flags] = f.as_slice()
            && version.len() == 2
            && *version != "ff"
            && trace.len() == 32
            && let (Some(trace_id), Some(span_id)) = (hex_u128(trace), hex_u64(span))
            && let Ok(flags) = u8::from_str_radix(flags, 16)
        {
            return Ok(Context {
                trace_id,
                span_id,
                sampled: Some(flags & 1 == 1),
            });
        }
    }
    Err(None)
}

/// A random non-zero span id.
pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// A random non-zero 128-bit trace id.
pub fn new_trace_id() -> u128 {
    (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(1..))
}

/// The span this hop creates, and what it tells the next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// Trace id.
    pub trace_id: u128,
    /// This hop's span id.
    pub span_id: u64,
    /// The caller's span id.
    pub parent: Option<u64>,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl Hop {
    /// Continues the caller's trace, or starts one (sampled with `sampling_percent`).
    pub fn from_request(h: &HeaderMap, sampling_percent: f64) -> Self {
        let roll = || sampling_percent >= 100.0 || fastrand::f64() * 100.0 < sampling_percent;
        match extract(h) {
            Ok(ctx) => Hop {
                trace_id: ctx.trace_id,
                span_id: new_span_id(),
                parent: Some(ctx.span_id),
                sampled: ctx.sampled.unwrap_or_else(roll),
            },
            Err(decision) => Hop {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                parent: None,
                sampled: decision.unwrap_or_else(roll),
            },
        }
    }

    /// A child span of this one in the same trace (e.g. the mirror copy).
    pub fn child(&self) -> Self {
        Hop {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            parent: Some(self.span_id),
            sampled: self.sampled,
        }
    }

    /// Writes this span as the context of the next hop: B3 multi-header (as Envoy) and `traceparent`;
    /// the single `b3` header is removed so the next hop cannot read a stale one first.
    pub fn inject(&self, h: &mut HeaderMap) {
        h.remove(B3);
        // Every id is written once into one buffer, `00-<trace>-<span>-<flags>` then the parent,
        // and each header value is a slice of it: one allocation instead of four on every request.
        let mut ids = *b"00-00000000000000000000000000000000-0000000000000000-000000000000000000";
        put_hex(self.trace_id, &mut ids[3..35]);
        put_hex(u128::from(self.span_id), &mut ids[36..52]);
        if self.sampled {
            ids[54] = b'1';
        }
        if let Some(p) = self.parent {
            put_hex(u128::from(p), &mut ids[55..71]);
        }
        let ids = Bytes::copy_from_slice(&ids);
        let value = |range: std::ops::Range<usize>| {
            let mut v = HeaderValue::from_maybe_shared(ids.slice(range)).ok()?;
            v.set_sensitive(true);
            Some(v)
        };
        if let Some(v) = value(3..35) {
            h.insert(X_B3_TRACEID, v);
        }
        if let Some(v) = value(36..52) {
            h.insert(X_B3_SPANID, v);
        }
        match self.parent.and_then(|_| value(55..71)) {
            Some(v) => {
                h.insert(X_B3_PARENTSPANID, v);
            }
            None => {
                h.remove(X_B3_PARENTSPANID);
            }
        }
        h.insert(
            X_B3_SAMPLED,
            HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
        );
        if let Some(v) = value(0..55) {
            h.insert(TRACEPARENT, v);
        }
    }
}

impl Hop {
    /// Writes this span as the context of the next hop when that hop is a peer sidecar (mTLS): the
    /// single `b3` header alone, which weft and Envoy both read before any other form. The peer's
    /// inbound side writes the multi-header form and `traceparent` for its app, so this hop carries
    /// one header instead of five: less HPACK work on both ends of the busiest hop. Headers of the
    /// other forms that the app sent are left for the peer to overwrite. B3's optional parent field
    /// is left out: the peer's span is a child of this span, so it never reads this span's parent,
    /// and on a request that continues a trace its 17 characters would be Huffman-coded and decoded
    /// for nothing.
    pub fn inject_mesh(&self, h: &mut HeaderMap) {
        // <trace>-<span>-<sampled>
        let mut b3 = [0u8; 32 + 1 + 16 + 2];
        put_hex(self.trace_id, &mut b3[0..32]);
        b3[32] = b'-';
        put_hex(u128::from(self.span_id), &mut b3[33..49]);
        b3[49] = b'-';
        b3[50] = if self.sampled { b'1' } else { b'0' };
        if let Some(v) = id_value(&b3) {
            h.insert(B3, v);
        }
    }
}

/// Sets `x-request-id` (a UUIDv4) when the request has none; returns it.
pub fn ensure_request_id(h: &mut HeaderMap) -> Option<HeaderValue> {
    if let Some(v) = h.get(X_REQUEST_ID) {
        return Some(v.clone());
    }
    // A version-4 UUID: 8-4-4-4-12 hex digits, version nibble 4, variant bits 10.
    let a = u128::from(fastrand::u64(..));
    let b = u128::from(fastrand::u64(..));
    let mut id = *b"00000000-0000-4000-0000-000000000000";
    put_hex(a >> 32, &mut id[0..8]);
    put_hex(a >> 16, &mut id[9..13]);
    put_hex(a, &mut id[15..18]);
    put_hex(((b >> 48) & 0x3fff) | 0x8000, &mut id[19..23]);
    put_hex(b, &mut id[24..36]);
    let v = id_value(&id)?;
    h.insert(X_REQUEST_ID, v.clone());
    Some(v)
}

/// Client or server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Outbound.
    Client,
    /// Inbound.
    Server,
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Identity within the trace.
    pub hop: Hop,
    /// Operation name (`httpbin.default.svc.cluster.local:8000/*`, as Istio names it).
    pub name: String,
    /// Client or server.
    pub kind: Kind,
    /// `service.name` of the emitting workload.
    pub service: Arc<str>,
    /// Start time.
    pub start: SystemTime,
    /// End time.
    pub end: SystemTime,
    /// HTTP status (0 = no response).
    pub status: u16,
    /// Attributes (Istio's tags, OTel's `http.response.status_code` and `weft.*`).
    pub attributes: Attributes,
    /// Timed events (shadow-diff's `weft.mirror.divergence`); empty for nearly every span.
    pub events: Vec<Event>,
    /// The caller's W3C `tracestate`, carried onto the span (the header itself goes on untouched).
    pub trace_state: Option<String>,
}

/// A span event: something that happened at a point of the span's life.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name.
    pub name: &'static str,
    /// When.
    pub time: SystemTime,
    /// Attributes.
    pub attributes: Attributes,
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

pub(crate) fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn attributes(attributes: &Attributes) -> Vec<KeyValue> {
    attributes.iter().map(|(k, v)| kv(k, v.to_text())).collect()
}

/// Whether a span's `status` makes it an error: 5xx or no response, on both sides (OTel's HTTP
/// conventions).
pub(crate) fn is_error(status: u16) -> bool {
    status == 0 || status >= 500
}

fn to_otlp(span: &Span) -> otlp::Span {
    let mut attributes = attributes(&span.attributes);
    if span.status != 0 {
        attributes.push(KeyValue {
            key: "http.response.status_code".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i64::from(span.status))),
            }),
            ..Default::default()
        });
    }
    otlp::Span {
        trace_id: span.hop.trace_id.to_be_bytes().to_vec(),
        span_id: span.hop.span_id.to_be_bytes().to_vec(),
        parent_span_id: span
            .hop
            .parent
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        name: span.name.clone(),
        kind: match span.kind {
            Kind::Client => otlp::span::SpanKind::Client as i32,
            Kind::Server => otlp::span::SpanKind::Server as i32,
        },
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(span.end),
        attributes,
        events: span
            .events
            .iter()
            .map(|e| otlp::span::Event {
                time_unix_nano: nanos(e.time),
                name: e.name.to_owned(),
                attributes: self::attributes(&e.attributes),
                ..Default::default()
            })
            .collect(),
        status: Some(otlp::Status {
            code: if is_error(span.status) {
                otlp::status::StatusCode::Error as i32
            } else {
                otlp::status::StatusCode::Unset as i32
            },
            message: String::new(),
        }),
        trace_state: span.trace_state.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// The batch's `service.name`s, in the order they first appear: one `ResourceSpans` each.
pub(crate) fn services(batch: &[Span]) -> Vec<&Arc<str>> {
    let mut services: Vec<&Arc<str>> = Vec::with_capacity(1);
    for span in batch {
        if !services
            .iter()
            .any(|s| Arc::ptr_eq(s, &span.service) || ***s == *span.service)
        {
            services.push(&span.service);
        }
    }
    services
}

/// The OTLP request of a batch: one `ResourceSpans` per `service.name` (the service's spans in
/// batch order), whose resource is `service.name` and then `resource`.
pub(crate) fn request(
    batch: &[Span],
    resource: &[(&'static str, String)],
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: services(batch)
            .into_iter()
            .map(|service| {
                let mut attributes = vec![kv("service.name", service.to_string())];
                attributes.extend(resource.iter().map(|(k, v)| kv(k, v.clone())));
                otlp::ResourceSpans {
                    resource: Some(Resource {
                        attributes,
                        ..Default::default()
                    }),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: SCOPE_NAME.into(),
                            version: SCOPE_VERSION.into(),
                            ..Default::default()
                        }),
                        spans: batch
                            .iter()
                            .filter(|s| *s.service == **service)
                            .map(to_otlp)
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// The instrumentation scope weft's spans name.
pub(crate) const SCOPE_NAME: &str = "weft-sidecar";
/// Its version.
pub(crate) const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const T: &str = "463ac35c9f6413ad48485a3953bb6124";

    #[test]
    fn reads_b3_single_multi_and_traceparent_with_precedence() {
        let multi = headers(&[
            ("x-b3-traceid", T),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let ctx = extract(&multi).unwrap();
        assert_eq!(ctx.trace_id, u128::from_str_radix(T, 16).unwrap());
        assert_eq!(ctx.span_id, 0xa2fb4a1d1a96d312);
        assert_eq!(ctx.sampled, Some(true));

        // Single wins over multi.
        let both = headers(&[
            (
                "b3",
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90",
            ),
            ("x-b3-traceid", T),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        let ctx = extract(&both).unwrap();
        assert_eq!(ctx.span_id, 0xe457b5a2e4d86bd1);
        assert_eq!(ctx.sampled, Some(false));

        // 64-bit ids are padded.
        let short = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "463ac35c9f6413ad"),
        ]);
        assert_eq!(extract(&short).unwrap().trace_id, 0x463ac35c9f6413ad);

        let tp = headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]);
        let ctx = extract(&tp).unwrap();
        assert_eq!(ctx.span_id, 0xb7ad6b7169203331);
        assert_eq!(ctx.sampled, Some(true));
    }

    #[test]
    fn malformed_context_starts_a_new_trace_keeping_a_decision() {
        for bad in [
            headers(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", "a2fb4a1d1a96d312")]),
            headers(&[("x-b3-traceid", T)]),
            headers(&[("b3", "nonsense-value")]),
            headers(&[(
                "traceparent",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            )]),
            headers(&[("x-b3-traceid", T), ("x-b3-spanid", "-")]),
        ] {
            assert!(extract(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(extract(&headers(&[("b3", "0")])), Err(Some(false)));
        let hop = Hop::from_request(&headers(&[("b3", "0")]), 100.0);
        assert!(!hop.sampled && hop.parent.is_none());
    }

    #[test]
    fn injects_envoy_style_multi_header_and_traceparent() {
        let incoming = headers(&[("b3", &format!("{T}-a2fb4a1d1a96d312-1"))]);
        let hop = Hop::from_request(&incoming, 0.0);
        assert_eq!(hop.parent, Some(0xa2fb4a1d1a96d312));
        assert!(
            hop.sampled,
            "the caller's decision wins over local sampling"
        );
        let mut out = incoming.clone();
        hop.inject(&mut out);
        assert!(out.get("b3").is_none());
        assert_eq!(out["x-b3-traceid"], T);
        assert_eq!(out["x-b3-spanid"], format!("{:016x}", hop.span_id).as_str());
        assert_eq!(out["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(out["x-b3-sampled"], "1");
        assert_eq!(
            out["traceparent"],
            format!("00-{T}-{:016x}-01", hop.span_id).as_str()
        );
        // A new trace has no parent: a stale one the app sent goes.
        let mut stale = headers(&[("x-b3-parentspanid", "a2fb4a1d1a96d312")]);
        let fresh = Hop::from_request(&HeaderMap::new(), 100.0);
        fresh.inject(&mut stale);
        assert!(stale.get("x-b3-parentspanid").is_none());
        assert_eq!(
            stale["traceparent"],
            format!("00-{:032x}-{:016x}-01", fresh.trace_id, fresh.span_id).as_str()
        );
        // The next hop reads exactly what we meant.
        let next = extract(&out).unwrap();
        assert_eq!((next.trace_id, next.span_id), (hop.trace_id, hop.span_id));
        let child = hop.child();
        assert_eq!(
            (child.trace_id, child.parent),
            (hop.trace_id, Some(hop.span_id))
        );
    }

    #[test]
    fn request_ids_are_uuids_and_kept_when_present() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h).unwrap();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(
            matches!(&s[19..20], "8" | "9" | "a" | "b"),
            "variant bits: {s}"
        );
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        assert!(
            id.is_sensitive(),
            "a unique id must stay out of HPACK's table"
        );
        assert_eq!(ensure_request_id(&mut h).unwrap(), id);
    }

    #[test]
    fn the_mesh_hop_carries_one_b3_header_that_reads_back_the_same() {
        for (incoming, parent) in [
            (headers(&[("b3", &format!("{T}-a2fb4a1d1a96d312-1"))]), true),
            (HeaderMap::new(), false),
        ] {
            let hop = Hop::from_request(&incoming, 100.0);
            let mut out = HeaderMap::new();
            hop.inject_mesh(&mut out);
            assert_eq!(out.len(), 1, "{out:?}");
            let b3 = out["b3"].to_str().unwrap();
            let mut fields = b3.split('-');
            assert_eq!(fields.next().unwrap(), format!("{:032x}", hop.trace_id));
            assert_eq!(fields.next().unwrap(), format!("{:016x}", hop.span_id));
            assert_eq!(fields.next().unwrap(), "1");
            // No parent field, whether or not this span has a parent.
            assert_eq!(fields.next(), None, "{b3}");
            assert_eq!(hop.parent.is_some(), parent);
            let next = extract(&out).unwrap();
            assert_eq!(
                (next.trace_id, next.span_id, next.sampled),
                (hop.trace_id, hop.span_id, Some(true))
            );
        }
        // It wins over stale multi-headers the app sent along.
        let mut stale = headers(&[("x-b3-traceid", T), ("x-b3-spanid", "a2fb4a1d1a96d312")]);
        let hop = Hop::from_request(&HeaderMap::new(), 0.0);
        hop.inject_mesh(&mut stale);
        assert_eq!(extract(&stale).unwrap().span_id, hop.span_id);
    }

    #[test]
    fn hex_ids_parse_as_from_str_radix_does() {
        for _ in 0..1000 {
            let v = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
            let wide = format!("{v:032x}");
            assert_eq!(hex_u128(&wide), Some(v));
            assert_eq!(hex_u128(&wide.to_uppercase()), Some(v));
            let narrow = format!("{:016x}", v as u64);
            assert_eq!(hex_u64(&narrow), Some(v as u64));
            assert_eq!(hex_u128(&narrow), Some(u128::from(v as u64)));
        }
        for bad in [
            "",
            "0",
            "abc",
            "0000000000000000",
            "g000000000000000",
            "+00000000000000a",
        ] {
            assert_eq!(hex_u64(bad), None, "{bad:?}");
            assert_eq!(hex_u128(bad), None, "{bad:?}");
        }
        assert_eq!(
            hex_u128(&"0".repeat(32)),
            None,
            "an all-zero trace id is invalid"
        );
        assert_eq!(hex_u128(&"a".repeat(31)), None);
    }

    #[test]
    fn hex_matches_the_formatter() {
        for _ in 0..1000 {
            let v = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
            let mut wide = [0u8; 32];
            put_hex(v, &mut wide);
            assert_eq!(std::str::from_utf8(&wide).unwrap(), format!("{v:032x}"));
            let mut narrow = [0u8; 16];
            put_hex(v, &mut narrow);
            assert_eq!(
                std::str::from_utf8(&narrow).unwrap(),
                format!("{:016x}", v as u64)
            );
        }
    }
}
