//! Header hygiene at the proxy's edges: hop-by-hop headers, ambiguous framing, spoofed mesh headers.

/// Header carrying the mesh's reason for a failure it generated.
pub const ERROR_HEADER: &str = "x-weft-error";

/// The headers whose value is new on every request that the hop between sidecars carries (`b3`,
/// `x-request-id`).
pub const MESH_IDS: [HeaderName; 2] = [
    HeaderName::from_static("b3"),
    HeaderName::from_static("x-request-id"),
];

/// Set on a local answer to a request refused by a circuit breaker (Envoy's header).
pub const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1); HTTP/2 forbids
/// them outright, so leaving one in would break the h1 → h2 hop between sidecars.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Which of the always-hop-by-hop names (bit `i` for `HOP_BY_HOP[i]`, then `keep-alive`,
/// `proxy-connection` and `te`) a head carries.
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    let mut mask = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            mask |= 1 << i;
        } else if *name == KEEP_ALIVE {
            mask |= 1 << HOP_BY_HOP.len();
        } else if *name == PROXY_CONNECTION {
            mask |= 1 << (HOP_BY_HOP.len() + 1);
        } else if *name == header::TE {
            mask |= 1 << (HOP_BY_HOP.len() + 2);
        }
    }
    mask
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (comparisons, no hashing) finds which are present; only those are
    // removed, each a hash lookup. Nearly every request has none, and a typical app response only
    // `Connection: keep-alive`.
    let mask = hop_by_hop_present(headers);
    if mask == 0 {
        return;
    }
    let te = HOP_BY_HOP.len() + 2;
    // Names listed in Connection are hop-by-hop too; collect first (they borrow `headers`).
    let listed: Vec<HeaderName> = if mask & 1 != 0 {
        headers
            .get_all(header::CONNECTION)
            .iter()
            // As bytes: one non-ASCII token must not hide the names listed beside it.
            .flat_map(|v| tokens(v.as_bytes()))
            .filter_map(|n| HeaderName::from_bytes(n).ok())
            // Those handled below by the mask (`keep-alive` is the usual one) cost no lookup.
            .filter(|n| !HOP_BY_HOP.contains(n) && *n != KEEP_ALIVE && *n != PROXY_CONNECTION)
            .collect()
    } else {
        Vec::new()
    };
    for name in listed {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if mask & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if mask & (1 << HOP_BY_HOP.len()) != 0 {
        headers.remove(KEEP_ALIVE);
    }
    if mask & (1 << (HOP_BY_HOP.len() + 1)) != 0 {
        headers.remove(PROXY_CONNECTION);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it end to end.
    // Every value is checked: a second `te` line after `te: trailers` is forwarded too.
    if mask & (1 << te) != 0
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Removes the mesh's own request headers (`x-envoy-*`, which Envoy-based peers read, and
/// `x-weft-*`) from a request that entered from outside the mesh: only a mesh peer may send them.
pub fn strip_mesh_internal(headers: &mut HeaderMap) {
    let internal = |n: &HeaderName| {
        let n = n.as_str();
        n.starts_with("x-envoy-") || n.starts_with("x-weft-")
    };
    if !headers.keys().any(internal) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| internal(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The `Content-Length` a message declared, if it declared a valid one.
pub fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| length_value(v.as_bytes()))
}

/// A `Content-Length` value: digits only (no sign, no spaces), at most 19 of them.
pub fn length_value(v: &[u8]) -> Option<u64> {
    (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
        .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated tokens of a header value (`Connection`, `TE`, `Transfer-Encoding`), trimmed.
pub fn tokens(v: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Refuses framing that two HTTP parsers could read differently (request smuggling): both
/// Content-Length and Transfer-Encoding, or several Content-Length values. hyper already refuses
/// malformed values such as `Content-Length: +5` and NUL bytes before we see the request.
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    // One pass over the entries (a `HeaderMap` iterates each value with its name) instead of three
    // hash lookups: this runs on every request.
    let (mut cl, mut te, mut host) = (0, false, 0);
    for name in headers.iter().map(|(name, _)| name) {
        if *name == header::CONTENT_LENGTH {
            cl += 1;
        } else if *name == header::TRANSFER_ENCODING {
            te = true;
        } else if *name == header::HOST {
            host += 1;
        }
    }
    if cl > 0 && te {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if cl > 1 {
        return Err("several Content-Length headers");
    }
    if host > 1 {
        return Err("several Host headers");
    }
    Ok(())
}

/// A minimal `400` written straight to a connection hyper never saw.
pub fn bad_request_bytes(reason: &str) -> Vec<u8> {
    let body = format!("bad request: {reason}\n");
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}: bad request: {reason}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        ERROR_HEADER,
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_raw_400_names_its_reason_and_closes() {
        let bytes = String::from_utf8(bad_request_bytes("x")).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 400 "), "{bytes}");
        assert!(bytes.contains("connection: close\r\n"), "{bytes}");
        assert!(bytes.ends_with("bad request: x\n"), "{bytes}");
    }

    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        h.insert("x-b3-traceid", "abc".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-b3-traceid"));
        let mut g = HeaderMap::new();
        g.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut g);
        assert_eq!(g[header::TE], "trailers", "gRPC's te: trailers passes");
        // A second `te` line must not ride on the first one's pass (caught by the `framing` fuzz
        // target: HTTP/2 refuses any `te` but `trailers`).
        g.append(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut g);
        assert!(!g.contains_key(header::TE), "{g:?}");
        // Each hop-by-hop name alone takes the slow path; a clean head is left as it was.
        for name in [
            "proxy-connection",
            "keep-alive",
            "upgrade",
            "transfer-encoding",
        ] {
            let mut one = HeaderMap::new();
            one.insert(HeaderName::from_static(name), "x".parse().unwrap());
            one.insert("x-kept", "1".parse().unwrap());
            strip_hop_by_hop(&mut one);
            assert_eq!(one.len(), 1, "{name} must go");
        }
        // `Connection: te` makes even `te: trailers` hop-by-hop; a listed standard name goes too.
        let mut listed = HeaderMap::new();
        listed.insert(header::CONNECTION, "te, accept-language".parse().unwrap());
        listed.insert(header::TE, "trailers".parse().unwrap());
        listed.insert(header::ACCEPT_LANGUAGE, "en".parse().unwrap());
        listed.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut listed);
        assert_eq!(listed.len(), 1, "{listed:?}");
        // A non-ASCII token beside the listed names (caught by the `framing` fuzz target's
        // invariant: the whole value was skipped and `x-internal` forwarded).
        let mut obs = HeaderMap::new();
        obs.insert(
            header::CONNECTION,
            http::HeaderValue::from_bytes(b"x-internal, caf\xe9").unwrap(),
        );
        obs.insert("x-internal", "secret".parse().unwrap());
        obs.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut obs);
        assert_eq!(obs.len(), 1, "{obs:?}");
        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, "h".parse().unwrap());
        clean.append("x-multi", "1".parse().unwrap());
        clean.append("x-multi", "2".parse().unwrap());
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 3);
    }

    #[test]
    fn strips_the_mesh_internal_headers_only() {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        h.insert("x-envoy-upstream-rq-timeout-ms", "1".parse().unwrap());
        h.insert("x-weft-app-protocol", "h2".parse().unwrap());
        h.insert("x-request-id", "r".parse().unwrap());
        h.insert("x-envoyish", "kept".parse().unwrap());
        strip_mesh_internal(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-envoyish", "x-request-id"]);
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        assert!(check_framing(&h).is_ok());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.append(header::CONTENT_LENGTH, "6".parse().unwrap());
        assert!(check_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::HOST, "a".parse().unwrap());
        h.append(header::HOST, "b".parse().unwrap());
        assert!(check_framing(&h).is_err());
    }
}
