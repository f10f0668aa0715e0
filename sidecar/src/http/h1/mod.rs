//! HTTP/1.1 between the sidecar and its own pod's app, without hyper on the common path.
//!
//! Both ends of the pair talk HTTP/1.1 to an app on loopback: the client side serves the app's
//! requests ([`server`]), the server side sends them on to its app ([`client`]). hyper's per-connection
//! task, with a channel and a oneshot per request, cost more there than parsing did (callgrind,
//! `bench/callgrind-pair.sh`). These modules do the everyday exchange (a request without a body, any
//! response) in the request's own task, and leave everything else to hyper: uploads, upgrades,
//! `CONNECT`, `Expect`, HTTP/2 and any head they do not take.

pub mod client;
pub mod framing;
pub mod server;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The most a message head (or a chunked body's trailers) may take: the sidecar's header limit.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most headers a head may have (hyper's limit).
pub const MAX_HEADERS: usize = 100;
/// Idle connections to the app kept beyond this are closed.
pub const MAX_POOLED: usize = 1024;

/// The parsed headers of a head in `data`, their values sharing its bytes.
fn header_map(parsed: &[httparse::Header<'_>], data: &Bytes) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(data.slice_ref(h.value))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}
