//! The plain-HTTP monitoring endpoint of `ca serve` and `pilot serve` (`--monitoring-listen`):
//! `/metrics` in Prometheus' text format (istiod serves its metrics on 15014), `/ready` (200 once
//! the component can serve, else 503, for the readiness probe) and `/healthz` (200 while the process
//! answers, for the liveness probe); plus [`Exposition`] and [`Histogram`], what both render with.
//!
//! It lives in weft-ca because pilot depends on weft-ca and the CA on nothing of pilot's; the sidecar
//! keeps its own (request-path) metrics and does not use this.
//!
//! The text is written by hand rather than through `prometheus-client`: that crate appends `_total`
//! to every counter (prometheus/client_rust#51), and Istio's control-plane counters, which operators'
//! dashboards and alerts query, have no such suffix (`pilot_xds_pushes`, `citadel_server_csr_count`:
//! istiod exports them through OpenTelemetry's Prometheus exporter `WithoutCounterSuffixes`).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// Renders the metrics text on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;
/// Whether the component is ready, asked on every `/ready`.
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until `shutdown`; other paths answer 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    ready: Ready,
    shutdown: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring accept failed");
                    continue;
                }
            },
        };
        let render = render.clone();
        let ready = ready.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let render = render.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(respond(req.uri().path(), &render, &ready)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(path: &str, render: &Render, ready: &Ready) -> http::Response<Full<Bytes>> {
    let text = |status, body: &str| (status, body.to_string(), "text/plain");
    let (status, body, content_type) = match path {
        "/metrics" => (http::StatusCode::OK, render(), CONTENT_TYPE),
        "/healthz" => text(http::StatusCode::OK, "ok\n"),
        "/ready" if ready() => text(http::StatusCode::OK, "ready\n"),
        "/ready" => text(http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            http::StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /healthz\n",
        ),
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// What a metric family is (the `# TYPE` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (reset on restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count (see [`Histogram`]).
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Prometheus text exposition (format 0.0.4) being written: a family's `# HELP` and `# TYPE` lines,
/// then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its help text and type.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
        self
    }

    /// Appends text some other component rendered (whole families).
    pub fn append(&mut self, text: &str) -> &mut Self {
        self.out.push_str(text);
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

/// A sample value as the text format spells it (`+Inf`, `-Inf`, `NaN`; integers without `.0`).
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        // Display never uses exponents and prints integral values without a fraction.
        format!("{value}")
    }
}

/// A histogram with fixed bucket bounds (upper bounds, `le`): cheap to observe (one short lock),
/// rendered with cumulative buckets, `+Inf`, `_sum` and `_count`.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative); one more than the bounds, for `+Inf`.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                buckets: vec![0; bounds.len() + 1],
                ..HistogramState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HistogramState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        let mut state = self.lock();
        if let Some(n) = state.buckets.get_mut(bucket) {
            *n += 1;
        }
        state.sum += value;
        state.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.lock().count
    }

    /// Writes the samples of this histogram as `name` with `labels` (the family is the caller's).
    pub fn render(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let (buckets, sum, count) = {
            let state = self.lock();
            (state.buckets.clone(), state.sum, state.count)
        };
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0;
        let les = self
            .bounds
            .iter()
            .map(|b| number(*b))
            .chain(["+Inf".into()]);
        for (le, n) in les.zip(buckets) {
            cumulative += n;
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            out.sample(&bucket_name, &with_le, cumulative as f64);
        }
        out.sample(&format!("{name}_sum"), labels, sum);
        out.sample(&format!("{name}_count"), labels, count as f64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn metrics_are_rendered_per_scrape_and_other_paths_are_not_found() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = scrapes.clone();
        let render: Render = Arc::new(move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            format!("weft_test_scrapes {n}\n")
        });
        let shutdown = CancellationToken::new();
        let is_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = is_ready.clone();
        let ready: Ready = Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed));
        tokio::spawn(serve(listener, render, ready, shutdown.clone()));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("text/plain; version=0.0.4"), "{first}");
        assert!(first.ends_with("weft_test_scrapes 1\n"), "{first}");
        assert!(
            get(addr, "/metrics")
                .await
                .ends_with("weft_test_scrapes 2\n")
        );
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/ready").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        is_ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    #[test]
    fn exposition_escapes_labels_and_spells_numbers_as_the_format_does() {
        let mut out = Exposition::default();
        out.family("x_total", Kind::Counter, "Help with \\ and\nnewline.")
            .sample("x_total", &[("a", "q\"b\\c\nd"), ("b", "plain")], 3.0)
            .sample("x_total", &[], 0.25);
        assert_eq!(
            out.finish(),
            "# HELP x_total Help with \\\\ and\\nnewline.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"b\\\\c\\nd\",b=\"plain\"} 3\nx_total 0.25\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1e21), "1000000000000000000000");
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        static BOUNDS: [f64; 3] = [0.1, 0.5, 1.0];
        let h = Histogram::new(&BOUNDS);
        for v in [0.0625, 0.25, 0.75, 2.0] {
            h.observe(v);
        }
        let mut out = Exposition::default();
        out.family("t_seconds", Kind::Histogram, "T.");
        h.render(&mut out, "t_seconds", &[("type", "x")]);
        let text = out.finish();
        for line in [
            "t_seconds_bucket{type=\"x\",le=\"0.1\"} 1\n",
            "t_seconds_bucket{type=\"x\",le=\"0.5\"} 2\n",
            "t_seconds_bucket{type=\"x\",le=\"1\"} 3\n",
            "t_seconds_bucket{type=\"x\",le=\"+Inf\"} 4\n",
            "t_seconds_sum{type=\"x\"} 3.0625\n",
            "t_seconds_count{type=\"x\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert_eq!(h.count(), 4);
    }
}
