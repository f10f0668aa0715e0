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

/// What the metrics say about one workload; empty fields are unknown.
#[derive(Debug, Default, Clone, Copy)]
pub struct Workload<'a> {
    /// Workload (pod) name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// SPIFFE identity.
    pub principal: &'a str,
    /// `app` label.
    pub app: &'a str,
    /// `version` label.
    pub version: &'a str,
    /// Canonical service, as [`canonical_service`] finds it (empty: the workload name).
    pub canonical_service: &'a str,
    /// Canonical revision, as [`canonical_revision`] finds it (empty: `latest`).
    pub canonical_revision: &'a str,
}

/// Istio's canonical service of a workload with pod labels `label`: the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`, else `app` (empty when
/// none, and the caller falls back to the workload name).
pub fn canonical_service<'a>(label: impl Fn(&str) -> Option<&'a str>) -> &'a str {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .into_iter()
    .find_map(|k| label(k).filter(|v| !v.is_empty()))
    .unwrap_or_default()
}

/// Istio's canonical revision of a workload with pod labels `label`: the
/// `service.istio.io/canonical-revision` label, else `app.kubernetes.io/version`, else `version`
/// (empty when none, and the metrics say `latest`).
pub fn canonical_revision<'a>(label: impl Fn(&str) -> Option<&'a str>) -> &'a str {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .into_iter()
    .find_map(|k| label(k).filter(|v| !v.is_empty()))
    .unwrap_or_default()
}

/// Istio's cluster id when none is configured: every workload here is in the one cluster.
const CLUSTER_ID: &str = "Kubernetes";

/// The label fragment describing a workload on one side (`source` or `destination`). A peer known
/// only by its certificate (no workload name) keeps its canonical names `unknown`, as Istio
/// reports a peer whose metadata it lacks; a named one falls back to its workload name and `latest`.
pub fn workload_labels(side: &str, w: &Workload<'_>) -> Labels {
    let named = !w.name.is_empty();
    let service = match (w.canonical_service, named) {
        ("", true) => w.name,
        (s, _) => s,
    };
    let revision = match (w.canonical_revision, named) {
        ("", true) => "latest",
        (r, _) => r,
    };
    let in_mesh = named || !w.namespace.is_empty() || !w.principal.is_empty();
    Labels::new(format!(
        "{side}_workload=\"{}\",{side}_canonical_service=\"{}\",{side}_canonical_revision=\"{}\",{side}_workload_namespace=\"{}\",{side}_principal=\"{}\",{side}_app=\"{}\",{side}_version=\"{}\",{side}_cluster=\"{}\"",
        or_unknown(w.name),
        or_unknown(service),
        or_unknown(revision),
        or_unknown(w.namespace),
        or_unknown(w.principal),
        or_unknown(w.app),
        or_unknown(w.version),
        if in_mesh { CLUSTER_ID } else { "unknown" },
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
    grpc: bool,
    grpc_status: Option<u16>,
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
    /// Whether the request was gRPC (its content-type `application/grpc*`).
    pub grpc: bool,
    /// The response's `grpc-status`, when it carried one in its head.
    pub grpc_status: Option<u16>,
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

/// Writes a family's `# HELP` and `# TYPE` lines, which Prometheus wants once, before its samples.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
            grpc: m.grpc,
            grpc_status: m.grpc_status,
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
                let mut grpc_status = String::new();
                if let Some(g) = k.grpc_status {
                    let _ = write!(grpc_status, "{g}");
                }
                (
                    format!(
                        "reporter=\"{}\",{},{},{},request_protocol=\"{}\",response_code=\"{}\",grpc_response_status=\"{grpc_status}\",response_flags=\"{}\",connection_security_policy=\"{}\"",
                        k.reporter.as_str(),
                        k.source,
                        k.destination,
                        k.service,
                        if k.grpc { "grpc" } else { "http" },
                        k.code,
                        k.flags,
                        if k.mtls { "mutual_tls" } else { "none" }
                    ),
                    s,
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            &mut out,
            "istio_requests_total",
            "counter",
            "Requests, by source, destination and response.",
        );
        for (labels, s) in &rows {
            let _ = writeln!(out, "istio_requests_total{{{labels}}} {}", s.count);
        }
        family(
            &mut out,
            "istio_request_duration_milliseconds",
            "histogram",
            "Time to the response head, milliseconds.",
        );
        for (labels, s) in &rows {
            s.duration.render(
                &mut out,
                "istio_request_duration_milliseconds",
                labels,
                &DURATION_BUCKETS,
            );
        }
        family(
            &mut out,
            "istio_request_bytes",
            "histogram",
            "Request body sizes, bytes.",
        );
        for (labels, s) in &rows {
            s.request_bytes
                .render(&mut out, "istio_request_bytes", labels, &SIZE_BUCKETS);
        }
        family(
            &mut out,
            "istio_response_bytes",
            "histogram",
            "Response body sizes, bytes.",
        );
        for (labels, s) in &rows {
            s.response_bytes
                .render(&mut out, "istio_response_bytes", labels, &SIZE_BUCKETS);
        }
        for (name, pick, help) in [
            (
                "istio_tcp_connections_opened_total",
                0,
                "Opaque TCP connections opened.",
            ),
            (
                "istio_tcp_connections_closed_total",
                1,
                "Opaque TCP connections closed.",
            ),
            (
                "istio_tcp_received_bytes_total",
                2,
                "Bytes received from the downstream of opaque TCP connections.",
            ),
            (
                "istio_tcp_sent_bytes_total",
                3,
                "Bytes sent to the downstream of opaque TCP connections.",
            ),
        ] {
            family(&mut out, name, "counter", help);
            for (reporter, c, this) in [
                ("source", &self.tcp_outbound, &self.this_source),
                ("destination", &self.tcp_inbound, &self.this_destination),
            ] {
                let v = [&c.opened, &c.closed, &c.received, &c.sent][pick].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{reporter=\"{reporter}\",{this},request_protocol=\"tcp\"}} {v}"
                );
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

impl<T> Counted<T> {
    /// Adds bytes that crossed before the connection was wrapped (read while sniffing it).
    pub fn add(&mut self, received: u64, sent: u64) {
        self.received += received;
        self.sent += sent;
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
            &Workload {
                name: "a",
                namespace: "default",
                principal: "spiffe://cluster.local/ns/default/sa/a",
                app: "a",
                ..Workload::default()
            },
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
    fn a_caller_is_the_workload_of_its_identity_at_its_address_else_the_only_one() {
        use weft_proto::discovery as pb;
        let peer = |workload: &str, sa: &str, version: &str, ips: &[&str]| pb::Peer {
            identity: format!("spiffe://cluster.local/ns/default/sa/{sa}"),
            workload: workload.into(),
            namespace: "default".into(),
            labels: [("app", "httpbin"), ("version", version)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addresses: ips.iter().map(|ip| (*ip).to_string()).collect(),
        };
        let table = RouteTable::try_from(pb::ProxyConfig {
            mesh: Some(pb::MeshSettings {
                trust_domain: "cluster.local".into(),
                ..Default::default()
            }),
            peers: vec![
                peer("httpbin-v1", "httpbin", "v1", &["10.0.0.1", "10.0.0.2"]),
                peer("httpbin-v2", "httpbin", "v2", &["10.0.0.3"]),
                peer("sleep", "sleep", "", &["10.0.0.9"]),
            ],
            ..Default::default()
        })
        .unwrap();
        let labels = TableLabels::build(&table);
        let httpbin = "spiffe://cluster.local/ns/default/sa/httpbin";
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let v2 = labels.caller(httpbin, ip("10.0.0.3")).unwrap().to_string();
        assert!(v2.contains("source_workload=\"httpbin-v2\""), "{v2}");
        assert!(v2.contains("source_version=\"v2\""), "{v2}");
        assert!(v2.contains("source_app=\"httpbin\""), "{v2}");
        assert!(
            v2.contains(&format!("source_principal=\"{httpbin}\"")),
            "{v2}"
        );
        let v1 = labels.caller(httpbin, ip("10.0.0.2")).unwrap().to_string();
        assert!(v1.contains("source_workload=\"httpbin-v1\""), "{v1}");
        // Two workloads share the identity and the address names neither: no workload.
        assert_eq!(labels.caller(httpbin, ip("127.0.0.1")), None);
        // The only workload of an identity, from wherever it connects (explicit mode: loopback).
        let sleep = labels
            .caller(
                "spiffe://cluster.local/ns/default/sa/sleep",
                ip("127.0.0.1"),
            )
            .unwrap()
            .to_string();
        assert!(sleep.contains("source_workload=\"sleep\""), "{sleep}");
        // An address never lends a workload to another identity.
        assert_eq!(
            labels.caller("spiffe://cluster.local/ns/default/sa/other", ip("10.0.0.3")),
            None
        );
    }

    fn labels<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
    }

    #[test]
    fn canonical_service_follows_istios_label_order() {
        let all = [
            ("service.istio.io/canonical-name", "canon"),
            ("app.kubernetes.io/name", "k8s-name"),
            ("app", "app"),
        ];
        assert_eq!(canonical_service(labels(&all)), "canon");
        assert_eq!(canonical_service(labels(&all[1..])), "k8s-name");
        assert_eq!(canonical_service(labels(&all[2..])), "app");
        assert_eq!(canonical_service(labels(&[("app", "")])), "");
        assert_eq!(canonical_service(labels(&[])), "");
    }

    #[test]
    fn canonical_revision_follows_istios_label_order() {
        let all = [
            ("service.istio.io/canonical-revision", "r1"),
            ("app.kubernetes.io/version", "k8s-v"),
            ("version", "v1"),
        ];
        assert_eq!(canonical_revision(labels(&all)), "r1");
        assert_eq!(canonical_revision(labels(&all[1..])), "k8s-v");
        assert_eq!(canonical_revision(labels(&all[2..])), "v1");
        assert_eq!(canonical_revision(labels(&[])), "");
    }

    #[test]
    fn a_named_workload_falls_back_to_its_name_and_latest_in_the_default_cluster() {
        let l = workload_labels(
            "destination",
            &Workload {
                name: "reviews-v2",
                namespace: "default",
                ..Workload::default()
            },
        );
        for want in [
            "destination_canonical_service=\"reviews-v2\"",
            "destination_canonical_revision=\"latest\"",
            "destination_cluster=\"Kubernetes\"",
            "destination_app=\"unknown\"",
        ] {
            assert!(l.as_str().contains(want), "{want} missing in {l}");
        }
        let l = workload_labels(
            "destination",
            &Workload {
                name: "reviews-v2",
                canonical_service: "reviews",
                canonical_revision: "v2",
                ..Workload::default()
            },
        );
        assert!(
            l.as_str()
                .contains("destination_canonical_service=\"reviews\"")
        );
        assert!(l.as_str().contains("destination_canonical_revision=\"v2\""));
    }

    #[test]
    fn a_peer_known_by_its_certificate_only_keeps_its_names_unknown() {
        let l = workload_labels(
            "source",
            &Workload {
                namespace: "default",
                principal: "spiffe://cluster.local/ns/default/sa/sleep",
                ..Workload::default()
            },
        );
        assert!(l.as_str().contains("source_canonical_service=\"unknown\""));
        assert!(l.as_str().contains("source_canonical_revision=\"unknown\""));
        assert!(l.as_str().contains("source_cluster=\"Kubernetes\""));
        let l = workload_labels("source", &Workload::default());
        assert!(l.as_str().contains("source_cluster=\"unknown\""), "{l}");
    }

    /// Real `promtool check metrics` on the rendered families (skipped, saying so, without it).
    #[test]
    fn promtool_accepts_the_rendering() {
        let Ok(out) = std::process::Command::new("promtool")
            .arg("--version")
            .output()
        else {
            eprintln!("skipped: promtool not installed (Debian's prometheus package)");
            return;
        };
        assert!(out.status.success());
        let me = workload_labels(
            "source",
            &Workload {
                name: "sleep",
                namespace: "default",
                ..Workload::default()
            },
        );
        let m = Metrics::new(me.clone(), me.clone());
        for (code, grpc) in [(200, false), (503, false), (200, true)] {
            m.record(RequestMetric {
                reporter: Reporter::Source,
                source: me.clone(),
                destination: workload_labels("destination", &Workload::default()),
                service: service_labels("httpbin.default.svc.cluster.local", "", ""),
                code,
                grpc,
                grpc_status: grpc.then_some(0),
                flags: Flags::default(),
                mtls: true,
                duration: Duration::from_millis(3),
                request_bytes: 10,
                response_bytes: 20,
            });
        }
        let text = m.render();
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        // Istio's own name breaks promtool's base-unit lint; that lint, and nothing else, is allowed.
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let problems: Vec<&str> = report
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && *l
                        != "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\""
            })
            .collect();
        assert!(problems.is_empty(), "promtool: {report}\n{text}");
        assert!(report.contains("base unit"), "promtool ran: {report}");
    }

    #[test]
    fn renders_istio_metric_names_and_labels() {
        let me = workload_labels(
            "source",
            &Workload {
                name: "sleep",
                namespace: "default",
                principal: "spiffe://cluster.local/ns/default/sa/sleep",
                app: "sleep",
                canonical_service: "sleep",
                ..Workload::default()
            },
        );
        let dest = workload_labels(
            "destination",
            &Workload {
                name: "httpbin-v1",
                namespace: "default",
                principal: "spiffe://cluster.local/ns/default/sa/httpbin",
                app: "httpbin",
                version: "v1",
                canonical_service: "httpbin",
                canonical_revision: "v1",
            },
        );
        let m = Metrics::new(me.clone(), dest.clone());
        for _ in 0..3 {
            m.record(RequestMetric {
                reporter: Reporter::Source,
                source: me.clone(),
                destination: dest.clone(),
                service: service_labels("httpbin.default.svc.cluster.local", "httpbin", "default"),
                code: 200,
                grpc: false,
                grpc_status: None,
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
            "destination_canonical_service=\"httpbin\"",
            "destination_canonical_revision=\"v1\"",
            "destination_cluster=\"Kubernetes\"",
            "request_protocol=\"http\"",
            "grpc_response_status=\"\"",
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
        assert!(text.contains("# HELP istio_requests_total "));
    }
}

/// The metric labels of one route table's Services, clusters and endpoints, built once per push
/// next to the table (the route model carries no telemetry types), indexed like the table.
#[derive(Debug, Default)]
pub struct TableLabels {
    services: Box<[Labels]>,
    clusters: Box<[Labels]>,
    endpoints: Box<[Box<[Labels]>]>,
    /// Callers by identity: each workload with that identity, its addresses and `source_*` labels.
    callers: foldhash::HashMap<String, Vec<CallerLabels>>,
}

/// One workload as a caller: its pods' addresses and its `source_*` labels.
type CallerLabels = (Box<[std::net::IpAddr]>, Labels);

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
                            &Workload {
                                name: if e.workload_name.is_empty() {
                                    pod
                                } else {
                                    &e.workload_name
                                },
                                namespace: ns,
                                principal: e
                                    .identity
                                    .as_ref()
                                    .map(|i| i.as_str())
                                    .unwrap_or_default(),
                                app: &e.app,
                                version: &e.version,
                                canonical_service: &e.canonical_service,
                                canonical_revision: &e.canonical_revision,
                            },
                        )
                    })
                    .collect()
            })
            .collect();
        let mut callers: foldhash::HashMap<String, Vec<_>> = foldhash::HashMap::default();
        for p in table.peers() {
            let labels = workload_labels(
                "source",
                &Workload {
                    name: &p.workload,
                    namespace: &p.namespace,
                    principal: &p.identity,
                    app: &p.app,
                    version: &p.version,
                    canonical_service: &p.canonical_service,
                    canonical_revision: &p.canonical_revision,
                },
            );
            callers
                .entry(p.identity.clone())
                .or_default()
                .push((p.addresses.clone().into_boxed_slice(), labels));
        }
        Self {
            services,
            clusters,
            endpoints,
            callers,
        }
    }

    /// The `source_*` labels of a caller whose sidecar proved `identity`, connecting from
    /// `address`: the workload with that identity whose pods include the address, else the only
    /// workload with that identity. `None` when pilot knows no such workload, or several and the
    /// address tells none apart (the caller is then named by its certificate alone).
    pub fn caller(&self, identity: &str, address: std::net::IpAddr) -> Option<&Labels> {
        let candidates = self.callers.get(identity)?;
        candidates
            .iter()
            .find(|(addresses, _)| addresses.contains(&address))
            .or(match candidates.as_slice() {
                [only] => Some(only),
                _ => None,
            })
            .map(|(_, labels)| labels)
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
