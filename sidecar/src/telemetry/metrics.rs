//! Istio's standard metrics, rendered for Prometheus (`/stats/prometheus`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::record::Flags;
use crate::route::RouteTable;

/// Istio's duration buckets, milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets, bytes.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// Which side reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The caller's sidecar (outbound).
    Source,
    /// The callee's sidecar (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// A label value, escaped, or Istio's `unknown` when there is none.
fn or_unknown(v: &str) -> String {
    if v.is_empty() {
        "unknown".to_owned()
    } else {
        esc(v)
    }
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The label fragment describing a workload on one side (`source` or `destination`).
/// A preformatted Prometheus label fragment, built once per workload, cluster, endpoint or connection
/// and shared by every request that reports it. Its hash is computed once, so recording a request
/// hashes a few words instead of a kilobyte of label text, and equal fragments built apart (after a
/// config push) still count as one series. Series keys are hashed with foldhash: a few words each.
#[derive(Clone)]
pub struct Labels(Arc<LabelText>);

struct LabelText {
    text: Box<str>,
    hash: u64,
}

impl Labels {
    /// Wraps an already formatted fragment.
    pub fn new(text: String) -> Self {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(text.as_str());
        Self(Arc::new(LabelText {
            text: text.into_boxed_str(),
            hash,
        }))
    }

    /// The fragment.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.text == other.0.text)
    }
}

impl Eq for Labels {}

impl std::hash::Hash for Labels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl std::fmt::Display for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.text)
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0.text, f)
    }
}

pub fn workload_labels(
    side: &str,
    workload: &str,
    namespace: &str,
    principal: &str,
    app: &str,
    version: &str,
) -> Labels {
    Labels::new(format!(
        "{side}_workload=\"{}\",{side}_workload_namespace=\"{}\",{side}_principal=\"{}\",{side}_app=\"{}\",{side}_version=\"{}\",{side}_canonical_service=\"{}\"",
        or_unknown(workload),
        or_unknown(namespace),
        or_unknown(principal),
        or_unknown(app),
        or_unknown(version),
        or_unknown(app),
    ))
}

/// The label fragment describing the destination Service: its FQDN, and the name and namespace
/// pilot gave (for a host that is no Service, the FQDN's first two labels, as Istio does).
pub fn service_labels(fqdn: &str, name: &str, namespace: &str) -> Labels {
    let mut parts = fqdn.split('.');
    let first = parts.next().unwrap_or_default();
    let second = parts.next().unwrap_or_default();
    let name = if name.is_empty() { first } else { name };
    let ns = if namespace.is_empty() {
        second
    } else {
        namespace
    };
    Labels::new(format!(
        "destination_service=\"{}\",destination_service_name=\"{}\",destination_service_namespace=\"{}\"",
        or_unknown(fqdn),
        or_unknown(name),
        or_unknown(ns)
    ))
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    reporter: Reporter,
    source: Labels,
    destination: Labels,
    service: Labels,
    code: u16,
    flags: Flags,
    mtls: bool,
}

#[derive(Default)]
struct Series {
    count: u64,
    duration: Histogram<19>,
    request_bytes: Histogram<8>,
    response_bytes: Histogram<8>,
}

struct Histogram<const N: usize> {
    counts: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            counts: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&mut self, buckets: &[f64; N], v: f64) {
        if let Some(i) = buckets.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64; N]) {
        let mut cumulative = 0;
        for (b, c) in buckets.iter().zip(self.counts.iter()) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What one finished request contributes.
#[derive(Debug, Clone)]
pub struct RequestMetric {
    /// Which side reports.
    pub reporter: Reporter,
    /// Source workload fragment.
    pub source: Labels,
    /// Destination workload fragment.
    pub destination: Labels,
    /// Destination service fragment.
    pub service: Labels,
    /// HTTP status.
    pub code: u16,
    /// Envoy response flags.
    pub flags: Flags,
    /// Whether the hop between sidecars was mTLS.
    pub mtls: bool,
    /// Time to the response head.
    pub duration: Duration,
    /// Request body size (Content-Length).
    pub request_bytes: u64,
    /// Response body size (Content-Length).
    pub response_bytes: u64,
}

/// TCP connection counters of one listener side.
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// Connections accepted.
    pub opened: AtomicU64,
    /// Connections finished.
    pub closed: AtomicU64,
    /// Bytes received from the downstream.
    pub received: AtomicU64,
    /// Bytes sent to the downstream.
    pub sent: AtomicU64,
}

/// The sidecar's Istio metrics.
pub struct Metrics {
    series: Mutex<HashMap<Key, Series, foldhash::fast::RandomState>>,
    /// Outbound listener connections.
    pub tcp_outbound: TcpCounters,
    /// Inbound listener connections.
    pub tcp_inbound: TcpCounters,
    /// This workload as a source (outbound) and as a destination (inbound).
    pub this_source: Labels,
    /// This workload as a destination.
    pub this_destination: Labels,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for a workload described by `this_source`/`this_destination` fragments.
    pub fn new(this_source: Labels, this_destination: Labels) -> Self {
        Self {
            series: Mutex::default(),
            tcp_outbound: TcpCounters::default(),
            tcp_inbound: TcpCounters::default(),
            this_source,
            this_destination,
        }
    }

    /// Records one request.
    pub fn record(&self, m: RequestMetric) {
        let key = Key {
            reporter: m.reporter,
            source: m.source,
            destination: m.destination,
            service: m.service,
            code: m.code,
            flags: m.flags,
            mtls: m.mtls,
        };
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let s = series.entry(key).or_default();
        s.count += 1;
        s.duration
            .observe(&DURATION_BUCKETS, m.duration.as_secs_f64() * 1000.0);
        s.request_bytes
            .observe(&SIZE_BUCKETS, m.request_bytes as f64);
        s.response_bytes
            .observe(&SIZE_BUCKETS, m.response_bytes as f64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(String, &Series)> = series
            .iter()
            .map(|(k, s)| {
                (
                    format!(
                        "reporter=\"{}\",{},{},{},request_protocol=\"http\",response_code=\"{}\",response_flags=\"{}\",connection_security_policy=\"{}\"",
                        k.reporter.as_str(),
                        k.source,
                        k.destination,
                        k.service,
                        k.code,
                        k.flags,
                        if k.mtls { "mutual_tls" } else { "none" }
                    ),
                    s,
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        out.push_str("# TYPE istio_requests_total counter\n");
        for (labels, s) in &rows {
            let _ = writeln!(out, "istio_requests_total{{{labels}}} {}", s.count);
        }
        out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
        for (labels, s) in &rows {
            s.duration.render(
                &mut out,
                "istio_request_duration_milliseconds",
                labels,
                &DURATION_BUCKETS,
            );
        }
        out.push_str("# TYPE istio_request_bytes histogram\n");
        for (labels, s) in &rows {
            s.request_bytes
                .render(&mut out, "istio_request_bytes", labels, &SIZE_BUCKETS);
        }
        out.push_str("# TYPE istio_response_bytes histogram\n");
        for (labels, s) in &rows {
            s.response_bytes
                .render(&mut out, "istio_response_bytes", labels, &SIZE_BUCKETS);
        }
        for (name, pick) in [
            ("istio_tcp_connections_opened_total", 0),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_received_bytes_total", 2),
            ("istio_tcp_sent_bytes_total", 3),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            for (reporter, c, this) in [
                ("source", &self.tcp_outbound, &self.this_source),
                ("destination", &self.tcp_inbound, &self.this_destination),
            ] {
                let v = [&c.opened, &c.closed, &c.received, &c.sent][pick].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{reporter=\"{reporter}\",{this}}} {v}");
            }
        }
        out
    }
}

/// A connection that counts its bytes into a listener's [`TcpCounters`] (opened when wrapped, closed
/// and bytes added when dropped).
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    metrics: Arc<Metrics>,
    inbound: bool,
    received: u64,
    sent: u64,
}

impl<T> Counted<T> {
    /// Wraps an accepted connection of the inbound (`true`) or outbound listener.
    pub fn new(inner: T, metrics: Arc<Metrics>, inbound: bool) -> Self {
        let c = if inbound {
            &metrics.tcp_inbound
        } else {
            &metrics.tcp_outbound
        };
        c.opened.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            metrics,
            inbound,
            received: 0,
            sent: 0,
        }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        let c = if self.inbound {
            &self.metrics.tcp_inbound
        } else {
            &self.metrics.tcp_outbound
        };
        c.closed.fetch_add(1, Ordering::Relaxed);
        c.received.fetch_add(self.received, Ordering::Relaxed);
        c.sent.fetch_add(self.sent, Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.received += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.sent += *n as u64;
        }
        r
    }

    // Forwarded, not left to the trait's default (which writes the first slice only): rustls
    // hands its queued TLS records over as slices, and h2 a frame head and its payload, and each
    // would otherwise cost a send of its own.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.sent += *n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counted_writes_every_slice_of_a_vectored_write() {
        // rustls flushes its queued TLS records as slices; the trait's default would send only
        // the first, one send per record.
        use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut server, _) = accepted.unwrap();
        let me = workload_labels(
            "source",
            "a",
            "default",
            "spiffe://cluster.local/ns/default/sa/a",
            "a",
            "",
        );
        let metrics = Arc::new(Metrics::new(me.clone(), me));
        let mut counted = Counted::new(client.unwrap(), metrics, true);
        assert!(counted.is_write_vectored());
        let slices = [
            std::io::IoSlice::new(b"head"),
            std::io::IoSlice::new(b"payload"),
        ];
        assert_eq!(counted.write_vectored(&slices).await.unwrap(), 11);
        assert_eq!(counted.sent, 11);
        let mut got = [0u8; 11];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headpayload");
    }

    #[test]
    fn renders_istio_metric_names_and_labels() {
        let me = workload_labels(
            "source",
            "sleep",
            "default",
            "spiffe://cluster.local/ns/default/sa/sleep",
            "sleep",
            "",
        );
        let dest = workload_labels(
            "destination",
            "httpbin-v1",
            "default",
            "spiffe://cluster.local/ns/default/sa/httpbin",
            "httpbin",
            "v1",
        );
        let m = Metrics::new(me.clone(), dest.clone());
        for _ in 0..3 {
            m.record(RequestMetric {
                reporter: Reporter::Source,
                source: me.clone(),
                destination: dest.clone(),
                service: service_labels("httpbin.default.svc.cluster.local", "httpbin", "default"),
                code: 200,
                flags: Flags::default(),
                mtls: true,
                duration: Duration::from_millis(7),
                request_bytes: 0,
                response_bytes: 321,
            });
        }
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap();
        for want in [
            "reporter=\"source\"",
            "source_workload=\"sleep\"",
            "source_version=\"unknown\"",
            "destination_workload=\"httpbin-v1\"",
            "destination_version=\"v1\"",
            "destination_service=\"httpbin.default.svc.cluster.local\"",
            "destination_service_name=\"httpbin\"",
            "destination_principal=\"spiffe://cluster.local/ns/default/sa/httpbin\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
        assert!(line.ends_with(" 3"), "{line}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
        assert!(text.lines().any(
            |l| l.starts_with("istio_request_duration_milliseconds_bucket")
                && l.contains("le=\"10\"}")
                && l.ends_with(" 3")
        ));
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_sum") && l.ends_with(" 963"))
        );
        assert!(text.contains("# TYPE istio_tcp_connections_opened_total counter"));
    }
}

/// The metric labels of one route table's Services, clusters and endpoints, built once per push
/// next to the table (the route model carries no telemetry types), indexed like the table.
#[derive(Debug, Default)]
pub struct TableLabels {
    services: Box<[Labels]>,
    clusters: Box<[Labels]>,
    endpoints: Box<[Box<[Labels]>]>,
}

impl TableLabels {
    /// Labels for every Service, cluster and endpoint of `table`.
    pub fn build(table: &RouteTable) -> Self {
        let services = table
            .services()
            .iter()
            .map(|s| service_labels(&s.hostname, &s.name, &s.namespace))
            .collect();
        let clusters = table
            .clusters()
            .iter()
            .map(|c| match table.service_by_host(&c.service_hostname) {
                Some(s) => service_labels(&s.hostname, &s.name, &s.namespace),
                None => service_labels(&c.service_hostname, "", ""),
            })
            .collect();
        let endpoints = table
            .clusters()
            .iter()
            .map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| {
                        let (ns, pod) = e.workload.split_once('/').unwrap_or(("", &e.workload));
                        workload_labels(
                            "destination",
                            pod,
                            ns,
                            e.identity.as_ref().map(|i| i.as_str()).unwrap_or_default(),
                            &e.app,
                            &e.version,
                        )
                    })
                    .collect()
            })
            .collect();
        Self {
            services,
            clusters,
            endpoints,
        }
    }

    /// A Service's `destination_service*` labels, by `Service::index`.
    pub fn service(&self, index: usize) -> Option<&Labels> {
        self.services.get(index)
    }

    /// A cluster's `destination_service*` labels, by `Cluster::index`.
    pub fn cluster(&self, index: usize) -> Option<&Labels> {
        self.clusters.get(index)
    }

    /// An endpoint's `destination_*` labels.
    pub fn endpoint(&self, cluster: usize, endpoint: usize) -> Option<&Labels> {
        self.endpoints.get(cluster)?.get(endpoint)
    }
}
