//! Opaque (ALPN `istio`) streams from peer sidecars: spliced to the app, unless they carry HTTP.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::Inbound;
use crate::http::sniff::Verdict;
use crate::inbound::identity::Caller;
use crate::listener::Edge;

/// An opaque (ALPN `istio`) stream from a peer sidecar. The app's answer flows back from the start
/// (server-first protocols work), while the peer's first bytes are held until [`crate::http::sniff`]
/// decides: a stream that cannot be HTTP is spliced; one that is HTTP (a peer's upgrade request, or
/// what a caller sent through a `CONNECT` tunnel) is served as HTTP with the verified caller, so no
/// request reaches the app with a header the mesh did not check. A stream whose app already spoke
/// first stays opaque: an HTTP server never does.
pub(super) async fn from_peer<S>(
    stream: S,
    inbound: Arc<Inbound>,
    app_port: u16,
    conn: Arc<Caller>,
    edge: &Edge,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TcpStream::connect(("127.0.0.1", app_port))
        .await
        .map_err(|e| format!("app 127.0.0.1:{app_port}: {e}"))?;
    let (mut app_r, app_w) = app.into_split();
    let (mut peer_r, peer_w) = tokio::io::split(stream);
    // The app → peer direction runs in its own task from the start; it can be stopped and give its
    // halves back only between two whole writes, so nothing it read is lost.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let to_peer = tokio::spawn(async move {
        let mut peer_w = peer_w;
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        loop {
            tokio::select! {
                biased;
                Ok(()) = &mut stop_rx => return Ok((app_r, peer_w, sent)),
                r = app_r.read(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        let _ = peer_w.shutdown().await;
                        return Ok((app_r, peer_w, sent));
                    }
                    peer_w.write_all(buf.get(..n).unwrap_or_default()).await?;
                    sent += n as u64;
                }
            }
        }
    });
    let mut first = bytes::BytesMut::new();
    let verdict =
        crate::http::sniff::read_verdict(&mut peer_r, &mut first, edge.limits.head_timeout).await;
    // Decided: the app → peer task gives its halves back (between two whole writes).
    let _ = stop_tx.send(());
    let (app_r, peer_w, sent) = to_peer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e: std::io::Error| e.to_string())?;
    let stream = peer_r.unsplit(peer_w);
    let mut app = app_r.reunite(app_w).map_err(|e| e.to_string())?;
    // An app that spoke first is no HTTP server: the stream stays opaque whatever the peer sent.
    if verdict == Some(Verdict::Http) && sent == 0 {
        drop(app);
        let io = crate::http::h1::server::Replay::new(stream, first.freeze());
        return super::serve_http(io, inbound, app_port, conn, edge).await;
    }
    app.write_all(&first).await.map_err(|e| e.to_string())?;
    // Opaque from here: counted into `istio_tcp_*` (decrypted bytes, as Envoy's network filters see
    // them), with what crossed while the sniffer decided.
    let mut stream = crate::telemetry::Counted::new(stream, inbound.sinks.metrics.clone(), true);
    stream.add(first.len() as u64, sent);
    crate::listener::splice(stream, app, edge)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
