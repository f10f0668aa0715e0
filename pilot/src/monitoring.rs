//! `pilot serve --monitoring-listen`: `/metrics` in Prometheus' text format (istiod serves its
//! metrics on 15014). Plain HTTP/1.1, one small handler; pilot's full metrics are another issue's.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// Renders the metrics text on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until `shutdown`; other paths answer 404.
pub async fn serve(listener: tokio::net::TcpListener, render: Render, shutdown: CancellationToken) {
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
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(req.uri().path(), &render)) }
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

fn respond(path: &str, render: &Render) -> http::Response<Full<Bytes>> {
    let (status, body, content_type) = if path == "/metrics" {
        (http::StatusCode::OK, render(), CONTENT_TYPE)
    } else {
        (
            http::StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n".to_string(),
            "text/plain",
        )
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
        tokio::spawn(serve(listener, render, shutdown.clone()));
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
        shutdown.cancel();
    }
}
