//! The inbound side's connections to the pod's own application on `127.0.0.1`.
//!
//! HTTP/1.1 apps (nearly all): a request without a body (most of them) is exchanged by
//! [`crate::http::h1::client`] on a connection of its own pool, without hyper. A request with a body takes
//! a pool of hyper keep-alive connections per app address, each carrying one request at a time.
//! Taking a connection is one short lock and a scan for one that is idle, which is what this hop
//! needs on every request; hyper-util's general client (connector, per-host pool keys,
//! checkout futures, a spawned task per returned connection) cost a tenth of the inbound side's
//! instructions for the same job. HTTP/2 apps (gRPC, h2c) keep hyper-util's pooled client, which
//! multiplexes every request over one connection.
//!
//! A connection the app closed is dropped at the next checkout; a request that a closing connection
//! never sent is sent again on a fresh one (hyper hands it back), so an app's keep-alive timeout
//! never fails a request. Nothing times out idle connections here: the app closes them when it likes,
//! as Envoy's inbound pool lets it.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::body::Body;

/// A hyper response as the proxy's response type.
fn boxed(resp: Response<Incoming>) -> Response<Body> {
    resp.map(crate::http::body::boxed)
}

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection could be made.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// The app's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The exchange failed after the request was sent or while sending it.
    #[error("app {addr}: {reason}")]
    Exchange {
        /// The app's address.
        addr: SocketAddr,
        /// The whole cause chain.
        reason: String,
        /// Whether the app reset its HTTP/2 stream (before response headers).
        reset: bool,
    },
}

/// One pooled HTTP/1.1 connection.
struct Pooled {
    addr: SocketAddr,
    sender: http1::SendRequest<Body>,
}

/// Connections to the app.
pub struct App {
    bodiless: crate::http::h1::client::Pool,
    h1: Mutex<Vec<Pooled>>,
    h2: Client<HttpConnector, Body>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    /// An empty pool.
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(http);
        Self {
            bodiless: crate::http::h1::client::Pool::default(),
            h1: Mutex::new(Vec::new()),
            h2,
        }
    }

    /// Sends `req` (absolute-form URI, `Host` set) to the app at `addr`, over HTTP/2 when `h2`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<Body>,
        h2: bool,
    ) -> Result<Response<Body>, AppError> {
        if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            return self.h2.request(req).await.map(boxed).map_err(|e| {
                let reason = weft_ca::cli::report_chain(&e);
                if e.is_connect() {
                    AppError::Connect { addr, reason }
                } else {
                    AppError::Exchange {
                        addr,
                        reset: is_reset(&e),
                        reason,
                    }
                }
            });
        }
        if crate::http::h1::client::eligible(&req) {
            return crate::http::h1::client::send(&self.bodiless, addr, req)
                .await
                .map_err(|e| match e {
                    crate::http::h1::client::Error::Connect(e) => AppError::Connect {
                        addr,
                        reason: e.to_string(),
                    },
                    e => AppError::Exchange {
                        addr,
                        reason: e.to_string(),
                        reset: false,
                    },
                });
        }
        // A connection takes the origin form; the authority is in Host already.
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = http::Uri::from(pq);
        }
        let mut req = req;
        // One retry: only a request that a pooled connection handed back unsent.
        for fresh in [false, true] {
            let mut sender = match (!fresh).then(|| self.checkout(addr)).flatten() {
                Some(s) => s,
                None => connect(addr).await?,
            };
            let sent = sender.try_send_request(req);
            self.checkin(addr, sender);
            match sent.await {
                Ok(resp) => return Ok(boxed(resp)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => {
                        let e = e.into_error();
                        return Err(AppError::Exchange {
                            addr,
                            reason: weft_ca::cli::report_chain(&e),
                            reset: false,
                        });
                    }
                },
            }
        }
        Err(AppError::Exchange {
            addr,
            reason: "no connection took the request".into(),
            reset: false,
        })
    }

    /// An idle pooled connection to `addr`, dropping closed ones on the way.
    fn checkout(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pool = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|p| !p.sender.is_closed());
        let i = pool
            .iter()
            .position(|p| p.addr == addr && p.sender.is_ready())?;
        Some(pool.swap_remove(i).sender)
    }

    /// Puts a connection (busy with the request just given to it) back; it is taken again once its
    /// response has ended.
    fn checkin(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut pool = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < crate::http::h1::MAX_POOLED {
            pool.push(Pooled { addr, sender });
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Body>, AppError> {
    let failed = |reason: String| AppError::Connect { addr, reason };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| failed(weft_ca::cli::report_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "app connection ended");
        }
    });
    Ok(sender)
}

/// Whether an HTTP/2 stream reset is among the causes.
fn is_reset(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::http::peer::h2_error(e).is_some_and(h2::Error::is_reset)
}

#[cfg(test)] // tests below may unwrap
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;

    use super::*;

    /// A real HTTP/1.1 app on loopback; counts the connections it accepted.
    async fn app(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let host = req.headers()[http::header::HOST]
                            .to_str()
                            .unwrap()
                            .to_owned();
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(format!("{host}{path}")),
                        )))
                    });
                    let _ = server::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr, path: &str) -> Request<Body> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "httpbin:8000".parse().unwrap());
        req
    }

    async fn body(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form() {
        let (addr, accepted) = app(true).await;
        let pool = App::new();
        for i in 0..5 {
            let resp = pool
                .send(addr, get(addr, &format!("/n/{i}")), false)
                .await
                .unwrap();
            assert_eq!(body(resp).await, format!("httpbin:8000/n/{i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_app_that_closes_every_connection_fails_no_request() {
        let (addr, accepted) = app(false).await;
        let pool = App::new();
        for i in 0..20 {
            let resp = pool.send(addr, get(addr, "/close"), false).await;
            assert!(resp.is_ok(), "request {i}: {resp:?}");
            let _ = body(resp.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections() {
        let (addr, accepted) = app(true).await;
        let pool = Arc::new(App::new());
        let mut tasks = Vec::new();
        for i in 0..8 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let resp = pool
                    .send(addr, get(addr, &format!("/{i}")), false)
                    .await
                    .unwrap();
                body(resp).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("httpbin:8000/{i}"));
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "{opened} connections");
        // Afterwards they are all idle and reused, none opened anew.
        for _ in 0..8 {
            let resp = pool.send(addr, get(addr, "/again"), false).await.unwrap();
            let _ = body(resp).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = App::new()
            .send(addr, get(addr, "/"), false)
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Connect { .. }), "{err}");
    }
}
