//! Per-route counts, noise, samples and latency deltas: what a concluded comparison updates, and
//! what the report, the admin endpoint and the metrics show. Pure (no clock, no I/O).

use std::collections::HashMap;
use std::fmt::Write as _;

use weft_proto::discovery as pb;

use super::compare::{Copied, Outcome, Verdict, compare};
use super::noise::Noise;
use super::observe::Observation;
use crate::route::compare::Compare;

/// Request shapes (method + path template) tracked per route; requests of further shapes are
/// counted under [`OTHER`].
pub const MAX_SHAPES: usize = 64;
/// The shape of requests beyond [`MAX_SHAPES`].
pub const OTHER: &str = "{other}";
/// Paths listed per route in a report (the busiest).
pub const REPORT_PATHS: usize = 20;

/// Buckets of the latency-delta histogram (mirror minus primary), milliseconds: negative bounds
/// for a mirror faster than the primary. Prometheus buckets are cumulative from -∞, so negative
/// `le` values are valid (promtool accepts them); `_sum` may be negative.
pub const DELTA_BUCKETS: [f64; 21] = [
    -5000.0, -1000.0, -500.0, -250.0, -100.0, -50.0, -25.0, -10.0, -5.0, -1.0, 0.0, 1.0, 5.0, 10.0,
    25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
];

/// What a comparison knows of its request, besides the two answers.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// `x-request-id`.
    pub request_id: String,
    /// "GET /status/{id}".
    pub shape: String,
}

#[derive(Debug, Default)]
struct Shape {
    outcomes: [u64; 7],
    sample: Option<pb::CompareSample>,
    last_primary: Option<Observation>,
    whole_body_noisy: bool,
}

/// One route's comparisons.
#[derive(Debug)]
pub struct RouteState {
    destination_service: String,
    outcomes: [u64; 7],
    noise: Noise,
    shapes: HashMap<String, Shape>,
    delta_buckets: [u64; DELTA_BUCKETS.len()],
    delta_sum_ms: f64,
    delta_count: u64,
}

impl RouteState {
    /// A route whose primaries go to `destination_service`.
    pub fn new(destination_service: String) -> Self {
        Self {
            destination_service,
            outcomes: [0; 7],
            noise: Noise::default(),
            shapes: HashMap::new(),
            delta_buckets: [0; DELTA_BUCKETS.len()],
            delta_sum_ms: 0.0,
            delta_count: 0,
        }
    }

    /// The primary's destination service.
    pub fn destination_service(&self) -> &str {
        &self.destination_service
    }

    /// Counts a comparison that never took place (the pending table was full).
    pub fn skipped(&mut self, shape: &str) {
        self.outcomes[Outcome::Skipped.index()] += 1;
        self.shape(shape).outcomes[Outcome::Skipped.index()] += 1;
    }

    fn shape(&mut self, shape: &str) -> &mut Shape {
        let key = if self.shapes.contains_key(shape) || self.shapes.len() < MAX_SHAPES {
            shape
        } else {
            OTHER
        };
        self.shapes.entry(key.to_owned()).or_default()
    }

    /// Learns noise from this primary, compares, counts, and keeps a sample of a divergence.
    pub fn conclude(
        &mut self,
        spec: &Compare,
        facts: &RequestFacts,
        primary: Option<Observation>,
        copy: &Copied,
    ) -> Verdict {
        let Self { noise, shapes, .. } = self;
        let key = if shapes.contains_key(&facts.shape) || shapes.len() < MAX_SHAPES {
            facts.shape.as_str()
        } else {
            OTHER
        };
        // The key is copied only for a shape seen for the first time.
        let shape = match shapes.get_mut(key) {
            Some(s) => s,
            None => shapes.entry(key.to_owned()).or_default(),
        };
        if let (Some(prev), Some(cur)) = (&shape.last_primary, &primary) {
            noise.whole_body = shape.whole_body_noisy;
            noise.learn(prev, cur);
            shape.whole_body_noisy = noise.whole_body;
        }
        noise.whole_body = shape.whole_body_noisy;
        let verdict = compare(spec, primary.as_ref(), copy, noise);
        shape.outcomes[verdict.outcome.index()] += 1;
        self.outcomes[verdict.outcome.index()] += 1;
        let delta_us = match (&primary, copy) {
            (Some(p), Copied::Answered(m)) => {
                let delta = i64::try_from(m.latency.as_micros()).unwrap_or(i64::MAX)
                    - i64::try_from(p.latency.as_micros()).unwrap_or(i64::MAX);
                let ms = delta as f64 / 1000.0;
                for (b, c) in DELTA_BUCKETS.iter().zip(self.delta_buckets.iter_mut()) {
                    if ms <= *b {
                        *c += 1;
                    }
                }
                self.delta_sum_ms += ms;
                self.delta_count += 1;
                delta
            }
            _ => 0,
        };
        if verdict.outcome.diverged() {
            shape.sample = Some(pb::CompareSample {
                request_id: facts.request_id.clone(),
                outcome: verdict.outcome.as_str().to_owned(),
                primary_status: primary.as_ref().map_or(0, |p| u32::from(p.status)),
                mirror_status: match copy {
                    Copied::Answered(m) => u32::from(m.status),
                    Copied::Failed(s) => s.map_or(0, u32::from),
                    Copied::TimedOut => 0,
                },
                headers: verdict.headers.clone(),
                json_paths: verdict.json_paths.clone(),
                latency_delta_us: delta_us,
            });
        }
        if primary.is_some() {
            shape.last_primary = primary;
        }
        verdict
    }

    /// This route's part of the report.
    pub fn report(&self, route: &str) -> pb::RouteCompare {
        let counts = |o: &[u64; 7]| {
            Outcome::ALL
                .iter()
                .filter(|x| o[x.index()] > 0)
                .map(|x| (x.as_str().to_owned(), o[x.index()]))
                .collect()
        };
        let mut paths: Vec<(&String, &Shape)> = self.shapes.iter().collect();
        paths.sort_by(|a, b| {
            let total = |s: &Shape| s.outcomes.iter().sum::<u64>();
            total(b.1).cmp(&total(a.1)).then(a.0.cmp(b.0))
        });
        let mut noisy_json: Vec<String> = self.noise.json.iter().map(|p| p.to_string()).collect();
        if self.shapes.values().any(|s| s.whole_body_noisy) {
            noisy_json.insert(0, "$".to_owned());
        }
        pb::RouteCompare {
            route: route.to_owned(),
            destination_service: self.destination_service.clone(),
            outcomes: counts(&self.outcomes),
            paths: paths
                .into_iter()
                .take(REPORT_PATHS)
                .map(|(path, s)| pb::PathCompare {
                    path: path.clone(),
                    outcomes: counts(&s.outcomes),
                    sample: s.sample.clone(),
                })
                .collect(),
            noisy_headers: self.noise.headers.iter().cloned().collect(),
            noisy_json,
        }
    }

    /// Appends this route's `weft_mirror_compare_total` samples; `labels` is the series' labels
    /// without `outcome`.
    pub fn render_total(&self, out: &mut String, labels: &str) {
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "weft_mirror_compare_total{{{labels},outcome=\"{}\"}} {}",
                o.as_str(),
                self.outcomes[o.index()]
            );
        }
    }

    /// Appends this route's latency-delta histogram.
    pub fn render_delta(&self, out: &mut String, labels: &str) {
        let name = "weft_mirror_compare_latency_delta_milliseconds";
        for (b, c) in DELTA_BUCKETS.iter().zip(self.delta_buckets.iter()) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
            self.delta_count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.delta_sum_ms);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.delta_count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow_diff::observe::Observer;
    use std::sync::Arc;
    use std::time::Duration;

    fn spec() -> Arc<Compare> {
        Compare::everything()
    }

    fn obs(status: u16, rid_header: &str, body: &str, ms: u64) -> Observation {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-generated", rid_header.parse().unwrap());
        let mut o = Observer::new(spec(), http::StatusCode::from_u16(status).unwrap(), &h);
        o.data(body.as_bytes());
        o.finish(Duration::from_millis(ms))
    }

    fn facts(shape: &str, rid: &str) -> RequestFacts {
        RequestFacts {
            request_id: rid.into(),
            shape: shape.into(),
        }
    }

    #[test]
    fn noise_learned_from_primaries_turns_divergences_into_matches() {
        let s = spec();
        let mut r = RouteState::new("httpbin.default.svc.cluster.local".into());
        let f = facts("GET /uuid", "r1");
        // First request of the shape: nothing learned yet, the generated header and id diverge.
        let v = r.conclude(
            &s,
            &f,
            Some(obs(200, "a", r#"{"id":"1","x":1}"#, 10)),
            &Copied::Answered(obs(200, "b", r#"{"id":"2","x":1}"#, 12)),
        );
        assert_eq!(v.outcome, Outcome::Headers);
        // The second primary differs from the first in the same fields: they are noise now.
        let v = r.conclude(
            &s,
            &f,
            Some(obs(200, "c", r#"{"id":"3","x":1}"#, 10)),
            &Copied::Answered(obs(200, "d", r#"{"id":"4","x":1}"#, 8)),
        );
        assert_eq!(v.outcome, Outcome::Match);
        // A real difference still shows, with its path.
        let v = r.conclude(
            &s,
            &f,
            Some(obs(200, "e", r#"{"id":"5","x":1}"#, 10)),
            &Copied::Answered(obs(200, "f", r#"{"id":"6","x":2}"#, 10)),
        );
        assert_eq!(
            (v.outcome, v.json_paths.clone()),
            (Outcome::Body, vec!["$.x".to_owned()])
        );
        let rep = r.report("default/httpbin/0");
        assert_eq!(rep.noisy_headers, ["x-generated"]);
        assert_eq!(rep.noisy_json, ["$.id"]);
        assert_eq!(rep.outcomes["match"], 1);
        assert_eq!(rep.outcomes["headers"], 1);
        assert_eq!(rep.outcomes["body"], 1);
        assert_eq!(rep.paths.len(), 1);
        let sample = rep.paths[0].sample.as_ref().unwrap();
        assert_eq!(sample.outcome, "body");
        assert_eq!(sample.json_paths, ["$.x"]);
        assert_eq!(sample.request_id, "r1");
        assert_eq!(sample.latency_delta_us, 0);
        assert_eq!(r.delta_count, 3);
        assert_eq!(r.delta_sum_ms, 0.0);
    }

    #[test]
    fn shapes_are_bounded_and_the_busiest_are_reported_first() {
        let s = spec();
        let mut r = RouteState::new("svc".into());
        for i in 0..(MAX_SHAPES + 10) {
            r.conclude(
                &s,
                &facts(&format!("GET /p{i}"), "x"),
                None,
                &Copied::TimedOut,
            );
        }
        r.skipped("GET /p0");
        assert_eq!(r.shapes.len(), MAX_SHAPES + 1);
        let rep = r.report("rt");
        assert_eq!(rep.paths.len(), REPORT_PATHS);
        // /p0 has two (skipped twice), {other} eleven.
        assert_eq!(rep.paths[0].path, OTHER);
        assert_eq!(rep.paths[0].outcomes["skipped"], 10);
        assert_eq!(rep.paths[1].path, "GET /p0");
        assert_eq!(rep.outcomes["skipped"], (MAX_SHAPES + 11) as u64);
    }

    #[test]
    fn latency_deltas_fill_negative_and_positive_buckets() {
        let s = spec();
        let mut r = RouteState::new("svc".into());
        let f = facts("GET /", "x");
        r.conclude(
            &s,
            &f,
            Some(obs(200, "a", "{}", 300)),
            &Copied::Answered(obs(200, "a", "{}", 100)),
        );
        r.conclude(
            &s,
            &f,
            Some(obs(200, "a", "{}", 100)),
            &Copied::Answered(obs(200, "a", "{}", 150)),
        );
        let mut out = String::new();
        r.render_delta(&mut out, "route=\"rt\"");
        let bucket = |le: &str| {
            out.lines()
                .find(|l| l.contains(&format!("le=\"{le}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .unwrap()
                .to_owned()
        };
        assert_eq!(bucket("-250"), "0");
        assert_eq!(bucket("-100"), "1");
        assert_eq!(bucket("25"), "1");
        assert_eq!(bucket("50"), "2");
        assert_eq!(bucket("+Inf"), "2");
        assert!(out.contains("_sum{route=\"rt\"} -150"), "{out}");
        let mut total = String::new();
        r.render_total(&mut total, "route=\"rt\"");
        assert!(total.contains("weft_mirror_compare_total{route=\"rt\",outcome=\"match\"} 2"));
    }
}
