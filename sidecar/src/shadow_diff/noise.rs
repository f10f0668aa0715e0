//! Noise: what differs between two answers of the *primary* to requests of the same shape is not
//! something the mirror got wrong (a timestamp, a generated id, a trace id echoed back). Pure.
//!
//! Learning (Diffy's primary-to-primary method, with the previous primary standing in for Diffy's
//! second primary so that no extra request is sent): per route and request shape (method + path
//! template) the previous primary's observation is kept; when the next primary of that shape
//! answers with the *same status*, every compared header and every JSON path whose value differs
//! between the two primaries becomes noisy for the whole route, and a body that is not JSON (or
//! too long to keep) and differs becomes noisy as a whole for that shape only (a route's other
//! paths keep having their bodies compared). Noise is only ever learned, never forgotten, and is
//! bounded: at most [`MAX_NOISY`] headers and as many JSON paths per route.

use std::collections::BTreeSet;

use super::compare::{differing_headers, differing_paths};
use super::observe::Observation;
use crate::route::compare::JsonPath;

/// Noisy headers (and as many JSON paths) remembered per route; later ones are not learned.
pub const MAX_NOISY: usize = 64;

/// The noisy fields of one route (and, for the whole body, of the shape being compared).
#[derive(Debug, Default, Clone)]
pub struct Noise {
    /// Header names.
    pub headers: BTreeSet<String>,
    /// JSON paths; a path is noisy when it or one of its ancestors is listed.
    pub json: BTreeSet<JsonPath>,
    /// Whether the whole body (`$`) of the shape being compared is noisy.
    pub whole_body: bool,
}

/// What one learning step found, for tests and logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// Headers newly noisy.
    pub headers: Vec<String>,
    /// JSON paths newly noisy.
    pub json: Vec<String>,
    /// Whether the whole body became noisy.
    pub whole_body: bool,
}

impl Noise {
    /// Whether a header's difference is noise.
    pub fn header_is_noisy(&self, name: &str) -> bool {
        self.headers.contains(name)
    }

    /// Whether a JSON path's difference is noise.
    pub fn path_is_noisy(&self, path: &JsonPath) -> bool {
        if path.0.is_empty() {
            return self.whole_body;
        }
        (1..=path.0.len()).any(|n| self.json.contains(&JsonPath(path.0[..n].to_vec())))
    }

    /// Learns from two primaries of the same shape (`prev` answered before `cur`). Returns what
    /// became noisy; the caller keeps `whole_body` per shape.
    pub fn learn(&mut self, prev: &Observation, cur: &Observation) -> Learned {
        let mut learned = Learned::default();
        if prev.status != cur.status {
            // Another status is another kind of answer, not the same answer with noise in it.
            return learned;
        }
        for h in differing_headers(prev, cur) {
            if self.headers.len() < MAX_NOISY && self.headers.insert(h.clone()) {
                learned.headers.push(h);
            }
        }
        for p in differing_paths(prev, cur) {
            if p.0.is_empty() {
                learned.whole_body = !self.whole_body;
                self.whole_body = true;
            } else if self.json.len() < MAX_NOISY
                && !self.path_is_noisy(&p)
                && self.json.insert(p.clone())
            {
                learned.json.push(p.to_string());
            }
        }
        learned
    }
}

/// A request path's template: the query dropped, and each segment that looks like an identifier
/// (a UUID, 16 or more hex digits, 4 or more decimal digits) replaced by `{id}`, so that
/// `/orders/12345` and `/orders/67890` are one shape and `/status/500` stays itself.
pub fn template(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn is_id(seg: &str) -> bool {
    let b = seg.as_bytes();
    let hex = |s: &[u8]| s.iter().all(u8::is_ascii_hexdigit);
    let uuid = b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.split(|c| *c == b'-').all(hex);
    uuid || (b.len() >= 16 && hex(b)) || (b.len() >= 4 && b.iter().all(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::compare::Compare;
    use crate::shadow_diff::observe::Observer;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn identifiers_become_id_and_the_rest_stays() {
        for (path, want) in [
            ("/status/500", "/status/500"),
            ("/orders/12345/items", "/orders/{id}/items"),
            ("/u/123e4567-e89b-12d3-a456-426614174000", "/u/{id}"),
            ("/blob/0123456789abcdef0123", "/blob/{id}"),
            ("/blob/0123456789abcde", "/blob/0123456789abcde"),
            ("/get?x=1", "/get"),
            ("/", "/"),
            ("", "/"),
            ("/a//b/", "/a//b/"),
            ("/2024", "/{id}"),
        ] {
            assert_eq!(template(path), want, "{path}");
        }
    }

    fn spec() -> Arc<Compare> {
        Compare::everything()
    }

    fn obs(status: u16, headers: &[(&str, &str)], ct: &str, body: &str) -> Observation {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", ct.parse().unwrap());
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut o = Observer::new(spec(), http::StatusCode::from_u16(status).unwrap(), &h);
        o.data(body.as_bytes());
        o.finish(Duration::ZERO)
    }

    #[test]
    fn fields_that_differ_between_primaries_are_noisy() {
        let mut n = Noise::default();
        let a = obs(
            200,
            &[("x-id", "1"), ("x-same", "s")],
            "application/json",
            r#"{"t":1,"k":{"u":"a","v":1}}"#,
        );
        let b = obs(
            200,
            &[("x-id", "2"), ("x-same", "s")],
            "application/json",
            r#"{"t":2,"k":{"u":"b","v":1}}"#,
        );
        let learned = n.learn(&a, &b);
        assert_eq!(learned.headers, ["x-id"]);
        assert_eq!(learned.json, ["$.k.u", "$.t"]);
        assert!(!learned.whole_body);
        assert!(n.header_is_noisy("x-id") && !n.header_is_noisy("x-same"));
        assert!(n.path_is_noisy(&JsonPath::parse("$.t").unwrap()));
        assert!(
            n.path_is_noisy(&JsonPath::parse("$.t.deeper").unwrap()),
            "under a noisy path"
        );
        assert!(!n.path_is_noisy(&JsonPath::parse("$.k.v").unwrap()));
        assert!(!n.path_is_noisy(&JsonPath::root()));
        // Learning again adds nothing new.
        assert_eq!(n.learn(&a, &b), Learned::default());
    }

    #[test]
    fn another_status_teaches_nothing_and_opaque_bodies_are_noisy_whole() {
        let mut n = Noise::default();
        let ok = obs(200, &[("x-id", "1")], "text/plain", "one");
        let err = obs(500, &[("x-id", "2")], "text/plain", "two");
        assert_eq!(n.learn(&ok, &err), Learned::default());
        let again = obs(200, &[("x-id", "1")], "text/plain", "three");
        let learned = n.learn(&ok, &again);
        assert!(learned.whole_body && learned.headers.is_empty());
        assert!(n.path_is_noisy(&JsonPath::root()));
    }

    #[test]
    fn noise_is_bounded() {
        let mut n = Noise::default();
        let many = |v: u32| {
            let hs: Vec<(String, String)> = (0..100)
                .map(|i| (format!("x-{i:03}"), v.to_string()))
                .collect();
            let refs: Vec<(&str, &str)> =
                hs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let fields: Vec<String> = (0..100).map(|i| format!("\"k{i:03}\":{v}")).collect();
            obs(
                200,
                &refs,
                "application/json",
                &format!("{{{}}}", fields.join(",")),
            )
        };
        n.learn(&many(1), &many(2));
        n.learn(&many(3), &many(4));
        assert_eq!(n.headers.len(), MAX_NOISY);
        assert_eq!(n.json.len(), MAX_NOISY);
    }
}
