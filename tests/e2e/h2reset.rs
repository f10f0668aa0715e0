//! RST_STREAM through the mesh (issue 4, "HTTP fidelity"): an HTTP/2 app written here with the `h2`
//! crate sits behind its sidecar on a Service port named `grpc` (so that sidecar speaks HTTP/2 to it),
//! and an `h2` client speaks h2c prior knowledge to the caller's sidecar in explicit mode. Both ends
//! see frames, not a library's summary of them, so the tests can send a reset and see one arrive:
//!
//! - client → app: a stream the client cancels (before or after the app's response headers) must
//!   arrive at the app as a reset of its request body, never as a complete body, while other streams
//!   on the same connections carry on;
//! - app → client: a response the app resets after part of its body must reach the client as a reset
//!   with the app's reason, never as a clean end (a truncated response must not look complete); a
//!   reset before any response headers becomes the mesh's 503 with `x-weft-error` (flag UR).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use weft_tests::{ControlPlane, Sidecar};

/// The bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// The app's Service: port 9000 named `grpc`, so its sidecar reaches it with HTTP/2.
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: resetter\nspec:\n  selector:\n    app: resetter\n  ports:\n  - name: grpc\n    port: 9000\n    targetPort: 9000\n";
const AUTHORITY: &str = "resetter:9000";

/// What the app saw of one request (`x-stream-id` names it).
#[derive(Debug)]
enum Seen {
    /// The request head arrived.
    Headers,
    /// A DATA frame of this many bytes.
    Data(usize),
    /// The body ended cleanly (END_STREAM) after this many bytes.
    End(usize),
    /// Reading the body failed (a reset, a lost connection).
    Failed(h2::Error),
}

/// Per stream id, the signal the app waits for before it resets a `/truncate` response.
type Triggers = Arc<Mutex<HashMap<String, oneshot::Receiver<()>>>>;

/// The HTTP/2 app. Paths:
/// - `/stream`: reports the head and each DATA frame, answers `complete N` once the body ends;
///   with `x-respond-first` it sends its response headers before reading the body (a gRPC stream).
/// - `/truncate`: sends headers and `partial`, waits for the stream's trigger, then resets with
///   `x-reset-reason` (`internal` or `cancel`).
/// - `/reset-early`: resets (INTERNAL_ERROR) before any response headers.
async fn serve_app(
    listener: TcpListener,
    events: mpsc::UnboundedSender<(String, Seen)>,
    triggers: Triggers,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (events, triggers) = (events.clone(), triggers.clone());
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            // Accepting also drives the connection; each stream gets a task of its own.
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(app_stream(req, respond, events.clone(), triggers.clone()));
            }
        });
    }
}

async fn app_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    events: mpsc::UnboundedSender<(String, Seen)>,
    triggers: Triggers,
) {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("x-stream-id");
    let report = |seen| {
        let _ = events.send((id.clone(), seen));
    };
    match req.uri().path() {
        "/stream" => {
            report(Seen::Headers);
            let early = req.headers().contains_key("x-respond-first");
            let mut sending = if early {
                respond.send_response(Response::new(()), false).ok()
            } else {
                None
            };
            let mut body = req.into_body();
            let mut total = 0;
            loop {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        total += chunk.len();
                        let _ = body.flow_control().release_capacity(chunk.len());
                        report(Seen::Data(chunk.len()));
                    }
                    Some(Err(e)) => {
                        report(Seen::Failed(e));
                        return;
                    }
                    None => break,
                }
            }
            report(Seen::End(total));
            if sending.is_none() {
                sending = respond.send_response(Response::new(()), false).ok();
            }
            if let Some(mut s) = sending {
                let _ = s.send_data(Bytes::from(format!("complete {total}")), true);
            }
        }
        "/truncate" => {
            let reason = if header("x-reset-reason") == "cancel" {
                Reason::CANCEL
            } else {
                Reason::INTERNAL_ERROR
            };
            let trigger = triggers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            let Ok(mut s) = respond.send_response(Response::new(()), false) else {
                return;
            };
            let _ = s.send_data(Bytes::from_static(b"partial"), false);
            // Reset only once the client has the partial body, so it surely crossed the mesh
            // (h2 drops a stream's still-queued frames when it is reset).
            if let Some(trigger) = trigger {
                let _ = tokio::time::timeout(WAIT, trigger).await;
            }
            s.send_reset(reason);
        }
        "/reset-early" => {
            report(Seen::Headers);
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
        _ => {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::NOT_FOUND;
            let _ = respond.send_response(resp, true);
        }
    }
}

/// Awaits `f` for at most [`WAIT`].
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

/// The control plane, the app behind its sidecar, and the caller's sidecar.
struct Mesh {
    client_side: Sidecar,
    _app_side: Sidecar,
    _plane: ControlPlane,
    events: mpsc::UnboundedReceiver<(String, Seen)>,
    /// Events already received for streams other than the one waited for.
    backlog: VecDeque<(String, Seen)>,
    triggers: Triggers,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts it all; the app runs on the returned runtime, where the test's client runs too.
    fn start() -> (Self, tokio::runtime::Runtime) {
        weft_tests::init();
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::start(dir.path(), &[]).unwrap();
        plane.apply_yaml("resetter.yaml", SERVICE).unwrap();

        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let app_port = listener.local_addr().unwrap().port();
        let (tx, events) = mpsc::unbounded_channel();
        let triggers = Triggers::default();
        rt.spawn(serve_app(listener, tx, triggers.clone()));

        let app_side = Sidecar::explicit(
            &plane,
            "resetter-1",
            "resetter",
            "app=resetter",
            Some(app_port),
            &[],
        )
        .unwrap();
        let client_side =
            Sidecar::explicit(&plane, "client", "client", "app=client", None, &[]).unwrap();
        let mut ready = false;
        for _ in 0..200 {
            if client_side
                .config_dump()
                .unwrap()
                .contains("\"workload\": \"default/resetter-1\"")
            {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            ready,
            "the app's endpoint never reached the client's sidecar"
        );
        let mesh = Mesh {
            client_side,
            _app_side: app_side,
            _plane: plane,
            events,
            backlog: VecDeque::new(),
            triggers,
            _dir: dir,
        };
        (mesh, rt)
    }

    /// The app's next event for stream `id` (bounded).
    async fn next(&mut self, id: &str) -> Seen {
        if let Some(i) = self.backlog.iter().position(|(s, _)| s == id)
            && let Some((_, seen)) = self.backlog.remove(i)
        {
            return seen;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (stream, seen) = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("the app saw nothing more of stream {id} within {WAIT:?}")
                })
                .expect("the app stopped");
            if stream == id {
                return seen;
            }
            self.backlog.push_back((stream, seen));
        }
    }

    /// Waits until the app has seen the head of stream `id` and then `len` bytes of its body.
    async fn app_got(&mut self, id: &str, len: usize) {
        let seen = self.next(id).await;
        assert!(matches!(seen, Seen::Headers), "stream {id}: {seen:?}");
        let mut got = 0;
        while got < len {
            match self.next(id).await {
                Seen::Data(n) => got += n,
                other => panic!("stream {id}: after {got} bytes, {other:?}"),
            }
        }
        assert_eq!(got, len, "stream {id}");
    }

    /// Waits until the app has seen the clean end of stream `id`'s body, `total` bytes in all (a
    /// proxy may split or merge DATA frames, so only the bytes count).
    async fn app_got_end(&mut self, id: &str, total: usize) {
        loop {
            match self.next(id).await {
                Seen::Data(_) => {}
                Seen::End(n) => {
                    assert_eq!(n, total, "stream {id}");
                    return;
                }
                other => panic!("stream {id}: {other:?} before the end of its body"),
            }
        }
    }

    /// An HTTP/2 connection to the caller's sidecar (h2c prior knowledge).
    async fn connect(&self) -> SendRequest<Bytes> {
        let tcp = bounded("connect", TcpStream::connect(&self.client_side.outbound))
            .await
            .unwrap();
        let (client, conn) = bounded("h2 handshake", h2::client::handshake(tcp))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

/// Opens a stream on `client`: `method path` with `x-stream-id: id` and `extra` headers.
async fn open(
    client: &mut SendRequest<Bytes>,
    method: Method,
    path: &str,
    id: &str,
    extra: &[(&str, &str)],
    end_of_stream: bool,
) -> (ResponseFuture, SendStream<Bytes>) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{AUTHORITY}{path}"))
        .header("x-stream-id", id);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    *client = bounded("a stream slot", client.clone().ready())
        .await
        .unwrap();
    client
        .send_request(req.body(()).unwrap(), end_of_stream)
        .unwrap()
}

/// Reads a response body to its end: the bytes, or the error that ended it.
async fn read_body(body: &mut RecvStream, got: &mut Vec<u8>) -> Result<(), h2::Error> {
    while let Some(chunk) = bounded("response body", body.data()).await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    Ok(())
}

/// A complete exchange: POST `body` on stream `id`; returns status and response body.
async fn post(
    client: &mut SendRequest<Bytes>,
    id: &str,
    body: &'static [u8],
) -> (StatusCode, String) {
    let (resp, mut send) = open(client, Method::POST, "/stream", id, &[], false).await;
    send.send_data(Bytes::from_static(body), true).unwrap();
    let resp = bounded("response", resp).await.unwrap();
    let status = resp.status();
    let mut got = Vec::new();
    read_body(&mut resp.into_body(), &mut got)
        .await
        .unwrap_or_else(|e| panic!("stream {id}: body failed after {got:?}: {e}"));
    (status, String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn a_client_reset_reaches_the_app_and_other_streams_carry_on() {
    let (mut m, rt) = Mesh::start();
    rt.block_on(async {
        let mut client = m.connect().await;

        // s1 will be cancelled while the app holds it without answering; s2 shares every
        // connection with it (client → sidecar, sidecar → sidecar, sidecar → app).
        let (_r1, mut s1) = open(&mut client, Method::POST, "/stream", "s1", &[], false).await;
        s1.send_data(Bytes::from_static(b"first"), false).unwrap();
        let (r2, mut s2) = open(&mut client, Method::POST, "/stream", "s2", &[], false).await;
        s2.send_data(Bytes::from_static(b"one "), false).unwrap();
        m.app_got("s1", 5).await;
        m.app_got("s2", 4).await;

        s1.send_reset(Reason::CANCEL);
        let seen = m.next("s1").await;
        assert!(
            matches!(&seen, Seen::Failed(e) if e.is_reset() && e.reason() == Some(Reason::CANCEL)),
            "the client cancelled s1 before any response; the app saw {seen:?}, not a CANCEL reset"
        );

        // s2 is untouched: its body goes on and its response comes back whole.
        s2.send_data(Bytes::from_static(b"two"), true).unwrap();
        m.app_got_end("s2", 7).await;
        let resp = bounded("s2 response", r2).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut got = Vec::new();
        read_body(&mut resp.into_body(), &mut got).await.unwrap();
        assert_eq!(got, b"complete 7");

        // s3: a streaming call the app has already answered (response headers sent, as a gRPC
        // bidirectional stream is), cancelled mid-request: the reset must still reach the app.
        let (r3, mut s3) = open(
            &mut client,
            Method::POST,
            "/stream",
            "s3",
            &[("x-respond-first", "1")],
            false,
        )
        .await;
        s3.send_data(Bytes::from_static(b"first"), false).unwrap();
        let resp = bounded("s3 response headers", r3).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        m.app_got("s3", 5).await;
        s3.send_reset(Reason::CANCEL);
        let seen = m.next("s3").await;
        assert!(
            matches!(&seen, Seen::Failed(e) if e.is_reset() && e.reason() == Some(Reason::CANCEL)),
            "the client cancelled s3 after the response headers; the app saw {seen:?}, not a CANCEL reset"
        );

        // And a new stream on the same client connection still works after both resets.
        assert_eq!(
            post(&mut client, "s4", b"after").await,
            (StatusCode::OK, "complete 5".to_owned())
        );
    });
}

#[test]
fn an_app_reset_reaches_the_client_and_never_looks_complete() {
    let (mut m, rt) = Mesh::start();
    rt.block_on(async {
        let mut client = m.connect().await;

        // Headers, part of the body, then a reset: the client must see the reset, with the app's
        // reason (a gRPC client maps INTERNAL_ERROR and CANCEL to different statuses).
        for (id, name, reason) in [
            ("t-internal", "internal", Reason::INTERNAL_ERROR),
            ("t-cancel", "cancel", Reason::CANCEL),
        ] {
            let (trigger, armed) = oneshot::channel();
            m.triggers.lock().unwrap().insert(id.to_owned(), armed);
            let (resp, _) = open(
                &mut client,
                Method::GET,
                "/truncate",
                id,
                &[("x-reset-reason", name)],
                true,
            )
            .await;
            let resp = bounded("response headers", resp).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{id}");
            let mut body = resp.into_body();
            let mut got = Vec::new();
            while got.len() < b"partial".len() {
                match bounded("the partial body", body.data()).await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    other => panic!("{id}: after {got:?}, {other:?}"),
                }
            }
            assert_eq!(got, b"partial", "{id}");
            trigger.send(()).unwrap();
            let end = read_body(&mut body, &mut got).await;
            match end {
                Err(e) => assert!(
                    e.is_reset() && e.reason() == Some(reason),
                    "{id}: the app reset with {reason:?}; the client saw {e} ({:?})",
                    e.reason()
                ),
                Ok(()) => panic!(
                    "{id}: the app reset its response after {:?}, but the client saw a clean end \
                     of body: a truncated response presented as complete",
                    String::from_utf8_lossy(&got)
                ),
            }
        }

        // A reset before any response headers: there is no response to pass on, so the app's
        // sidecar answers for it (`errors::rescue`). weft today: 502 with `x-weft-error`, which
        // reads "connect to 127.0.0.1:<app port> failed: http2 error" (access-log flag UF): it
        // neither names the reset nor was it a connect failure. Envoy answers 503 "upstream
        // connect error or disconnect/reset before headers. reset reason: remote reset" (flag UR).
        let (resp, _) = open(&mut client, Method::GET, "/reset-early", "early", &[], true).await;
        let seen = m.next("early").await;
        assert!(matches!(seen, Seen::Headers), "early: {seen:?}");
        let resp = bounded("the reset-early response", resp)
            .await
            .unwrap_or_else(|e| {
                panic!("a reset before headers reached the client as {e}, not a 5xx")
            });
        let status = resp.status();
        let reason = resp
            .headers()
            .get("x-weft-error")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let mut got = Vec::new();
        read_body(&mut resp.into_body(), &mut got).await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason:?} {text}");
        let reason = reason.unwrap_or_else(|| panic!("a 503 without x-weft-error: {text}"));
        assert!(
            reason.starts_with("upstream reset before response headers: ")
                && reason.contains("stream error received"),
            "{reason}"
        );
        assert_eq!(
            text.trim_end(),
            reason,
            "the body repeats the mesh's reason"
        );

        // The client's connection survived all three resets.
        assert_eq!(
            post(&mut client, "after", b"ok").await,
            (StatusCode::OK, "complete 2".to_owned())
        );
    });
}
