//! OTLP/protobuf encoding of a span batch, written straight into one buffer.
//!
//! Why not prost's types: building an `ExportTraceServiceRequest` costs an allocation per attribute
//! key and value, and prost then sizes every nested message once for each level above it (an
//! attribute's value is sized five times). At 100% sampling that was most of what tracing cost a
//! request (bench/results/callgrind-2026-12-06-span-encoding.md). Here each value is turned into
//! text once, into a stack buffer when it is a number, address or flags, and copied once, into the
//! request; a message whose length is not known in advance is written after a fixed-width length
//! slot, closed up when the message ends.
//!
//! The bytes are exactly prost's for the same batch (tested below against `trace::request`, which
//! stays the one description of a span's fields and serves OTLP/JSON).

use crate::telemetry::attribute::{Scratch, Value};
use crate::telemetry::trace::{self, Kind, Span};

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// Bytes kept for the length of a message written before its length is known: a varint of 5
/// bytes holds up to 32 GiB, far above any batch (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans of
/// bounded heads).
const LEN_SLOT: usize = 5;

/// The `ExportTraceServiceRequest` of `batch`: one `ResourceSpans` per `service.name` in the order
/// they first appear, its resource `service.name` then `resource`.
pub fn request(batch: &[Span], resource: &[(&'static str, String)]) -> Vec<u8> {
    // About what a span of a plain request takes, so that the buffer rarely grows.
    let mut out = Vec::with_capacity(256 + batch.len() * 768);
    let mut scratch = Scratch::default();
    for service in trace::services(batch) {
        // ExportTraceServiceRequest.resource_spans
        message(&mut out, 1, |out| {
            // ResourceSpans.resource
            message(out, 1, |out| {
                key_value(out, 1, "service.name", service);
                for (k, v) in resource {
                    key_value(out, 1, k, v);
                }
            });
            // ResourceSpans.scope_spans
            message(out, 2, |out| {
                // ScopeSpans.scope: InstrumentationScope's name and version.
                message(out, 1, |out| {
                    string(out, 1, trace::SCOPE_NAME);
                    string(out, 2, trace::SCOPE_VERSION);
                });
                for span in batch.iter().filter(|s| *s.service == **service) {
                    // ScopeSpans.spans
                    message(out, 2, |out| span_fields(out, span, &mut scratch));
                }
            });
        });
    }
    out
}

/// A `Span`'s fields, in field order.
fn span_fields(out: &mut Vec<u8>, span: &Span, scratch: &mut Scratch) {
    let hop = &span.hop;
    bytes(out, 1, &hop.trace_id.to_be_bytes());
    bytes(out, 2, &hop.span_id.to_be_bytes());
    string(out, 3, span.trace_state.as_deref().unwrap_or_default());
    if let Some(parent) = hop.parent {
        bytes(out, 4, &parent.to_be_bytes());
    }
    string(out, 5, &span.name);
    // SpanKind: SERVER 2, CLIENT 3.
    let kind = match span.kind {
        Kind::Server => 2,
        Kind::Client => 3,
    };
    varint_field(out, 6, kind);
    fixed64(out, 7, trace::nanos(span.start));
    fixed64(out, 8, trace::nanos(span.end));
    attributes(out, 9, &span.attributes, scratch);
    if span.status != 0 {
        key_int(out, 9, "http.response.status_code", i64::from(span.status));
    }
    for event in &span.events {
        // Span.events
        message(out, 11, |out| {
            fixed64(out, 1, trace::nanos(event.time));
            string(out, 2, event.name);
            attributes(out, 3, &event.attributes, scratch);
        });
    }
    // Span.status, always present: code ERROR (2) or UNSET (the default, so not written).
    key(out, 15, LEN);
    if trace::is_error(span.status) {
        out.extend_from_slice(&[2, (3 << 3) | VARINT, 2]);
    } else {
        out.push(0);
    }
}

fn attributes(out: &mut Vec<u8>, field: u32, attributes: &[(&str, Value)], scratch: &mut Scratch) {
    for (k, v) in attributes {
        key_value(out, field, k, v.text(scratch));
    }
}

/// A `KeyValue` whose value is an `AnyValue` string; both lengths are known, so it is written in
/// one pass.
fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &str) {
    // AnyValue.string_value: a oneof member, written even when empty.
    let any = 1 + varint_len(v.len() as u64) + v.len();
    key_value_head(out, field, k, any);
    key(out, 1, LEN);
    varint(out, v.len() as u64);
    out.extend_from_slice(v.as_bytes());
}

/// A `KeyValue` whose value is an `AnyValue` int.
fn key_int(out: &mut Vec<u8>, field: u32, k: &str, v: i64) {
    // int64 is written as its two's complement bits.
    let bits = v as u64;
    let any = 1 + varint_len(bits);
    key_value_head(out, field, k, any);
    key(out, 3, VARINT);
    varint(out, bits);
}

/// A `KeyValue` up to its value's `AnyValue` body, which is `any` bytes long; room for the whole
/// `KeyValue` is reserved first.
fn key_value_head(out: &mut Vec<u8>, field: u32, k: &str, any: usize) {
    let key_len = if k.is_empty() {
        0
    } else {
        1 + varint_len(k.len() as u64) + k.len()
    };
    let body = key_len + 1 + varint_len(any as u64) + any;
    out.reserve(1 + varint_len(body as u64) + body);
    key(out, field, LEN);
    varint(out, body as u64);
    string(out, 1, k);
    key(out, 2, LEN);
    varint(out, any as u64);
}

/// A message field whose body `fields` writes; its length goes into a slot written first and
/// closed up to the varint's real width afterwards.
fn message(out: &mut Vec<u8>, field: u32, fields: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let slot = out.len();
    out.extend_from_slice(&[0; LEN_SLOT]);
    fields(out);
    let len = (out.len() - slot - LEN_SLOT) as u64;
    let mut prefix = [0u8; 10];
    let n = put_varint(&mut prefix, len);
    // `n` is at most LEN_SLOT for any batch this process can hold (see LEN_SLOT); splice covers a
    // wider one all the same.
    if n <= LEN_SLOT {
        out.copy_within(slot + LEN_SLOT.., slot + n);
        out.truncate(out.len() - (LEN_SLOT - n));
        out[slot..slot + n].copy_from_slice(&prefix[..n]);
    } else {
        out.splice(slot..slot + LEN_SLOT, prefix[..n].iter().copied());
    }
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

/// A string field; proto3 leaves an empty one out.
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A bytes field; proto3 leaves an empty one out.
fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if b.is_empty() {
        return;
    }
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A fixed64 field; proto3 leaves 0 out.
fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v == 0 {
        return;
    }
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A varint field; proto3 leaves 0 out.
fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    if v == 0 {
        return;
    }
    key(out, field, VARINT);
    varint(out, v);
}

/// Byte by byte: a tag or length is a byte or two, which a push writes for less than a call to
/// `memcpy` costs.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        // The low seven bits and the continuation bit.
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    // Below 0x80 here.
    out.push(v as u8);
}

/// Writes `v` as a varint into `buf`; its width.
fn put_varint(buf: &mut [u8; 10], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 && i < 9 {
        // The low seven bits and the continuation bit.
        buf[i] = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
        i += 1;
    }
    // What is left is below 0x80 (a u64 needs at most ten groups of seven bits).
    buf[i] = v as u8;
    i + 1
}

fn varint_len(v: u64) -> usize {
    // Seven bits per byte; 0 takes one.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use prost::Message as _;

    use super::*;
    use crate::telemetry::record::Flags;
    use crate::telemetry::trace::{Event, Hop};

    fn random_text(max: usize) -> String {
        let n = fastrand::usize(..=max);
        (0..n)
            .map(|_| match fastrand::u8(..4) {
                0 => 'é',
                1 => '中',
                _ => fastrand::alphanumeric(),
            })
            .collect()
    }

    fn random_value() -> Value {
        match fastrand::u8(..6) {
            0 => Value::Static(["GET", "", "-", "HTTP/2"][fastrand::usize(..4)]),
            1 => Value::Text(random_text(300)),
            2 => Value::Number(fastrand::u64(..) >> fastrand::u32(..64)),
            3 => Value::Signed(fastrand::i64(..)),
            4 => Value::Ip(if fastrand::bool() {
                std::net::IpAddr::from(fastrand::u32(..).to_be_bytes())
            } else {
                std::net::IpAddr::from(fastrand::u128(..).to_be_bytes())
            }),
            _ => {
                let mut f = Flags::default();
                if fastrand::bool() {
                    f.set(Flags::UF);
                    f.set(Flags::URX);
                }
                Value::Flags(f)
            }
        }
    }

    fn random_attributes(max: usize) -> Vec<(&'static str, Value)> {
        const KEYS: [&str; 5] = ["http.url", "", "guid:x-request-id", "peer.address", "k"];
        (0..fastrand::usize(..=max))
            .map(|_| (KEYS[fastrand::usize(..KEYS.len())], random_value()))
            .collect()
    }

    fn random_span(services: &[Arc<str>]) -> Span {
        let at = |ns: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
        Span {
            hop: Hop {
                trace_id: fastrand::u128(1..),
                span_id: fastrand::u64(1..),
                parent: fastrand::bool().then(|| fastrand::u64(1..)),
                sampled: true,
            },
            name: random_text(40),
            kind: if fastrand::bool() {
                Kind::Client
            } else {
                Kind::Server
            },
            service: services[fastrand::usize(..services.len())].clone(),
            start: at(fastrand::u64(..1 << 62)),
            end: at(fastrand::u64(..1 << 62)),
            status: [0, 200, 404, 503, 599][fastrand::usize(..5)],
            attributes: random_attributes(20),
            events: (0..fastrand::usize(..3))
                .map(|_| Event {
                    name: "weft.mirror.divergence",
                    time: at(fastrand::u64(..)),
                    attributes: random_attributes(4),
                })
                .collect(),
            trace_state: fastrand::bool().then(|| random_text(60)),
        }
    }

    #[test]
    fn the_bytes_are_prosts_for_the_same_batch() {
        let resource = vec![
            (
                "node_id",
                "sidecar~10.0.0.7~sleep-1.default~default.svc".to_owned(),
            ),
            ("istio.mesh_id", String::new()),
        ];
        for round in 0..300 {
            let services: Vec<Arc<str>> = (0..1 + round % 3)
                .map(|i| Arc::from(format!("svc{i}.default")))
                .collect();
            // Up to a few thousand spans, so that the outer lengths take three varint bytes.
            let n = if round % 50 == 0 {
                3000
            } else {
                fastrand::usize(..12)
            };
            let batch: Vec<Span> = (0..n).map(|_| random_span(&services)).collect();
            let ours = request(&batch, &resource);
            let reference = trace::request(&batch, &resource);
            assert_eq!(
                ours,
                reference.encode_to_vec(),
                "round {round}: {} spans",
                batch.len()
            );
            let decoded = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                ours.as_slice(),
            )
            .expect("decodes");
            assert_eq!(decoded, reference);
        }
    }

    #[test]
    fn a_span_reads_back_with_its_tags_as_strings() {
        let mut flags = Flags::default();
        flags.set(Flags::UT);
        let span = Span {
            hop: Hop {
                trace_id: 7,
                span_id: 9,
                parent: None,
                sampled: true,
            },
            name: "httpbin.default.svc.cluster.local:8000/*".into(),
            kind: Kind::Server,
            service: Arc::from("httpbin.default"),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            status: 504,
            attributes: vec![
                ("http.status_code", Value::Number(504)),
                ("response_flags", Value::Flags(flags)),
                ("peer.address", Value::Ip("10.1.2.3".parse().unwrap())),
            ],
            events: Vec::new(),
            trace_state: None,
        };
        let bytes = request(std::slice::from_ref(&span), &[]);
        let req =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                bytes.as_slice(),
            )
            .unwrap();
        let s = &req.resource_spans[0].scope_spans[0].spans[0];
        let text = |key: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.as_ref()?.value.clone())
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        assert_eq!(
            text("http.status_code"),
            Some(Any::StringValue("504".into()))
        );
        assert_eq!(text("response_flags"), Some(Any::StringValue("UT".into())));
        assert_eq!(
            text("peer.address"),
            Some(Any::StringValue("10.1.2.3".into()))
        );
        assert_eq!(text("http.response.status_code"), Some(Any::IntValue(504)));
        assert_eq!(s.status.as_ref().unwrap().code, 2, "a 504 is an error");
        assert_eq!(s.start_time_unix_nano, 1_000_000_000);
        assert!(request(&[], &[]).is_empty(), "no spans, no ResourceSpans");
    }

    #[test]
    fn varints_are_protobufs() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut ours = Vec::new();
            varint(&mut ours, v);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
            assert_eq!(varint_len(v), theirs.len(), "{v}");
        }
    }
}
