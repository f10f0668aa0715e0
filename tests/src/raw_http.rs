//! A raw HTTP/1.1 client: writes exactly the bytes a test gives it (malformed framing, smuggling
//! shapes, pipelined requests) and reads what comes back, with bounded waits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What the server did with a raw request.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Everything read (until the server closed, or the wait ended).
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        status_of(&self.bytes)
    }

    /// The status codes of every response head in the bytes, in order (for pipelined requests;
    /// assumes bodies do not themselves contain `HTTP/1.1 NNN ` at a line start).
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("HTTP/1.1 ") {
            let at_line_start = i == 0 || rest[..i].ends_with('\n');
            if at_line_start && let Some(code) = status_of(&rest.as_bytes()[i..]) {
                out.push(code);
            }
            rest = &rest[i + 9..];
        }
        out
    }

    /// The bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The first response's head (status line and headers), lowercased.
    pub fn head_lowercase(&self) -> String {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        head.to_ascii_lowercase()
    }
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    let line = bytes.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Sends `request` to `addr` and reads until the server closes the connection, or `done` says the
/// bytes so far are enough, or `wait` passes.
pub fn exchange_until(
    addr: &str,
    request: &[u8],
    wait: Duration,
    done: impl Fn(&[u8]) -> bool,
) -> Result<RawReply> {
    let mut tcp = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    tcp.set_write_timeout(Some(wait))?;
    // The server may answer and close before reading everything; a failed write is not an error.
    let _ = tcp.write_all(request);
    let deadline = Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(RawReply {
                bytes,
                closed: false,
            });
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.read(&mut buf) {
            Ok(0) => {
                return Ok(RawReply {
                    bytes,
                    closed: true,
                });
            }
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if done(&bytes) {
                    return Ok(RawReply {
                        bytes,
                        closed: false,
                    });
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // Reset by the server: it refused the request.
            Err(_) => {
                return Ok(RawReply {
                    bytes,
                    closed: true,
                });
            }
        }
    }
}

/// Sends `request` and reads until the first response head is complete (or the server closes, or
/// `wait` passes): enough to see how the request was judged without waiting for a keep-alive
/// connection to time out.
pub fn exchange_head(addr: &str, request: &[u8], wait: Duration) -> Result<RawReply> {
    exchange_until(addr, request, wait, |b| {
        b.windows(4).any(|w| w == b"\r\n\r\n")
    })
}

/// Sends `request` and reads until the server closes (use `Connection: close` on the last request).
pub fn exchange_to_close(addr: &str, request: &[u8], wait: Duration) -> Result<RawReply> {
    exchange_until(addr, request, wait, |_| false)
}

/// A raw client that runs as a process (so it can run inside a pod's network namespace): connects to
/// `host:port`, sends `parts` with `pause` between them, and prints everything it reads until the
/// server closes or 10 s pass.
pub const PAUSED_CLIENT: &str = r#"
import socket, sys, time
host, port, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
parts = [bytes.fromhex(p) for p in sys.argv[4:]]
c = socket.create_connection((host, port), timeout=10)
for i, p in enumerate(parts):
    if i:
        time.sleep(pause)
    c.sendall(p)
out = b""
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        out += d
except (socket.timeout, ConnectionResetError):
    pass
sys.stdout.write(out.decode("latin-1"))
"#;

/// Runs [`PAUSED_CLIENT`] with `python` (a `Command` for the venv's python, in a namespace or not)
/// and returns what the server answered.
pub fn paused_exchange(
    mut python: std::process::Command,
    addr: (&str, u16),
    parts: &[&[u8]],
    pause: Duration,
) -> Result<RawReply> {
    python
        .arg("-c")
        .arg(PAUSED_CLIENT)
        .arg(addr.0)
        .arg(addr.1.to_string())
        .arg(format!("{}", pause.as_secs_f64()));
    for p in parts {
        python.arg(p.iter().map(|b| format!("{b:02x}")).collect::<String>());
    }
    let (_, out, err) = crate::run(&mut python)?;
    if out.is_empty() && !err.is_empty() {
        anyhow::bail!("raw client failed: {err}");
    }
    Ok(RawReply {
        bytes: out.into_bytes(),
        closed: true,
    })
}
