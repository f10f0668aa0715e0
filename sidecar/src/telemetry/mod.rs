//! Istio's standard metrics and Envoy's access log, so existing Grafana/Kiali dashboards and log
//! tooling read weft unchanged.
//!
//! Metrics (`/stats/prometheus`): `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (histograms with Istio's buckets), and
//! `istio_tcp_connections_opened_total` / `_closed_total`, `istio_tcp_sent_bytes_total` /
//! `_received_bytes_total`, each with Istio's labels (reporter, source/destination workload, namespace,
//! principal, app, version, destination service, response code, connection security policy).
//! Decisions: the duration is measured to the response head (Envoy measures to the last byte); request
//! and response sizes come from Content-Length (0 when the body is streamed without one); an inbound
//! caller's workload comes from its verified certificate and the pods pilot knows with that
//! identity (`TableLabels::caller`; Istio learns it by a metadata exchange the caller fills in,
//! weft never takes it from the caller); a gRPC call's sample waits for its trailers'
//! `grpc-status`; TCP metrics are per listener connection.
//!
//! Label sets are built once (per workload, cluster, endpoint or connection) as preformatted label
//! fragments shared by `Arc`, so recording a request is a hash-map update under a short lock.

pub mod access_log;
pub mod appmetrics;
pub mod attribute;
pub mod export;
pub mod metrics;
pub mod record;
pub mod span_tags;
pub mod trace;

pub use access_log::{AccessLog, LogEntry};
pub use metrics::{
    Counted, Labels, Metrics, Reporter, RequestMetric, TableLabels, TcpCounters, Workload,
    canonical_revision, canonical_service, family, service_labels, workload_labels,
};
pub use record::Record;

/// Content-Length of a header map, 0 when absent.
pub fn content_length(h: &http::HeaderMap) -> u64 {
    crate::http::headers::declared_length(h).unwrap_or(0)
}
