//! HTTP/1.1 request framing, judged the same way on every request of every connection.
//!
//! Both HTTP/1.1 servers of the sidecar apply these rules: `h1::server` to the requests it takes,
//! and [`Guard`] to the byte stream hyper reads for the rest (an upload, the requests after a
//! hand-over, the inbound side's plaintext). hyper is lenient where a proxy must not be: it lets
//! Transfer-Encoding win over a Content-Length, and httparse takes a bare LF for a line end. Two
//! parsers that read one stream differently are how requests are smuggled, so the mesh refuses:
//! - a head with both Content-Length and Transfer-Encoding, several Content-Length headers, a
//!   Content-Length that is not plain digits, or a Transfer-Encoding whose last coding is not
//!   `chunked` (400, connection closed);
//! - a bare LF anywhere in a head, a chunk-size line or trailers (400);
//! - a chunk size that is not 1-16 hex digits (`0x10`, `-1`, empty), or chunk data not followed by
//!   CRLF: the body is cut there, and the request is answered 400 with `x-weft-error: bad request:
//!   malformed chunked body`, never a 502 that would blame the upstream.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{MAX_HEAD, MAX_HEADERS};
use crate::http::headers::{length_value, tokens};

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// After this head the connection may become something else (`CONNECT`, `Upgrade`).
    Tunnel,
}

/// What a request head's headers say about framing and the connection, gathered in one pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadFacts {
    lengths: u8,
    length: Option<u64>,
    bad_length: bool,
    te: bool,
    te_chunked: bool,
    upgrade: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Connection: upgrade`.
    pub connection_upgrade: bool,
    /// `TE: trailers`.
    pub trailers: bool,
    /// An `Expect` header.
    pub expect: bool,
}

impl HeadFacts {
    /// Reads the headers of `req`.
    pub fn of(req: &httparse::Request<'_, '_>) -> Self {
        let mut f = Self::default();
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                f.lengths = f.lengths.saturating_add(1);
                f.length = length_value(h.value);
                f.bad_length |= f.length.is_none();
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.te = true;
                // Only the last coding counts, over every Transfer-Encoding line.
                f.te_chunked = tokens(h.value)
                    .next_back()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                for t in tokens(h.value) {
                    f.close |= t.eq_ignore_ascii_case(b"close");
                    f.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                    f.connection_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
                }
            } else if name.eq_ignore_ascii_case(b"te") {
                f.trailers |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = true;
            } else if name.eq_ignore_ascii_case(b"expect") {
                f.expect = true;
            }
        }
        f
    }

    /// The body framing these headers declare for a request (`connect`: its method is CONNECT),
    /// or why the request is refused.
    pub fn framing(&self, connect: bool) -> Result<BodyFraming, &'static str> {
        if self.te && self.lengths > 0 {
            return Err("both Content-Length and Transfer-Encoding");
        }
        if self.lengths > 1 {
            return Err("several Content-Length headers");
        }
        if self.bad_length {
            return Err("invalid Content-Length");
        }
        if self.te && !self.te_chunked {
            return Err("Transfer-Encoding other than chunked");
        }
        Ok(match (connect || self.upgrade, self.te, self.length) {
            (true, _, _) => BodyFraming::Tunnel,
            (_, true, _) => BodyFraming::Chunked,
            (_, _, Some(0) | None) => BodyFraming::None,
            (_, _, Some(n)) => BodyFraming::Length(n),
        })
    }
}

/// The framing a parsed request head declares, or why it is refused.
pub fn request_framing(req: &httparse::Request<'_, '_>) -> Result<BodyFraming, &'static str> {
    HeadFacts::of(req).framing(req.method == Some("CONNECT"))
}

/// Whether a head uses a bare LF (one not preceded by CR) as a line end.
pub fn has_bare_lf(head: &[u8]) -> bool {
    bare_lf_from(head, 0)
}

/// Whether `head` has a bare LF at `from` or after.
fn bare_lf_from(head: &[u8], from: usize) -> bool {
    let Some(tail) = head.get(from..) else {
        return false;
    };
    memchr::memchr_iter(b'\n', tail).any(|i| {
        let at = from + i;
        at == 0 || head[at - 1] != b'\r'
    })
}

/// What a [`Guard`] found wrong, shared with the connection's request handler.
#[derive(Debug, Default)]
pub struct Findings {
    head: OnceLock<&'static str>,
    body: OnceLock<&'static str>,
}

impl Findings {
    /// Why a request body was cut short, if one was.
    pub fn body_refused(&self) -> Option<&'static str> {
        self.body.get().copied()
    }

    /// Why a head was refused, if one was.
    pub fn head_refused(&self) -> Option<&'static str> {
        self.head.get().copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a head (its bytes so far are in `Guard::head`).
    Head,
    /// Body bytes left.
    Length(u64),
    /// A chunk-size line: digits so far, its value, where in the line.
    Size { digits: u8, value: u64, phase: Line },
    /// Chunk data left.
    Data(u64),
    /// The CRLF after chunk data (`true` once the CR was seen).
    DataEnd(bool),
    /// Trailer lines: bytes in the current line, after a CR, bytes so far.
    Trailers { line: usize, cr: bool, total: usize },
    /// Not HTTP/1.1 any more (a tunnel, HTTP/2, or a head hyper refuses anyway).
    Passthrough,
    /// Refused: nothing more reaches hyper.
    Refused,
}

/// Runs a fresh guard's rules over `stream` (the bytes a client sent on one connection): where the
/// first refused byte is, why, and whether it is in a head. For the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub fn judge(stream: &[u8]) -> Result<(), (usize, &'static str, bool)> {
    Guard::new((), Arc::new(Findings::default())).scan(stream)
}

/// Where a chunk-size line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Digits,
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    Lws,
    Ext,
    Cr,
}

const SIZE: State = State::Size {
    digits: 0,
    value: 0,
    phase: Line::Digits,
};

/// Reads the bytes hyper reads and stops them at the first framing this module refuses. A refused
/// head is never seen by hyper, which gets the end of the stream instead, finishes what it has and
/// closes; the guard then answers 400 itself before the connection closes. A refused chunked body
/// ends in a read error, which fails that request's body; the handler sees why in the [`Findings`].
#[derive(Debug)]
pub struct Guard<IO> {
    io: IO,
    state: State,
    head: Vec<u8>,
    verdict: Arc<Findings>,
    /// The 400 still to write (and how much of it is written) when the connection closes.
    answer: Option<(Vec<u8>, usize)>,
}

impl<IO> Guard<IO> {
    /// Guards `io`; `verdict` is what the handler reads.
    pub fn new(io: IO, verdict: Arc<Findings>) -> Self {
        Self {
            io,
            state: State::Head,
            head: Vec::new(),
            verdict,
            answer: None,
        }
    }

    /// Runs `bytes` through the state machine; `Err((at, reason, in_head))` is where the first
    /// refused byte is.
    fn scan(&mut self, bytes: &[u8]) -> Result<(), (usize, &'static str, bool)> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Passthrough => return Ok(()),
                State::Refused => return Err((i, "refused", false)),
                State::Head => {
                    let b = bytes[i];
                    if self.head.is_empty() && (b == b'\r' || b == b'\n') {
                        // Empty lines before a request line: every parser skips them.
                        i += 1;
                        continue;
                    }
                    if self.head.is_empty() && bytes[i..].starts_with(b"PRI * HTTP/2.0") {
                        self.state = State::Passthrough;
                        return Ok(());
                    }
                    // Up to the end of the head in these bytes (or all of them).
                    let rest = &bytes[i..];
                    let end = find_head_end(&self.head, rest);
                    let take = end.unwrap_or(rest.len());
                    let old = self.head.len();
                    self.head.extend_from_slice(&rest[..take]);
                    if self.head.len() > MAX_HEAD {
                        // hyper refuses it (431) with its own limit, the same.
                        self.state = State::Passthrough;
                        return Ok(());
                    }
                    // Only what was just added is looked at: a head that trickles in is not
                    // scanned again and again.
                    if bare_lf_from(&self.head, old) {
                        // Cut where the head begins (in these bytes, or at their start).
                        return Err((i.saturating_sub(old), "bare LF in the request head", true));
                    }
                    let Some(_) = end else { return Ok(()) };
                    let head_start = (i + take).saturating_sub(self.head.len());
                    i += take;
                    let framing = {
                        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let mut req = httparse::Request::new(&mut headers);
                        match req.parse(&self.head) {
                            Ok(httparse::Status::Complete(_)) => request_framing(&req),
                            // hyper answers a head it cannot parse (400) and closes.
                            _ => Ok(BodyFraming::Tunnel),
                        }
                    };
                    self.head.clear();
                    self.state = match framing {
                        Ok(BodyFraming::None) => State::Head,
                        Ok(BodyFraming::Length(n)) => State::Length(n),
                        Ok(BodyFraming::Chunked) => SIZE,
                        Ok(BodyFraming::Tunnel) => State::Passthrough,
                        Err(reason) => return Err((head_start.min(bytes.len()), reason, true)),
                    };
                }
                State::Length(n) => {
                    let left = skip(n, &mut i, bytes.len());
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Data(n) => {
                    let left = skip(n, &mut i, bytes.len());
                    self.state = if left == 0 {
                        State::DataEnd(false)
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd(cr) => {
                    self.state = match (cr, bytes[i]) {
                        (false, b'\r') => State::DataEnd(true),
                        (true, b'\n') => SIZE,
                        _ => return Err((i, "chunk data not followed by CRLF", false)),
                    };
                    i += 1;
                }
                State::Size {
                    digits,
                    value,
                    phase,
                } => {
                    let b = bytes[i];
                    let bad = |why| Err((i, why, false));
                    let next = |phase| State::Size {
                        digits,
                        value,
                        phase,
                    };
                    self.state = match (phase, b) {
                        (Line::Cr, b'\n') if value == 0 => State::Trailers {
                            line: 0,
                            cr: false,
                            total: 0,
                        },
                        (Line::Cr, b'\n') => State::Data(value),
                        (_, b'\n') => return bad("bare LF in a chunk-size line"),
                        (Line::Digits, b'\r' | b' ' | b'\t' | b';') if digits == 0 => {
                            return bad("malformed chunk size");
                        }
                        (Line::Digits | Line::Lws | Line::Ext, b'\r') => next(Line::Cr),
                        (Line::Digits | Line::Lws, b' ' | b'\t') => next(Line::Lws),
                        (Line::Digits | Line::Lws, b';') => next(Line::Ext),
                        (Line::Ext, c) if c < 0x20 && c != b'\t' || c == 0x7f => {
                            return bad("malformed chunk extension");
                        }
                        (Line::Ext, _) => next(Line::Ext),
                        (Line::Digits, c) => {
                            let Some(d) = (c as char).to_digit(16) else {
                                return bad("malformed chunk size");
                            };
                            if digits >= 16 {
                                return bad("chunk size too large");
                            }
                            State::Size {
                                digits: digits + 1,
                                value: value << 4 | u64::from(d),
                                phase,
                            }
                        }
                        _ => return bad("malformed chunk size"),
                    };
                    i += 1;
                }
                State::Trailers { line, cr, total } => {
                    let b = bytes[i];
                    if total >= MAX_HEAD {
                        return Err((i, "trailers too large", false));
                    }
                    self.state = match b {
                        b'\n' if !cr => return Err((i, "bare LF in the trailers", false)),
                        b'\n' if line == 0 => State::Head,
                        b'\n' => State::Trailers {
                            line: 0,
                            cr: false,
                            total: total + 1,
                        },
                        _ if cr => return Err((i, "malformed trailers", false)),
                        b'\r' => State::Trailers {
                            line,
                            cr: true,
                            total: total + 1,
                        },
                        _ => State::Trailers {
                            line: line + 1,
                            cr: false,
                            total: total + 1,
                        },
                    };
                    i += 1;
                }
            }
        }
        Ok(())
    }
}

/// Moves `i` over up to `n` body bytes of the `len` there are; what is left of `n`.
fn skip(n: u64, i: &mut usize, len: usize) -> u64 {
    let take = usize::try_from(n).unwrap_or(usize::MAX).min(len - *i);
    *i += take;
    n - take as u64
}

/// Where the head that `before` began ends within `rest` (the index just past its empty line).
fn find_head_end(before: &[u8], rest: &[u8]) -> Option<usize> {
    // The end may straddle the two: look at the last 3 bytes of `before` too.
    let tail = &before[before.len().saturating_sub(3)..];
    let mut window = [0u8; 4];
    let mut n = 0;
    for &b in tail {
        window = [window[1], window[2], window[3], b];
        n += 1;
    }
    for (i, &b) in rest.iter().enumerate() {
        window = [window[1], window[2], window[3], b];
        n += 1;
        if n >= 4 && window == *b"\r\n\r\n" {
            return Some(i + 1);
        }
    }
    None
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.state {
            State::Refused if this.verdict.body_refused().is_some() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed chunked body",
                )));
            }
            // The end of the stream, as far as hyper is concerned.
            State::Refused => return Poll::Ready(Ok(())),
            _ => {}
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.state == State::Passthrough {
            return Poll::Ready(Ok(()));
        }
        let scanned = this.scan(&buf.filled()[before..]);
        if let Err((at, reason, in_head)) = scanned {
            this.state = State::Refused;
            let got = buf.filled().len() - before;
            buf.set_filled(before + at.min(got));
            if in_head {
                let _ = this.verdict.head.set(reason);
                this.answer = Some((crate::http::headers::bad_request_bytes(reason), 0));
            } else {
                let _ = this.verdict.body.set(reason);
                if at == 0 {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // hyper closes the connection once it has answered what came before a refused head:
        // the 400 goes out last.
        while let Some((answer, written)) = &mut this.answer {
            if *written == answer.len() {
                this.answer = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                this.answer = None;
                break;
            }
            *written += n;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(stream: &[u8]) -> (usize, Option<&'static str>, Option<&'static str>) {
        let verdict = Arc::new(Findings::default());
        let mut g = Guard::new((), verdict.clone());
        match g.scan(stream) {
            Ok(()) => (stream.len(), None, None),
            Err((at, reason, head)) => (at, head.then_some(reason), (!head).then_some(reason)),
        }
    }

    #[test]
    fn keeps_every_request_of_a_connection_to_the_same_rules() {
        // A bodied request, then CL+TE: the second head is refused where it starts.
        let first = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
        let second = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let stream = [&first[..], &second[..]].concat();
        assert_eq!(
            judge(&stream),
            (
                first.len(),
                Some("both Content-Length and Transfer-Encoding"),
                None
            )
        );
        // Chunked, then a clean GET: accepted whole.
        let ok = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\ntrailer: t\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(judge(ok), (ok.len(), None, None));
        // Leading empty lines are fine.
        let crlf = b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(judge(crlf), (crlf.len(), None, None));
    }

    #[test]
    fn refuses_bare_lf_and_malformed_chunks() {
        let lf = b"GET / HTTP/1.1\nHost: h\n\n";
        assert_eq!(judge(lf).1, Some("bare LF in the request head"));
        let lf2 = b"GET / HTTP/1.1\r\nHost: h\n\r\n";
        assert_eq!(judge(lf2).1, Some("bare LF in the request head"));
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, why) in [
            (&b"0x5\r\nhello\r\n0\r\n\r\n"[..], "malformed chunk size"),
            (b"-1\r\n", "malformed chunk size"),
            (b"\r\n", "malformed chunk size"),
            (b"5\nhello\r\n", "bare LF in a chunk-size line"),
            (b"5\r\nhelloXX0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"11111111111111111\r\n", "chunk size too large"),
            (b"0\r\nx: y\n\r\n", "bare LF in the trailers"),
        ] {
            let stream = [&head[..], body].concat();
            let (at, h, b) = judge(&stream);
            assert_eq!(
                (h, b),
                (None, Some(why)),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(at >= head.len(), "cut inside the head: {at}");
        }
        for (bad, why) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"[..],
                "several Content-Length headers",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                "Transfer-Encoding other than chunked",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "Transfer-Encoding other than chunked",
            ),
        ] {
            assert_eq!(judge(bad), (0, Some(why), None));
        }
    }

    #[test]
    fn tunnels_and_http2_are_not_judged() {
        let up =
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello\n";
        assert_eq!(judge(up), (up.len(), None, None));
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00";
        assert_eq!(judge(h2), (h2.len(), None, None));
    }

    #[tokio::test]
    async fn a_refused_head_reaches_no_one_and_is_answered_400_at_close() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(4096);
        let verdict = Arc::new(Findings::default());
        let mut g = Guard::new(server, verdict.clone());
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\nHost: h\n\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = g.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(seen, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(verdict.head_refused(), Some("bare LF in the request head"));
        g.shutdown().await.unwrap();
        let mut answer = Vec::new();
        cr.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 400 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
