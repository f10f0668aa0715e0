//! The request path's cost of one sampled span (issue 19's rule: export through `opentelemetry_sdk`'s
//! batch processor unless it costs the request path more than weft's own queue).
//!
//! (a) weft: the `Span` a sidecar builds for a sampled request (a name and 12 string attributes, as
//!     `outbound`/`inbound` and `Record::finish` build them) handed to `Tracer::record` (`try_send` into
//!     the bounded queue of 4096); a consumer task on its own thread drains the queue into batches of
//!     512, as the export task does.
//! (b) SDK: `SdkTracerProvider` with a `BatchSpanProcessor` (queue 4096, batches of 512, 1 s, as weft)
//!     and an exporter that drops what it gets; a span with the same ids, kind, name and attributes
//!     started through the `opentelemetry` `Tracer` API, its status set, ended.
//!
//! The measured work of one span is one call of `weft_span` / `sdk_span` (never inlined, so callgrind
//! can count exactly them with `--toggle-collect`); everything the background threads do is outside.
//!
//! Usage:
//!   span-path cpu [SPANS_PER_ROUND] [ROUNDS]   interleaved rounds, CPU (thread) time per span, medians
//!                                              (default 2000 x 40: a block stays under both queues)
//!   span-path weft|sdk [SPANS]                 one pipeline, for callgrind (bench/span-path.sh)

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use weft_sidecar::telemetry::trace::{Hop, Kind, Span, Tracer};

// The sidecar's allocator: allocation is most of either way's cost, so it must be the same one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What a request contributes to its span: the values the sidecar reads from the request.
struct Facts {
    method: &'static str,
    path: &'static str,
    authority: &'static str,
    host: &'static str,
    port: u16,
    service: Arc<str>,
    pod: Arc<str>,
    peer: &'static str,
    flags: &'static str,
}

fn facts() -> Facts {
    Facts {
        method: "GET",
        path: "/status/200",
        authority: "httpbin.default.svc.cluster.local:8000",
        host: "httpbin.default.svc.cluster.local",
        port: 8000,
        service: Arc::from("sleep.default"),
        pod: Arc::from("sleep-7d9c8f5b6-x2x9k"),
        peer: "spiffe://cluster.local/ns/default/sa/httpbin",
        flags: "-",
    }
}

/// The 12 attributes, as owned strings built per request (what both ways must do).
fn attributes(f: &Facts, status: u16) -> [(&'static str, String); 12] {
    [
        ("http.request.method", f.method.to_owned()),
        ("url.path", f.path.to_owned()),
        ("server.address", f.authority.to_owned()),
        ("server.port", f.port.to_string()),
        ("weft.route", "default".to_owned()),
        (
            "weft.upstream_cluster",
            format!("outbound|{}||{}", f.port, f.host),
        ),
        ("weft.subset", "v1".to_owned()),
        ("weft.source.workload", f.pod.to_string()),
        ("weft.peer.identity", f.peer.to_owned()),
        ("weft.response_flags", f.flags.to_owned()),
        (
            "guid:x-request-id",
            "3f2c9a1e-5b7d-4c1e-9a2b-6d8e0f1a2b3c".to_owned(),
        ),
        ("http.response.status_code", status.to_string()),
    ]
}

#[inline(never)]
fn weft_span(tracer: &Tracer, f: &Facts, hop: Hop, start: SystemTime) {
    let attributes = attributes(f, 200)
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    tracer.record(Span {
        hop,
        name: format!("{}:{}/*", f.host, f.port),
        kind: Kind::Client,
        service: f.service.clone(),
        start,
        end: SystemTime::now(),
        status: 200,
        attributes,
        events: Vec::new(),
        trace_state: None,
    });
}

#[inline(never)]
fn sdk_span(tracer: &SdkTracer, f: &Facts, hop: Hop, start: SystemTime) {
    let attributes: Vec<KeyValue> = attributes(f, 200)
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, Value::from(v)))
        .collect();
    // The caller's B3 context as the SDK's remote parent (0.33 takes no explicit ids: the span's
    // own id comes from the SDK's id generator).
    let parent = SpanContext::new(
        TraceId::from(hop.trace_id),
        SpanId::from(hop.parent.unwrap_or(hop.span_id)),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let cx = Context::new().with_remote_span_context(parent);
    let mut span = SpanBuilder::from_name(Cow::Owned(format!("{}:{}/*", f.host, f.port)))
        .with_kind(SpanKind::Client)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &cx);
    span.set_status(Status::Unset);
    span.end();
}

/// An exporter that drops what it gets: the cost measured is the SDK's own, not a wire's.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

struct Weft {
    tracer: Tracer,
    _consumer: std::thread::JoinHandle<()>,
}

fn weft() -> Result<Weft> {
    let (tracer, mut rx) = Tracer::queued(4096);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let consumer = std::thread::spawn(move || {
        rt.block_on(async move {
            let mut batch = Vec::with_capacity(512);
            while let Some(span) = rx.recv().await {
                batch.push(span);
                if batch.len() == 512 {
                    std::hint::black_box(std::mem::take(&mut batch));
                    batch.reserve(512);
                }
            }
        });
    });
    Ok(Weft {
        tracer,
        _consumer: consumer,
    })
}

fn sdk() -> (SdkTracerProvider, SdkTracer) {
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(4096)
        .with_max_export_batch_size(512)
        .with_scheduled_delay(Duration::from_secs(1))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(Discard)
                .with_batch_config(config)
                .build(),
        )
        .build();
    let tracer = provider.tracer("weft-sidecar");
    (provider, tracer)
}

/// A hop that continues a caller's sampled trace (as a server span or the next hop would).
fn hop() -> Hop {
    let mut hop = Hop::from_request(&Default::default(), 100.0);
    hop.parent = Some(hop.span_id.wrapping_add(1).max(1));
    hop
}

/// The CPU time of this thread (the request path's; the consumers run on their own threads).
fn thread_cpu() -> Duration {
    // From /proc rather than clock_gettime: `unsafe` is forbidden in the workspace.
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(
        stat.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("cpu");
    let n: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let f = facts();
    match mode {
        "weft" => {
            let w = weft()?;
            for _ in 0..n {
                weft_span(&w.tracer, &f, hop(), SystemTime::now());
            }
            println!(
                "weft: {n} spans, dropped {}",
                w.tracer.stats.dropped.load(Ordering::Relaxed)
            );
        }
        "sdk" => {
            let (provider, tracer) = sdk();
            for _ in 0..n {
                sdk_span(&tracer, &f, hop(), SystemTime::now());
            }
            let _ = provider.shutdown();
            println!("sdk: {n} spans");
        }
        "cpu" => {
            let rounds: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(40);
            let w = weft()?;
            let (provider, tracer) = sdk();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for round in 0..rounds + 1 {
                // Weft first on even rounds, the SDK first on odd ones; round 0 warms both up.
                for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                    let hops: Vec<Hop> = (0..n).map(|_| hop()).collect();
                    let t0 = thread_cpu();
                    for h in hops {
                        if which == 0 {
                            weft_span(&w.tracer, &f, h, SystemTime::now());
                        } else {
                            sdk_span(&tracer, &f, h, SystemTime::now());
                        }
                    }
                    let per = (thread_cpu() - t0).as_nanos() as f64 / n as f64;
                    if round > 0 {
                        if which == 0 { a.push(per) } else { b.push(per) }
                    }
                    // Let the consumers catch up between blocks: both queues hold 4096.
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            let dropped = w.tracer.stats.dropped.load(Ordering::Relaxed);
            let (ma, mb) = (median(&mut a), median(&mut b));
            println!(
                "CPU ns per span, median of {rounds} interleaved rounds of {n}: weft {ma:.0}, sdk {mb:.0}, sdk/weft {:.2} (weft dropped {dropped})",
                mb / ma
            );
            let _ = provider.shutdown();
        }
        other => bail!("unknown mode {other:?}: cpu | weft | sdk"),
    }
    Ok(())
}
