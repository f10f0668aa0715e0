//! What every listener of the sidecar shares: the accept loop with its limits, and the drain.
//!
//! - **Accept**: errors back off instead of spinning; running out of file descriptors (EMFILE, ENFILE)
//!   waits longer and is logged once per episode.
//! - **Connection cap**: each listener serves at most `max_connections` at once; a connection over
//!   the cap is accepted and closed at once (the client sees a reset within a round trip instead of
//!   hanging in the backlog) and counted in `weft_listener_overflow_total{listener}`.
//! - **Drain** (SIGTERM, SIGINT; Istio's `terminationDrainDuration`): readiness turns false, the
//!   listeners stop accepting, the connections' own code finishes what is in flight (HTTP/1.1
//!   answers carry `Connection: close`, HTTP/2 connections get GOAWAY, idle connections close), and
//!   the process exits once every connection has ended or the drain duration has passed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The limits at the sidecar's edges (flags of `sidecar run`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections one listener serves at once.
    pub max_connections: usize,
    /// How long a request head (or a new connection's first line) may take to arrive.
    pub head_timeout: Duration,
    /// How long a connection may stay without a request in progress (HTTP) or without bytes in
    /// either direction (opaque TCP).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// Envoy's and Istio's defaults where they have them: an idle timeout of one hour (Envoy's
    /// `common_http_protocol_options.idle_timeout`, Istio's TCP `idle_timeout`). Envoy sets no
    /// request-header timeout by default; 10 s is ours, what slow-header clients need to be cut
    /// off while every real client's head arrives in one round trip. The cap is far below the
    /// file-descriptor limits pods get and far above what one pod's app opens.
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// What a listener's serving code needs: its limits, the drain, its counters.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Limits.
    pub limits: Limits,
    /// The sidecar's drain.
    pub drain: Drain,
    /// This listener's counters.
    pub stats: Arc<ListenerStats>,
}

impl Edge {
    /// The bounds of one HTTP/1.1 connection served by `h1::server`.
    pub fn bounds(&self) -> crate::http::h1::server::Bounds<'_> {
        crate::http::h1::server::Bounds {
            closing: self.drain.signal(),
            head_timeout: self.limits.head_timeout,
            idle_timeout: self.limits.idle_timeout,
        }
    }
}

/// Serves `io` with hyper (HTTP/1.1 with upgrades, or HTTP/2 by prior knowledge) within the edge's
/// bounds: the head limit of every path (64 KiB: 431 beyond it; 100 headers), the head timeout (which
/// hyper also applies to an idle keep-alive connection waiting for its next head), and on drain a
/// graceful shutdown (`Connection: close` on HTTP/1.1, GOAWAY on HTTP/2, in-flight requests
/// finish).
pub async fn serve_hyper<IO, S>(
    io: IO,
    svc: S,
    edge: &Edge,
    h2: crate::http::peer::Windows,
) -> Result<(), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::http::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        // A request in progress is answered even after the read side ended: a client that
        // half-closes, or a framing guard that cut the stream after it.
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(edge.limits.head_timeout)
        .max_buf_size(crate::http::h1::MAX_HEAD);
    builder
        .http2()
        .initial_stream_window_size(h2.stream)
        .initial_connection_window_size(h2.connection)
        .max_send_buf_size(h2.max_send_buf)
        .max_header_list_size(u32::try_from(crate::http::h1::MAX_HEAD).unwrap_or(u32::MAX));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        () = edge.drain.signal().cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    served.map_err(|e| e.to_string())
}

/// Splices two opaque streams until either side ends, or neither has moved a byte for the idle
/// timeout (counted in the listener's timeouts). A drain does not cut it short: it ends with the
/// process at the drain's deadline.
pub async fn splice<A, B>(a: A, b: B, edge: &Edge) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = std::time::Instant::now();
    let last = AtomicU64::new(0);
    let (mut a, mut b) = (
        Touched {
            io: a,
            start,
            last: &last,
        },
        Touched {
            io: b,
            start,
            last: &last,
        },
    );
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let idle = edge.limits.idle_timeout;
    loop {
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if quiet >= idle {
            edge.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle timeout",
            ));
        }
        tokio::select! {
            r = &mut copy => return r,
            () = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Touched<'a, S> {
    io: S,
    start: std::time::Instant,
    last: &'a AtomicU64,
}

impl<S> Touched<'_, S> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touched<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touched<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The drain: a signal, and the connections it waits for.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    connections: TaskTracker,
}

impl Drain {
    /// A drain not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled once the drain starts: connections watch it to finish what they have and close.
    pub fn signal(&self) -> &CancellationToken {
        &self.signal
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Starts the drain: listeners stop accepting, connections are told.
    pub fn start(&self) {
        self.signal.cancel();
        self.connections.close();
    }

    /// Waits until every connection has ended, at most `within`; whether they all did.
    pub async fn finished(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.connections.wait())
            .await
            .is_ok()
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.connections.len()
    }
}

/// Counters of one listener, for `/stats/prometheus`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections open now.
    pub active: AtomicUsize,
    /// Connections admitted, whatever they carry (HTTP or opaque; `istio_tcp_*` count only opaque).
    pub opened: AtomicU64,
    /// Admitted connections that have ended.
    pub closed: AtomicU64,
    /// Connections refused over the cap.
    pub overflow: AtomicU64,
    /// Connections closed for a head that did not arrive in time, or for idleness.
    pub timeouts: AtomicU64,
}

/// Every listener's counters, by name.
#[derive(Debug, Default)]
pub struct Stats {
    /// Listeners in the order they were registered.
    pub listeners: std::sync::Mutex<Vec<(&'static str, Arc<ListenerStats>)>>,
}

impl Stats {
    /// The counters of listener `name` (registered on first use).
    pub fn listener(&self, name: &'static str) -> Arc<ListenerStats> {
        let mut all = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = all.iter().find(|(n, _)| *n == name) {
            return s.clone();
        }
        let s = Arc::new(ListenerStats::default());
        all.push((name, s.clone()));
        s
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let all = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&ListenerStats) -> u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (listener, s) in all.iter() {
                    let _ = writeln!(out, "{name}{{listener=\"{listener}\"}} {}", value(s));
                }
            };
        family(
            "weft_listener_connections_active",
            "gauge",
            "Connections a listener is serving.",
            &|s| s.active.load(Ordering::Relaxed) as u64,
        );
        family(
            "weft_listener_connections_opened_total",
            "counter",
            "Connections a listener admitted (HTTP or opaque).",
            &|s| s.opened.load(Ordering::Relaxed),
        );
        family(
            "weft_listener_connections_closed_total",
            "counter",
            "Admitted connections that have ended.",
            &|s| s.closed.load(Ordering::Relaxed),
        );
        family(
            "weft_listener_overflow_total",
            "counter",
            "Connections refused because the listener was at its connection cap.",
            &|s| s.overflow.load(Ordering::Relaxed),
        );
        family(
            "weft_listener_timeouts_total",
            "counter",
            "Connections closed for a request head that did not arrive in time, or for idleness.",
            &|s| s.timeouts.load(Ordering::Relaxed),
        );
        out
    }
}

/// Accepts connections on `listener` until the drain starts, running `serve` for each (with the
/// edge) as a task the drain waits for, within the cap.
pub async fn accept_loop<F, Fut>(name: &'static str, listener: TcpListener, edge: Edge, serve: F)
where
    F: Fn(TcpStream, SocketAddr, Edge) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut backoff = Backoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            () = edge.drain.signal().cancelled() => return,
            c = accept(&listener, name, &mut backoff) => c,
        };
        let stats = &edge.stats;
        if stats.active.load(Ordering::Relaxed) >= edge.limits.max_connections {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = name, %peer, "connection cap reached; refusing");
            // Closed with a reset, so the client learns at once rather than at its own timeout.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
            continue;
        }
        stats.active.fetch_add(1, Ordering::Relaxed);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(stats.clone());
        let conn = serve(tcp, peer, edge.clone());
        edge.drain.connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended");
            }
            drop(guard);
        });
    }
}

/// Whether the last accept failed for want of file descriptors (logged once per episode).
#[derive(Debug, Default)]
pub struct Backoff {
    out_of_fds: bool,
}

/// The next connection on `listener`; failed accepts are retried after a pause, longer (and logged)
/// when the process is out of file descriptors, so that an accept loop never spins.
pub async fn accept(
    listener: &TcpListener,
    name: &'static str,
    backoff: &mut Backoff,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => {
                backoff.out_of_fds = false;
                return c;
            }
            Err(e) => {
                let pause = if e.raw_os_error().is_some_and(is_fd_exhaustion) {
                    if !backoff.out_of_fds {
                        tracing::warn!(listener = name, error = %e, "out of file descriptors; accepting again in 100 ms");
                        backoff.out_of_fds = true;
                    }
                    Duration::from_millis(100)
                } else {
                    tracing::debug!(listener = name, error = %e, "accept failed");
                    Duration::from_millis(10)
                };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// EMFILE (24) and ENFILE (23) on Linux: no descriptor for the accepted connection.
fn is_fd_exhaustion(errno: i32) -> bool {
    errno == 24 || errno == 23
}

struct ActiveGuard(Arc<ListenerStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.closed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_cap_refuses_at_once_and_the_drain_waits_for_connections() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let drain = Drain::new();
        let stats = Arc::new(ListenerStats::default());
        let release = CancellationToken::new();
        let held = release.clone();
        let edge = Edge {
            limits: Limits {
                max_connections: 2,
                ..Limits::default()
            },
            drain: drain.clone(),
            stats: stats.clone(),
        };
        let looped = tokio::spawn(accept_loop("test", l, edge, move |mut tcp, _, _| {
            let held = held.clone();
            async move {
                held.cancelled().await;
                let _ = tcp.read(&mut [0u8; 1]).await;
                Ok(())
            }
        }));
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        while stats.active.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The third is over the cap: closed at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut [0u8; 1]))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert_eq!(stats.overflow.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.opened.load(Ordering::Relaxed),
            2,
            "a refused one is not admitted"
        );

        // The drain stops the accept loop, and waits for the two connections.
        drain.start();
        looped.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        assert!(!drain.finished(Duration::from_millis(100)).await);
        assert_eq!(drain.open(), 2);
        release.cancel();
        drop((_a, _b));
        assert!(drain.finished(Duration::from_secs(5)).await);
        assert_eq!(stats.active.load(Ordering::Relaxed), 0);
        assert_eq!(stats.closed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn renders_every_listener() {
        let s = Stats::default();
        s.listener("outbound")
            .overflow
            .fetch_add(3, Ordering::Relaxed);
        s.listener("inbound");
        let text = s.render();
        assert!(
            text.contains("weft_listener_overflow_total{listener=\"outbound\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weft_listener_connections_active{listener=\"inbound\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE weft_listener_overflow_total counter"),
            "{text}"
        );
    }
}
