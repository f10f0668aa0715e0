//! A request body that can be sent again, for retries (and any other second copy of a request).
//!
//! [`ReplayBody`] wraps the client's body and keeps every chunk it reads (as `Bytes`: reference
//! counts, no copies) in a log shared with its clones. A clone made by
//! [`ReplayBody::try_clone`] first replays the log, then continues reading the client's body where
//! the previous copy stopped, adding to the log as it goes; trailers are kept and replayed too. So
//! the first try streams as the client sends, and a retry needs no more than what was read.
//!
//! Once more than `max_bytes` has been read, the log is dropped and no copy can be made any more,
//! as Envoy's router does when a request outgrows its buffer limit ("Give up on the retry/shadow"):
//! the copy being read goes on streaming, [`ReplayBody::try_clone`] answers `None`, and a copy made
//! earlier fails with [`ReplayError::Capped`] if polled (check [`ReplayBody::is_capped`] before
//! sending it). A body known from its size hint to be too large is refused at once
//! ([`ReplayBody::try_new`] gives it back).
//!
//! One copy is read at a time: the latest to start being polled owns the client's body, and a copy
//! polled after a newer one started fails with [`ReplayError::Superseded`]. That keeps a previous
//! try that a connection task still drives from stealing data or wake-ups from the current one.
//! The shared state is behind a `std` mutex taken only inside `poll_frame`, `size_hint`,
//! `is_end_stream` and `try_clone`, never across an `.await`.
//!
//! A request without a body (the common case) costs one check: no allocation, no lock.
//!
//! The request path uses it so (a sketch):
//!
//! ```text
//! let mut body = match ReplayBody::try_new(body, DEFAULT_MAX_BYTES) {
//!     Ok(body) => body,
//!     Err(body) => return send_once(body),      // known too large: one try, no retries
//! };
//! loop {
//!     let next = body.try_clone();              // before sending: the try takes `body`
//!     let outcome = send(body).await;
//!     match (tries.next(..), next) {
//!         (Decision::Retry(wait), Some(next)) if !next.is_capped() => {
//!             drop(outcome);                    // the previous try's body goes first
//!             sleep(wait).await;
//!             body = next;
//!         }
//!         _ => return outcome,                  // no retry, or the body outgrew the buffer
//!     }
//! }
//! ```

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use crate::upstream::{Body, BodyError};

/// Bytes of request body kept for a retry: Envoy's default buffer limit (the listener's
/// `per_connection_buffer_limit_bytes`, 1 MiB), which bounds its retry and shadow buffer.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// Why a copy of a request body cannot deliver it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The body outgrew the replay buffer after this copy was made; its start is gone.
    #[error("request body outgrew the retry buffer; this copy cannot be replayed")]
    Capped,
    /// A newer copy started being read; this one was abandoned.
    #[error("a newer copy of this request body is being sent")]
    Superseded,
    /// The client's body failed while an earlier copy read it.
    #[error("the request body failed on an earlier try")]
    Failed,
}

/// A request body that can be cloned for another try (see the module docs).
#[derive(Debug)]
pub struct ReplayBody(Kind);

#[derive(Debug)]
enum Kind {
    /// No body at all: every copy is empty, nothing is shared.
    Empty,
    Shared(Reader),
}

/// One copy's position in the shared log.
#[derive(Debug)]
struct Reader {
    shared: Arc<Mutex<State>>,
    id: u64,
    /// This copy has been polled; if another copy starts after that, this one is superseded.
    started: bool,
    /// Chunks and bytes this copy has yielded.
    chunks: usize,
    bytes: u64,
    trailers_sent: bool,
}

struct State {
    /// The client's body, where reading stopped; `None` once it ended or failed.
    inner: Option<Body>,
    failed: bool,
    /// Every chunk read so far, while not capped.
    log: Vec<Bytes>,
    chunks_read: usize,
    bytes_read: u64,
    max_bytes: u64,
    capped: bool,
    /// The client's trailers, once read (unless capped).
    trailers: Option<HeaderMap>,
    saw_trailers: bool,
    /// The copy allowed to read.
    active: u64,
    next_id: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("chunks_read", &self.chunks_read)
            .field("bytes_read", &self.bytes_read)
            .field("capped", &self.capped)
            .field("failed", &self.failed)
            .field("ended", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

/// The state stays consistent across a panic in the client body's `poll_frame` (nothing is half
/// updated around that call), so a poisoned lock is taken as it is.
fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `max_bytes` of it for copies. `Err` gives the body back when its
    /// size hint already says it is larger than that.
    pub fn try_new(body: Body, max_bytes: usize) -> Result<ReplayBody, Body> {
        if body.is_end_stream() {
            return Ok(ReplayBody(Kind::Empty));
        }
        let max_bytes = u64::try_from(max_bytes).unwrap_or(u64::MAX);
        if body.size_hint().lower() > max_bytes {
            return Err(body);
        }
        let state = State {
            inner: Some(body),
            failed: false,
            log: Vec::new(),
            chunks_read: 0,
            bytes_read: 0,
            max_bytes,
            capped: false,
            trailers: None,
            saw_trailers: false,
            active: 0,
            next_id: 1,
        };
        Ok(ReplayBody(Kind::Shared(Reader {
            shared: Arc::new(Mutex::new(state)),
            id: 0,
            started: false,
            chunks: 0,
            bytes: 0,
            trailers_sent: false,
        })))
    }

    /// A copy that replays what was read and then reads on; `None` once the body outgrew the
    /// buffer or failed (no further try can carry it).
    pub fn try_clone(&self) -> Option<ReplayBody> {
        match &self.0 {
            Kind::Empty => Some(ReplayBody(Kind::Empty)),
            Kind::Shared(reader) => {
                let mut state = lock(&reader.shared);
                if state.capped || state.failed {
                    return None;
                }
                let id = state.next_id;
                state.next_id += 1;
                Some(ReplayBody(Kind::Shared(Reader {
                    shared: Arc::clone(&reader.shared),
                    id,
                    started: false,
                    chunks: 0,
                    bytes: 0,
                    trailers_sent: false,
                })))
            }
        }
    }

    /// The body outgrew the buffer: copies made earlier cannot be sent (polling them fails).
    pub fn is_capped(&self) -> bool {
        match &self.0 {
            Kind::Empty => false,
            Kind::Shared(reader) => lock(&reader.shared).capped,
        }
    }
}

impl Reader {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut guard = lock(&self.shared);
        let state = &mut *guard;
        if state.active != self.id {
            if self.started {
                return Poll::Ready(Some(Err(ReplayError::Superseded.into())));
            }
            state.active = self.id;
        }
        self.started = true;

        if self.chunks < state.chunks_read {
            let Some(chunk) = state.log.get(self.chunks).filter(|_| !state.capped) else {
                return Poll::Ready(Some(Err(ReplayError::Capped.into())));
            };
            self.chunks += 1;
            self.bytes += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }

        if let Some(inner) = state.inner.as_mut() {
            return match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => {
                    state.inner = None;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    state.inner = None;
                    state.failed = true;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = record(state, frame, &mut self.chunks, &mut self.bytes);
                    self.trailers_sent |= frame.is_trailers();
                    Poll::Ready(Some(Ok(frame)))
                }
            };
        }

        if state.failed {
            return Poll::Ready(Some(Err(ReplayError::Failed.into())));
        }
        if !self.trailers_sent && state.saw_trailers {
            self.trailers_sent = true;
            return match &state.trailers {
                Some(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers.clone())))),
                None => Poll::Ready(Some(Err(ReplayError::Capped.into()))),
            };
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.shared);
        if (self.started && state.active != self.id) || self.chunks < state.chunks_read {
            // Still to yield data, or an error.
            return false;
        }
        match &state.inner {
            Some(inner) => inner.is_end_stream(),
            None => !state.failed && (self.trailers_sent || !state.saw_trailers),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let state = lock(&self.shared);
        let logged = state.bytes_read.saturating_sub(self.bytes);
        match &state.inner {
            Some(inner) => {
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(logged.saturating_add(rest.lower()));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(logged.saturating_add(upper));
                }
                hint
            }
            None => SizeHint::with_exact(logged),
        }
    }
}

/// Logs a frame a copy read from the client's body, counting it in that copy's `chunks` and
/// `bytes`.
fn record(
    state: &mut State,
    frame: Frame<Bytes>,
    chunks: &mut usize,
    bytes: &mut u64,
) -> Frame<Bytes> {
    let frame = match frame.into_data() {
        Ok(data) => {
            let len = data.len() as u64;
            state.chunks_read += 1;
            state.bytes_read += len;
            *chunks += 1;
            *bytes += len;
            if !state.capped {
                if state.bytes_read > state.max_bytes {
                    state.capped = true;
                    state.log = Vec::new();
                } else {
                    state.log.push(data.clone());
                }
            }
            return Frame::data(data);
        }
        Err(frame) => frame,
    };
    match frame.into_trailers() {
        Ok(trailers) => {
            // Trailers end a body: nothing more will be read.
            state.inner = None;
            state.saw_trailers = true;
            if !state.capped {
                state.trailers = Some(trailers.clone());
            }
            Frame::trailers(trailers)
        }
        // A kind of frame http-body does not have today: passed on, not replayable.
        Err(frame) => {
            state.capped = true;
            state.log = Vec::new();
            frame
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Shared(reader) => reader.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Shared(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Shared(reader) => reader.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    type Item = Result<Frame<Bytes>, BodyError>;

    /// A body of these frames, with no size hint (as a streamed client body).
    fn frames(items: Vec<Item>) -> Body {
        StreamBody::new(futures_util::stream::iter(items)).boxed()
    }

    fn data(s: &'static str) -> Item {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t
    }

    /// A body fed by the test, chunk by chunk; dropping the sender ends it.
    fn channel() -> (mpsc::UnboundedSender<Item>, Body) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            StreamBody::new(UnboundedReceiverStream::new(rx)).boxed(),
        )
    }

    /// A body with an exact size hint that shrinks as it is read (as a Content-Length body).
    struct Sized(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Sized {
        type Data = Bytes;
        type Error = BodyError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
        }
    }

    fn sized(chunks: &[&'static str]) -> Body {
        Sized(
            chunks
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
        )
        .boxed()
    }

    async fn next_data(body: &mut ReplayBody) -> Bytes {
        body.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    /// Everything a body yields: its data as one string, and its trailers.
    async fn read_all(body: ReplayBody) -> (String, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes();
        (String::from_utf8(bytes.to_vec()).unwrap(), trailers)
    }

    fn error_of(e: BodyError) -> ReplayError {
        *e.downcast::<ReplayError>().unwrap()
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync + Unpin + 'static>() {}
        check::<ReplayBody>();
    }

    #[tokio::test]
    async fn empty_body_costs_nothing_and_replays_empty() {
        let body = ReplayBody::try_new(Empty::<Bytes>::new().map_err(BodyError::from).boxed(), 10)
            .unwrap();
        assert!(matches!(body.0, Kind::Empty));
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        let copy = body.try_clone().unwrap();
        assert!(copy.is_end_stream());
        assert_eq!(read_all(body).await, (String::new(), None));
        assert_eq!(read_all(copy).await, (String::new(), None));
    }

    #[tokio::test]
    async fn a_body_that_turns_out_empty() {
        let body = ReplayBody::try_new(frames(vec![]), 10).unwrap();
        assert!(!body.is_end_stream());
        let copy = body.try_clone().unwrap();
        assert_eq!(read_all(body).await, (String::new(), None));
        assert!(copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
        assert_eq!(read_all(copy).await, (String::new(), None));
    }

    #[tokio::test]
    async fn full_body_and_trailers_replayed_exactly() {
        let body = ReplayBody::try_new(
            frames(vec![
                data("hello "),
                data(""),
                data("wor"),
                data("ld"),
                Ok(Frame::trailers(trailers())),
            ]),
            DEFAULT_MAX_BYTES,
        )
        .unwrap();
        let copy = body.try_clone().unwrap();
        assert_eq!(
            read_all(body).await,
            ("hello world".to_string(), Some(trailers()))
        );
        // The copy yields the same chunks, one by one, then the trailers.
        let again = copy.try_clone().unwrap();
        let mut copy = copy;
        let mut chunks = Vec::new();
        while let Some(frame) = copy.frame().await {
            chunks.push(frame.unwrap());
        }
        assert_eq!(chunks.len(), 5);
        let texts: Vec<_> = chunks[..4]
            .iter()
            .map(|f| f.data_ref().unwrap().clone())
            .collect();
        assert_eq!(texts, ["hello ", "", "wor", "ld"]);
        assert_eq!(chunks[4].trailers_ref(), Some(&trailers()));
        assert!(copy.is_end_stream());
        // And a copy of a copy, made before that was read.
        assert_eq!(
            read_all(again).await,
            ("hello world".to_string(), Some(trailers()))
        );
    }

    #[tokio::test]
    async fn chunks_are_shared_not_copied() {
        let body = ReplayBody::try_new(frames(vec![data("static")]), 100).unwrap();
        let copy = body.try_clone().unwrap();
        let mut body = body;
        let first = next_data(&mut body).await;
        let mut copy = copy;
        let second = next_data(&mut copy).await;
        assert_eq!(first.as_ptr(), second.as_ptr());
    }

    #[tokio::test]
    async fn replay_after_a_partial_read_continues_where_the_first_stopped() {
        let (tx, inner) = channel();
        let mut first = ReplayBody::try_new(inner, 100).unwrap();
        let early = first.try_clone().unwrap();
        tx.send(data("ab")).unwrap();
        tx.send(data("cd")).unwrap();
        assert_eq!(next_data(&mut first).await, "ab");
        assert_eq!(next_data(&mut first).await, "cd");
        // The try fails; its body is dropped while the client is still sending.
        let late = first.try_clone().unwrap();
        drop(first);
        tx.send(data("ef")).unwrap();
        let mut late = late;
        assert_eq!(next_data(&mut late).await, "ab");
        assert_eq!(next_data(&mut late).await, "cd");
        assert_eq!(next_data(&mut late).await, "ef");
        // Nothing more yet: the copy waits on the client.
        assert!(futures_util::poll!(late.frame()).is_pending());
        tx.send(data("gh")).unwrap();
        tx.send(Ok(Frame::trailers(trailers()))).unwrap();
        drop(tx);
        let third = late.try_clone().unwrap();
        assert_eq!(read_all(late).await, ("gh".to_string(), Some(trailers())));
        // Copies made at any point carry the whole body.
        assert_eq!(
            read_all(early).await,
            ("abcdefgh".to_string(), Some(trailers()))
        );
        assert_eq!(
            read_all(third).await,
            ("abcdefgh".to_string(), Some(trailers()))
        );
    }

    #[tokio::test]
    async fn a_copy_made_before_any_read_carries_everything() {
        let original = ReplayBody::try_new(frames(vec![data("x"), data("yz")]), 100).unwrap();
        let copy = original.try_clone().unwrap();
        // The copy is read first; the original is never polled.
        assert_eq!(read_all(copy).await, ("xyz".to_string(), None));
        let another = original.try_clone().unwrap();
        drop(original);
        assert_eq!(read_all(another).await, ("xyz".to_string(), None));
    }

    #[tokio::test]
    async fn over_the_limit_gives_up_on_copies_but_streams_on() {
        let (tx, inner) = channel();
        let mut body = ReplayBody::try_new(inner, 10).unwrap();
        let early = body.try_clone().unwrap();
        tx.send(data("0123456789")).unwrap();
        assert_eq!(next_data(&mut body).await, "0123456789");
        // Exactly the limit is still replayable.
        assert!(!body.is_capped());
        let at_limit = body.try_clone().unwrap();
        tx.send(data("a")).unwrap();
        assert_eq!(next_data(&mut body).await, "a");
        assert!(body.is_capped() && early.is_capped() && at_limit.is_capped());
        assert!(body.try_clone().is_none());
        assert!(early.try_clone().is_none());
        tx.send(data("bcd")).unwrap();
        tx.send(Ok(Frame::trailers(trailers()))).unwrap();
        drop(tx);
        assert_eq!(read_all(body).await, ("bcd".to_string(), Some(trailers())));
        // A copy made before cannot be sent: it fails instead of sending a truncated body.
        let mut early = early;
        assert!(!early.is_end_stream());
        let err = early.frame().await.unwrap().unwrap_err();
        assert_eq!(error_of(err), ReplayError::Capped);
    }

    #[tokio::test]
    async fn a_size_hint_over_the_limit_gives_the_body_back() {
        let body = Full::new(Bytes::from_static(b"0123456789a"))
            .map_err(BodyError::from)
            .boxed();
        let back = ReplayBody::try_new(body, 10).unwrap_err();
        let bytes = back.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "0123456789a");
        // At the limit it is taken.
        let body = Full::new(Bytes::from_static(b"0123456789"))
            .map_err(BodyError::from)
            .boxed();
        assert!(ReplayBody::try_new(body, 10).is_ok());
    }

    #[tokio::test]
    async fn size_hints_of_the_original_and_its_copies() {
        let mut body = ReplayBody::try_new(sized(&["abc", "de", "f"]), 100).unwrap();
        assert_eq!(body.size_hint().exact(), Some(6));
        assert!(!body.is_end_stream());
        assert_eq!(next_data(&mut body).await, "abc");
        assert_eq!(body.size_hint().exact(), Some(3));
        let mut copy = body.try_clone().unwrap();
        assert_eq!(copy.size_hint().exact(), Some(6));
        drop(body);
        assert_eq!(next_data(&mut copy).await, "abc");
        assert_eq!(copy.size_hint().exact(), Some(3));
        assert_eq!(next_data(&mut copy).await, "de");
        assert_eq!(next_data(&mut copy).await, "f");
        // The client's body says it is done without another poll.
        assert!(copy.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(0));
        let last = copy.try_clone().unwrap();
        assert_eq!(last.size_hint().exact(), Some(6));
        assert!(!last.is_end_stream());

        // A streamed body: no upper bound until it has ended.
        let (tx, inner) = channel();
        let mut body = ReplayBody::try_new(inner, 100).unwrap();
        assert_eq!(body.size_hint().upper(), None);
        tx.send(data("1234")).unwrap();
        assert_eq!(next_data(&mut body).await, "1234");
        let copy = body.try_clone().unwrap();
        assert_eq!(copy.size_hint().lower(), 4);
        assert_eq!(copy.size_hint().upper(), None);
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(4));
    }

    #[tokio::test]
    async fn trailers_only_body() {
        let body = ReplayBody::try_new(frames(vec![Ok(Frame::trailers(trailers()))]), 0).unwrap();
        let copy = body.try_clone().unwrap();
        assert_eq!(read_all(body).await, (String::new(), Some(trailers())));
        assert!(!copy.is_end_stream());
        assert_eq!(read_all(copy).await, (String::new(), Some(trailers())));
    }

    #[tokio::test]
    async fn an_older_copy_polled_after_a_newer_one_started_fails() {
        let (tx, inner) = channel();
        let mut first = ReplayBody::try_new(inner, 100).unwrap();
        tx.send(data("a")).unwrap();
        assert_eq!(next_data(&mut first).await, "a");
        let mut second = first.try_clone().unwrap();
        assert_eq!(next_data(&mut second).await, "a");
        // The first try's connection still polls its body: it must not take the client's data.
        tx.send(data("b")).unwrap();
        assert!(!first.is_end_stream());
        let err = first.frame().await.unwrap().unwrap_err();
        assert_eq!(error_of(err), ReplayError::Superseded);
        assert_eq!(next_data(&mut second).await, "b");
    }

    #[tokio::test]
    async fn a_failed_client_body_is_not_replayed() {
        let body = ReplayBody::try_new(
            frames(vec![data("a"), Err(BodyError::from("client went away"))]),
            100,
        )
        .unwrap();
        let early = body.try_clone().unwrap();
        let mut body = body;
        assert_eq!(next_data(&mut body).await, "a");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "client went away");
        assert!(body.try_clone().is_none());
        let mut early = early;
        assert_eq!(next_data(&mut early).await, "a");
        assert!(!early.is_end_stream());
        let err = early.frame().await.unwrap().unwrap_err();
        assert_eq!(error_of(err), ReplayError::Failed);
    }

    #[tokio::test]
    async fn copies_are_read_from_other_tasks() {
        let (tx, inner) = channel();
        let body = ReplayBody::try_new(inner, 100).unwrap();
        let copy = body.try_clone().unwrap();
        let reader = tokio::spawn(read_all(body));
        for chunk in ["p", "q", "r"] {
            tx.send(data(chunk)).unwrap();
            tokio::task::yield_now().await;
        }
        drop(tx);
        assert_eq!(reader.await.unwrap(), ("pqr".to_string(), None));
        let copy = tokio::spawn(read_all(copy)).await.unwrap();
        assert_eq!(copy, ("pqr".to_string(), None));
    }
}
