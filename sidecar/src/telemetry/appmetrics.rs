//! Istio's metrics merging: the pod's Prometheus annotations point at the sidecar's status port
//! (15020, `/stats/prometheus`), and the application's own metrics, which the original
//! `prometheus.io/*` annotations named, are fetched from 127.0.0.1 on each scrape and appended to
//! the sidecar's. `pilot inject` moves those annotations into `WEFT_APP_PROMETHEUS_ANNOTATIONS`
//! (Istio: `ISTIO_PROMETHEUS_ANNOTATIONS`), JSON like `{"scrape":"true","port":"8080","path":"/metrics"}`.
//!
//! Decisions: the app is scraped with a time bound and a size bound, and a failed or refused app
//! scrape never fails the sidecar's own metrics (the app part is left out, a comment says why, and
//! `weft_app_metrics_scrape_failures_total` counts it, like Istio's
//! `istio_agent_scrape_failures_total`). Only plain HTTP to loopback: the sidecar is the app's
//! neighbour, not a general scraper.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// How long one scrape of the app may take (Prometheus' default scrape timeout is 10 s; ours must
/// fit inside it with the sidecar's own part).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest app exposition accepted (bytes).
pub const MAX_BODY: usize = 16 << 20;

/// Where the app's metrics are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTarget {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// HTTP path (`/metrics` unless the annotation said otherwise).
    pub path: String,
}

/// Why `WEFT_APP_PROMETHEUS_ANNOTATIONS` is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationsError {
    /// Not a JSON object of strings.
    #[error("not a JSON object of strings: {0}")]
    Json(String),
    /// Scraping asked for without a usable port.
    #[error("port {0:?} is not a port number")]
    Port(String),
    /// The path is not an absolute path.
    #[error("path {0:?} must start with '/'")]
    Path(String),
}

/// Parses the app's original annotations (keys without the `prometheus.io/` prefix). `None` when
/// they do not ask for scraping (`scrape` absent or not `true`) or name no port: Prometheus would
/// not have scraped such a pod either.
pub fn parse_annotations(json: &str) -> Result<Option<AppTarget>, AnnotationsError> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let map: BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|e| AnnotationsError::Json(e.to_string()))?;
    if map.get("scrape").map(String::as_str) != Some("true") {
        return Ok(None);
    }
    let Some(port) = map.get("port") else {
        return Ok(None);
    };
    let port = port
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| AnnotationsError::Port(port.clone()))?;
    let path = map
        .get("path")
        .filter(|p| !p.is_empty())
        .cloned()
        .unwrap_or_else(|| "/metrics".to_string());
    if !path.starts_with('/') {
        return Err(AnnotationsError::Path(path));
    }
    Ok(Some(AppTarget { port, path }))
}

/// The app scraper and its failure counter.
#[derive(Debug)]
pub struct AppMetrics {
    target: AppTarget,
    timeout: Duration,
    max_body: usize,
    failures: AtomicU64,
}

impl AppMetrics {
    /// A scraper of `target` with the default bounds.
    pub fn new(target: AppTarget) -> Self {
        Self::with_bounds(target, SCRAPE_TIMEOUT, MAX_BODY)
    }

    /// A scraper with explicit bounds (tests use small ones).
    pub fn with_bounds(target: AppTarget, timeout: Duration, max_body: usize) -> Self {
        Self {
            target,
            timeout,
            max_body,
            failures: AtomicU64::new(0),
        }
    }

    /// Appends the app's exposition to `out` (which holds the sidecar's own), or on failure a
    /// comment saying why; then the failure counter.
    pub async fn append_to(&self, out: &mut String) {
        match tokio::time::timeout(self.timeout, self.fetch()).await {
            Ok(Ok(text)) => {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                // An OpenMetrics body ends with `# EOF`, which must not sit between metrics.
                for line in text.lines().filter(|l| l.trim() != "# EOF") {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            Ok(Err(why)) => self.failed(out, &why),
            Err(_) => self.failed(out, &format!("no answer within {:?}", self.timeout)),
        }
        out.push_str(&format!(
            "# HELP weft_app_metrics_scrape_failures_total Failed scrapes of the app's own metrics.\n\
             # TYPE weft_app_metrics_scrape_failures_total counter\n\
             weft_app_metrics_scrape_failures_total {}\n",
            self.failures.load(Ordering::Relaxed)
        ));
    }

    fn failed(&self, out: &mut String, why: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(port = self.target.port, path = %self.target.path, why, "cannot scrape the application's metrics");
        // Comment lines are ignored by Prometheus; a newline in `why` must not start a sample.
        out.push_str(&format!(
            "# weft: application metrics unavailable: {}\n",
            why.replace(['\n', '\r'], " ")
        ));
    }

    async fn fetch(&self) -> Result<String, String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.target.port));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The connection task ends with the request (Connection: close), or when dropped.
        let conn = tokio::spawn(conn);
        let req = http::Request::get(self.target.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "text/plain;version=0.0.4")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_string())
        }
        .await;
        conn.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn annotations_parse_like_prometheus_reads_them() {
        let t = |j: &str| parse_annotations(j);
        assert_eq!(
            t(r#"{"scrape":"true","port":"8080","path":"/m"}"#),
            Ok(Some(AppTarget {
                port: 8080,
                path: "/m".into()
            }))
        );
        assert_eq!(
            t(r#"{"scrape":"true","port":"9090"}"#),
            Ok(Some(AppTarget {
                port: 9090,
                path: "/metrics".into()
            }))
        );
        assert_eq!(t(r#"{"scrape":"false","port":"8080"}"#), Ok(None));
        assert_eq!(t(r#"{"port":"8080"}"#), Ok(None));
        assert_eq!(t(r#"{"scrape":"true"}"#), Ok(None));
        assert_eq!(t(""), Ok(None));
        assert_eq!(
            t(r#"{"scrape":"true","port":"http"}"#),
            Err(AnnotationsError::Port("http".into()))
        );
        assert_eq!(
            t(r#"{"scrape":"true","port":"80","path":"metrics"}"#),
            Err(AnnotationsError::Path("metrics".into()))
        );
        assert!(matches!(t("[1]"), Err(AnnotationsError::Json(_))));
    }

    /// A one-shot HTTP server on loopback answering every connection with `response` (after
    /// `delay`), for at most `count` connections.
    async fn app(response: Vec<u8>, delay: Duration, count: usize) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..count {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let response = response.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(&response).await;
                });
            }
        });
        port
    }

    fn target(port: u16) -> AppTarget {
        AppTarget {
            port,
            path: "/metrics".into(),
        }
    }

    #[tokio::test]
    async fn merges_the_app_exposition_after_the_sidecars() {
        let body = "# TYPE app_hits_total counter\napp_hits_total 7\n# EOF\n";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let port = app(resp.into_bytes(), Duration::ZERO, 1).await;
        let m = AppMetrics::new(target(port));
        let mut out = "own_metric 1".to_string();
        m.append_to(&mut out).await;
        assert!(out.starts_with("own_metric 1\n# TYPE app_hits_total counter\napp_hits_total 7\n"));
        assert!(!out.contains("# EOF"));
        assert!(out.ends_with("weft_app_metrics_scrape_failures_total 0\n"));
    }

    #[tokio::test]
    async fn a_failing_app_leaves_the_sidecars_metrics_and_counts() {
        // Refused connection (nothing listens on the port once the listener is dropped).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let m = AppMetrics::new(target(port));
        let mut out = "own_metric 1\n".to_string();
        m.append_to(&mut out).await;
        assert!(out.starts_with("own_metric 1\n# weft: application metrics unavailable: connect"));
        assert!(out.ends_with("weft_app_metrics_scrape_failures_total 1\n"));

        // Error status.
        let port = app(
            b"HTTP/1.1 500 Oops\r\nContent-Length: 9\r\n\r\nbad 1\nx 2".to_vec(),
            Duration::ZERO,
            1,
        )
        .await;
        let m = AppMetrics::new(target(port));
        let mut out = String::new();
        m.append_to(&mut out).await;
        assert!(out.contains("unavailable: status 500"), "{out}");
        assert!(!out.contains("bad 1"));

        // Too slow: bounded by the timeout, not by the app.
        let port = app(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nx 1\n".to_vec(),
            Duration::from_secs(30),
            1,
        )
        .await;
        let m = AppMetrics::with_bounds(target(port), Duration::from_millis(200), MAX_BODY);
        let started = std::time::Instant::now();
        let mut out = String::new();
        m.append_to(&mut out).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(out.contains("no answer within 200ms"), "{out}");

        // Too large: bounded by size.
        let big = "x 1\n".repeat(1000);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        );
        let port = app(resp.into_bytes(), Duration::ZERO, 1).await;
        let m = AppMetrics::with_bounds(target(port), SCRAPE_TIMEOUT, 1000);
        let mut out = String::new();
        m.append_to(&mut out).await;
        assert!(out.contains("unavailable: body"), "{out}");
        assert!(!out.contains("x 1\n"));
        assert!(out.ends_with("weft_app_metrics_scrape_failures_total 1\n"));
    }
}
