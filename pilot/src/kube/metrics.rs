//! The Kubernetes registry's counters, rendered in Prometheus' text format for
//! `pilot serve --monitoring-listen` (discovery, the config API and pilot itself render theirs; these
//! are plain atomics and maps under a short lock, taken once per watch event).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges of the Kubernetes registry.
#[derive(Debug, Default)]
pub struct KubeMetrics {
    /// (kind, event) -> watch events received.
    events: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// kind -> objects of the cluster currently refused (invalid), whether or not an older valid
    /// version is in force.
    invalid: Mutex<BTreeMap<&'static str, u64>>,
    /// Snapshots published (each one a set of objects that differs from the previous).
    snapshots: AtomicU64,
    /// Workload sets published.
    workload_sets: AtomicU64,
}

impl KubeMetrics {
    /// Counts one watch event (`list`, `apply`, `delete`, `restart`, `synced`, `error`).
    pub fn event(&self, kind: &'static str, event: &'static str) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        *events.entry((kind, event)).or_default() += 1;
    }

    /// Sets the number of invalid objects of every kind (kinds missing from `counts` are 0).
    pub fn set_invalid(&self, counts: &BTreeMap<&'static str, u64>) {
        let mut invalid = self.invalid.lock().unwrap_or_else(|p| p.into_inner());
        for value in invalid.values_mut() {
            *value = 0;
        }
        for (kind, n) in counts {
            invalid.insert(kind, *n);
        }
    }

    /// Counts a published snapshot.
    pub fn snapshot_published(&self) {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a published workload set.
    pub fn workloads_published(&self) {
        self.workload_sets.fetch_add(1, Ordering::Relaxed);
    }

    /// Watch events of `kind` and `event` so far (for tests and logs).
    pub fn events(&self, kind: &str, event: &str) -> u64 {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events
            .iter()
            .filter(|((k, e), _)| *k == kind && *e == event)
            .map(|(_, n)| n)
            .sum()
    }

    /// Snapshots published so far.
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "weft_pilot_invalid_objects",
            "gauge",
            "Objects of the cluster pilot refuses (never sent to a sidecar).",
        );
        for (kind, n) in self
            .invalid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "weft_pilot_invalid_objects{{kind=\"{kind}\"}} {n}");
        }
        family(
            &mut out,
            "weft_pilot_kube_watch_events_total",
            "counter",
            "Kubernetes watch events received.",
        );
        for ((kind, event), n) in self.events.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "weft_pilot_kube_watch_events_total{{kind=\"{kind}\",event=\"{event}\"}} {n}"
            );
        }
        for (name, help, value) in [
            (
                "weft_pilot_kube_snapshots_total",
                "Config snapshots published from the cluster (only when the objects changed).",
                &self.snapshots,
            ),
            (
                "weft_pilot_kube_workload_sets_total",
                "Workload sets published from Pods and EndpointSlices (only when they changed).",
                &self.workload_sets,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_zeroes_kinds_no_longer_invalid() {
        let m = KubeMetrics::default();
        m.event("VirtualService", "apply");
        m.event("VirtualService", "apply");
        m.set_invalid(&[("VirtualService", 2)].into_iter().collect());
        m.set_invalid(&BTreeMap::new());
        let text = m.render();
        assert!(text.contains(
            "weft_pilot_kube_watch_events_total{kind=\"VirtualService\",event=\"apply\"} 2\n"
        ));
        assert!(text.contains("weft_pilot_invalid_objects{kind=\"VirtualService\"} 0\n"));
        assert_eq!(m.events("VirtualService", "apply"), 2);
    }
}
