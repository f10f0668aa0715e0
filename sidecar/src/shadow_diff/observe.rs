//! What is kept of one answer (the primary's or the copy's): an [`Observation`], built by an
//! [`Observer`] that sees the head once and the body chunk by chunk as it streams, never the whole
//! body at once.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::header;
use serde_json::Value;

use crate::route::compare::{Compare, JsonPath, Step};

/// A JSON body is kept (to name the paths that differ and to remove ignored ones) while it is at
/// most this long; a longer one is compared by its hash alone and a difference is reported as `$`.
/// With [`super::MAX_PENDING`] comparisons in flight, two kept prefixes each, this bounds what
/// shadow-diff holds at 1024 × 2 × 64 KiB = 128 MiB in the worst case (every pending comparison a
/// JSON body just under the bound); the usual case is a few KiB per comparison.
pub const JSON_PREFIX_MAX: usize = 64 * 1024;

/// Response headers never compared, besides the ones pilot sends in `ignore_headers`: framing and
/// hop-by-hop headers describe one connection (the copy's hop and the primary's differ in
/// HTTP version and chunking), not the application's answer.
const FRAMING: [HeaderName; 8] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// A 64-bit streaming hash whose value does not depend on how the bytes were split into chunks
/// (the copy's body and the primary's arrive in different frames). Not cryptographic: two
/// different bodies hashing equal (odds 2^-64 for bodies nobody crafted) would read as a match.
#[derive(Debug, Clone)]
pub struct StreamHash {
    state: u64,
    carry: [u8; 8],
    carried: usize,
    len: u64,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for StreamHash {
    fn default() -> Self {
        Self {
            state: 0x243F_6A88_85A3_08D3,
            carry: [0; 8],
            carried: 0,
            len: 0,
        }
    }
}

impl StreamHash {
    fn word(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(K).rotate_left(29);
    }

    /// Adds bytes.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.carried > 0 {
            let take = (8 - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            if self.carried < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.carry));
            self.carried = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let tail = words.remainder();
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carried = tail.len();
    }

    /// The hash of everything written.
    pub fn finish(&self) -> u64 {
        let mut h = self.clone();
        let mut last = [0u8; 8];
        last[..h.carried].copy_from_slice(&h.carry[..h.carried]);
        h.word(u64::from_le_bytes(last));
        h.word(h.len);
        let mut x = h.state;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    /// The hash of one byte string.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut h = Self::default();
        h.write(bytes);
        h.finish()
    }
}

/// One answer, as far as shadow-diff compares it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// HTTP status.
    pub status: u16,
    /// The compared headers (every response header but the ignored and framing ones), sorted by
    /// name, each with the hash of its values in order. Empty when headers are not compared.
    pub headers: Vec<(HeaderName, u64)>,
    /// The hash of the whole body as it streamed.
    pub body_hash: u64,
    /// Body length.
    pub body_len: u64,
    /// A JSON body within [`JSON_PREFIX_MAX`], parsed, with the ignored paths removed.
    pub json: Option<Arc<Value>>,
    /// The hash of `json` (canonical: serde_json's maps are sorted).
    pub json_hash: Option<u64>,
    /// From the request's start to the body's last byte.
    pub latency: Duration,
}

impl Observation {
    /// The body's hash as compared: the JSON one (ignored paths removed) when the body was kept,
    /// else the raw one.
    pub fn compared_body_hash(&self) -> u64 {
        self.json_hash.unwrap_or(self.body_hash)
    }
}

/// Builds an [`Observation`] from a head and the body chunks as they pass.
#[derive(Debug)]
pub struct Observer {
    spec: Arc<Compare>,
    status: u16,
    headers: Vec<(HeaderName, u64)>,
    hash: StreamHash,
    /// The JSON body so far, while it is JSON, compared, and within the bound.
    prefix: Option<Vec<u8>>,
}

/// Whether a content type is JSON (`application/json`, `application/*+json`, with parameters).
fn is_json(headers: &http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

impl Observer {
    /// Starts observing an answer whose head is `status` and `headers`.
    pub fn new(spec: Arc<Compare>, status: http::StatusCode, headers: &http::HeaderMap) -> Self {
        let mut kept = Vec::new();
        if spec.headers {
            for name in headers.keys() {
                if FRAMING.contains(name) || spec.ignore_headers.contains(name) {
                    continue;
                }
                let mut h = StreamHash::default();
                for v in headers.get_all(name) {
                    h.write(v.as_bytes());
                    h.write(b"\n");
                }
                kept.push((name.clone(), h.finish()));
            }
            kept.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let prefix =
            (spec.body && is_json(headers) && declared.is_none_or(|n| n <= JSON_PREFIX_MAX))
                .then(|| Vec::with_capacity(declared.unwrap_or(0)));
        Self {
            spec,
            status: status.as_u16(),
            headers: kept,
            hash: StreamHash::default(),
            prefix,
        }
    }

    /// One body chunk.
    pub fn data(&mut self, bytes: &[u8]) {
        self.hash.write(bytes);
        if let Some(p) = &mut self.prefix {
            if p.len() + bytes.len() > JSON_PREFIX_MAX {
                // Over the bound: from here on the body is compared by its hash alone.
                self.prefix = None;
            } else {
                p.extend_from_slice(bytes);
            }
        }
    }

    /// The observation, once the body has ended `latency` after the request started.
    pub fn finish(self, latency: Duration) -> Observation {
        let json = self
            .prefix
            .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
            .map(|mut v| {
                for path in &self.spec.ignore_json {
                    remove(&mut v, path);
                }
                v
            });
        let json_hash = json
            .as_ref()
            .map(|v| StreamHash::of(&serde_json::to_vec(v).unwrap_or_default()));
        Observation {
            status: self.status,
            headers: self.headers,
            body_hash: self.hash.finish(),
            body_len: self.hash.len,
            json: json.map(Arc::new),
            json_hash,
            latency,
        }
    }
}

/// Removes the value at `path` from `v`, if there is one. An ignored array element is replaced by
/// `null` rather than removed, so the elements after it keep their indices.
pub fn remove(v: &mut Value, path: &JsonPath) {
    let Some((last, parents)) = path.0.split_last() else {
        return;
    };
    let mut at = v;
    for step in parents {
        let next = match (step, at) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k),
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => at = n,
            None => return,
        }
    }
    match (last, at) {
        (Step::Key(k), Value::Object(m)) => {
            m.remove(k);
        }
        (Step::Index(i), Value::Array(a)) => {
            if let Some(e) = a.get_mut(*i) {
                *e = Value::Null;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ignore_headers: &[&str], ignore_json: &[&str]) -> Arc<Compare> {
        Arc::new(Compare {
            status: true,
            headers: true,
            body: true,
            ignore_headers: ignore_headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
                .collect(),
            ignore_json: ignore_json
                .iter()
                .map(|p| JsonPath::parse(p).unwrap())
                .collect(),
        })
    }

    fn head(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_hash_does_not_depend_on_chunking() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = StreamHash::of(&body);
        for split in [1, 3, 7, 8, 9, 64, 999] {
            let mut h = StreamHash::default();
            for c in body.chunks(split) {
                h.write(c);
            }
            assert_eq!(h.finish(), whole, "chunks of {split}");
        }
        assert_ne!(StreamHash::of(b"ab"), StreamHash::of(b"ab\0"));
        assert_ne!(StreamHash::of(b""), StreamHash::of(b"\0"));
        assert_ne!(StreamHash::of(b"abc"), StreamHash::of(b"abd"));
    }

    #[test]
    fn ignored_and_framing_headers_are_not_kept() {
        let h = head(&[
            ("date", "x"),
            ("content-length", "2"),
            ("connection", "keep-alive"),
            ("x-b", "1"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        let o =
            Observer::new(spec(&["date"], &[]), http::StatusCode::OK, &h).finish(Duration::ZERO);
        let names: Vec<&str> = o.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-a", "x-b"]);
        // Both values of a repeated header count, in order.
        let swapped = head(&[("x-a", "2"), ("x-a", "1"), ("x-b", "1")]);
        let o2 =
            Observer::new(spec(&[], &[]), http::StatusCode::OK, &swapped).finish(Duration::ZERO);
        assert_ne!(o.headers[0].1, o2.headers[0].1);
        assert_eq!(o.headers[1], o2.headers[1]);
    }

    #[test]
    fn a_json_body_is_kept_without_its_ignored_paths() {
        let h = head(&[("content-type", "application/json; charset=utf-8")]);
        let mut a = Observer::new(spec(&[], &["$.id", "$.list[0]"]), http::StatusCode::OK, &h);
        a.data(br#"{"id": 1, "list": [5, 6], "#);
        a.data(br#""keep": true}"#);
        let a = a.finish(Duration::ZERO);
        assert_eq!(
            a.json.as_deref(),
            Some(&serde_json::json!({"list": [null, 6], "keep": true}))
        );
        let mut b = Observer::new(spec(&[], &["$.id", "$.list[0]"]), http::StatusCode::OK, &h);
        b.data(br#"{"keep":true,"id":2,"list":[7,6]}"#);
        let b = b.finish(Duration::ZERO);
        assert_eq!(a.compared_body_hash(), b.compared_body_hash());
        assert_ne!(a.body_hash, b.body_hash);
    }

    #[test]
    fn a_body_over_the_bound_is_hashed_only() {
        let h = head(&[("content-type", "application/json")]);
        let mut o = Observer::new(spec(&[], &[]), http::StatusCode::OK, &h);
        let chunk = vec![b' '; 16 * 1024];
        for _ in 0..5 {
            o.data(&chunk);
        }
        assert!(
            o.prefix.is_none(),
            "the prefix is dropped once over the bound"
        );
        let o = o.finish(Duration::ZERO);
        assert!(o.json.is_none());
        assert_eq!(o.body_len, 80 * 1024);
        // Declared too long up front: never kept at all.
        let big = head(&[
            ("content-type", "application/json"),
            ("content-length", "70000"),
        ]);
        assert!(
            Observer::new(spec(&[], &[]), http::StatusCode::OK, &big)
                .prefix
                .is_none()
        );
        // Not JSON: never kept.
        let text = head(&[("content-type", "text/plain")]);
        assert!(
            Observer::new(spec(&[], &[]), http::StatusCode::OK, &text)
                .prefix
                .is_none()
        );
        assert!(is_json(&head(&[(
            "content-type",
            "application/problem+json"
        )])));
    }
}
