//! The webhooks' HTTPS server: TLS (rustls on ring; ALPN h2 and http/1.1, the API server speaks
//! both) with the certificate from a [`CredentialStore`] (renewed in place), hyper's server on each
//! connection, and the two routes.
//!
//! Bounds on what a client can make pilot hold: the TLS handshake (10 s, `weft_ca::grpc`), request
//! heads (10 s on HTTP/1.1), the whole body ([`BODY_TIMEOUT`]) and its size
//! ([`super::MAX_BODY_BYTES`], refused with 413 before it is read when Content-Length says so).
//! The work runs on the blocking pool: a large pod or object does not hold up the runtime.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use weft_ca::tls::{self, ClientAuth, CredentialStore, TrustBundle};

use super::{Admission, BadReview, MAX_BODY_BYTES};

/// How long a client has to send a request head (HTTP/1.1).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a whole body. The API server's own timeout for a webhook call is
/// 10 s by default (at most 30 s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// ALPN offered: HTTP/2 first (the API server prefers it), HTTP/1.1 for everyone else (curl).
const ALPN: [&[u8]; 2] = [tls::ALPN_H2, b"http/1.1"];

/// The rustls server config: `store`'s certificate, no client certificate (the API server sends
/// none by default).
pub fn tls_config(
    store: Arc<CredentialStore>,
    bundle: &TrustBundle,
) -> Result<rustls::ServerConfig, weft_ca::tls::SvidError> {
    tls::server_config(store, bundle, ClientAuth::None, &ALPN)
}

/// Serves `/inject` and `/validate` on `listener` until `shutdown`, then gives open connections
/// `drain` to finish their requests (HTTP/2 GOAWAY, `Connection: close`).
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let incoming = weft_ca::grpc::tls_incoming(listener, config);
    tokio::pin!(incoming);
    let mut connections = JoinSet::new();
    loop {
        let tls = tokio::select! {
            () = shutdown.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(tls)) => tls,
                Some(Err(e)) => {
                    tracing::info!(error = %e, "webhook connection failed");
                    continue;
                }
                None => break,
            },
            // Reap finished connections so the set does not grow with every one ever served.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let admission = admission.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admission = admission.clone();
                async move {
                    Ok::<_, Infallible>(handle::<hyper::body::Incoming>(&admission, request).await)
                }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "webhook connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.abort_all();
    }
}

/// Which handler a request is for.
#[derive(Debug, Clone, Copy)]
enum Route {
    Inject,
    Validate,
}

/// One request: route, bounded body, handler on the blocking pool, answer.
pub async fn handle<B>(admission: &Arc<Admission>, request: Request<B>) -> Response<Full<Bytes>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let route = match request.uri().path() {
        "/inject" => Route::Inject,
        "/validate" => Route::Validate,
        "/ready" if request.method() == Method::GET => return text(StatusCode::OK, "ready"),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: the webhooks are POST /inject and POST /validate",
            );
        }
    };
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only POST");
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let (handler, kept) = (admission.clone(), body.clone());
    let answer = match tokio::task::spawn_blocking(move || match route {
        Route::Inject => handler.inject(&body),
        Route::Validate => handler.validate(&body),
    })
    .await
    {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, ?route, "webhook handler failed; answering allowed");
            admission.allowed_after_failure(&kept)
        }
    };
    match answer {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(BadReview(reason)) => text(StatusCode::BAD_REQUEST, &reason),
    }
}

/// The whole body, at most [`MAX_BODY_BYTES`], within [`BODY_TIMEOUT`]; or the response refusing it.
async fn read_body<B>(request: Request<B>) -> Result<Bytes, Response<Full<Bytes>>>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the request body: {e}"),
        )),
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests;
