//! The inbound side's HTTP/1.1 exchanges with the pod's app for requests without a body (GET, HEAD,
//! DELETE, ...), done on the connection by the request's own task.
//!
//! hyper's client drives each connection from a task of its own and hands every request and response
//! across a channel and a oneshot. For a GET to an app on loopback that dispatch cost more than the
//! parsing: hyper's client was 14k of the inbound side's 61k instructions per request
//! (`bench/callgrind-pair.sh`). Here the request's task writes the head and reads the response head
//! itself; the response body reads the rest from the same connection and puts the connection back in
//! the pool when it has ended. A request with a body still goes through hyper (see [`crate::inbound::app`]):
//! an app may answer before it has read an upload, so the upload and the response must move at the
//! same time, which is what hyper's connection task is for.
//!
//! Decisions:
//! - Response framing is RFC 9112 §6.3's: no body after HEAD, 1xx, 204 and 304; a Transfer-Encoding
//!   ending in `chunked` wins over Content-Length (which is dropped, and the connection is not
//!   reused); any other Transfer-Encoding, or no length at all, reads to the close. Several different
//!   or malformed Content-Length values (`+5`) fail the exchange (the caller gets 502).
//! - Interim 1xx responses are dropped, as hyper's client drops them. A 101 is an error: this path
//!   never asks for an upgrade (upgrades travel between sidecars as opaque streams).
//! - A pooled connection that fails before any byte of a response arrived has lost the keep-alive
//!   race with the app: an idempotent request is sent once more on a new connection and the app's
//!   other idle connections are dropped. Before a non-idempotent request a pooled connection is first
//!   checked with one non-blocking read.
//! - A response head may have [`MAX_HEADERS`] headers in [`MAX_HEAD`] bytes.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{MAX_HEAD, MAX_HEADERS, MAX_POOLED, header_map};
use crate::http::body::{Body, BodyError};
use crate::http::headers::{length_value, tokens};

/// Reads ask for at least this much room.
const READ_CHUNK: usize = 16 * 1024;
/// Less room than this left in the read buffer makes it grow first.
const MIN_SPARE: usize = 4096;
/// A body with a known length is read in pieces up to this size. Each piece waits in h2's send queue
/// until the peer's window takes it, so the size is memory per stream: with 256 KiB pieces, 16
/// concurrent 1 MiB responses held the server side at 41 MB RSS, with 64 KiB at 16 MB (4 of them: 19
/// and 11 MB), and CPU per MiB did not measurably change (`bench/cpu-pair.sh`, bulk).
const MAX_READ: usize = 64 * 1024;
/// The longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made.
    #[error("{0}")]
    Connect(io::Error),
    /// The connection failed while sending the request or reading the response head.
    #[error("{0}")]
    Io(io::Error),
    /// The app's response is not valid HTTP/1.1.
    #[error("{0}")]
    Protocol(&'static str),
}

/// One connection to the app and what has been read from it but not yet used.
struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Self, Error> {
        let tcp = TcpStream::connect(addr).await.map_err(Error::Connect)?;
        let _ = tcp.set_nodelay(true);
        Ok(Self {
            tcp,
            buf: BytesMut::new(),
        })
    }

    /// Reads what the socket has, with room for at least `want` bytes; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_SPARE {
            self.buf.reserve(want.clamp(READ_CHUNK, MAX_READ));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read_buf(&mut self.buf) {
                // tokio clears the readiness on WouldBlock; polling again registers for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    /// Whether an idle connection is still open: the app has neither closed it nor sent anything.
    fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Idle connections to apps, shared with the response bodies that hand theirs back.
#[derive(Clone, Default)]
pub struct Pool(Arc<Mutex<Vec<(SocketAddr, Conn)>>>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The most recently used first: its buffers are the likeliest to be in cache.
        let i = idle.iter().rposition(|(a, _)| *a == addr)?;
        Some(idle.swap_remove(i).1)
    }

    fn put(&self, addr: SocketAddr, conn: Conn) {
        // Bytes after the end of a response mean the app and this side disagree on framing.
        if !conn.buf.is_empty() {
            return;
        }
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_POOLED {
            idle.push((addr, conn));
        }
    }

    /// Drops every idle connection to `addr` (after one of them turned out closed).
    fn forget(&self, addr: SocketAddr) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(a, _)| *a != addr);
    }
}

/// Whether `req` takes this path: no body, and not a method that turns the connection into a tunnel.
pub fn eligible(req: &Request<Body>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && crate::http::headers::declared_length(req.headers()).is_none_or(|n| n == 0)
        && !req.headers().contains_key(header::TRANSFER_ENCODING)
}

/// Sends a bodiless `req` to the app at `addr` (path and headers as given; `Host` must be set) and
/// returns its response, whose body streams from the connection.
pub async fn send(
    pool: &Pool,
    addr: SocketAddr,
    req: Request<Body>,
) -> Result<Response<Body>, Error> {
    let head = encode_head(&req);
    let method = req.method().clone();
    drop(req);
    let idempotent = method.is_idempotent();
    let mut pooled = true;
    loop {
        let (mut conn, reused) = match if pooled { pool.take(addr) } else { None } {
            Some(c) if idempotent || c.is_idle_and_open() => (c, true),
            // Closed while idle: try the next one.
            Some(_) => continue,
            None => (Conn::connect(addr).await?, false),
        };
        match exchange(&mut conn, &head).await {
            Ok((head, rest)) => return respond(head, rest, conn, pool, addr, &method),
            Err((_, false)) if reused && idempotent => {
                pool.forget(addr);
                pooled = false;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

/// Writes the head and reads up to the final response head. On failure, also says whether any
/// byte of a response had arrived.
async fn exchange(conn: &mut Conn, head: &[u8]) -> Result<(Head, Bytes), (Error, bool)> {
    conn.tcp
        .write_all(head)
        .await
        .map_err(|e| (Error::Io(e), false))?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            match parse_head(&mut conn.buf).map_err(|e| (e, true))? {
                Some((h, rest)) if h.status.is_informational() => {
                    if h.status == StatusCode::SWITCHING_PROTOCOLS {
                        let e = Error::Protocol("101 Switching Protocols without an upgrade");
                        return Err((e, true));
                    }
                    conn.buf = BytesMut::from(rest);
                    continue;
                }
                Some(done) => return Ok(done),
                None => {}
            }
        }
        let n = std::future::poll_fn(|cx| conn.poll_fill(cx, READ_CHUNK))
            .await
            .map_err(|e| (Error::Io(e), answered))?;
        if n == 0 {
            let why = if answered {
                "the app closed the connection within the response head"
            } else {
                "the app closed the connection without a response"
            };
            let e = Error::Io(io::Error::new(io::ErrorKind::UnexpectedEof, why));
            return Err((e, answered));
        }
    }
}

/// The request line and headers, in one buffer for one write.
fn encode_head(req: &Request<Body>) -> Vec<u8> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let method = req.method().as_str();
    let mut size = method.len() + target.len() + 32;
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // A bodiless POST, PUT or PATCH says so, as hyper's client does; other methods need not.
    let expects_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if expects_body && !req.headers().contains_key(header::CONTENT_LENGTH) {
        head.extend_from_slice(b"content-length: 0\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Parses one response head from the front of `buf` and removes it, returning it with the bytes
/// that followed it; `None` (and `buf` as it was) until the head is complete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<(Head, Bytes)>, Error> {
    // Frozen first, so that header values share its bytes (no copy, and no table of offsets to
    // fill); taken whole, so that an incomplete head goes back without a copy.
    let data = std::mem::take(buf).freeze();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, &data, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if data.len() < MAX_HEAD => {
            *buf = BytesMut::from(data);
            return Ok(None);
        }
        Ok(_) => return Err(Error::Protocol("response head over 64 KiB")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Protocol("more than 100 response headers"));
        }
        Err(_) => return Err(Error::Protocol("malformed response head")),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| Error::Protocol("invalid status code"))?;
    let headers = header_map(resp.headers, &data).map_err(Error::Protocol)?;
    let version = if resp.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let head = Head {
        status,
        version,
        headers,
    };
    Ok(Some((head, data.slice(len..))))
}

/// The response to hand on: its framing decided, its body `rest` (what followed the head) and then
/// what `conn` reads.
fn respond(
    head: Head,
    mut rest: Bytes,
    mut conn: Conn,
    pool: &Pool,
    addr: SocketAddr,
    method: &Method,
) -> Result<Response<Body>, Error> {
    let Head {
        status,
        version,
        mut headers,
    } = head;
    let declared = Declared::of(&headers)?;
    let mut reusable = version == Version::HTTP_11 && !declared.close;
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Length(0)
    } else if let Some(chunked) = declared.chunked {
        if declared.length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            reusable = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            reusable = false;
            Framing::Close
        }
    } else {
        match declared.length {
            Some(n) => Framing::Length(n),
            None => {
                reusable = false;
                Framing::Close
            }
        }
    };
    let body = match framing {
        // The whole body is here already (nearly every small response): the connection is free now.
        Framing::Length(n) if n <= rest.len() as u64 => {
            let data = rest.split_to(n as usize);
            // Bytes after the body mean the app and this side disagree on framing.
            if reusable && rest.is_empty() {
                pool.put(addr, conn);
            }
            if data.is_empty() {
                crate::http::body::empty_body()
            } else {
                http_body_util::Full::new(data)
                    .map_err(|never| match never {})
                    .boxed()
            }
        }
        framing => {
            if !rest.is_empty() {
                conn.buf = BytesMut::from(rest);
            }
            AppBody {
                conn: Some(conn),
                framing,
                home: reusable.then(|| (pool.clone(), addr)),
            }
            .boxed()
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// What a response head says about its framing and its connection.
#[derive(Debug, Default)]
struct Declared {
    /// `Connection: close`.
    close: bool,
    /// With a Transfer-Encoding: whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// The Content-Length, all its values the same.
    length: Option<u64>,
}

impl Declared {
    /// Reads the three framing headers in one pass over the names (no hashing): this runs on every
    /// response.
    fn of(headers: &HeaderMap) -> Result<Self, Error> {
        let mut d = Self::default();
        for (name, value) in headers {
            let v = value.as_bytes();
            if *name == header::CONTENT_LENGTH {
                let n = length_value(v)
                    .ok_or(Error::Protocol("invalid Content-Length in the response"))?;
                if d.length.is_some_and(|l| l != n) {
                    return Err(Error::Protocol(
                        "conflicting Content-Length values in the response",
                    ));
                }
                d.length = Some(n);
            } else if *name == header::TRANSFER_ENCODING {
                let last = tokens(v).next_back().unwrap_or_default();
                d.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            } else if *name == header::CONNECTION {
                d.close |= tokens(v).any(|t| t.eq_ignore_ascii_case(b"close"));
            }
        }
        Ok(d)
    }
}

/// How the rest of the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked transfer coding, at this point.
    Chunked(Chunk),
    /// Everything until the app closes the connection.
    Close,
    /// Ended.
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailers, then an empty line.
    Trailers,
}

/// A response body still being read from the app's connection.
struct AppBody {
    conn: Option<Conn>,
    framing: Framing,
    /// Where the connection goes once the body has ended, if it can carry another request.
    home: Option<(Pool, SocketAddr)>,
}

fn broken(why: &'static str) -> BodyError {
    io::Error::new(io::ErrorKind::InvalidData, why).into()
}

fn cut_short() -> BodyError {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the app closed the connection before the end of the body",
    )
    .into()
}

impl AppBody {
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(conn), Some((pool, addr))) = (self.conn.take(), self.home.take()) {
            pool.put(addr, conn);
        }
    }

    /// Decodes chunked framing from the buffer, reading more as needed.
    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        mut at: Chunk,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match decode_chunked(&mut conn.buf, at) {
                Ok(Decoded::Data(data, next)) => {
                    self.framing = Framing::Chunked(next);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End(trailers)) => {
                    self.finish();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Ok(Decoded::More(next)) => {
                    at = next;
                    self.framing = Framing::Chunked(at);
                    let want = match at {
                        Chunk::Data(left) => usize::try_from(left).unwrap_or(MAX_READ),
                        _ => READ_CHUNK,
                    };
                    match ready!(conn.poll_fill(cx, want)) {
                        Ok(0) => return Poll::Ready(Some(Err(cut_short()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

/// What the chunked decoder made of the bytes buffered so far.
#[derive(Debug)]
enum Decoded {
    /// Data of the body; the decoder is then at this point.
    Data(Bytes, Chunk),
    /// The body ended, with these trailers (`None` when there were none).
    End(Option<HeaderMap>),
    /// More bytes are needed; the decoder is at this point (what it used is gone from the buffer).
    More(Chunk),
}

/// Decodes chunked framing from the front of `buf`, starting `at`: pure, so that it can be fuzzed
/// without a connection (`fuzzing`).
fn decode_chunked(buf: &mut BytesMut, mut at: Chunk) -> Result<Decoded, BodyError> {
    loop {
        at = match at {
            Chunk::Size => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    let _ = buf.split_to(used);
                    Chunk::Trailers
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    let _ = buf.split_to(used);
                    Chunk::Data(size)
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                    return Err(broken("chunk-size line too long"));
                }
                Ok(httparse::Status::Partial) => return Ok(Decoded::More(at)),
                Err(_) => return Err(broken("invalid chunk size")),
            },
            Chunk::Data(left) if !buf.is_empty() => {
                let n = left.min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                let next = if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                };
                return Ok(Decoded::Data(data, next));
            }
            Chunk::Data(_) => return Ok(Decoded::More(at)),
            Chunk::DataEnd if buf.len() >= 2 => {
                if !buf.starts_with(b"\r\n") {
                    return Err(broken("chunk data longer than its size"));
                }
                let _ = buf.split_to(2);
                Chunk::Size
            }
            Chunk::DataEnd => return Ok(Decoded::More(at)),
            Chunk::Trailers => {
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(buf, &mut slots) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for f in fields {
                            match (
                                HeaderName::from_bytes(f.name.as_bytes()),
                                HeaderValue::from_bytes(f.value),
                            ) {
                                (Ok(n), Ok(v)) => {
                                    trailers.append(n, v);
                                }
                                _ => return Err(broken("invalid trailer")),
                            }
                        }
                        let _ = buf.split_to(used);
                        return Ok(Decoded::End((!trailers.is_empty()).then_some(trailers)));
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        return Err(broken("trailers over 64 KiB"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::More(at)),
                    Err(_) => return Err(broken("invalid trailers")),
                }
            }
        };
    }
}

impl HttpBody for AppBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match this.framing {
            Framing::Done => Poll::Ready(None),
            Framing::Chunked(at) => this.poll_chunked(cx, at),
            Framing::Length(0) => {
                this.finish();
                Poll::Ready(None)
            }
            Framing::Length(left) => {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                if conn.buf.is_empty() {
                    let want = usize::try_from(left).unwrap_or(MAX_READ);
                    match ready!(conn.poll_fill(cx, want)) {
                        Ok(0) => return Poll::Ready(Some(Err(cut_short()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                let n = left.min(conn.buf.len() as u64);
                let data = conn.buf.split_to(n as usize).freeze();
                if n == left {
                    // Ended with this frame: the connection is free before the caller asks again.
                    this.finish();
                } else {
                    this.framing = Framing::Length(left - n);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Framing::Close => {
                let Some(conn) = this.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                if conn.buf.is_empty() {
                    match ready!(conn.poll_fill(cx, READ_CHUNK)) {
                        Ok(0) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                let data = conn.buf.split().freeze();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

#[cfg(test)] // tests below may unwrap
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::Empty;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// What the scripted app does for one request: write these pieces (a short pause between
    /// them), then keep the connection or close it.
    struct Step {
        pieces: Vec<Vec<u8>>,
        close: bool,
    }

    fn step(response: &str) -> Step {
        Step {
            pieces: vec![response.as_bytes().to_vec()],
            close: false,
        }
    }

    fn closing(response: &str) -> Step {
        Step {
            pieces: vec![response.as_bytes().to_vec()],
            close: true,
        }
    }

    /// A loopback app that answers each request head it reads with the next step; records the heads
    /// and counts connections.
    struct Scripted {
        addr: SocketAddr,
        heads: Arc<Mutex<Vec<String>>>,
        accepted: Arc<AtomicUsize>,
    }

    async fn scripted(steps: Vec<Step>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let steps = Arc::new(Mutex::new(VecDeque::from(steps)));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (h, a) = (heads.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (steps, heads) = (steps.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = tcp.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            heads.lock().unwrap().push(String::from_utf8(head).unwrap());
                            let Some(step) = steps.lock().unwrap().pop_front() else {
                                return;
                            };
                            for (i, piece) in step.pieces.iter().enumerate() {
                                if i > 0 {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                tcp.write_all(piece).await.unwrap();
                            }
                            if step.close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            heads,
            accepted,
        }
    }

    fn request(method: Method, path: &str) -> Request<Body> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.method_mut() = method;
        *req.uri_mut() = format!("http://127.0.0.1:1{path}").parse().unwrap();
        req.headers_mut()
            .insert(header::HOST, "httpbin:8000".parse().unwrap());
        req
    }

    async fn get(pool: &Pool, app: &Scripted, path: &str) -> Result<Response<Body>, Error> {
        send(pool, app.addr, request(Method::GET, path)).await
    }

    /// The whole body, and the trailers if any.
    async fn read(resp: Response<Body>) -> Result<(String, Option<HeaderMap>), BodyError> {
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().cloned();
        let text = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
        Ok((text, trailers))
    }

    #[tokio::test]
    async fn writes_an_origin_form_head_and_reuses_the_connection() {
        let app = scripted(vec![
            step("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-app: one\r\n\r\nhello"),
            step("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"),
            step("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        ])
        .await;
        let pool = Pool::default();
        let resp = get(&pool, &app, "/get?x=1").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-app"], "one");
        assert_eq!(read(resp).await.unwrap().0, "hello");
        let resp = send(&pool, app.addr, request(Method::POST, "/post"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let resp = send(&pool, app.addr, request(Method::DELETE, "/d"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
        let heads = app.heads.lock().unwrap().clone();
        assert_eq!(
            heads[0],
            "GET /get?x=1 HTTP/1.1\r\nhost: httpbin:8000\r\n\r\n"
        );
        // A bodiless POST says its length; a DELETE need not.
        assert_eq!(
            heads[1],
            "POST /post HTTP/1.1\r\nhost: httpbin:8000\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(heads[2], "DELETE /d HTTP/1.1\r\nhost: httpbin:8000\r\n\r\n");
    }

    #[tokio::test]
    async fn chunked_bodies_stream_with_their_trailers_and_keep_the_connection() {
        let app = scripted(vec![
            Step {
                pieces: vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n"
                        .to_vec(),
                    b"6\r\n world\r\n0\r\ngrpc-status: 0\r\nx-t: 2\r\n\r\n".to_vec(),
                ],
                close: false,
            },
            step("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        ])
        .await;
        let pool = Pool::default();
        let (text, trailers) = read(get(&pool, &app, "/stream").await.unwrap())
            .await
            .unwrap();
        assert_eq!(text, "hello world");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-t"], "2");
        let (text, trailers) = read(get(&pool, &app, "/again").await.unwrap())
            .await
            .unwrap();
        assert_eq!((text.as_str(), trailers), ("abc", None));
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_dropped_and_heads_may_arrive_in_pieces() {
        let app = scripted(vec![Step {
            pieces: vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 2".to_vec(),
                b"00 OK\r\ncontent-le".to_vec(),
                b"ngth: 3\r\n\r\nab".to_vec(),
                b"c".to_vec(),
            ],
            close: false,
        }])
        .await;
        let pool = Pool::default();
        let resp = get(&pool, &app, "/").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp.headers().contains_key("link"));
        assert_eq!(read(resp).await.unwrap().0, "abc");
    }

    #[tokio::test]
    async fn no_body_after_head_204_and_304() {
        let app = scripted(vec![
            step("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            step("HTTP/1.1 204 No Content\r\n\r\n"),
            step("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"),
            step("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ])
        .await;
        let pool = Pool::default();
        let resp = send(&pool, app.addr, request(Method::HEAD, "/"))
            .await
            .unwrap();
        // The length a GET would get is kept; no body is read.
        assert_eq!(resp.headers()["content-length"], "5");
        assert_eq!(read(resp).await.unwrap().0, "");
        for code in [204, 304] {
            let resp = get(&pool, &app, "/").await.unwrap();
            assert_eq!(resp.status(), code);
            assert_eq!(read(resp).await.unwrap().0, "");
        }
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "ok"
        );
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_without_length_reads_to_the_close() {
        let app = scripted(vec![
            closing("HTTP/1.1 200 OK\r\n\r\nuntil the end"),
            step("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ])
        .await;
        let pool = Pool::default();
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "until the end"
        );
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "ok"
        );
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn chunked_wins_over_a_content_length_and_the_connection_is_not_reused() {
        let app = scripted(vec![
            step("HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
            step("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        ])
        .await;
        let pool = Pool::default();
        let resp = get(&pool, &app, "/").await.unwrap();
        assert!(!resp.headers().contains_key("content-length"));
        assert_eq!(read(resp).await.unwrap().0, "hi");
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "ok"
        );
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        let long = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
                "conflicting",
            ),
            ("HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            ("HTTP/1.1 2x0 OK\r\n\r\n", "malformed response head"),
            (
                "HTTP/1.1 200 OK\r\nbad\0name: 1\r\n\r\n",
                "malformed response head",
            ),
            (long.as_str(), "over 64 KiB"),
        ];
        for (response, why) in cases {
            let app = scripted(vec![closing(response)]).await;
            let err = get(&Pool::default(), &app, "/").await.unwrap_err();
            assert!(err.to_string().contains(why), "{response:.40}: {err}");
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_an_end() {
        for response in [
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX",
        ] {
            let app = scripted(vec![closing(response)]).await;
            let resp = get(&Pool::default(), &app, "/").await.unwrap();
            assert!(read(resp).await.is_err(), "{response}");
        }
    }

    #[tokio::test]
    async fn a_large_body_arrives_whole() {
        let body = "x".repeat(700 * 1024);
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        let app = scripted(vec![Step {
            pieces: vec![
                head.into_bytes(),
                body[..300_000].into(),
                body[300_000..].into(),
            ],
            close: false,
        }])
        .await;
        let resp = get(&Pool::default(), &app, "/").await.unwrap();
        assert_eq!(resp.body().size_hint().exact(), Some(body.len() as u64));
        // In pieces no larger than MAX_READ: each waits in h2's send queue, so this bounds the memory
        // a stream holds.
        let mut got = Vec::new();
        let mut stream = resp.into_body();
        while let Some(frame) = stream.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= MAX_READ, "a {} byte piece", data.len());
            got.extend_from_slice(&data);
        }
        assert!(got == body.as_bytes());
    }

    #[tokio::test]
    async fn an_idle_connection_the_app_closed_costs_no_request() {
        // The app closes each connection after answering, without saying so: the pooled connection
        // is dead when the next request takes it.
        let app = scripted(vec![
            closing("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
            closing("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
            closing("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc"),
        ])
        .await;
        let pool = Pool::default();
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "a"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Idempotent: sent, failed without an answer, sent again on a new connection.
        assert_eq!(
            read(get(&pool, &app, "/").await.unwrap()).await.unwrap().0,
            "b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Not idempotent: the dead connection is noticed before anything is sent.
        let resp = send(&pool, app.addr, request(Method::POST, "/"))
            .await
            .unwrap();
        assert_eq!(read(resp).await.unwrap().0, "c");
        assert_eq!(app.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(
            app.heads.lock().unwrap().len(),
            3,
            "each request reached the app once"
        );
    }

    #[tokio::test]
    async fn a_request_with_a_body_is_not_eligible() {
        let mut req = request(Method::POST, "/");
        assert!(eligible(&req));
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(!eligible(&req));
        let full = Request::new(
            http_body_util::Full::new(Bytes::from_static(b"abc"))
                .map_err(|never| match never {})
                .boxed(),
        );
        assert!(!eligible(&full));
        assert!(!eligible(&request(Method::CONNECT, "/")));
    }
}
