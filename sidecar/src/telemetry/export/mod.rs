//! Span export: the request path hands finished spans to `Tracer::record`; one task batches them and
//! sends them to the OTLP collector the OpenTelemetry environment names (`config`), over gRPC or
//! HTTP (protobuf or JSON), TLS when the endpoint is `https` (`wire`), retrying what the OTLP
//! specification calls retryable with exponential backoff and jitter.
//!
//! Measured (bench/results/span-path-2026-12-06.md): the OpenTelemetry SDK's batch processor costs
//! the request path more per span than weft's `try_send` into a bounded queue, so the request path
//! stays weft's own and the environment contract is implemented here.
//!
//! The request path never waits: `record` is one `try_send`; a full queue drops the span (counted).
//! While a batch is being retried the queue keeps filling, up to its bound. Every span ends up
//! counted once in `TraceStats`: exported, dropped (queue full), rejected (the collector's partial
//! success), or failed (by reason).

pub mod config;
pub mod protobuf;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{Config, Off, Protocol};
use wire::{Sent, Wire};

use super::trace::Span;

/// Export statistics (the admin endpoint's `weft_spans_total` and `weft_span_export_*`).
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans lost before export: the queue was full.
    pub dropped: AtomicU64,
    /// Spans the collector said it rejected (partial success).
    pub rejected: AtomicU64,
    /// Replies that carried a partial success (rejected spans or a warning message).
    pub partial_successes: AtomicU64,
    /// Export attempts repeated after a retryable failure.
    pub retries: AtomicU64,
    /// Spans of batches dropped after a non-retryable answer.
    pub failed_non_retryable: AtomicU64,
    /// Spans of batches dropped when retries ran out (attempts or `OTEL_BSP_EXPORT_TIMEOUT`).
    pub failed_retries_exhausted: AtomicU64,
}

/// Records spans for export: the request path's whole share of tracing is `record`.
#[derive(Debug, Clone)]
pub struct Tracer {
    tx: Option<mpsc::Sender<Span>>,
    /// Counters.
    pub stats: Arc<TraceStats>,
}

impl Tracer {
    /// A tracer that records nothing (no endpoint configured).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            stats: Arc::new(TraceStats::default()),
        }
    }

    /// A tracer over a bounded queue of `capacity` spans, and the queue's receiving end (the export
    /// task's, or a benchmark's).
    pub fn queued(capacity: usize) -> (Self, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx: Some(tx),
                stats: Arc::new(TraceStats::default()),
            },
            rx,
        )
    }

    /// Reads the environment and starts the export task (inside a Tokio runtime); a disabled tracer
    /// when export is off or cannot be set up (logged). `resource` describes this workload; the
    /// environment's `OTEL_RESOURCE_ATTRIBUTES` override its keys.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        resource: Vec<(&'static str, String)>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut warnings = Vec::new();
        let config = Config::from_env(get, &mut warnings);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        match config {
            Ok(cfg) => Self::start(cfg, resource, shutdown),
            Err(Off::NoEndpoint) => Self::disabled(),
            Err(off) => {
                tracing::info!(?off, "span export is off");
                Self::disabled()
            }
        }
    }

    /// Starts the export task for `cfg` (inside a Tokio runtime).
    pub fn start(
        cfg: Config,
        resource: Vec<(&'static str, String)>,
        shutdown: CancellationToken,
    ) -> Self {
        let wire = match Wire::new(&cfg) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, endpoint = %cfg.endpoint, "span export cannot start; spans are not exported");
                return Self::disabled();
            }
        };
        tracing::info!(endpoint = %cfg.endpoint, protocol = ?cfg.protocol, tls = cfg.endpoint.starts_with("https://"), "exporting spans over OTLP");
        let (tracer, rx) = Self::queued(cfg.batch.queue);
        let exporter = Exporter {
            wire,
            resource: merge_resource(resource, &cfg.resource),
            service: cfg.service_name.as_deref().map(Arc::from),
            batch: cfg.batch,
            stats: tracer.stats.clone(),
            log: RateLimited::default(),
        };
        tokio::spawn(exporter.run(rx, shutdown));
        tracer
    }

    /// Whether spans go anywhere (callers skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a finished span; never waits.
    pub fn record(&self, span: Span) {
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send(span).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The workload's own resource attributes, with the environment's added (same key: the
/// environment's value wins). `trace::request` takes `&'static str` keys; the environment's are
/// leaked once, at start (a handful of short strings for the life of the process).
fn merge_resource(
    mut own: Vec<(&'static str, String)>,
    env: &[(String, String)],
) -> Vec<(&'static str, String)> {
    for (k, v) in env {
        match own.iter_mut().find(|(key, _)| *key == k.as_str()) {
            Some(slot) => slot.1.clone_from(v),
            None => own.push((Box::leak(k.clone().into_boxed_str()), v.clone())),
        }
    }
    own
}

/// Most attempts per batch (the first included).
const MAX_ATTEMPTS: u32 = 5;
/// First retry delay; doubled per retry up to `MAX_BACKOFF`, each drawn with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The delay before retry number `retry` (1-based): exponential, capped, with "equal jitter" (a
/// uniform draw from the upper half) so that sidecars that failed together do not retry together.
fn backoff(retry: u32, jitter: f64) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// At most one log line per interval; the rest are counted into the next line.
#[derive(Debug, Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(suppressed since the last line)` when a line may be written now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < Self::EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct Exporter {
    wire: Wire,
    resource: Vec<(&'static str, String)>,
    /// `OTEL_SERVICE_NAME` (or the environment's `service.name`): replaces the mesh's name.
    service: Option<Arc<str>>,
    batch: config::Batch,
    stats: Arc<TraceStats>,
    log: RateLimited,
}

impl Exporter {
    async fn run(mut self, mut rx: mpsc::Receiver<Span>, shutdown: CancellationToken) {
        let mut done = false;
        while !done {
            let mut batch = Vec::with_capacity(self.batch.size);
            let deadline = tokio::time::sleep(self.batch.delay);
            tokio::pin!(deadline);
            while batch.len() < self.batch.size {
                tokio::select! {
                    span = rx.recv() => match span {
                        Some(s) => batch.push(s),
                        None => { done = true; break; }
                    },
                    () = &mut deadline => break,
                    () = shutdown.cancelled() => {
                        // Flush what is queued, then stop.
                        while let Ok(s) = rx.try_recv() {
                            batch.push(s);
                        }
                        done = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            if let Some(service) = &self.service {
                for s in &mut batch {
                    s.service = service.clone();
                }
            }
            self.export(&batch).await;
        }
    }

    /// Counts and logs (rate-limited) a batch of `n` spans dropped on an answer not worth retrying.
    fn failed_non_retryable(&mut self, n: u64, why: &str) {
        self.stats
            .failed_non_retryable
            .fetch_add(n, Ordering::Relaxed);
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::warn!(spans = n, %why, suppressed, "span export failed (not retryable); spans dropped");
        }
    }

    /// Sends one batch, retrying within `OTEL_BSP_EXPORT_TIMEOUT` and `MAX_ATTEMPTS`; counts how
    /// it ended.
    async fn export(&mut self, batch: &[Span]) {
        let n = batch.len() as u64;
        let give_up = Instant::now() + self.batch.export_timeout;
        let payload = match self.wire.prepare(batch, &self.resource) {
            Ok(p) => p,
            Err(why) => return self.failed_non_retryable(n, &why),
        };
        let mut attempt = 1;
        loop {
            // Each attempt within `_TIMEOUT` (the wire's) and within what is left of the batch's
            // `OTEL_BSP_EXPORT_TIMEOUT`.
            let left = give_up.saturating_duration_since(Instant::now());
            let sent = tokio::time::timeout(left, self.wire.send(&payload))
                .await
                .unwrap_or_else(|_| Sent::Retry {
                    after: None,
                    why: "OTEL_BSP_EXPORT_TIMEOUT reached".into(),
                });
            match sent {
                Sent::Accepted(partial) => {
                    let rejected = partial
                        .as_ref()
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0).min(n));
                    self.stats
                        .exported
                        .fetch_add(n - rejected, Ordering::Relaxed);
                    if let Some(p) = partial
                        && (p.rejected_spans != 0 || !p.error_message.is_empty())
                    {
                        self.stats.rejected.fetch_add(rejected, Ordering::Relaxed);
                        self.stats.partial_successes.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.log.allow(Instant::now()) {
                            tracing::warn!(
                                rejected_spans = p.rejected_spans,
                                message = %p.error_message,
                                suppressed,
                                "the OTLP collector accepted the spans only in part"
                            );
                        }
                    }
                    return;
                }
                Sent::Failed(why) => return self.failed_non_retryable(n, &why),
                Sent::Retry { after, why } => {
                    let delay = after.unwrap_or_else(|| backoff(attempt, fastrand::f64()));
                    if attempt >= MAX_ATTEMPTS || Instant::now() + delay >= give_up {
                        self.stats
                            .failed_retries_exhausted
                            .fetch_add(n, Ordering::Relaxed);
                        if let Some(suppressed) = self.log.allow(Instant::now()) {
                            tracing::warn!(spans = n, attempts = attempt, %why, suppressed, "span export failed after retries; spans dropped");
                        }
                        return;
                    }
                    tracing::debug!(attempt, ?delay, %why, "span export will be retried");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
