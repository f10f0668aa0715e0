//! The HTTP/2 hop between sidecars, both ends, driven on the `h2` crate directly.
//!
//! hyper's HTTP/2 client hands every request to its connection task through a channel, spawns a task
//! per request to await the response and answers through a oneshot: three hand-offs and a task for
//! each request on the busiest hop of the mesh. Here the request's own task opens the stream and awaits
//! its response; only a request body that is not already complete gets a task of its own (it has to
//! keep flowing while the response is awaited). The server side ([`serve`]) runs one task per stream,
//! as hyper's does, without its service and executor layers. Semantics follow hyper's: a received
//! body releases flow-control capacity as it is read, a body error resets the stream with the reason
//! it carried (INTERNAL_ERROR when it carried none), a peer's reset stops the pump, and a caller's
//! reset drops the request's handler (so the app sees it too).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};

use crate::http::headers::declared_length;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::http::body::{Body, BodyError};
use crate::stream::TcpOrTls;
use weft_ca::grpc::Keepalive;

/// The hop's HTTP/2 keepalive, on both ends: a PING every 10 s, the connection closed when one is not
/// answered within 10 s. A peer that vanished without a FIN (a partition, a node that lost power) is
/// noticed within 20 s, busy or idle: the client then dials a new connection for the next request
/// instead of queueing streams on a dead one, and the server frees the streams' tasks and buffers.
pub const KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(10),
    timeout: Duration::from_secs(10),
};

/// Every this many requests on a connection, one sends its per-request ids indexable (see
/// [`Connection::send`]).
const NAME_REFRESH: u32 = 1024;

/// A stream's task writes out what the connection has queued after every this many streams (see
/// [`Driven`]). Measured at saturation (32 connections, recipe's pair): idle cores 24% without, 9-10%
/// at 4, 8 and 16; 8 spent the least CPU per request of those.
const FLUSH_EVERY: u32 = 8;

/// One HTTP/2 connection to a peer sidecar; clones share it.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Set when the peer stopped answering pings: it may be gone (a lost node), not just closing.
    lost: Arc<AtomicBool>,
    driven: Arc<Driven<h2::client::Connection<TcpOrTls, Bytes>>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("peer::Connection")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// A connection's state machine, polled by its own task and now and then by a stream's task.
///
/// h2 writes queued frames only when the connection's task runs, and a burst of requests (or of
/// responses) wakes their tasks together: every one of them runs before the connection's task, so
/// the whole burst leaves in one write and the peer starts on none of it before the last is ready.
/// The pair then works in waves, one side idle while the other works (at saturation a quarter of the
/// two cores sat idle, against a tenth with HAProxy). A stream's task that polls the connection
/// itself, with the connection task's waker so that the connection's I/O still wakes that task,
/// sends the burst in pieces the peer can start on. A std mutex guards the connection: it is held
/// only for one poll, never across an await, and a stream's task that finds it taken leaves the
/// flush to whoever holds it.
struct Driven<C> {
    conn: std::sync::Mutex<Option<C>>,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
    streams: AtomicU32,
}

impl<C> Driven<C> {
    fn new(conn: C) -> Self {
        Self {
            conn: std::sync::Mutex::new(Some(conn)),
            waker: std::sync::Mutex::new(None),
            streams: AtomicU32::new(0),
        }
    }

    /// Polls the connection with `f` for its own task; `None` once it has ended.
    fn poll<R>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut C, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<Option<R>> {
        {
            let mut w = self.waker.lock().unwrap_or_else(|p| p.into_inner());
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        match conn.as_mut() {
            Some(c) => f(c, cx).map(Some),
            None => Poll::Ready(None),
        }
    }

    /// Counts a stream; its number on this connection, from 0.
    fn next_stream(&self) -> u32 {
        self.streams.fetch_add(1, Ordering::Relaxed)
    }

    /// For every [`FLUSH_EVERY`]th stream (`n` from [`Self::next_stream`]), polls the connection
    /// with `f` from the stream's task, unless the connection's own task is polling it right now.
    /// `f` returning ready means the connection ended: it is dropped, and its task finds it gone.
    fn stream_ready<R>(&self, n: u32, f: impl FnOnce(&mut C, &mut Context<'_>) -> Poll<R>) {
        if !n.is_multiple_of(FLUSH_EVERY) {
            return;
        }
        let Some(waker) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let Ok(mut conn) = self.conn.try_lock() else {
            return;
        };
        let Some(c) = conn.as_mut() else { return };
        if f(c, &mut Context::from_waker(&waker)).is_ready() {
            *conn = None;
        }
        drop(conn);
        // The poll may have taken in what the connection's own task is for (a new stream to accept,
        // the connection's end): it looks next.
        waker.wake();
    }

    /// Drops the connection (closing it) once its task is done with it.
    fn end(&self) {
        drop(self.conn.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// Flow-control and keepalive settings of a connection (`upstream::H2_WINDOWS` says why the mesh
/// uses its sizes, [`KEEPALIVE`] its pings).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Per-stream receive window.
    pub stream: u32,
    /// Connection-wide receive window.
    pub connection: u32,
    /// Bytes a stream may queue for sending.
    pub max_send_buf: usize,
    /// PINGs, and how long their answer may take.
    pub keepalive: Keepalive,
}

/// Sends a PING every `interval` and reports the peer dead when the PONG is later than `timeout`.
/// Polled next to the connection (the PONG only arrives while the connection is polled), from a
/// `poll_fn`: one interval timer for the connection's life, no timer per poll.
struct Pinger {
    pings: h2::PingPong,
    tick: tokio::time::Interval,
    timeout: Duration,
    due: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the peer last answered (or the connection opened).
    heard: tokio::time::Instant,
    /// Streams opened as of the last look (client side): a new one on a quiet connection asks
    /// for a PING at once.
    streams: u32,
}

/// A connection the peer has not answered on for this long gets a PING as soon as a request is
/// sent on it, answered within [`ON_DEMAND_TIMEOUT`] or the connection is closed: a request on a
/// connection to a node that vanished fails in seconds, not after the keepalive's 20 s. A busy
/// connection hears from its peer all the time and never pings on demand more than once a second.
const QUIET: Duration = Duration::from_secs(1);
/// How long an on-demand PING may take (far above any answer a live peer gives, even loaded).
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(3);

impl Pinger {
    fn new(pings: Option<h2::PingPong>, keepalive: Keepalive) -> Option<Self> {
        let start = tokio::time::Instant::now() + keepalive.interval;
        let mut tick = tokio::time::interval_at(start, keepalive.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Self {
            pings: pings?,
            tick,
            timeout: keepalive.timeout,
            due: None,
            heard: tokio::time::Instant::now(),
            streams: 0,
        })
    }

    /// Ready when the peer has not answered a PING in time, or pings cannot be sent any more.
    /// `streams`: the client side's count of streams opened, for on-demand pings.
    fn poll_dead(&mut self, cx: &mut Context<'_>, streams: Option<u32>) -> Poll<()> {
        loop {
            match self.due.as_mut() {
                Some(due) => match self.pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.due = None;
                        self.heard = tokio::time::Instant::now();
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return due.as_mut().poll(cx),
                },
                None => {
                    if let Some(n) = streams
                        && n != self.streams
                    {
                        self.streams = n;
                        if self.heard.elapsed() >= QUIET {
                            if self.pings.send_ping(h2::Ping::opaque()).is_err() {
                                return Poll::Ready(());
                            }
                            self.due = Some(Box::pin(tokio::time::sleep(ON_DEMAND_TIMEOUT)));
                            continue;
                        }
                    }
                    ready!(self.tick.poll_tick(cx));
                    if self.pings.send_ping(h2::Ping::opaque()).is_err() {
                        return Poll::Ready(());
                    }
                    self.due = Some(Box::pin(tokio::time::sleep(self.timeout)));
                }
            }
        }
    }
}

impl Connection {
    /// HTTP/2 handshake over an established mTLS stream; the connection is driven by a task of its own
    /// until either side closes it or the peer stops answering pings.
    pub async fn handshake(io: TcpOrTls, windows: Windows) -> Result<Self, h2::Error> {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(windows.stream)
            .initial_connection_window_size(windows.connection)
            .max_send_buffer_size(windows.max_send_buf)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let lost_flag = lost.clone();
        let mut pinger = Pinger::new(conn.ping_pong(), windows.keepalive);
        let driven = Arc::new(Driven::new(conn));
        let shared = driven.clone();
        tokio::spawn(async move {
            let end = poll_fn(|cx| {
                let conn = shared.poll(cx, |c, cx| Pin::new(c).poll(cx).map_err(Some));
                if let Poll::Ready(r) = conn {
                    return Poll::Ready(r);
                }
                let streams = shared.streams.load(Ordering::Relaxed);
                match pinger.as_mut().map(|p| p.poll_dead(cx, Some(streams))) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(None))),
                    _ => Poll::Pending,
                }
            })
            .await;
            match end {
                Some(Err(Some(e))) => tracing::debug!(error = %e, "peer connection closed"),
                Some(Err(None)) => {
                    tracing::info!("peer did not answer a keepalive ping; closing the connection");
                    lost_flag.store(true, Ordering::Release);
                }
                _ => {}
            }
            // Dropping the connection closes it (a ping that went unanswered).
            shared.end();
            flag.store(true, Ordering::Release);
        });
        Ok(Self {
            send,
            closed,
            lost,
            driven,
        })
    }

    /// Identifies the connection (shared by its clones) without keeping it open.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.closed) as usize
    }

    /// Whether the connection ended because the peer stopped answering (see [`QUIET`]).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Whether the connection has ended (the pool then dials a new one).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` and waits for the response head; the request body, unless already complete, is
    /// pumped by a task of its own. A connection that can open no stream (the peer sent GOAWAY: it
    /// is draining) gives the request back unsent, and is marked closed so that the pool dials anew.
    pub async fn send(self, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let mut send = match self.send.ready().await {
            Ok(send) => send,
            Err(e) => {
                self.closed.store(true, Ordering::Release);
                return Err(SendError::NotSent(Box::new(req), e));
            }
        };
        let (mut parts, body) = req.into_parts();
        // The per-request ids (`b3`, `x-request-id`) are marked never-indexed so that their values
        // stay out of HPACK's table, but then their names would be Huffman-coded on every request
        // too, and decoded into a new name at the peer. Sent indexable now and then, they put their
        // names in the table, and the never-indexed ones in between refer to the name by index.
        let n = self.driven.next_stream();
        if n.is_multiple_of(NAME_REFRESH) {
            for name in &crate::http::headers::MESH_IDS {
                if let Some(v) = parts.headers.get_mut(name) {
                    v.set_sensitive(false);
                }
            }
        }
        let end = body.is_end_stream();
        let (response, stream) = send
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(SendError::Failed)?;
        if !end {
            tokio::spawn(pump(body, stream));
        }
        self.driven.stream_ready(n, |c, cx| Pin::new(c).poll(cx));
        let (parts, recv) = response.await.map_err(SendError::Failed)?.into_parts();
        let size = declared_length(&parts.headers);
        let body = Incoming {
            recv,
            data_done: false,
            size,
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// Why [`Connection::send`] failed.
#[derive(Debug)]
pub enum SendError {
    /// The connection could not open a stream: the request never left and can go elsewhere.
    NotSent(Box<Request<Body>>, h2::Error),
    /// The request was (or may have been) sent.
    Failed(h2::Error),
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::NotSent(_, e) | SendError::Failed(e) => Some(e),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotSent(_, e) | SendError::Failed(e) => e.fmt(f),
        }
    }
}

/// hyper's limit of concurrent streams per connection (server side), and Envoy's 60 KiB header limit
/// rounded up (both sides; h2's own default, 16 MiB, would let one peer make the sidecar buffer that
/// much per message).
const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Serves HTTP/2 from a peer sidecar on `io`: each request stream gets a task running `handler`,
/// whose response (head, then body) is sent back within the caller's flow-control window.
pub async fn serve<IO, F, Fut>(
    io: IO,
    windows: Windows,
    closing: &tokio_util::sync::CancellationToken,
    handler: F,
) -> Result<(), h2::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Body>) -> Fut,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .max_send_buffer_size(windows.max_send_buf)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(io)
        .await?;
    let mut pinger = Pinger::new(conn.ping_pong(), windows.keepalive);
    let driven = Arc::new(Driven::new(conn));
    // Accepting also drives the connection: this loop runs until the peer closes it or stops
    // answering pings, or, once the sidecar drains, until the streams in flight are done (GOAWAY
    // tells the peer to open no more).
    let mut drain = std::pin::pin!(closing.cancelled());
    let mut going_away = false;
    let mut next = |cx: &mut Context<'_>| {
        if !going_away && drain.as_mut().poll(cx).is_ready() {
            going_away = true;
            let _ = driven.poll(cx, |c, _| {
                c.graceful_shutdown();
                Poll::Ready(())
            });
        }
        if let Poll::Ready(r) = driven.poll(cx, |c, cx| c.poll_accept(cx)) {
            return Poll::Ready(r);
        }
        match pinger.as_mut().map(|p| p.poll_dead(cx, None)) {
            Some(Poll::Ready(())) => {
                tracing::info!("peer did not answer a keepalive ping; closing the connection");
                Poll::Ready(None)
            }
            _ => Poll::Pending,
        }
    };
    while let Some(Some(accepted)) = poll_fn(&mut next).await {
        let (req, respond) = accepted?;
        let (parts, recv) = req.into_parts();
        let body = Incoming {
            size: declared_length(&parts.headers),
            recv,
            data_done: false,
        };
        // Boxed once here, so that the spawned task (and every move of it) carries a pointer, not the
        // handler's whole state.
        let reply = Box::pin(handler(Request::from_parts(parts, body.boxed())));
        tokio::spawn(answer(reply, respond, driven.clone()));
    }
    driven.end();
    Ok(())
}

/// Awaits the handler's response and sends it; a reset from the caller first drops the handler.
async fn answer<Fut, IO>(
    mut reply: Pin<Box<Fut>>,
    mut respond: h2::server::SendResponse<Bytes>,
    driven: Arc<Driven<h2::server::Connection<IO, Bytes>>>,
) where
    Fut: std::future::Future<Output = Response<Body>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let resp = poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        reply.as_mut().poll(cx).map(Some)
    })
    .await;
    let Some(resp) = resp else { return };
    let (parts, body) = resp.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => pump(body, stream).await,
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "response head refused; resetting the stream");
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
    }
    // `poll_closed` drives the connection without accepting: a stream that arrives meanwhile waits
    // for the accept loop.
    driven.stream_ready(driven.next_stream(), |c, cx| c.poll_closed(cx));
}

/// The first HTTP/2 error in `e`'s source chain (hyper and the body wrappers keep it as a cause).
pub fn h2_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a h2::Error> {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cause = err.source();
    }
    None
}

/// The reason an HTTP/2 error in `e`'s source chain carries, if any.
pub fn h2_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    h2_error(e).and_then(h2::Error::reason)
}

/// Copies a body into its stream; stops when the peer resets the stream.
///
/// Backpressure as in hyper: the next chunk is read only once the stream has room for at least a
/// byte, and h2 then sends the whole chunk in frames it sizes to the window itself (asking for a
/// chunk's full size up front would split it into as many small frames as window updates arrive).
async fn pump(mut body: Body, mut tx: SendStream<Bytes>) {
    enum Next {
        Frame(Option<Result<Frame<Bytes>, BodyError>>),
        Stop,
    }
    loop {
        tx.reserve_capacity(1);
        let next = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(Next::Stop);
            }
            while tx.capacity() == 0 {
                match ready!(tx.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Poll::Ready(Next::Stop),
                }
            }
            Pin::new(&mut body).poll_frame(cx).map(Next::Frame)
        })
        .await;
        let frame = match next {
            Next::Stop => return,
            Next::Frame(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Next::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "body failed; resetting the stream");
                tx.send_reset(h2_reason(e.as_ref()).unwrap_or(Reason::INTERNAL_ERROR));
                return;
            }
            Next::Frame(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                // The last chunk carries END_STREAM itself, not an empty DATA frame after it.
                let end = body.is_end_stream();
                if tx.send_data(data, end).is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

/// A body read from a peer's stream.
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::net::{TcpListener, TcpStream};

    const WINDOWS: Windows = Windows {
        stream: 64 * 1024,
        connection: 128 * 1024,
        max_send_buf: 16 * 1024,
        keepalive: KEEPALIVE,
    };

    /// Keepalive fast enough for tests: a silent peer is noticed after 100 + 200 ms.
    const FAST: Windows = Windows {
        keepalive: Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
        },
        ..WINDOWS
    };

    /// A client and a server of this module on loopback; the server echoes the request body back,
    /// with a trailer counting its bytes.
    async fn pair() -> Connection {
        pair_with(WINDOWS).await
    }

    async fn pair_with(windows: Windows) -> Connection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = serve(
                tcp,
                windows,
                &Default::default(),
                |req: Request<Body>| async move {
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-echoed", body.len().to_string().parse().unwrap());
                    let frames = vec![
                        Ok::<_, BodyError>(Frame::data(body)),
                        Ok(Frame::trailers(trailers)),
                    ];
                    Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                },
            )
            .await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        Connection::handshake(TcpOrTls::Tcp(tcp), windows)
            .await
            .unwrap()
    }

    fn request(body: Body) -> Request<Body> {
        Request::post("http://peer.test/echo").body(body).unwrap()
    }

    fn text(t: &'static str) -> Body {
        Full::new(Bytes::from_static(t.as_bytes()))
            .map_err(|never| match never {})
            .boxed()
    }

    const SILENT_AFTER: std::ops::RangeInclusive<Duration> =
        Duration::from_millis(250)..=Duration::from_millis(1500);

    #[tokio::test]
    async fn answered_pings_keep_an_idle_connection_open() {
        let conn = pair_with(FAST).await;
        // About ten pings, each answered, by both ends.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!conn.is_closed());
        let resp = conn
            .clone()
            .send(request(text("still here")))
            .await
            .unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "still here");
    }

    #[tokio::test]
    async fn a_silent_server_is_dropped_within_the_keepalive_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Completes the handshake, then never polls the connection again: no PONG, no FIN, as
        // a peer behind a partition.
        let silent = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = h2::server::handshake(tcp).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(conn);
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = Connection::handshake(TcpOrTls::Tcp(tcp), FAST)
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        for _ in 0..300 {
            if conn.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(conn.is_closed(), "still open after {:?}", start.elapsed());
        assert!(
            SILENT_AFTER.contains(&start.elapsed()),
            "{:?}",
            start.elapsed()
        );
        silent.abort();
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_by_the_server_within_the_keepalive_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let start = tokio::time::Instant::now();
            serve(
                tcp,
                FAST,
                &Default::default(),
                |_req: Request<Body>| async move { Response::new(text("")) },
            )
            .await
            .unwrap();
            start.elapsed()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The client's connection is never polled after the handshake: it answers nothing.
        let (_send, conn) = h2::client::handshake(tcp).await.unwrap();
        let took = tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the server never gave up on a silent client")
            .unwrap();
        assert!(SILENT_AFTER.contains(&took), "{took:?}");
        drop(conn);
    }

    #[tokio::test]
    async fn bursts_flushed_by_stream_tasks_all_complete() {
        // Many requests at once on one connection: stream tasks poll the connection themselves
        // (every FLUSH_EVERY-th), taking in frames and new streams meant for the connection's own
        // task; none may be stranded. Bounded: 5 rounds of 200, each within 10 s.
        let conn = pair().await;
        for round in 0..5 {
            let mut tasks = Vec::new();
            for i in 0..200usize {
                let conn = conn.clone();
                tasks.push(tokio::spawn(async move {
                    let body = Full::new(Bytes::from(format!("{round}-{i}")))
                        .map_err(|never| match never {})
                        .boxed();
                    let resp = conn.send(request(body)).await.unwrap();
                    resp.into_body().collect().await.unwrap().to_bytes()
                }));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                let got = tokio::time::timeout(Duration::from_secs(10), t)
                    .await
                    .expect("every stream completes")
                    .unwrap();
                assert_eq!(got, format!("{round}-{i}").as_bytes());
            }
        }
    }

    #[tokio::test]
    async fn per_request_ids_arrive_intact_whether_sent_indexable_or_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = serve(
                tcp,
                WINDOWS,
                &Default::default(),
                |req: Request<Body>| async move {
                    let mut resp = Response::new(crate::http::body::empty_body());
                    for name in &crate::http::headers::MESH_IDS {
                        if let Some(v) = req.headers().get(name) {
                            resp.headers_mut().insert(name.clone(), v.clone());
                        }
                    }
                    resp
                },
            )
            .await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = Connection::handshake(TcpOrTls::Tcp(tcp), WINDOWS)
            .await
            .unwrap();
        // The first request primes the names; the rest refer to them by index.
        for _ in 0..5 {
            let mut req = Request::get("http://peer.test/ids")
                .body(crate::http::body::empty_body())
                .unwrap();
            let hop = crate::telemetry::trace::Hop::from_request(req.headers(), 100.0);
            hop.inject_mesh(req.headers_mut());
            let id = crate::telemetry::trace::ensure_request_id(req.headers_mut()).unwrap();
            let b3 = req.headers()["b3"].clone();
            assert!(id.is_sensitive() && b3.is_sensitive());
            let resp = conn.clone().send(req).await.unwrap();
            assert_eq!(resp.headers()["x-request-id"], id);
            assert_eq!(resp.headers()["b3"], b3);
        }
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_and_trailers_cross_both_ways() {
        let conn = pair().await;
        // Five times the connection window, in uneven chunks: both pumps must wait for capacity.
        let chunks: Vec<Result<Frame<Bytes>, BodyError>> = (0..40u8)
            .map(|i| {
                Ok(Frame::data(Bytes::from(vec![
                    i;
                    16 * 1024 + usize::from(i)
                ])))
            })
            .collect();
        let sent: usize = (0..40).map(|i| 16 * 1024 + i).sum();
        let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        let resp = conn.clone().send(request(body)).await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        let bytes = collected.to_bytes();
        assert_eq!(bytes.len(), sent);
        assert_eq!(bytes[0], 0);
        assert_eq!(bytes[bytes.len() - 1], 39);
        assert_eq!(trailers["x-echoed"], sent.to_string().as_str());
        // The connection is still good for the next request, with an empty body.
        let empty = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        let resp = conn.send(request(empty)).await.unwrap();
        assert!(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_failing_request_body_resets_the_stream_with_its_reason() {
        let conn = pair().await;
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"partial"))),
            Err(Box::new(h2::Error::from(Reason::CANCEL))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        // The server never sees a complete body: the exchange fails instead of answering.
        let outcome = match conn.send(request(body)).await {
            Ok(resp) => resp.into_body().collect().await.map(|_| ()),
            Err(e) => Err(Box::new(e) as BodyError),
        };
        let err = outcome.expect_err("a reset request must not complete");
        assert_eq!(h2_reason(err.as_ref()), Some(Reason::CANCEL), "{err}");
    }

    #[test]
    fn the_reset_reason_is_found_through_wrapping_errors() {
        #[derive(Debug)]
        struct Wrap(h2::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Wrap(h2::Error::from(Reason::REFUSED_STREAM));
        assert_eq!(h2_reason(&e), Some(Reason::REFUSED_STREAM));
        let io = std::io::Error::other("no h2 here");
        assert_eq!(h2_reason(&io), None);
    }
}
