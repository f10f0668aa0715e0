//! `pilot mirror-report`: the shadow-diff reports of every sidecar merged into one view per route,
//! and its text rendering.
//!
//! Definitions. A copy is *compared* when its outcome is anything but `skipped` (the sidecar was
//! over a bound and did not compare it): `match`, `status`, `headers`, `body`, `mirror_error`,
//! `timeout`. The *match rate* is `match / compared`. A *divergence* is a compared copy that did
//! not match (so a mirror that errors or times out counts: the user wants to know v2 cannot
//! answer). Counts of the same route (or path) from several sidecars are added; a path's sample is
//! the first one found in pod order (namespace, name), so the output is stable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use weft_proto::config as pb;

/// The outcomes in the order the report shows them (divergences after `match`).
pub const OUTCOMES: [&str; 7] = [
    "match",
    "status",
    "headers",
    "body",
    "mirror_error",
    "timeout",
    "skipped",
];

/// How many diverging paths per route the table shows (`-o wide` shows all the sidecars sent).
pub const TOP_PATHS: usize = 5;

/// Every route reported, merged over the sidecars.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MergedReport {
    /// How many sidecars' reports were merged.
    pub sidecars: usize,
    /// The routes, by name.
    pub routes: Vec<RouteSummary>,
}

/// One route (one http rule of a VirtualService), over every sidecar that mirrored it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RouteSummary {
    /// `<namespace>/<virtualservice>/<rule>`.
    pub route: String,
    /// `<namespace>/<virtualservice>`.
    pub virtual_service: String,
    /// The FQDNs the primary requests were for.
    pub destination_services: Vec<String>,
    /// Copies compared (every outcome but `skipped`).
    pub compared: u64,
    /// Of those, the ones that matched.
    pub matched: u64,
    /// `matched / compared`, absent when nothing was compared.
    pub match_rate: Option<f64>,
    /// Outcome -> count, summed.
    pub outcomes: BTreeMap<String, u64>,
    /// Headers found to differ between two primaries (noise, not divergence), from any sidecar.
    pub noisy_headers: Vec<String>,
    /// JSON paths found to differ between two primaries.
    pub noisy_json: Vec<String>,
    /// The sidecars that reported it (`namespace/pod`).
    pub sidecars: Vec<String>,
    /// Paths, most divergences first (then most compared, then by name).
    pub paths: Vec<PathSummary>,
}

/// One request path template of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PathSummary {
    /// `GET /status/{id}`.
    pub path: String,
    /// Copies compared.
    pub compared: u64,
    /// Compared copies that did not match.
    pub divergences: u64,
    /// Outcome -> count, summed.
    pub outcomes: BTreeMap<String, u64>,
    /// One diverging request, if any.
    pub sample: Option<Sample>,
}

/// One diverging request, as a sidecar kept it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// The sidecar that saw it (`namespace/pod`): where to look for its logs and span.
    pub sidecar: String,
    /// `x-request-id`.
    pub request_id: String,
    /// Its outcome.
    pub outcome: String,
    /// The primary's status.
    pub primary_status: u32,
    /// The mirror's status, 0 when it gave no answer.
    pub mirror_status: u32,
    /// Header names that differed.
    pub headers: Vec<String>,
    /// JSON paths that differed (`$` for bodies that differ and are not JSON).
    pub json_paths: Vec<String>,
    /// Mirror latency minus primary latency, microseconds.
    pub latency_delta_us: i64,
}

/// Merges the per-sidecar reports of the config API.
pub fn merge(proxies: &[pb::ProxyMirrorReport]) -> MergedReport {
    let mut sorted: Vec<&pb::ProxyMirrorReport> = proxies.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut routes: BTreeMap<String, RouteAcc> = BTreeMap::new();
    for proxy in &sorted {
        let Some(report) = &proxy.report else {
            continue;
        };
        let sidecar = format!("{}/{}", proxy.namespace, proxy.name);
        for route in &report.routes {
            let acc = routes.entry(route.route.clone()).or_default();
            if !route.destination_service.is_empty() {
                acc.destinations.insert(route.destination_service.clone());
            }
            add(&mut acc.outcomes, &route.outcomes);
            acc.noisy_headers
                .extend(route.noisy_headers.iter().cloned());
            acc.noisy_json.extend(route.noisy_json.iter().cloned());
            acc.sidecars.insert(sidecar.clone());
            for path in &route.paths {
                let p = acc.paths.entry(path.path.clone()).or_default();
                add(&mut p.outcomes, &path.outcomes);
                if p.sample.is_none()
                    && let Some(s) = &path.sample
                {
                    p.sample = Some(Sample {
                        sidecar: sidecar.clone(),
                        request_id: s.request_id.clone(),
                        outcome: s.outcome.clone(),
                        primary_status: s.primary_status,
                        mirror_status: s.mirror_status,
                        headers: s.headers.clone(),
                        json_paths: s.json_paths.clone(),
                        latency_delta_us: s.latency_delta_us,
                    });
                }
            }
        }
    }
    MergedReport {
        sidecars: sorted.iter().filter(|p| p.report.is_some()).count(),
        routes: routes
            .into_iter()
            .map(|(route, acc)| acc.finish(route))
            .collect(),
    }
}

#[derive(Default)]
struct RouteAcc {
    destinations: BTreeSet<String>,
    outcomes: BTreeMap<String, u64>,
    noisy_headers: BTreeSet<String>,
    noisy_json: BTreeSet<String>,
    sidecars: BTreeSet<String>,
    paths: BTreeMap<String, PathAcc>,
}

#[derive(Default)]
struct PathAcc {
    outcomes: BTreeMap<String, u64>,
    sample: Option<Sample>,
}

impl RouteAcc {
    fn finish(self, route: String) -> RouteSummary {
        let (compared, matched) = counts(&self.outcomes);
        let mut paths: Vec<PathSummary> = self
            .paths
            .into_iter()
            .map(|(path, acc)| {
                let (compared, matched) = counts(&acc.outcomes);
                PathSummary {
                    path,
                    compared,
                    divergences: compared - matched,
                    outcomes: acc.outcomes,
                    sample: acc.sample,
                }
            })
            .collect();
        paths.sort_by(|a, b| {
            (b.divergences, b.compared, &a.path).cmp(&(a.divergences, a.compared, &b.path))
        });
        let virtual_service = route.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
        RouteSummary {
            virtual_service,
            destination_services: self.destinations.into_iter().collect(),
            compared,
            matched,
            match_rate: (compared > 0).then(|| matched as f64 / compared as f64),
            outcomes: self.outcomes,
            noisy_headers: self.noisy_headers.into_iter().collect(),
            noisy_json: self.noisy_json.into_iter().collect(),
            sidecars: self.sidecars.into_iter().collect(),
            paths,
            route,
        }
    }
}

fn add(into: &mut BTreeMap<String, u64>, from: &std::collections::HashMap<String, u64>) {
    for (outcome, n) in from {
        let slot = into.entry(outcome.clone()).or_default();
        *slot = slot.saturating_add(*n);
    }
}

/// (compared, matched) of an outcome map.
fn counts(outcomes: &BTreeMap<String, u64>) -> (u64, u64) {
    let compared = outcomes
        .iter()
        .filter(|(o, _)| o.as_str() != "skipped")
        .fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
    let matched = outcomes.get("match").copied().unwrap_or(0).min(compared);
    (compared, matched)
}

/// The text report: a table of routes, then, per route with divergences, its top paths with one
/// sample each. `wide` adds the skipped copies, the sidecars and the noise to the route table, and
/// shows every diverging path with the full sample instead of the top [`TOP_PATHS`].
pub fn render(report: &MergedReport, wide: bool) -> String {
    let mut header = vec![
        "ROUTE",
        "DESTINATION",
        "COMPARED",
        "MATCH RATE",
        "DIVERGENCES",
    ];
    if wide {
        header.extend(["SKIPPED", "SIDECARS", "NOISE (IGNORED)"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for r in &report.routes {
        let mut row = vec![
            r.route.clone(),
            dash(r.destination_services.join(",")),
            r.compared.to_string(),
            r.match_rate
                .map_or_else(|| "-".to_string(), |rate| format!("{:.1}%", rate * 100.0)),
            dash(divergences(&r.outcomes)),
        ];
        if wide {
            let noise: Vec<&str> = r
                .noisy_headers
                .iter()
                .chain(&r.noisy_json)
                .map(String::as_str)
                .collect();
            row.extend([
                r.outcomes.get("skipped").copied().unwrap_or(0).to_string(),
                r.sidecars.len().to_string(),
                dash(noise.join(",")),
            ]);
        }
        rows.push(row);
    }
    let mut out = crate::table::columns(&rows);
    for r in &report.routes {
        let diverging: Vec<&PathSummary> = r.paths.iter().filter(|p| p.divergences > 0).collect();
        if diverging.is_empty() {
            continue;
        }
        let shown = if wide {
            diverging.len()
        } else {
            diverging.len().min(TOP_PATHS)
        };
        let _ = write!(out, "\nDIVERGING PATHS OF {}", r.route);
        if shown < diverging.len() {
            let _ = write!(
                out,
                " (top {shown} of {}; -o wide for all)",
                diverging.len()
            );
        }
        out.push('\n');
        let mut header = vec![
            "PATH",
            "COMPARED",
            "DIVERGED",
            "OUTCOMES",
            "SAMPLE REQUEST",
            "STATUS (PRIMARY->MIRROR)",
            "DIFFERS",
            "LATENCY DELTA",
        ];
        if wide {
            header.push("SIDECAR");
        }
        let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
        for p in diverging.iter().take(shown) {
            let mut row = vec![
                p.path.clone(),
                p.compared.to_string(),
                p.divergences.to_string(),
                dash(divergences(&p.outcomes)),
            ];
            match &p.sample {
                Some(s) => {
                    row.extend([
                        dash(s.request_id.clone()),
                        format!("{}->{}", s.primary_status, mirror_status(s.mirror_status)),
                        differs(s, wide),
                        latency(s.latency_delta_us),
                    ]);
                    if wide {
                        row.push(s.sidecar.clone());
                    }
                }
                None => row.extend(["-".to_string(), "-".into(), "-".into(), "-".into()]),
            }
            rows.push(row);
        }
        out.push_str(&crate::table::columns(&rows));
    }
    out
}

/// `status 3, body 1`: the non-match outcomes with a count, in [`OUTCOMES`] order (unknown
/// outcomes from a newer sidecar last, by name).
fn divergences(outcomes: &BTreeMap<String, u64>) -> String {
    let known = OUTCOMES
        .iter()
        .filter(|o| !matches!(**o, "match" | "skipped"));
    let unknown = outcomes
        .keys()
        .map(String::as_str)
        .filter(|o| !OUTCOMES.contains(o));
    known
        .copied()
        .chain(unknown)
        .filter_map(|o| {
            let n = outcomes.get(o).copied().unwrap_or(0);
            (n > 0).then(|| format!("{o} {n}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What differed in a sample: the status, the headers and JSON paths (by name when `all` or when
/// there is one, else counted, so the table stays readable), else the outcome itself.
fn differs(s: &Sample, all: bool) -> String {
    let mut parts: Vec<String> = Vec::new();
    if s.outcome == "status" || (s.primary_status != s.mirror_status && s.mirror_status != 0) {
        parts.push("status".into());
    }
    let mut named = |names: &[String], one: &str, many: &str| match names {
        [] => {}
        [name] => parts.push(format!("{one} {name}")),
        _ if all => parts.extend(names.iter().map(|n| format!("{one} {n}"))),
        _ => parts.push(format!("{} {many}", names.len())),
    };
    named(&s.headers, "header", "headers");
    named(&s.json_paths, "body", "JSON paths");
    if parts.is_empty() {
        parts.push(s.outcome.clone());
    }
    dash(parts.join(", "))
}

fn mirror_status(status: u32) -> String {
    if status == 0 {
        "none".to_string()
    } else {
        status.to_string()
    }
}

/// `+1.2ms`, `-350us`, `+2.10s`: mirror minus primary.
fn latency(us: i64) -> String {
    let sign = if us < 0 { "-" } else { "+" };
    let abs = us.unsigned_abs();
    if abs < 1_000 {
        format!("{sign}{abs}us")
    } else if abs < 1_000_000 {
        format!("{sign}{:.1}ms", abs as f64 / 1_000.0)
    } else {
        format!("{sign}{:.2}s", abs as f64 / 1_000_000.0)
    }
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".to_string() } else { s }
}

#[cfg(test)]
mod tests {
    use weft_proto::discovery as dpb;

    use super::*;

    fn outcomes(pairs: &[(&str, u64)]) -> std::collections::HashMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn path(p: &str, o: &[(&str, u64)], sample: Option<dpb::CompareSample>) -> dpb::PathCompare {
        dpb::PathCompare {
            path: p.into(),
            outcomes: outcomes(o),
            sample,
        }
    }

    fn proxy(name: &str, routes: Vec<dpb::RouteCompare>) -> pb::ProxyMirrorReport {
        pb::ProxyMirrorReport {
            name: name.into(),
            namespace: "default".into(),
            workload: "sleep".into(),
            report: Some(dpb::MirrorReport { routes }),
        }
    }

    fn route(paths: Vec<dpb::PathCompare>, o: &[(&str, u64)]) -> dpb::RouteCompare {
        dpb::RouteCompare {
            route: "default/httpbin/0".into(),
            destination_service: "httpbin.default.svc.cluster.local".into(),
            outcomes: outcomes(o),
            paths,
            noisy_headers: vec!["etag".into()],
            noisy_json: vec![],
        }
    }

    fn status_sample(id: &str) -> dpb::CompareSample {
        dpb::CompareSample {
            request_id: id.into(),
            outcome: "status".into(),
            primary_status: 200,
            mirror_status: 418,
            headers: vec![],
            json_paths: vec![],
            latency_delta_us: 1_500,
        }
    }

    /// Two sleep pods mirrored the same route: 40 + 20 copies, of which 10 + 5 diverged on
    /// `/status/418`, one skipped.
    fn two_sidecars() -> Vec<pb::ProxyMirrorReport> {
        vec![
            // Out of order on purpose: the merge sorts by pod.
            proxy(
                "sleep-b",
                vec![route(
                    vec![
                        path(
                            "GET /status/{id}",
                            &[("match", 10), ("status", 5)],
                            Some(status_sample("b-1")),
                        ),
                        path("GET /get", &[("match", 5), ("skipped", 1)], None),
                    ],
                    &[("match", 15), ("status", 5), ("skipped", 1)],
                )],
            ),
            proxy(
                "sleep-a",
                vec![route(
                    vec![
                        path("GET /get", &[("match", 20)], None),
                        path(
                            "GET /status/{id}",
                            &[("match", 10), ("status", 10)],
                            Some(status_sample("a-1")),
                        ),
                    ],
                    &[("match", 30), ("status", 10)],
                )],
            ),
        ]
    }

    #[test]
    fn counts_of_every_sidecar_are_added() {
        let merged = merge(&two_sidecars());
        assert_eq!(merged.sidecars, 2);
        assert_eq!(merged.routes.len(), 1);
        let r = &merged.routes[0];
        assert_eq!(r.virtual_service, "default/httpbin");
        assert_eq!((r.compared, r.matched), (60, 45), "skipped is not compared");
        assert_eq!(r.match_rate, Some(0.75));
        assert_eq!(r.outcomes.get("skipped"), Some(&1));
        assert_eq!(r.sidecars, ["default/sleep-a", "default/sleep-b"]);
        assert_eq!(r.noisy_headers, ["etag"]);
        let paths: Vec<(&str, u64, u64)> = r
            .paths
            .iter()
            .map(|p| (p.path.as_str(), p.compared, p.divergences))
            .collect();
        assert_eq!(paths, [("GET /status/{id}", 35, 15), ("GET /get", 25, 0)]);
        let sample = r.paths[0].sample.as_ref().unwrap();
        assert_eq!(
            (sample.sidecar.as_str(), sample.request_id.as_str()),
            ("default/sleep-a", "a-1"),
            "the first sidecar in pod order gives the sample"
        );
    }

    #[test]
    fn table_lists_routes_then_only_diverging_paths() {
        let text = render(&merge(&two_sidecars()), false);
        let expected = "\
ROUTE               DESTINATION                         COMPARED   MATCH RATE   DIVERGENCES
default/httpbin/0   httpbin.default.svc.cluster.local   60         75.0%        status 15

DIVERGING PATHS OF default/httpbin/0
PATH               COMPARED   DIVERGED   OUTCOMES    SAMPLE REQUEST   STATUS (PRIMARY->MIRROR)   DIFFERS   LATENCY DELTA
GET /status/{id}   35         15         status 15   a-1              200->418                   status    +1.5ms
";
        assert_eq!(text, expected);
        let wide = render(&merge(&two_sidecars()), true);
        assert!(
            wide.lines()
                .next()
                .unwrap()
                .ends_with("SKIPPED   SIDECARS   NOISE (IGNORED)")
        );
        assert!(
            wide.contains("status 15     1         2          etag"),
            "{wide}"
        );
        assert!(wide.contains("+1.5ms          default/sleep-a"), "{wide}");
        assert!(
            !wide.contains("GET /get"),
            "matching paths are not divergences"
        );
    }

    #[test]
    fn table_shows_the_top_paths_and_wide_all() {
        let paths: Vec<dpb::PathCompare> = (0..TOP_PATHS + 2)
            .map(|i| path(&format!("GET /p{i}"), &[("body", i as u64 + 1)], None))
            .collect();
        let merged = merge(&[proxy("s", vec![route(paths, &[("body", 28)])])]);
        let table = render(&merged, false);
        assert!(
            table.contains("DIVERGING PATHS OF default/httpbin/0 (top 5 of 7; -o wide for all)")
        );
        assert!(
            table.contains("GET /p6") && !table.contains("GET /p1 "),
            "{table}"
        );
        let wide = render(&merged, true);
        assert!(wide.contains("GET /p0"), "{wide}");
    }

    #[test]
    fn samples_name_what_differed() {
        let s = |outcome: &str, primary, mirror, headers: &[&str], json: &[&str]| Sample {
            outcome: outcome.into(),
            primary_status: primary,
            mirror_status: mirror,
            headers: headers.iter().map(|h| h.to_string()).collect(),
            json_paths: json.iter().map(|h| h.to_string()).collect(),
            ..Sample::default()
        };
        assert_eq!(
            differs(&s("headers", 200, 200, &["x-version"], &[]), false),
            "header x-version"
        );
        let many = s("status", 200, 500, &["a", "b"], &["$.origin", "$.args[0]"]);
        assert_eq!(differs(&many, false), "status, 2 headers, 2 JSON paths");
        assert_eq!(
            differs(&many, true),
            "status, header a, header b, body $.origin, body $.args[0]"
        );
        assert_eq!(differs(&s("timeout", 200, 0, &[], &[]), false), "timeout");
        assert_eq!(
            differs(&s("mirror_error", 200, 0, &[], &[]), true),
            "mirror_error"
        );
        assert_eq!(latency(-350), "-350us");
        assert_eq!(latency(2_100_000), "+2.10s");
        assert_eq!(mirror_status(0), "none");
    }

    #[test]
    fn nothing_compared_has_no_rate() {
        let merged = merge(&[proxy("s", vec![route(vec![], &[("skipped", 3)])])]);
        assert_eq!(merged.routes[0].match_rate, None);
        assert!(render(&merged, false).contains("0          -            -"));
        assert_eq!(merge(&[]), MergedReport::default());
    }
}
