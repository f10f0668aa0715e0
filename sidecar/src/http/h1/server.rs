//! The client side's HTTP/1.1 server for its app's connections: requests without a body are read,
//! handled and answered here; at the first request it does not take, the connection goes to hyper.
//!
//! Taken here: HTTP/1.0 and 1.1 requests with no body (no Transfer-Encoding, Content-Length absent or
//! `0`), no `Upgrade` and no `Expect`, other than `CONNECT`. Anything else, and any head this parser
//! refuses, is handed to hyper with the bytes read so far, so hyper answers it exactly as it answers
//! a connection it had from the start (its 400 and 431, uploads, `100 Continue`, upgrades, h2c).
//! Heads are judged by the rules of [`super::framing`] (the same for the requests hyper reads):
//! ambiguous framing and bare LFs are refused here with 400.
//!
//! Responses are written as hyper writes them: `HTTP/1.1` and the canonical reason; a `date` header
//! when the response has none; the body framed by its Content-Length, by its exact size (a
//! Content-Length is added), else chunked (read to the close for HTTP/1.0 callers); no body after
//! HEAD, 1xx, 204 and 304; trailers only for a caller that sent `TE: trailers`. The connection is
//! kept unless the caller or the response asked to close it, the body failed, or the answer is 400. Writes are batched:
//! what the body has ready goes out in one write, and the head goes with the first data.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::framing::{BodyFraming, HeadFacts};
use super::{MAX_HEAD, MAX_HEADERS, header_map};
use crate::http::body::Body;
use crate::http::headers::{length_value, tokens};

/// Gathered output beyond this is written before more is gathered: a 1 MiB body leaves in 16
/// writes instead of one per HTTP/2 frame.
const FLUSH_ABOVE: usize = 64 * 1024;

/// Body frames from this size on are written from their own buffers, in one vectored write with
/// what precedes them, instead of being copied; smaller ones cost less to copy than a slice.
const GATHER_FROM: usize = 4096;

/// Slices handed to one vectored write (a 64 KiB batch of 16 KiB chunked frames needs about 10).
const MAX_SLICES: usize = 16;

/// How a connection served here ended.
#[derive(Debug)]
pub enum Outcome<IO> {
    /// Closed (by the caller, or after a response that ended the connection).
    Closed,
    /// A request this server does not take: hyper serves the connection from here, starting with
    /// these bytes, already read from it.
    HandOver(IO, Bytes),
}

/// What bounds a connection served here: the drain signal, and how long heads and idleness may last.
#[derive(Debug, Clone, Copy)]
pub struct Bounds<'a> {
    /// Cancelled when the sidecar drains: the response in progress says `Connection: close`, an
    /// idle connection closes.
    pub closing: &'a tokio_util::sync::CancellationToken,
    /// A head must be whole this long after its first byte (else `408`).
    pub head_timeout: std::time::Duration,
    /// The connection closes after this long without a request.
    pub idle_timeout: std::time::Duration,
}

/// Serves `io` with `handle` until it closes or needs hyper.
pub async fn serve<IO, H, F>(
    mut io: IO,
    bounds: Bounds<'_>,
    mut handle: H,
) -> io::Result<Outcome<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut buf = BytesMut::new();
    // One drain watch and one timer for the connection's life, not one of each per request: a
    // request costs a poll of each (see `Deadline`).
    let mut drained = std::pin::pin!(bounds.closing.cancelled());
    let mut deadline = Deadline::new();
    loop {
        deadline.idle(bounds.idle_timeout);
        let head = loop {
            if !buf.is_empty() {
                match parse_request(&mut buf) {
                    Parsed::Taken(head) => break head,
                    Parsed::Partial => {}
                    Parsed::Other => return Ok(Outcome::HandOver(io, buf.freeze())),
                    Parsed::Refused(reason) => {
                        io.write_all(&crate::http::headers::bad_request_bytes(reason))
                            .await?;
                        return Ok(Outcome::Closed);
                    }
                }
                // Part of a head: from its first byte the head timeout runs.
                deadline.head(bounds.head_timeout);
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(8 * 1024);
            }
            let idle = buf.is_empty();
            let read = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) =
                    tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf)
                {
                    return Poll::Ready(Waited::Read(r));
                }
                // Between requests a draining sidecar closes the connection; a head already begun
                // is still answered (with `Connection: close`).
                if idle && drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Waited::Drained);
                }
                deadline.poll(cx).map(|()| Waited::TimedOut)
            })
            .await;
            match read {
                Waited::Read(n) => {
                    if n? == 0 {
                        return Ok(Outcome::Closed);
                    }
                }
                Waited::Drained => return Ok(Outcome::Closed),
                Waited::TimedOut if idle => return Ok(Outcome::Closed),
                Waited::TimedOut => {
                    io.write_all(REQUEST_TIMEOUT).await?;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received in time",
                    ));
                }
            }
        };
        let Head {
            request,
            keep_alive,
            trailers,
        } = head;
        let head_only = request.method() == Method::HEAD;
        let version_10 = request.version() == Version::HTTP_10;
        let response = handle(request).await;
        let keep_alive = keep_alive && !bounds.closing.is_cancelled();
        let kept = write_response(
            &mut io, response, head_only, version_10, keep_alive, trailers,
        )
        .await?;
        if !kept {
            let _ = io.shutdown().await;
            return Ok(Outcome::Closed);
        }
    }
}

/// What a wait for more of a head ended with.
enum Waited {
    Read(io::Result<usize>),
    Drained,
    TimedOut,
}

/// The connection's one timer. Between requests it is armed lazily: `idle` only notes that a new
/// wait began (no clock read, no timer reset per request), and when the timer fires after a
/// request was served since it was armed, it re-arms for a full idle period instead of firing. A
/// connection is so closed between one and two idle periods after its last request. A head that
/// arrives in pieces gets an exact deadline from its first byte.
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Requests began since the timer was armed (idle mode).
    activity: bool,
    /// The idle period, or `None` while a head's exact deadline is set.
    idle: Option<std::time::Duration>,
}

impl Deadline {
    fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            armed: false,
            activity: false,
            idle: None,
        }
    }

    /// A new wait for a request begins.
    fn idle(&mut self, period: std::time::Duration) {
        if self.idle.is_none() {
            // Coming from an exact head deadline: the idle period starts over.
            self.armed = false;
        }
        self.idle = Some(period);
        self.activity = true;
    }

    /// A head has begun: it must be whole within `timeout` from now.
    fn head(&mut self, timeout: std::time::Duration) {
        if self.idle.is_some() {
            self.idle = None;
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + timeout);
            self.armed = true;
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if !self.armed {
                let period = self.idle.unwrap_or_default();
                self.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + period);
                self.armed = true;
                self.activity = false;
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            match self.idle {
                Some(_) if self.activity => self.armed = false,
                _ => return Poll::Ready(()),
            }
        }
    }
}

/// Envoy's answer to a head that did not arrive in time.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A request taken here, and what its head said about the connection.
struct Head {
    request: Request<Body>,
    keep_alive: bool,
    /// The caller accepts trailers (`TE: trailers`).
    trailers: bool,
}

// Returned once per request and matched at once: boxing the large variant would cost an allocation
// per request to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Taken(Head),
    /// More bytes are needed (`buf` is as it was).
    Partial,
    /// Not taken here (`buf` is as it was).
    Other,
    /// Refused with 400.
    Refused(&'static str),
}

/// Parses the request head at the front of `buf`; a taken request's head is removed from it.
fn parse_request(buf: &mut BytesMut) -> Parsed {
    // Frozen first so that header values share its bytes; taken whole, so that anything not taken
    // goes back without a copy.
    let data = std::mem::take(buf).freeze();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, &data, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if data.len() < MAX_HEAD => {
            *buf = BytesMut::from(data);
            return Parsed::Partial;
        }
        // Too long, malformed, too many headers, HTTP/2's preface: hyper's answer.
        _ => {
            *buf = BytesMut::from(data);
            return Parsed::Other;
        }
    };
    if super::framing::has_bare_lf(data.get(..len).unwrap_or_default()) {
        return Parsed::Refused("bare LF in the request head");
    }
    let taken = match shape(&req) {
        Ok(Some(shape)) => shape,
        Ok(None) => {
            *buf = BytesMut::from(data);
            return Parsed::Other;
        }
        Err(reason) => return Parsed::Refused(reason),
    };
    let built = (|| {
        let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
        let uri = Uri::from_maybe_shared(data.slice_ref(req.path?.as_bytes())).ok()?;
        let headers = header_map(req.headers, &data).ok()?;
        Some((method, uri, headers))
    })();
    let Some((method, uri, headers)) = built else {
        *buf = BytesMut::from(data);
        return Parsed::Other;
    };
    if data.len() > len {
        *buf = BytesMut::from(data.slice(len..));
    }
    let mut request = Request::new(crate::http::body::empty_body());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = taken.version;
    *request.headers_mut() = headers;
    Parsed::Taken(Head {
        request,
        keep_alive: taken.keep_alive,
        trailers: taken.trailers,
    })
}

/// What the raw head says, when the request is one this server takes.
struct Shape {
    version: Version,
    keep_alive: bool,
    trailers: bool,
}

/// `Ok(None)`: a request for hyper. `Err`: one to refuse (the rules of [`super::framing`]).
fn shape(req: &httparse::Request<'_, '_>) -> Result<Option<Shape>, &'static str> {
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Ok(None),
    };
    let facts = HeadFacts::of(req);
    let framing = facts.framing(req.method == Some("CONNECT"))?;
    if framing != BodyFraming::None || facts.connection_upgrade || facts.expect {
        return Ok(None);
    }
    let keep_alive = match version {
        Version::HTTP_10 => facts.keep_alive && !facts.close,
        _ => !facts.close,
    };
    Ok(Some(Shape {
        version,
        keep_alive,
        trailers: facts.trailers,
    }))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes `resp`; whether the connection can carry another request.
async fn write_response<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    resp: Response<Body>,
    head_only: bool,
    version_10: bool,
    keep_alive: bool,
    trailers_ok: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    // A request refused as malformed ends its connection (Envoy does the same): nothing pipelined
    // behind it is trusted.
    let mut keep_alive = keep_alive && status != StatusCode::BAD_REQUEST;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    // One pass writes the headers and notes what decides the framing, which is written after them.
    let (mut length, mut has_date) = (None, false);
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            length = length_value(value.as_bytes());
            // RFC 9110 §8.6: never on a 1xx or 204 (a 304 keeps the length of what it stands for).
            if status.is_informational() || status == StatusCode::NO_CONTENT {
                continue;
            }
        } else if *name == header::CONNECTION {
            // This hop's connection is decided here, not by the response.
            keep_alive &= !tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
            continue;
        } else if *name == header::TRANSFER_ENCODING {
            // And so is its framing.
            continue;
        } else if *name == header::DATE {
            has_date = true;
        }
        put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if head_only || bodiless {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if version_10 {
        keep_alive = false;
        Framing::Close
    } else {
        Framing::Chunked
    };
    match framing {
        Framing::Length(n) if length.is_none() => {
            put_field(&mut out, b"content-length", digits(n, 10).as_bytes());
        }
        Framing::Chunked => put_field(&mut out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !has_date {
        put_field(&mut out, b"date", &http_date());
    }
    if !keep_alive {
        put_field(&mut out, b"connection", b"close");
    } else if version_10 {
        put_field(&mut out, b"connection", b"keep-alive");
    }
    out.put_slice(b"\r\n");
    if framing == Framing::None {
        io.write_all_buf(&mut out).await?;
        return Ok(keep_alive);
    }
    let mut out = Gather::new(out);

    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        // What the body has ready joins `out`; when it has nothing ready, `out` is written first.
        let frame = match std::future::poll_fn(|cx| Poll::Ready(poll_frame(&mut body, cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                out.write_to(io).await?;
                std::future::poll_fn(|cx| poll_frame(&mut body, cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // Mid-body the caller can only be told by the connection closing.
                tracing::debug!(error = %e, "response body failed");
                let _ = out.write_to(io).await;
                return Ok(false);
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Framing::Chunked, true, Ok(trailers)) =
                    (framing, trailers_ok, frame.into_trailers())
                {
                    out.buf.put_slice(b"0\r\n");
                    put_trailers(&mut out.buf, &trailers);
                    out.buf.put_slice(b"\r\n");
                    out.write_to(io).await?;
                    return Ok(keep_alive);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        match framing {
            Framing::Length(_) => {
                let n = data.len() as u64;
                if n > left {
                    // More than it declared: the caller could not tell where it ends.
                    return Ok(false);
                }
                left -= n;
            }
            Framing::Chunked => {
                out.buf.put_slice(digits(data.len() as u64, 16).as_bytes());
                out.buf.put_slice(b"\r\n");
            }
            _ => {}
        }
        out.frame(data);
        if framing == Framing::Chunked {
            out.buf.put_slice(b"\r\n");
        }
        if out.len() > FLUSH_ABOVE {
            out.write_to(io).await?;
        }
    }
    match framing {
        Framing::Chunked => out.buf.put_slice(b"0\r\n\r\n"),
        Framing::Length(_) if left != 0 => {
            let _ = out.write_to(io).await;
            return Ok(false);
        }
        _ => {}
    }
    out.write_to(io).await?;
    Ok(keep_alive && framing != Framing::Close)
}

/// A response's output waiting to be written: small pieces copied into `buf`, large body frames
/// kept as they came and queued, in order, ahead of it.
struct Gather {
    /// Written before `buf`, front first.
    queued: VecDeque<Bytes>,
    /// Bytes in `queued`.
    queued_len: usize,
    buf: BytesMut,
}

impl Gather {
    fn new(buf: BytesMut) -> Self {
        Self {
            queued: VecDeque::new(),
            queued_len: 0,
            buf,
        }
    }

    fn len(&self) -> usize {
        self.queued_len + self.buf.len()
    }

    /// Adds a body frame after what is gathered.
    fn frame(&mut self, data: Bytes) {
        if data.len() < GATHER_FROM {
            self.buf.put_slice(&data);
            return;
        }
        self.queue_buf();
        self.queued_len += data.len();
        self.queued.push_back(data);
    }

    /// Moves what `buf` holds to the queue (its spare capacity stays for what follows).
    fn queue_buf(&mut self) {
        if !self.buf.is_empty() {
            let head = self.buf.split().freeze();
            self.queued_len += head.len();
            self.queued.push_back(head);
        }
    }

    /// Writes everything gathered.
    async fn write_to<IO: AsyncWrite + Unpin>(&mut self, io: &mut IO) -> io::Result<()> {
        if self.queued.is_empty() {
            // Nothing large: one buffer, the common case.
            return io.write_all_buf(&mut self.buf).await;
        }
        self.queue_buf();
        while !self.queued.is_empty() {
            let written = {
                let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
                let n = slices
                    .iter_mut()
                    .zip(&self.queued)
                    .map(|(slice, part)| *slice = io::IoSlice::new(part))
                    .count();
                io.write_vectored(&slices[..n]).await?
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.queued_len -= written;
            let mut left = written;
            while let Some(front) = self.queued.front_mut() {
                if front.len() > left {
                    front.advance(left);
                    break;
                }
                left -= front.len();
                self.queued.pop_front();
            }
        }
        Ok(())
    }
}

fn poll_frame(
    body: &mut Body,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, crate::http::body::BodyError>>> {
    Pin::new(body).poll_frame(cx)
}

fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

fn put_trailers(out: &mut BytesMut, trailers: &HeaderMap) {
    for (name, value) in trailers {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// A small stack buffer holding an ASCII number.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// `n` in `radix` (10 or 16), lowercase.
fn digits(mut n: u64, radix: u64) -> Digits {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        // The remainder is below the radix, at most 16.
        d.buf[d.start] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            return d;
        }
    }
}

/// The current time as an HTTP date, formatted at most once a second per thread.
fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let mut fresh = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == 29 {
            fresh.copy_from_slice(formatted.as_bytes());
        }
        c.set((secs, fresh));
        fresh
    })
}

/// A connection whose first bytes were already read: they are read again first (for hyper, after a
/// hand-over).
#[derive(Debug)]
pub struct Replay<IO> {
    read: Bytes,
    io: IO,
}

impl<IO> Replay<IO> {
    /// `io`, with `read` in front of what it has not yet delivered.
    pub fn new(io: IO, read: Bytes) -> Self {
        Self { read, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)] // tests below may unwrap
mod tests {
    use std::time::Duration;

    use http::HeaderValue;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What the test handler answers: the request's method and path as the body, with headers that
    /// the path asks for.
    fn answer(req: Request<Body>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let text = format!("{} {}", req.method(), req.uri());
        let body: Body = match path.as_str() {
            // No length known: chunked, with a trailer.
            "/stream" => {
                let frames: Vec<Result<Frame<Bytes>, crate::http::body::BodyError>> = vec![
                    Ok(Frame::data(Bytes::from_static(b"hello "))),
                    Ok(Frame::data(Bytes::from(vec![b'x'; 20_000]))),
                    Ok(Frame::trailers({
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", "0".parse().unwrap());
                        t
                    })),
                ];
                StreamBody::new(futures_util::stream::iter(frames)).boxed()
            }
            // Many HTTP/2-sized frames, each of its own byte: order and completeness show.
            "/big" | "/big-chunked" => {
                let frames: Vec<Result<Frame<Bytes>, crate::http::body::BodyError>> = (0
                    ..BIG_FRAMES)
                    .map(|i| Ok(Frame::data(Bytes::from(vec![big_byte(i); BIG_FRAME]))))
                    .collect();
                let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
                let mut resp = Response::new(body);
                if path == "/big" {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, (BIG_FRAMES * BIG_FRAME).into());
                }
                return resp;
            }
            "/broken" => {
                let frames: Vec<Result<Frame<Bytes>, crate::http::body::BodyError>> = vec![
                    Ok(Frame::data(Bytes::from_static(b"part"))),
                    Err("upstream reset".into()),
                ];
                StreamBody::new(futures_util::stream::iter(frames)).boxed()
            }
            _ => Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        };
        let mut resp = Response::new(body);
        if path == "/nocontent" {
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        if path == "/dated" {
            resp.headers_mut().insert(
                header::DATE,
                HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
            );
        }
        resp
    }

    const BIG_FRAMES: usize = 70;
    const BIG_FRAME: usize = 16 * 1024;

    fn big_byte(frame: usize) -> u8 {
        (frame % 251) as u8
    }

    /// A connected pair: the test's client end, and the task serving the other end here. The task
    /// returns what the hand-over carried, if there was one.
    async fn pair() -> (TcpStream, tokio::task::JoinHandle<Option<Bytes>>) {
        pair_with(
            bounds(Duration::from_secs(10), Duration::from_secs(60)),
            answer,
        )
        .await
    }

    /// Bounds with a drain that never starts.
    fn bounds(head_timeout: Duration, idle_timeout: Duration) -> Bounds<'static> {
        Bounds {
            closing: Box::leak(Box::default()),
            head_timeout,
            idle_timeout,
        }
    }

    async fn pair_with(
        bounds: Bounds<'static>,
        answer: fn(Request<Body>) -> Response<Body>,
    ) -> (TcpStream, tokio::task::JoinHandle<Option<Bytes>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let task = tokio::spawn(async move {
            match serve(server, bounds, |req| async move { answer(req) })
                .await
                .unwrap()
            {
                Outcome::Closed => None,
                Outcome::HandOver(_, read) => Some(read),
            }
        });
        (client, task)
    }

    /// Sends `request` and reads until `until` has been seen (or the connection closes).
    async fn exchange(client: &mut TcpStream, request: &str, until: &str) -> String {
        client.write_all(request.as_bytes()).await.unwrap();
        read_until(client, until).await
    }

    async fn read_until(client: &mut TcpStream, until: &str) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        while !String::from_utf8_lossy(&got).contains(until) {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                .await
                .expect("response in time")
                .unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    async fn closed(client: &mut TcpStream) -> bool {
        let mut rest = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut rest)).await,
            Ok(Ok(0))
        )
    }

    #[tokio::test]
    async fn keep_alive_requests_get_framed_dated_responses() {
        let (mut c, task) = pair().await;
        let one = exchange(
            &mut c,
            "GET /a?b=1 HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET /a?b=1",
        )
        .await;
        assert!(one.starts_with("HTTP/1.1 200 OK\r\n"), "{one}");
        assert!(one.contains("\r\ncontent-length: 10\r\n"), "{one}");
        assert!(one.contains("\r\ndate: "), "{one}");
        assert!(!one.contains("connection"), "{one}");
        // The response's own date is kept; absolute-form targets stay as they came (explicit mode).
        let two = exchange(
            &mut c,
            "DELETE http://svc:8000/dated HTTP/1.1\r\nhost: svc\r\n\r\n",
            "DELETE http://svc:8000/dated",
        )
        .await;
        assert!(
            two.contains("date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
            "{two}"
        );
        assert_eq!(two.matches("date:").count(), 1, "{two}");
        drop(c);
        assert_eq!(task.await.unwrap(), None);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (mut c, _task) = pair().await;
        let both = exchange(
            &mut c,
            "GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET /2",
        )
        .await;
        let (first, second) = (both.find("GET /1").unwrap(), both.find("GET /2").unwrap());
        assert!(first < second, "{both}");
    }

    #[tokio::test]
    async fn unknown_lengths_are_chunked_and_trailers_need_te() {
        let (mut c, _task) = pair().await;
        let plain = exchange(
            &mut c,
            "GET /stream HTTP/1.1\r\nhost: x\r\n\r\n",
            "0\r\n\r\n",
        )
        .await;
        assert!(plain.contains("transfer-encoding: chunked\r\n"), "{plain}");
        assert!(plain.contains("\r\n6\r\nhello \r\n4e20\r\nxxxx"), "{plain}");
        assert!(plain.ends_with("xxxx\r\n0\r\n\r\n"), "{plain:.200}");
        assert!(!plain.contains("grpc-status"));
        let with = exchange(
            &mut c,
            "GET /stream HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n",
            "grpc-status: 0\r\n\r\n",
        )
        .await;
        assert!(
            with.ends_with("xxxx\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            "{with:.200}"
        );
    }

    #[tokio::test]
    async fn large_bodies_arrive_whole_and_in_order() {
        // Frames this size are written from their own buffers, batched into vectored writes; a
        // slice lost, repeated or out of order changes the bytes.
        let expected: Vec<u8> = (0..BIG_FRAMES)
            .flat_map(|i| std::iter::repeat_n(big_byte(i), BIG_FRAME))
            .collect();
        let (mut c, _task) = pair().await;
        for path in ["/big", "/big-chunked"] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 65536];
            let (head_end, body) = loop {
                let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
                    .await
                    .expect("response in time")
                    .unwrap();
                assert_ne!(n, 0, "closed early on {path}");
                got.extend_from_slice(&chunk[..n]);
                let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                let body = if path == "/big" {
                    assert!(
                        head.contains(&format!("content-length: {}", expected.len())),
                        "{head}"
                    );
                    got.get(end + 4..end + 4 + expected.len())
                        .map(<[u8]>::to_vec)
                } else {
                    assert!(head.contains("transfer-encoding: chunked"), "{head}");
                    if got.ends_with(b"\r\n0\r\n\r\n") {
                        Some(dechunk(&got[end + 4..]))
                    } else {
                        None
                    }
                };
                if let Some(body) = body {
                    break (end, body);
                }
            };
            assert!(head_end > 0);
            assert!(
                body == expected,
                "{path}: body differs ({} bytes)",
                body.len()
            );
        }
    }

    /// Takes at most `limit` bytes per write, across slices: every write is a short one.
    struct Trickle {
        got: Vec<u8>,
        limit: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let me = self.get_mut();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(me.limit - n);
                me.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn gathered_output_survives_short_writes() {
        // Short writes end inside a slice and across several: what is written is each byte once,
        // in order, however the writes fall.
        for limit in [1, 7, 4096, 5000, 20_000] {
            let mut out = Gather::new(BytesMut::from(&b"head"[..]));
            let mut expected = b"head".to_vec();
            for (i, size) in [10, 5000, 3, 16_384, 16_384, 4095, 4096, 70_000]
                .iter()
                .enumerate()
            {
                let frame = vec![i as u8 + 1; *size];
                expected.extend_from_slice(&frame);
                out.frame(Bytes::from(frame));
                out.buf.put_slice(b"|");
                expected.push(b'|');
            }
            assert_eq!(out.len(), expected.len());
            let mut w = Trickle {
                got: Vec::new(),
                limit,
            };
            out.write_to(&mut w).await.unwrap();
            assert_eq!(out.len(), 0);
            assert!(
                w.got == expected,
                "limit {limit}: {} bytes written",
                w.got.len()
            );
        }
    }

    /// The data of a complete chunked body.
    fn dechunk(mut wire: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let line = wire.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&wire[..line]).unwrap(), 16).unwrap();
            if size == 0 {
                return data;
            }
            data.extend_from_slice(&wire[line + 2..line + 2 + size]);
            wire = &wire[line + 2 + size + 2..];
        }
    }

    #[tokio::test]
    async fn no_body_after_head_and_204() {
        let (mut c, _task) = pair().await;
        let head = exchange(&mut c, "HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n", "\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let none = exchange(
            &mut c,
            "GET /nocontent HTTP/1.1\r\nhost: x\r\n\r\n",
            "\r\n\r\n",
        )
        .await;
        assert!(none.starts_with("HTTP/1.1 204 No Content\r\n"), "{none}");
        assert!(!none.contains("content-length"), "{none}");
        // Still one connection, in step: the next answer is the next request's.
        let next = exchange(&mut c, "GET /n HTTP/1.1\r\nhost: x\r\n\r\n", "GET /n").await;
        assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{next}");
    }

    #[tokio::test]
    async fn http_1_0_and_close_end_the_connection() {
        let (mut c, _task) = pair().await;
        let one = exchange(&mut c, "GET /old HTTP/1.0\r\n\r\n", "GET /old").await;
        assert!(one.contains("connection: close\r\n"), "{one}");
        assert!(closed(&mut c).await);
        // HTTP/1.0 keep-alive is kept and said so; an unknown length is read to the close.
        let (mut c, _task) = pair().await;
        let kept = exchange(
            &mut c,
            "GET /k HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
            "GET /k",
        )
        .await;
        assert!(kept.contains("connection: keep-alive\r\n"), "{kept}");
        c.write_all(b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let streamed = read_until(&mut c, "never").await;
        assert!(!streamed.contains("chunked"), "{streamed:.300}");
        assert!(
            streamed.contains("connection: close\r\n"),
            "{streamed:.300}"
        );
        assert!(streamed.ends_with(&"x".repeat(100)));
        let (mut c, _task) = pair().await;
        let asked = exchange(
            &mut c,
            "GET /c HTTP/1.1\r\nconnection: close\r\n\r\n",
            "GET /c",
        )
        .await;
        assert!(asked.contains("connection: close\r\n"), "{asked}");
        assert!(closed(&mut c).await);
    }

    #[tokio::test]
    async fn a_body_that_fails_midway_closes_the_connection() {
        let (mut c, _task) = pair().await;
        c.write_all(b"GET /broken HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut c, "never").await;
        assert!(got.contains("4\r\npart\r\n"), "{got}");
        assert!(
            !got.contains("0\r\n\r\n"),
            "a cut body must not look complete: {got}"
        );
    }

    #[tokio::test]
    async fn requests_it_does_not_take_go_to_hyper_with_their_bytes() {
        for request in [
            "POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
            "POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            "CONNECT svc:443 HTTP/1.1\r\nhost: svc:443\r\n\r\n",
            "PUT /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /bad\0 HTTP/1.1\r\n\r\n",
        ] {
            let (mut c, task) = pair().await;
            c.write_all(request.as_bytes()).await.unwrap();
            let read = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(read.as_deref(), Some(request.as_bytes()), "{request}");
        }
        // Taken requests first, then the hand-over carries exactly what follows them.
        let (mut c, task) = pair().await;
        let rest = "POST /p HTTP/1.1\r\ncontent-length: 1\r\n\r\nz";
        c.write_all(format!("GET /first HTTP/1.1\r\n\r\n{rest}").as_bytes())
            .await
            .unwrap();
        read_until(&mut c, "GET /first").await;
        assert_eq!(task.await.unwrap().as_deref(), Some(rest.as_bytes()));
    }

    #[tokio::test]
    async fn ambiguous_framing_is_refused_here() {
        let (mut c, task) = pair().await;
        let got = exchange(
            &mut c,
            "GET /x HTTP/1.1\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n",
            "\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        assert_eq!(task.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_400_answer_ends_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        tokio::spawn(serve(
            server,
            bounds(Duration::from_secs(10), Duration::from_secs(60)),
            |_req| async {
                let mut resp = Response::new(crate::http::body::empty_body());
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                resp
            },
        ));
        let got = exchange(
            &mut c,
            "GET /a HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            "\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(
            closed(&mut c).await,
            "the pipelined request must not be answered"
        );
    }

    #[tokio::test]
    async fn replay_reads_the_prefix_first() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut replay = Replay::new(server, Bytes::from_static(b"hello"));
        let mut all = String::new();
        replay.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn slow_heads_get_408_and_idle_connections_close() {
        let (mut c, task) = pair_with(
            bounds(Duration::from_millis(200), Duration::from_millis(400)),
            answer,
        )
        .await;
        // A whole request, then nothing: closed once the idle time has passed.
        let got = exchange(&mut c, "GET /a HTTP/1.1\r\nhost: x\r\n\r\n", "\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        let t = std::time::Instant::now();
        assert!(closed(&mut c).await);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        task.await.unwrap();
        // A head dripping in: 408 once the head timeout has passed since its first byte.
        let (mut c, task) = pair_with(
            bounds(Duration::from_millis(200), Duration::from_secs(60)),
            answer,
        )
        .await;
        c.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(b"host: x\r\n").await.unwrap();
        let got = read_until(&mut c, "\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
        assert!(closed(&mut c).await);
        // The connection ended with the timeout as its error (the test task unwraps it).
        assert!(task.await.is_err());
    }

    #[tokio::test]
    async fn a_drain_closes_idle_connections_and_says_close_on_the_last_answer() {
        let closing: &'static tokio_util::sync::CancellationToken = Box::leak(Box::default());
        let b = Bounds {
            closing,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        };
        let (mut idle, idle_task) = pair_with(b, answer).await;
        let got = exchange(&mut idle, "GET /a HTTP/1.1\r\nhost: x\r\n\r\n", "\r\n\r\n").await;
        assert!(!got.contains("connection: close"), "{got}");
        let (mut busy, busy_task) = pair_with(b, answer).await;
        busy.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        closing.cancel();
        assert!(
            closed(&mut idle).await,
            "an idle connection stays open in a drain"
        );
        let got = exchange(&mut busy, "\r\n", "\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("connection: close"), "{got}");
        assert!(closed(&mut busy).await);
        assert_eq!(idle_task.await.unwrap(), None);
        assert_eq!(busy_task.await.unwrap(), None);
    }
}
