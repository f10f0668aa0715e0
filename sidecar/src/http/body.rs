//! The body type every stage of the proxy moves: streamed, boxed once per request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// Why a body stopped early (a hyper or h2 error; the reason of an HTTP/2 reset stays findable in
/// its source chain, see [`crate::http::peer::h2_reason`]).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the proxy moves around.
pub type Body = BoxBody<Bytes, BodyError>;

/// A hyper body (a request from a client, a response from an app) as a [`Body`].
pub fn boxed(body: hyper::body::Incoming) -> Body {
    body.map_err(BodyError::from).boxed()
}

/// An empty body (redirects, local answers).
pub fn empty_body() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// What a [`Watched`] body tells its watcher as its frames pass through unchanged (a mirror's
/// copy of the request body, shadow-diff's hash of the answer, a gRPC call's trailers).
pub trait Watch {
    /// `frame` is on its way to the reader; `ended` says the body has ended with it (hyper stops
    /// polling a body that says so, without asking for the final `None`).
    fn frame(&mut self, frame: &Frame<Bytes>, ended: bool);
    /// The body ended without another frame.
    fn end(&mut self);
    /// The body failed.
    fn failed(&mut self);
}

/// A body passed through unchanged, its frames shown to `W` on the way.
pub struct Watched<W> {
    inner: Body,
    /// The watcher.
    pub watch: W,
}

impl<W> Watched<W> {
    /// Watches `inner` with `watch`.
    pub fn new(inner: Body, watch: W) -> Self {
        Self { inner, watch }
    }
}

impl<W: Watch + Unpin> HttpBody for Watched<W> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let ended = this.inner.is_end_stream();
                this.watch.frame(frame, ended);
            }
            Poll::Ready(None) => this.watch.end(),
            Poll::Ready(Some(Err(_))) => this.watch.failed(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the watcher was told, in order.
    #[derive(Default)]
    struct Log(Vec<String>);

    impl Watch for Log {
        fn frame(&mut self, frame: &Frame<Bytes>, ended: bool) {
            let what = match frame.data_ref() {
                Some(d) => format!("data {}", String::from_utf8_lossy(d)),
                None => "trailers".to_owned(),
            };
            self.0.push(format!("{what} ended={ended}"));
        }
        fn end(&mut self) {
            self.0.push("end".into());
        }
        fn failed(&mut self) {
            self.0.push("failed".into());
        }
    }

    fn streamed(frames: Vec<Result<Frame<Bytes>, BodyError>>) -> Body {
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn drain(mut body: Watched<Log>) -> (Vec<Bytes>, Vec<String>) {
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => data.extend(f.into_data().ok()),
                Err(_) => break,
            }
        }
        (data, std::mem::take(&mut body.watch.0))
    }

    #[tokio::test]
    async fn a_watched_body_passes_every_frame_and_reports_each_then_the_end() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let body = streamed(vec![
            Ok(Frame::data(Bytes::from("a"))),
            Ok(Frame::data(Bytes::from("b"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let (data, log) = drain(Watched::new(body, Log::default())).await;
        assert_eq!(data, [Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(
            log,
            [
                "data a ended=false",
                "data b ended=false",
                "trailers ended=false",
                "end"
            ]
        );

        // A body that knows its length says it has ended with its last frame.
        let (_, log) = drain(Watched::new(
            Full::new(Bytes::from("xyz"))
                .map_err(|never| match never {})
                .boxed(),
            Log::default(),
        ))
        .await;
        assert_eq!(log[0], "data xyz ended=true");

        let failing = streamed(vec![Ok(Frame::data(Bytes::from("a"))), Err("reset".into())]);
        let (data, log) = drain(Watched::new(failing, Log::default())).await;
        assert_eq!(data, [Bytes::from("a")]);
        assert_eq!(log, ["data a ended=false", "failed"]);
    }
}
