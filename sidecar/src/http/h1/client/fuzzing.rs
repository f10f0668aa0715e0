//! The response head parser and the chunked decoder, reachable without a connection for fuzzing
//! (`crate::fuzzing`).

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, Version};

use super::{Chunk, Declared, Decoded, decode_chunked, parse_head};

/// A parsed response head and what it says about framing.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The version.
    pub version: Version,
    /// The headers.
    pub headers: HeaderMap,
    /// What followed the head.
    pub rest: Bytes,
    /// The framing headers read (`Err`: the exchange fails with this message).
    pub declared: Result<DeclaredFraming, String>,
}

/// [`Declared`], readable from outside.
#[derive(Debug)]
pub struct DeclaredFraming {
    /// `Connection: close`.
    pub close: bool,
    /// A Transfer-Encoding, and whether it ends in `chunked`.
    pub chunked: Option<bool>,
    /// The Content-Length.
    pub length: Option<u64>,
}

/// Parses a response head from `data`: `Ok(None)` while incomplete, with the buffer as it was left.
pub fn parse(data: &[u8]) -> (Result<Option<ResponseHead>, String>, Bytes) {
    let mut buf = BytesMut::from(data);
    let parsed = parse_head(&mut buf).map_err(|e| e.to_string()).map(|head| {
        head.map(|(head, rest)| ResponseHead {
            declared: Declared::of(&head.headers)
                .map(|d| DeclaredFraming {
                    close: d.close,
                    chunked: d.chunked,
                    length: d.length,
                })
                .map_err(|e| e.to_string()),
            status: head.status,
            version: head.version,
            headers: head.headers,
            rest,
        })
    });
    (parsed, buf.freeze())
}

/// The end of a chunked body fed to the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkedEnd {
    /// The body ended, with these trailers; these bytes (of every piece) followed it.
    Complete(Option<HeaderMap>, Bytes),
    /// The input ended first.
    Cut,
    /// The decoder refused the input.
    Invalid,
}

/// Decodes `pieces` as a chunked body arriving in those reads: the data, and how it ended.
pub fn dechunk<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, ChunkedEnd) {
    let mut buf = BytesMut::new();
    let mut at = Chunk::Size;
    let mut data = Vec::new();
    let mut pieces = pieces.into_iter();
    while let Some(piece) = pieces.next() {
        buf.extend_from_slice(piece);
        loop {
            match decode_chunked(&mut buf, at) {
                Ok(Decoded::Data(d, next)) => {
                    data.extend_from_slice(&d);
                    at = next;
                }
                Ok(Decoded::End(trailers)) => {
                    for after in pieces.by_ref() {
                        buf.extend_from_slice(after);
                    }
                    return (data, ChunkedEnd::Complete(trailers, buf.freeze()));
                }
                Ok(Decoded::More(next)) => {
                    at = next;
                    break;
                }
                Err(_) => return (data, ChunkedEnd::Invalid),
            }
        }
    }
    (data, ChunkedEnd::Cut)
}
