//! HTTP/2 to a peer sidecar, driven on the `h2` crate directly.
//!
//! hyper's HTTP/2 client hands every request to its connection task through a channel, spawns a task
//! per request to await the response and answers through a oneshot: three hand-offs and a task for
//! each request on the busiest hop of the mesh. Here the request's own task opens the stream and awaits
//! its response; only a request body that is not already complete gets a task of its own (it has to
//! keep flowing while the response is awaited). Semantics follow hyper's: the response body releases
//! flow-control capacity as it is read, a body error resets the stream with the reason it carried
//! (INTERNAL_ERROR when it carried none), and a peer's reset ends the request body's pump.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::upstream::{Body, BodyError, TcpOrTls};

/// How often an idle connection is probed, and how long the answer may take (hyper's settings
/// before: a peer that vanished without a FIN is noticed within a minute).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One HTTP/2 connection to a peer sidecar; clones share it.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("peer::Connection")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Flow-control settings of the connection (see `upstream`'s constants for why these sizes).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Per-stream receive window.
    pub stream: u32,
    /// Connection-wide receive window.
    pub connection: u32,
    /// Bytes a stream may queue for sending.
    pub max_send_buf: usize,
}

impl Connection {
    /// HTTP/2 handshake over an established mTLS stream; the connection is driven by a task of its own
    /// until either side closes it or the peer stops answering pings.
    pub async fn handshake(io: TcpOrTls, windows: Windows) -> Result<Self, h2::Error> {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(windows.stream)
            .initial_connection_window_size(windows.connection)
            .max_send_buffer_size(windows.max_send_buf)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let mut pings = conn.ping_pong();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "peer connection closed");
                        }
                        break;
                    }
                    () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {
                        let Some(p) = pings.as_mut() else { continue };
                        // The connection must keep being driven while the ping is out.
                        let answered = tokio::select! {
                            r = &mut conn => {
                                if let Err(e) = r {
                                    tracing::debug!(error = %e, "peer connection closed");
                                }
                                break;
                            }
                            r = tokio::time::timeout(KEEPALIVE_TIMEOUT, p.ping(h2::Ping::opaque())) => {
                                matches!(r, Ok(Ok(_)))
                            }
                        };
                        if !answered {
                            tracing::debug!("peer did not answer a ping; closing the connection");
                            break;
                        }
                    }
                }
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Self { send, closed })
    }

    /// Whether the connection has ended (the pool then dials a new one).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` and waits for the response head; the request body, unless already complete, is
    /// pumped by a task of its own.
    pub async fn send(self, req: Request<Body>) -> Result<Response<Body>, h2::Error> {
        let mut send = self.send.ready().await?;
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let (response, stream) = send.send_request(Request::from_parts(parts, ()), end)?;
        if !end {
            tokio::spawn(pump(body, stream));
        }
        let (parts, recv) = response.await?.into_parts();
        let size = content_length(&parts.headers);
        let body = Incoming {
            recv,
            data_done: false,
            size,
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// The `Content-Length` a response declared (h2 checks the DATA frames against it).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The reason an HTTP/2 error in `e`'s source chain carries, if any.
pub fn h2_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cause = err.source();
    }
    None
}

/// Copies a request body into its stream, within the peer's flow-control window; stops when the
/// peer resets the stream.
async fn pump(mut body: Body, mut tx: SendStream<Bytes>) {
    enum Next {
        Frame(Option<Result<Frame<Bytes>, BodyError>>),
        Reset,
    }
    loop {
        let next = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(Next::Reset);
            }
            Pin::new(&mut body).poll_frame(cx).map(Next::Frame)
        })
        .await;
        let frame = match next {
            Next::Reset => return,
            Next::Frame(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Next::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; resetting the stream");
                tx.send_reset(h2_reason(e.as_ref()).unwrap_or(Reason::INTERNAL_ERROR));
                return;
            }
            Next::Frame(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return;
            }
        };
        if send_data(&mut tx, data).await.is_err() {
            return;
        }
    }
}

/// Sends `data` as the window allows: capacity is asked for and granted piecewise.
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(Reason::CANCEL)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        tx.send_data(chunk, false)?;
    }
    Ok(())
}

/// A response body read from a peer's stream.
struct Incoming {
    recv: RecvStream,
    data_done: bool,
    size: Option<u64>,
}

impl HttpBody for Incoming {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read means consumed here: the peer may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        self.size
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
