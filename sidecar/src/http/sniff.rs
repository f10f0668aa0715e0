//! Protocol detection: does a connection carry HTTP?
//!
//! The answer decides whether the mesh parses the traffic (and so sets the identity headers the app
//! sees) or splices it raw. The rule leans one way on purpose: a connection is opaque only when its
//! first line *cannot* be an HTTP/1.x request line or the HTTP/2 preface. Anything an HTTP server
//! might still read as a request (leading empty lines, an unknown or lowercase method, a request
//! that trickles in byte by byte) is HTTP, so a caller cannot dress a request up to slip a forged
//! `x-forwarded-client-cert` past the mesh. A first line that is still incomplete is undecided:
//! callers wait for more, and when the wait ends (a time or size bound) they take it as HTTP, whose
//! parser then refuses what is not.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a connection's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A request line (or the HTTP/2 preface) so far: parse it as HTTP.
    Http,
    /// Cannot be HTTP: carry it as opaque TCP.
    Opaque,
    /// Consistent with a request line so far, not yet complete.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Beyond this many bytes without a verdict, the first line is HTTP (too long for anything else;
/// the HTTP parser's head limit refuses it).
pub const MAX_SNIFF: usize = crate::http::h1::MAX_HEAD;

/// RFC 9110 §5.6.2 `tchar`: what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes a client sent.
pub fn classify(bytes: &[u8]) -> Verdict {
    // RFC 9112 §2.2: servers skip empty lines before a request line (and lenient ones blanks).
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'));
    let Some(start) = start else {
        return undecided(bytes);
    };
    let line = &bytes[start..];
    if line.first() == Some(&b'P') && (H2_PREFACE.starts_with(line) || line.starts_with(H2_PREFACE))
    {
        if line.len() >= H2_PREFACE.len() {
            return Verdict::Http;
        }
        return undecided(bytes);
    }
    let method = line.iter().take_while(|&&b| is_tchar(b)).count();
    match line.get(method) {
        None => return undecided(bytes),
        Some(b' ' | b'\t') if method > 0 => {}
        Some(_) => return Verdict::Opaque,
    }
    // The rest of the first line: any request line an HTTP/1.x server accepts names its version.
    let rest = &line[method..];
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return if contains_version(rest) {
            Verdict::Http
        } else {
            undecided(bytes)
        };
    };
    if contains_version(&rest[..end]) {
        Verdict::Http
    } else {
        Verdict::Opaque
    }
}

fn contains_version(line: &[u8]) -> bool {
    line.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/"))
}

fn undecided(bytes: &[u8]) -> Verdict {
    if bytes.len() >= MAX_SNIFF {
        Verdict::Http
    } else {
        Verdict::NeedMore
    }
}

/// Peeks at a plaintext connection until its first bytes decide, for at most `wait`. `None`: nothing
/// arrived (a server-first protocol, or an idle client). An undecided prefix at the end of the wait
/// is HTTP.
pub async fn peek_verdict(tcp: &tokio::net::TcpStream, wait: Duration) -> Option<Verdict> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 512];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => n,
            Err(_) => return (seen > 0).then_some(Verdict::Http),
        };
        match classify(buf.get(..n).unwrap_or_default()) {
            Verdict::NeedMore => {}
            v => return Some(v),
        }
        if n == buf.len() {
            // Peek shows what is queued from the start: a longer buffer to see further.
            buf.resize((buf.len() * 4).min(MAX_SNIFF), 0);
        } else if n == seen
            && tokio::time::timeout_at(deadline, wait_for_more(tcp, n))
                .await
                .is_err()
        {
            return Some(Verdict::Http);
        }
        seen = n;
    }
}

/// Returns once more than `have` bytes are queued on `tcp` (or it closed). `peek` returns at once
/// while anything is queued, so this looks again every few milliseconds, as the caller's deadline
/// allows.
async fn wait_for_more(tcp: &tokio::net::TcpStream, have: usize) {
    let mut probe = vec![0u8; have + 1];
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        match tcp.peek(&mut probe).await {
            Ok(n) if n > have || n == 0 => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Reads from a stream that cannot be peeked (TLS) into `buf` until its first bytes decide. It waits
/// as long as it takes for the first byte (the other direction may be carrying a server-first
/// protocol meanwhile), then at most `wait` for the first line. `None`: the stream ended before any
/// byte.
pub async fn read_verdict<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut bytes::BytesMut,
    wait: Duration,
) -> Option<Verdict> {
    let mut deadline = None;
    loop {
        match classify(buf) {
            Verdict::NeedMore => {}
            v => return Some(v),
        }
        buf.reserve(4096);
        let read = io.read_buf(buf);
        let read = match deadline {
            None => Ok(read.await),
            Some(d) => tokio::time::timeout_at(d, read).await,
        };
        match read {
            // Ended mid-line: no request line came, and no header with it.
            Ok(Ok(0)) | Ok(Err(_)) => return (!buf.is_empty()).then_some(Verdict::Opaque),
            Ok(Ok(_)) => {
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
            }
            Err(_) => return Some(Verdict::Http),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http_whatever_their_method_or_prefix() {
        for http in [
            &b"GET /headers HTTP/1.1\r\n"[..],
            b"\r\nGET /headers HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\r\n\r\n\r\nPOST / HTTP/1.0\r\n",
            b"PROPFIND /x HTTP/1.1\r\n",
            b"QUERY /x HTTP/1.1\r\n",
            b"get /headers HTTP/1.1\r\n",
            b"GET /headers http/1.1\n",
            b"GET /x HTTP/1.1 \r\n",
            b"GET\t/x\tHTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"CONNECT httpbin:8000 HTTP/1.1\r\n",
            // The version is enough; the rest of the line is the parser's to refuse.
            b"GET /\0 HTTP/1.1",
        ] {
            assert_eq!(
                classify(http),
                Verdict::Http,
                "{}",
                String::from_utf8_lossy(http)
            );
        }
    }

    #[test]
    fn prefixes_of_a_request_line_wait_for_more() {
        for partial in [
            &b""[..],
            b"\r\n",
            b"G",
            b"GET",
            b"GET /headers",
            b"GET /headers HTTP",
            b"\r\nPROPF",
            b"PRI * HT",
        ] {
            assert_eq!(
                classify(partial),
                Verdict::NeedMore,
                "{}",
                String::from_utf8_lossy(partial)
            );
        }
        // A head limit's worth of undecided bytes is taken as HTTP.
        let long = [b'A'; MAX_SNIFF];
        assert_eq!(classify(&long), Verdict::Http);
        let mut line = b"GET /".to_vec();
        line.resize(MAX_SNIFF, b'a');
        assert_eq!(classify(&line), Verdict::Http);
    }

    #[test]
    fn what_cannot_be_a_request_line_is_opaque() {
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"\x00\x00\x00\x08",
            b"*1\r\n$4\r\nPING\r\n",
            b"PING\r\n",
            b"HELLO\n",
            b"SET k v\r\n",
            b"EHLO mail.example\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"{\"json\": 1}",
            b" \x01",
        ] {
            assert_eq!(
                classify(opaque),
                Verdict::Opaque,
                "{}",
                String::from_utf8_lossy(opaque)
            );
        }
    }

    #[tokio::test]
    async fn a_request_that_trickles_in_is_still_http() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            for b in b"GET /headers HTTP/1.1\r\n" {
                c.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            c
        });
        let (s, _) = l.accept().await.unwrap();
        let v = peek_verdict(&s, Duration::from_secs(5)).await;
        assert_eq!(v, Some(Verdict::Http));
        let _c = client.await.unwrap();
        // A first byte followed by a long pause: still HTTP when the wait ends.
        let addr = l.local_addr().unwrap();
        let c2 = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"G").await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            c
        });
        let (s, _) = l.accept().await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(
            peek_verdict(&s, Duration::from_millis(300)).await,
            Some(Verdict::Http)
        );
        assert!(t.elapsed() < Duration::from_millis(550));
        let _c2 = c2.await.unwrap();
    }

    #[tokio::test]
    async fn read_verdict_keeps_what_it_read() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let w = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            b.write_all(b"\r\nQUE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            b.write_all(b"RY /x HTTP/1.1\r\n").await.unwrap();
            b
        });
        let mut buf = bytes::BytesMut::new();
        let v = read_verdict(&mut a, &mut buf, Duration::from_secs(5)).await;
        assert_eq!(v, Some(Verdict::Http));
        assert_eq!(&buf[..], b"\r\nQUERY /x HTTP/1.1\r\n");
        drop(w.await.unwrap());
    }
}
