//! HTTP/1.1 upgrades (WebSocket and the like) on both sides of the mesh.
//!
//! HTTP/2 between sidecars cannot carry an upgrade, so the client side sends the upgrade request over
//! an opaque mTLS stream (ALPN `istio`); the server side parses that stream as HTTP again (see
//! `inbound`), so the request that reaches the app went through the same header hygiene as any other
//! (the verified `x-forwarded-client-cert`), and only after `101 Switching Protocols` do bytes pass
//! unparsed.

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::body::Body;

/// Whether a request asks to switch protocols (`Connection: upgrade` plus an `Upgrade` header).
pub fn is_upgrade(h: &http::HeaderMap) -> bool {
    h.contains_key(http::header::UPGRADE)
        && h.get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends the upgrade request `req` over `stream` (HTTP/1.1) and, once the other end answers 101,
/// splices the caller's upgraded connection (`downstream`) with it in a task of its own. Any other
/// answer is returned as it is and the stream is dropped with it.
pub async fn upgrade_over<S>(
    stream: S,
    req: Request<Body>,
    downstream: hyper::upgrade::OnUpgrade,
) -> Result<Response<Body>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(req).await?;
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up))
                        .await;
            }
        });
    } else {
        // Not switched: the caller's connection closes after this answer, so that nothing sent on
        // it after an upgrade request is read as a request of its own.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    Ok(resp.map(crate::http::body::boxed))
}
