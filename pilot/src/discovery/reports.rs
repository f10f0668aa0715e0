//! The latest shadow-diff report of each sidecar (`DiscoveryRequest.mirror_report`), for
//! `pilot mirror-report`.
//!
//! A report is a summary the sidecar recomputes (counts since it started), so only the latest one
//! per pod is kept; it replaces the previous one whole. Reports never reach the push path: they
//! are stored here and read only by the config API.
//!
//! Bounds, so a sidecar (buggy or hostile; its certificate only proves it is some workload) cannot
//! grow pilot: a report whose encoding exceeds [`MAX_REPORT_BYTES`] is dropped; of what remains
//! at most [`MAX_ROUTES`] routes, [`MAX_PATHS`] paths per route, [`MAX_OUTCOMES`] outcomes per
//! map and [`MAX_NAMES`] header/JSON names per list are kept, and every string is cut to
//! [`MAX_STRING`] bytes. One report per connected stream; after its stream ends a pod's report is
//! kept for [`REPORT_MEMORY`] (the counts of a pod that went away still tell what v2 did, and a
//! reconnecting sidecar replaces it), at most [`MAX_DISCONNECTED`] of them, oldest dropped first.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message as _;
use weft_proto::discovery as pb;

/// Largest report kept (encoded). The sidecar's own bounds give a few KiB; 256 KiB leaves room
/// for many routes without letting one stream hold megabytes.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Routes kept per report.
pub const MAX_ROUTES: usize = 64;
/// Paths kept per route (the sidecar sends the busiest first).
pub const MAX_PATHS: usize = 32;
/// Entries kept per outcome map (there are seven outcomes).
pub const MAX_OUTCOMES: usize = 16;
/// Header names or JSON paths kept per list.
pub const MAX_NAMES: usize = 32;
/// Longest string kept, in bytes (cut at a character boundary).
pub const MAX_STRING: usize = 256;
/// How long the report of a disconnected sidecar is kept (as `proxy-status` keeps refusals).
pub const REPORT_MEMORY: Duration = Duration::from_secs(600);
/// How many disconnected sidecars' reports are kept at most.
pub const MAX_DISCONNECTED: usize = 1024;

/// One pod's latest report.
#[derive(Clone, Debug)]
pub struct StoredReport {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Its workload (see [`workload_of`]).
    pub workload: String,
    /// The report, bounded.
    pub report: pb::MirrorReport,
    /// The stream that sent it (a reconnecting sidecar's old stream may end after the new one sent).
    stream: u64,
    /// When that stream ended (`None`: still connected).
    disconnected: Option<Instant>,
}

/// Why a report was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Larger than [`MAX_REPORT_BYTES`].
    #[error("mirror report of {size} bytes exceeds the {MAX_REPORT_BYTES} byte limit")]
    TooLarge {
        /// Its encoded size.
        size: usize,
    },
}

/// The reports, by pod (namespace, name).
#[derive(Debug, Default)]
pub struct MirrorReports {
    reports: Mutex<BTreeMap<(String, String), StoredReport>>,
}

impl MirrorReports {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), StoredReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `report` as the latest of the pod `namespace/name`, sent on its open stream `stream`.
    pub fn record(
        &self,
        stream: u64,
        namespace: &str,
        name: &str,
        workload: &str,
        mut report: pb::MirrorReport,
    ) -> Result<(), ReportError> {
        let size = report.encoded_len();
        if size > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge { size });
        }
        bound(&mut report);
        self.lock().insert(
            (namespace.to_string(), name.to_string()),
            StoredReport {
                name: name.to_string(),
                namespace: namespace.to_string(),
                workload: workload.to_string(),
                report,
                stream,
                disconnected: None,
            },
        );
        Ok(())
    }

    /// Stream `stream` of pod `namespace/name` ended: the report it sent is kept for
    /// [`REPORT_MEMORY`]. One a newer stream of the pod sent stays a connected one's.
    pub fn disconnected(&self, stream: u64, namespace: &str, name: &str) {
        self.disconnected_at(stream, namespace, name, Instant::now());
    }

    fn disconnected_at(&self, stream: u64, namespace: &str, name: &str, now: Instant) {
        let mut reports = self.lock();
        if let Some(stored) = reports.get_mut(&(namespace.to_string(), name.to_string()))
            && stored.stream == stream
        {
            stored.disconnected = Some(now);
        }
        forget_old(&mut reports, now);
    }

    /// Every kept report, sorted by namespace and pod name.
    pub fn list(&self) -> Vec<StoredReport> {
        self.list_at(Instant::now())
    }

    fn list_at(&self, now: Instant) -> Vec<StoredReport> {
        let mut reports = self.lock();
        forget_old(&mut reports, now);
        reports.values().cloned().collect()
    }
}

/// Drops the reports of sidecars gone for longer than [`REPORT_MEMORY`], then the oldest gone
/// ones beyond [`MAX_DISCONNECTED`].
fn forget_old(reports: &mut BTreeMap<(String, String), StoredReport>, now: Instant) {
    reports.retain(|_, r| {
        r.disconnected
            .is_none_or(|at| now.saturating_duration_since(at) < REPORT_MEMORY)
    });
    let mut gone: Vec<(Instant, (String, String))> = reports
        .iter()
        .filter_map(|(key, r)| r.disconnected.map(|at| (at, key.clone())))
        .collect();
    if gone.len() > MAX_DISCONNECTED {
        gone.sort();
        for (_, key) in gone.iter().take(gone.len() - MAX_DISCONNECTED) {
            reports.remove(key);
        }
    }
}

/// The workload a pod's report is shown under: Istio's canonical service (the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`, else `app`), else the
/// pod name.
pub fn workload_of(name: &str, labels: &BTreeMap<String, String>) -> String {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|key| labels.get(*key).filter(|v| !v.is_empty()))
    .cloned()
    .unwrap_or_else(|| name.to_string())
}

/// Applies the per-report bounds in place.
fn bound(report: &mut pb::MirrorReport) {
    report.routes.truncate(MAX_ROUTES);
    for route in &mut report.routes {
        cut(&mut route.route);
        cut(&mut route.destination_service);
        bound_outcomes(&mut route.outcomes);
        bound_names(&mut route.noisy_headers);
        bound_names(&mut route.noisy_json);
        route.paths.truncate(MAX_PATHS);
        for path in &mut route.paths {
            cut(&mut path.path);
            bound_outcomes(&mut path.outcomes);
            if let Some(sample) = &mut path.sample {
                cut(&mut sample.request_id);
                cut(&mut sample.outcome);
                bound_names(&mut sample.headers);
                bound_names(&mut sample.json_paths);
            }
        }
    }
}

fn bound_outcomes(outcomes: &mut std::collections::HashMap<String, u64>) {
    if outcomes.len() > MAX_OUTCOMES || outcomes.keys().any(|k| k.len() > MAX_STRING) {
        let mut kept: Vec<(String, u64)> = outcomes.drain().collect();
        kept.sort();
        kept.truncate(MAX_OUTCOMES);
        *outcomes = kept
            .into_iter()
            .map(|(mut k, v)| {
                cut(&mut k);
                (k, v)
            })
            .collect();
    }
}

fn bound_names(names: &mut Vec<String>) {
    names.truncate(MAX_NAMES);
    names.iter_mut().for_each(cut);
}

/// Cuts `s` to at most [`MAX_STRING`] bytes, at a character boundary.
fn cut(s: &mut String) {
    if s.len() > MAX_STRING {
        let end = (0..=MAX_STRING)
            .rev()
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(0);
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(routes: usize, paths: usize) -> pb::MirrorReport {
        pb::MirrorReport {
            routes: (0..routes)
                .map(|r| pb::RouteCompare {
                    route: format!("default/httpbin/{r}"),
                    destination_service: "httpbin.default.svc.cluster.local".into(),
                    outcomes: [("match".to_string(), 3)].into_iter().collect(),
                    paths: (0..paths)
                        .map(|p| pb::PathCompare {
                            path: format!("GET /p{p}"),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn latest_report_per_pod_replaces_the_previous() {
        let reports = MirrorReports::default();
        reports
            .record(1, "default", "sleep-1", "sleep", report(1, 1))
            .unwrap();
        reports
            .record(1, "default", "sleep-1", "sleep", report(2, 1))
            .unwrap();
        reports
            .record(2, "other", "sleep-1", "sleep", report(1, 1))
            .unwrap();
        let list = reports.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].namespace.as_str(), list[0].report.routes.len()),
            ("default", 2)
        );
        assert_eq!(list[1].namespace, "other");
    }

    #[test]
    fn reports_are_bounded() {
        let reports = MirrorReports::default();
        let mut big = report(MAX_ROUTES + 5, MAX_PATHS + 5);
        big.routes[0].route = "é".repeat(MAX_STRING);
        big.routes[0].noisy_headers = vec!["x".into(); MAX_NAMES + 1];
        big.routes[0].outcomes = (0..MAX_OUTCOMES + 3)
            .map(|i| (format!("o{i}"), 1))
            .collect();
        reports.record(1, "default", "a", "a", big).unwrap();
        let kept = &reports.list()[0].report;
        assert_eq!(kept.routes.len(), MAX_ROUTES);
        assert!(kept.routes.iter().all(|r| r.paths.len() == MAX_PATHS));
        assert!(kept.routes[0].route.len() <= MAX_STRING);
        assert_eq!(kept.routes[0].route.chars().count(), MAX_STRING / 2);
        assert_eq!(kept.routes[0].noisy_headers.len(), MAX_NAMES);
        assert_eq!(kept.routes[0].outcomes.len(), MAX_OUTCOMES);

        let mut huge = report(1, 1);
        huge.routes[0].noisy_json = vec!["y".repeat(1024); MAX_REPORT_BYTES / 1024 + 1];
        assert!(matches!(
            reports.record(2, "default", "b", "b", huge),
            Err(ReportError::TooLarge { .. })
        ));
        assert_eq!(reports.list().len(), 1, "the oversized report is not kept");
    }

    #[test]
    fn disconnected_reports_expire_and_are_capped() {
        let reports = MirrorReports::default();
        let t0 = Instant::now();
        reports
            .record(1, "default", "gone", "sleep", report(1, 1))
            .unwrap();
        reports
            .record(2, "default", "here", "sleep", report(1, 1))
            .unwrap();
        reports.disconnected_at(1, "default", "gone", t0);
        assert_eq!(
            reports.list_at(t0 + REPORT_MEMORY / 2).len(),
            2,
            "kept a while"
        );
        let later = reports.list_at(t0 + REPORT_MEMORY);
        assert_eq!(later.len(), 1, "gone after REPORT_MEMORY");
        assert_eq!(
            later[0].name, "here",
            "a connected sidecar's report never expires"
        );

        for i in 0..MAX_DISCONNECTED + 2 {
            let name = format!("p{i}");
            reports
                .record(100 + i as u64, "default", &name, "w", report(0, 0))
                .unwrap();
            reports.disconnected_at(
                100 + i as u64,
                "default",
                &name,
                t0 + Duration::from_millis(i as u64),
            );
        }
        let list = reports.list_at(t0 + Duration::from_secs(1));
        assert_eq!(
            list.len(),
            MAX_DISCONNECTED + 1,
            "the connected one plus the cap"
        );
        assert!(
            !list.iter().any(|r| r.name == "p0" || r.name == "p1"),
            "oldest dropped"
        );
    }

    #[test]
    fn an_old_stream_ending_leaves_the_new_streams_report_connected() {
        let reports = MirrorReports::default();
        let t0 = Instant::now();
        reports
            .record(1, "default", "sleep-1", "sleep", report(1, 1))
            .unwrap();
        // The sidecar reconnected (stream 2) and reported before pilot saw stream 1 end.
        reports
            .record(2, "default", "sleep-1", "sleep", report(2, 1))
            .unwrap();
        reports.disconnected_at(1, "default", "sleep-1", t0);
        let list = reports.list_at(t0 + REPORT_MEMORY * 2);
        assert_eq!(list.len(), 1, "never expires while stream 2 is open");
        assert_eq!(list[0].report.routes.len(), 2);
        reports.disconnected_at(2, "default", "sleep-1", t0);
        assert!(reports.list_at(t0 + REPORT_MEMORY).is_empty());
    }

    #[test]
    fn workload_is_the_canonical_service_else_the_pod() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            workload_of("sleep-0", &labels(&[("app", "sleep")])),
            "sleep"
        );
        assert_eq!(
            workload_of(
                "x",
                &labels(&[("app", "a"), ("service.istio.io/canonical-name", "c")])
            ),
            "c"
        );
        assert_eq!(workload_of("sleep-0", &labels(&[])), "sleep-0");
    }
}
