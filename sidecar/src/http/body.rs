//! The body type every stage of the proxy moves: streamed, boxed once per request.

use bytes::Bytes;
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
