//! `pilot serve --monitoring-listen`: `/metrics` in Prometheus' text format (istiod serves its
//! metrics on 15014), `/ready` (200 once discovery can serve: the Kubernetes registry has listed
//! every kind; else 503, for the readiness probe) and `/healthz` (200 while the process answers,
//! for the liveness probe). Plain HTTP/1.1; pilot's full metrics are another issue's.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// Renders the metrics text on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;
/// Whether pilot is ready, asked on every `/ready`.
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
        "/ready" => text(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the registry has not listed every kind yet\n",
        ),
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
}
