//! The request head parser's view for fuzzing (`crate::fuzzing`): what it decided, and the buffer
//! it left.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Uri, Version};

use super::{Head, Parsed, parse_request};

/// A head taken here, as the handler would see it.
#[derive(Debug)]
pub struct TakenHead {
    /// The method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The headers, in order.
    pub headers: HeaderMap,
    /// The connection can carry another request.
    pub keep_alive: bool,
    /// The caller sent `TE: trailers`.
    pub trailers: bool,
}

/// What [`parse_request`] decided about a buffer.
#[derive(Debug)]
pub enum Decision {
    /// Taken here.
    Taken(TakenHead),
    /// More bytes needed.
    Partial,
    /// Handed to hyper.
    Other,
    /// Refused with 400, for this reason.
    Refused(&'static str),
}

/// Parses `data` as the server's read buffer; returns the decision and the buffer as it was left.
pub fn parse(data: &[u8]) -> (Decision, Bytes) {
    let mut buf = BytesMut::from(data);
    let decision = match parse_request(&mut buf) {
        Parsed::Taken(Head {
            request,
            keep_alive,
            trailers,
        }) => {
            let (parts, _) = request.into_parts();
            Decision::Taken(TakenHead {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                keep_alive,
                trailers,
            })
        }
        Parsed::Partial => Decision::Partial,
        Parsed::Other => Decision::Other,
        Parsed::Refused(reason) => Decision::Refused(reason),
    };
    (decision, buf.freeze())
}
