//! Comparing two observations: the outcome and what differed. Pure.

use serde_json::Value;

use super::noise::Noise;
use super::observe::Observation;
use crate::route::compare::{Compare, JsonPath, Step};

/// At most this many differing JSON paths are named per comparison (the first ones in document
/// order); the outcome does not depend on it.
pub const MAX_PATHS: usize = 16;

/// What a comparison concluded. The order is the order of precedence when several apply: a copy
/// that answered another status is `status` even if its headers differ too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Same in every compared aspect (differences only in noisy fields count as the same).
    Match,
    /// Another status.
    Status,
    /// Another compared header (value, or present on one side only).
    Headers,
    /// Another body.
    Body,
    /// The copy failed: no endpoint, connect failure, reset, or a mesh error answer (5xx with
    /// `x-weft-error`).
    MirrorError,
    /// The copy's answer did not complete within the copy timeout.
    Timeout,
    /// Not compared: the pending table was full, or the primary's answer never completed.
    Skipped,
}

impl Outcome {
    /// Every outcome, in the order of [`Outcome::index`].
    pub const ALL: [Outcome; 7] = [
        Outcome::Match,
        Outcome::Status,
        Outcome::Headers,
        Outcome::Body,
        Outcome::MirrorError,
        Outcome::Timeout,
        Outcome::Skipped,
    ];

    /// The label value (`outcome="…"`, and the key in `RouteCompare.outcomes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Match => "match",
            Outcome::Status => "status",
            Outcome::Headers => "headers",
            Outcome::Body => "body",
            Outcome::MirrorError => "mirror_error",
            Outcome::Timeout => "timeout",
            Outcome::Skipped => "skipped",
        }
    }

    /// Position in [`Outcome::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether it is a divergence worth a span event and a sample.
    pub fn diverged(self) -> bool {
        !matches!(self, Outcome::Match | Outcome::Skipped)
    }
}

/// The copy's side of a comparison.
#[derive(Debug, Clone)]
pub enum Copied {
    /// It answered in full.
    Answered(Observation),
    /// It failed (see [`Outcome::MirrorError`]); the status when a mesh error answer came.
    Failed(Option<u16>),
    /// It did not complete in time.
    TimedOut,
}

/// The outcome and what differed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The outcome.
    pub outcome: Outcome,
    /// Compared headers that differed (not noisy), sorted.
    pub headers: Vec<String>,
    /// JSON paths that differed (not noisy); `$` for bodies compared by hash.
    pub json_paths: Vec<String>,
}

impl Verdict {
    fn only(outcome: Outcome) -> Self {
        Self {
            outcome,
            headers: Vec::new(),
            json_paths: Vec::new(),
        }
    }
}

/// Compares the primary's answer (`None`: it never completed) with the copy's, under `spec`,
/// ignoring differences in the fields `noise` has found noisy.
pub fn compare(
    spec: &Compare,
    primary: Option<&Observation>,
    copy: &Copied,
    noise: &Noise,
) -> Verdict {
    let Some(p) = primary else {
        return Verdict::only(Outcome::Skipped);
    };
    let m = match copy {
        Copied::Answered(m) => m,
        Copied::Failed(_) => return Verdict::only(Outcome::MirrorError),
        Copied::TimedOut => return Verdict::only(Outcome::Timeout),
    };
    let headers = if spec.headers {
        differing_headers(p, m)
            .into_iter()
            .filter(|h| !noise.header_is_noisy(h))
            .collect()
    } else {
        Vec::new()
    };
    let json_paths: Vec<String> = if spec.body {
        differing_paths(p, m)
            .into_iter()
            .filter(|path| !noise.path_is_noisy(path))
            .take(MAX_PATHS)
            .map(|p| p.to_string())
            .collect()
    } else {
        Vec::new()
    };
    let outcome = if spec.status && p.status != m.status {
        Outcome::Status
    } else if !headers.is_empty() {
        Outcome::Headers
    } else if !json_paths.is_empty() {
        Outcome::Body
    } else {
        Outcome::Match
    };
    Verdict {
        outcome,
        headers,
        json_paths,
    }
}

/// Names of compared headers whose values differ or that only one side has (both lists sorted).
pub fn differing_headers(a: &Observation, b: &Observation) -> Vec<String> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.headers.len() || j < b.headers.len() {
        match (a.headers.get(i), b.headers.get(j)) {
            (Some((na, ha)), Some((nb, hb))) => match na.as_str().cmp(nb.as_str()) {
                std::cmp::Ordering::Equal => {
                    if ha != hb {
                        out.push(na.to_string());
                    }
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    out.push(na.to_string());
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(nb.to_string());
                    j += 1;
                }
            },
            (Some((n, _)), None) => {
                out.push(n.to_string());
                i += 1;
            }
            (None, Some((n, _))) => {
                out.push(n.to_string());
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}

/// The JSON paths where two bodies differ: the leaves of both parsed bodies when both were kept,
/// else `$` when their hashes differ. Ignored paths were removed when the bodies were observed.
pub fn differing_paths(a: &Observation, b: &Observation) -> Vec<JsonPath> {
    match (&a.json, &b.json) {
        (Some(x), Some(y)) => {
            let mut out = Vec::new();
            if a.json_hash != b.json_hash {
                diff(x, y, &JsonPath::root(), &mut out);
            }
            out
        }
        _ if a.compared_body_hash() != b.compared_body_hash() => vec![JsonPath::root()],
        _ => Vec::new(),
    }
}

/// Collects the paths where `a` and `b` differ, descending into objects and arrays present on both
/// sides; stops after [`MAX_PATHS`] × 4 paths (the caller drops the noisy ones first).
fn diff(a: &Value, b: &Value, at: &JsonPath, out: &mut Vec<JsonPath>) {
    if out.len() >= MAX_PATHS * 4 {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            // serde_json's maps are sorted: walk both in order.
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let here = at.child(Step::Key(k.clone()));
                match (x.get(k), y.get(k)) {
                    (Some(vx), Some(vy)) => diff(vx, vy, &here, out),
                    _ => out.push(here),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let here = at.child(Step::Index(i));
                match (x.get(i), y.get(i)) {
                    (Some(vx), Some(vy)) => diff(vx, vy, &here, out),
                    _ => out.push(here),
                }
            }
        }
        _ if a != b => out.push(at.clone()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow_diff::observe::Observer;
    use std::sync::Arc;
    use std::time::Duration;

    fn spec(ignore_json: &[&str]) -> Arc<Compare> {
        Arc::new(Compare {
            status: true,
            headers: true,
            body: true,
            ignore_headers: vec![http::header::DATE],
            ignore_json: ignore_json
                .iter()
                .map(|p| JsonPath::parse(p).unwrap())
                .collect(),
        })
    }

    fn obs(spec: &Arc<Compare>, status: u16, headers: &[(&str, &str)], body: &str) -> Observation {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut o = Observer::new(
            spec.clone(),
            http::StatusCode::from_u16(status).unwrap(),
            &h,
        );
        o.data(body.as_bytes());
        o.finish(Duration::from_millis(1))
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn every_outcome() {
        let s = spec(&["$.id"]);
        let quiet = Noise::default();
        let p = obs(&s, 200, &[JSON, ("date", "1")], r#"{"a":1,"id":1}"#);
        let check = |copy: Copied| compare(&s, Some(&p), &copy, &quiet);
        let same = obs(&s, 200, &[JSON, ("date", "2")], r#"{"id":2,"a":1}"#);
        assert_eq!(check(Copied::Answered(same)).outcome, Outcome::Match);
        let v = check(Copied::Answered(obs(&s, 500, &[JSON, ("x", "1")], "oops")));
        assert_eq!(v.outcome, Outcome::Status, "status takes precedence");
        assert_eq!(v.headers, ["x"]);
        let v = check(Copied::Answered(obs(
            &s,
            200,
            &[JSON, ("x-new", "1")],
            r#"{"a":1}"#,
        )));
        assert_eq!(
            (v.outcome, v.headers),
            (Outcome::Headers, vec!["x-new".to_owned()])
        );
        let v = check(Copied::Answered(obs(
            &s,
            200,
            &[JSON],
            r#"{"a":2,"b":[1]}"#,
        )));
        assert_eq!(v.outcome, Outcome::Body);
        assert_eq!(v.json_paths, ["$.a", "$.b"]);
        assert_eq!(
            check(Copied::Failed(Some(503))).outcome,
            Outcome::MirrorError
        );
        assert_eq!(check(Copied::TimedOut).outcome, Outcome::Timeout);
        assert_eq!(
            compare(&s, None, &Copied::TimedOut, &quiet).outcome,
            Outcome::Skipped
        );
        assert_eq!(Outcome::ALL.map(Outcome::index), [0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn only_the_compared_aspects_count() {
        let s = Arc::new(Compare {
            status: true,
            headers: false,
            body: false,
            ignore_headers: vec![],
            ignore_json: vec![],
        });
        let p = obs(&s, 200, &[("x", "1")], "a");
        let m = obs(&s, 200, &[("x", "2")], "b");
        assert_eq!(
            compare(&s, Some(&p), &Copied::Answered(m), &Noise::default()).outcome,
            Outcome::Match
        );
    }

    #[test]
    fn json_paths_name_where_bodies_differ() {
        let s = spec(&[]);
        let p = obs(
            &s,
            200,
            &[JSON],
            r#"{"a":{"b":1,"c":[1,2]},"x.y":true,"same":"s"}"#,
        );
        let m = obs(
            &s,
            200,
            &[JSON],
            r#"{"a":{"b":2,"c":[1,2,3]},"x.y":false,"same":"s"}"#,
        );
        let paths: Vec<String> = differing_paths(&p, &m)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(paths, ["$.a.b", "$.a.c[2]", "$[\"x.y\"]"]);
        // Not JSON: the whole body.
        let t = obs(&s, 200, &[], "one");
        let u = obs(&s, 200, &[], "two");
        let paths: Vec<String> = differing_paths(&t, &u)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(paths, ["$"]);
        assert!(differing_paths(&t, &t.clone()).is_empty());
    }

    #[test]
    fn a_long_json_body_differs_as_a_whole() {
        let s = spec(&[]);
        let big = |v: u8| {
            format!(
                "{{\"pad\":\"{}\",\"v\":{v}}}",
                "x".repeat(super::super::observe::JSON_PREFIX_MAX)
            )
        };
        let p = obs(&s, 200, &[JSON], &big(1));
        let m = obs(&s, 200, &[JSON], &big(2));
        let v = compare(&s, Some(&p), &Copied::Answered(m), &Noise::default());
        assert_eq!(
            (v.outcome, v.json_paths),
            (Outcome::Body, vec!["$".to_owned()])
        );
    }

    #[test]
    fn the_number_of_paths_named_is_bounded() {
        let s = spec(&[]);
        let many = |v: u8| {
            let fields: Vec<String> = (0..100).map(|i| format!("\"k{i:03}\":{v}")).collect();
            format!("{{{}}}", fields.join(","))
        };
        let p = obs(&s, 200, &[JSON], &many(1));
        let m = obs(&s, 200, &[JSON], &many(2));
        let v = compare(&s, Some(&p), &Copied::Answered(m), &Noise::default());
        assert_eq!(v.outcome, Outcome::Body);
        assert_eq!(v.json_paths.len(), MAX_PATHS);
    }
}
