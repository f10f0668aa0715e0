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
