//! The admin listener (loopback only): `/ready`, `/config_dump`, `/stats/prometheus`; the status
//! listener (kubelet, `/healthz/ready`); and the Prometheus listener (Istio's 15020: the sidecar's
//! metrics merged with the app's, see [`crate::telemetry::appmetrics`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_ca::tls::{CredentialStore, TrustBundle};

use crate::control::ControlStats;
use crate::route::MtlsMode;
use crate::telemetry::family;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    /// Current config.
    pub tables: crate::snapshot::Snapshots,
    /// Current certificate.
    pub creds: Arc<CredentialStore>,
    /// The roots trusted now.
    pub bundle: TrustBundle,
    /// Discovery counters.
    pub control: Arc<ControlStats>,
    /// Mirroring counters.
    pub mirror: Arc<crate::outbound::mirror::MirrorStats>,
    /// Shadow-diff comparisons (`/mirror_report`, `weft_mirror_compare_*`).
    pub shadow: Arc<crate::shadow_diff::ShadowDiff>,
    /// Span export counters.
    pub trace: Arc<crate::telemetry::trace::TraceStats>,
    /// Istio metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// The sidecar's drain: not ready once it has started.
    pub drain: crate::listener::Drain,
    /// The listeners' counters.
    pub listeners: Arc<crate::listener::Stats>,
    /// The app's metrics to merge on the Prometheus port, when its annotations named them.
    pub app_metrics: Option<crate::telemetry::appmetrics::AppMetrics>,
}

/// Which listener a request came in on: each serves its own set of endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Loopback admin (15000): everything but the merged metrics.
    Admin,
    /// The kubelet's readiness port (15021): `/healthz/ready` only.
    Status,
    /// Prometheus' scrape port (15020): merged `/stats/prometheus`, and `/healthz/ready`.
    Prometheus,
}

impl Admin {
    /// Ready once a certificate and a first config are in place, while the certificate has not
    /// expired, until the drain starts.
    pub fn ready(&self) -> bool {
        self.not_ready().is_none()
    }

    /// Why the sidecar is not ready, if it is not.
    fn not_ready(&self) -> Option<&'static str> {
        if self.drain.is_draining() {
            return Some("draining\n");
        }
        if !self.creds.valid_at(SystemTime::now()) {
            // Every mesh handshake would fail: take the pod out of its Services until renewed.
            return Some("certificate expired and not yet renewed (see the log)\n");
        }
        if self.tables.borrow().routes.version.is_empty() {
            return Some("waiting for the first config from pilot\n");
        }
        None
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/ready" | "/healthz/ready" => match self.not_ready() {
                None => text(StatusCode::OK, "ready\n".into()),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why.into()),
            },
            "/config_dump" => self.config_dump(),
            "/stats/prometheus" | "/stats" => text(StatusCode::OK, self.stats()),
            "/mirror_report" => {
                let mut resp = text(
                    StatusCode::OK,
                    serde_json::to_string_pretty(&self.shadow.report_json()).unwrap_or_default(),
                );
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                resp
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: /ready /config_dump /stats/prometheus /mirror_report\n".into(),
            ),
        }
    }

    fn config_dump(&self) -> Response<Full<Bytes>> {
        let snapshot = self.tables.borrow().clone();
        let table = &snapshot.routes;
        let creds = self.creds.current();
        let services: Vec<serde_json::Value> = table
            .services()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "hostname": s.hostname,
                    "vip": s.vip.map(|v| v.to_string()),
                    "ports": s.ports.iter().map(|p| serde_json::json!({
                        "port": p.port,
                        "protocol": p.protocol,
                        "routes": p.routes.iter().map(|r| serde_json::json!({
                            "name": r.name,
                            "destinations": match &r.action {
                                crate::route::Action::Forward { destinations, .. } => destinations
                                    .iter()
                                    .map(|d| serde_json::json!({"cluster": d.cluster.name, "weight": d.weight}))
                                    .collect::<Vec<_>>(),
                                crate::route::Action::Redirect(_) => Vec::new(),
                            },
                            "mirrors": r.mirrors.iter().map(|m| serde_json::json!({
                                "cluster": m.cluster.name,
                                "percent": m.percent,
                                "compare": m.compare.as_ref().map(|c| serde_json::json!({
                                    "status": c.status,
                                    "headers": c.headers,
                                    "body": c.body,
                                    "ignore_headers": c.ignore_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                                    "ignore_json": c.ignore_json.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                                })),
                            })).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut clusters: Vec<serde_json::Value> = table
            .clusters()
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "lb": format!("{:?}", c.lb),
                    "tls": format!("{:?}", c.tls),
                    "endpoints": c.endpoints.iter().map(|e| serde_json::json!({
                        "address": e.dial.to_string(),
                        "workload": e.workload,
                        "identity": e.identity.as_ref().map(ToString::to_string),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mode = |m: MtlsMode| format!("{m:?}").to_uppercase();
        let body = serde_json::json!({
            "version": table.version,
            "identity": creds.identity().to_string(),
            "certificate_expires_in_s": secs_until(creds.not_after()),
            "services": services,
            "clusters": clusters,
            "inbound": {
                "mode": mode(table.inbound.mode),
                "port_modes": table.inbound.port_modes.iter().map(|(p, m)| (p.to_string(), mode(*m))).collect::<std::collections::BTreeMap<_, _>>(),
            },
            "tracing": {
                "sampling_percent": table.tracing.sampling_percent,
                "service_name": table.tracing.service_name.as_deref().unwrap_or_default(),
            },
        });
        let mut resp = text(
            StatusCode::OK,
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        );
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    fn stats(&self) -> String {
        let m = &self.mirror;
        let t = &self.trace;
        let mut out = String::new();
        family(
            &mut out,
            "weft_mirror_requests_total",
            "counter",
            "Mirrored requests, by what became of them.",
        );
        for (result, v) in [
            ("sent", &m.sent),
            ("failed", &m.failed),
            ("dropped_busy", &m.dropped_busy),
            ("dropped_too_large", &m.dropped_too_large),
        ] {
            let _ = writeln!(
                out,
                "weft_mirror_requests_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.shadow.render(&mut out);
        family(
            &mut out,
            "weft_spans_total",
            "counter",
            "Spans by how their export ended: exported, dropped (queue full), rejected (the collector's partial success), failed (by reason).",
        );
        for (result, v) in [
            ("exported", &t.exported),
            ("dropped", &t.dropped),
            ("rejected", &t.rejected),
            ("failed_non_retryable", &t.failed_non_retryable),
            ("failed_retries_exhausted", &t.failed_retries_exhausted),
        ] {
            let _ = writeln!(
                out,
                "weft_spans_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "weft_span_export_retries_total",
                "Span export attempts repeated after a retryable failure.",
                &t.retries,
            ),
            (
                "weft_span_export_partial_success_total",
                "Export replies that accepted the spans only in part (or carried a warning).",
                &t.partial_successes,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        out.push_str(&self.control_stats());
        out.push_str(&self.cluster_stats());
        out.push_str(&self.listeners.render());
        out.push_str(&self.metrics.render());
        out
    }

    /// Outlier ejections and circuit-breaker state per cluster that has either configured, each
    /// family whole (Prometheus wants a family's samples together, after its TYPE line).
    fn cluster_stats(&self) -> String {
        let snapshot = self.tables.borrow().clone();
        let mut ejections = String::new();
        let mut overflow = String::new();
        let mut pending = String::new();
        for c in snapshot.routes.clusters() {
            let Some(state) = snapshot.upstream.cluster(c.index) else {
                continue;
            };
            let name = c.name.replace('\\', "\\\\").replace('"', "\\\"");
            if state.outlier.is_some() {
                let _ = writeln!(
                    ejections,
                    "weft_outlier_ejections_total{{cluster=\"{name}\"}} {}",
                    state.ejections.load(Ordering::Relaxed)
                );
            }
            if !state.limits.is_unlimited() {
                let s = state.limits.stats();
                let _ = writeln!(
                    overflow,
                    "weft_upstream_overflow_total{{cluster=\"{name}\"}} {}",
                    s.overflows + s.retry_overflows
                );
                let _ = writeln!(
                    pending,
                    "weft_upstream_requests_pending{{cluster=\"{name}\"}} {}",
                    s.pending
                );
            }
        }
        let mut out = String::new();
        for (name, kind, help, samples) in [
            (
                "weft_outlier_ejections_total",
                "counter",
                "Endpoint ejections by outlier detection, per cluster.",
                ejections,
            ),
            (
                "weft_upstream_overflow_total",
                "counter",
                "Requests refused by a cluster's circuit breaker (retries included).",
                overflow,
            ),
            (
                "weft_upstream_requests_pending",
                "gauge",
                "Requests waiting for a connection to a cluster.",
                pending,
            ),
        ] {
            family(&mut out, name, kind, help);
            out.push_str(&samples);
        }
        out
    }

    fn control_stats(&self) -> String {
        let c = &self.control;
        let version: u64 = self.tables.borrow().routes.version.parse().unwrap_or(0);
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "weft_config_pushes_total",
                "counter",
                "Config pushes applied.",
                c.pushes.load(Ordering::Relaxed),
            ),
            (
                "weft_config_nacks_total",
                "counter",
                "Config pushes refused.",
                c.nacks.load(Ordering::Relaxed),
            ),
            (
                "weft_control_connects_total",
                "counter",
                "Connections made to pilot.",
                c.connects.load(Ordering::Relaxed),
            ),
            (
                "weft_config_version",
                "gauge",
                "Version of the config in use.",
                version,
            ),
            (
                "weft_control_connected",
                "gauge",
                "1 while connected to pilot.",
                c.connected.load(Ordering::Relaxed),
            ),
            (
                "weft_cert_expiry_seconds",
                "gauge",
                "Seconds until the workload certificate expires.",
                secs_until(self.creds.current().not_after()),
            ),
            (
                "weft_certificate_valid",
                "gauge",
                "1 while the workload certificate is valid.",
                u64::from(self.creds.valid_at(SystemTime::now())),
            ),
        ] {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        }
        family(
            &mut out,
            "weft_certificate_renewals_total",
            "counter",
            "Certificate renewals, by result.",
        );
        let _ = writeln!(
            out,
            "weft_certificate_renewals_total{{result=\"success\"}} {}\n\
             weft_certificate_renewals_total{{result=\"failure\"}} {}",
            self.creds.renewals(),
            self.creds.failures()
        );
        family(
            &mut out,
            "weft_trust_bundle_roots",
            "gauge",
            "Roots in the trust bundle.",
        );
        let _ = writeln!(out, "weft_trust_bundle_roots {}", self.bundle.len());
        out
    }
}

fn secs_until(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

impl Admin {
    async fn respond(&self, port: Port, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        match port {
            Port::Admin => self.handle(&req),
            _ if path == "/healthz/ready" => self.handle(&req),
            Port::Prometheus if path == "/stats/prometheus" => {
                let mut out = self.stats();
                if let Some(app) = &self.app_metrics {
                    app.append_to(&mut out).await;
                }
                let mut resp = text(StatusCode::OK, out);
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            Port::Prometheus => text(
                StatusCode::NOT_FOUND,
                "endpoints: /stats/prometheus /healthz/ready\n".into(),
            ),
            Port::Status => text(StatusCode::NOT_FOUND, "only /healthz/ready here\n".into()),
        }
    }
}

/// Serves `port`'s endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    port: Port,
    shutdown: CancellationToken,
) {
    let name = match port {
        Port::Admin => "admin",
        Port::Status => "status",
        Port::Prometheus => "prometheus",
    };
    let mut backoff = crate::listener::Backoff::default();
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            c = crate::listener::accept(&listener, name, &mut backoff) => c,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.respond(port, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
