//! What discovery counts, with istiod's names (`pilot/pkg/xds/monitoring.go`), owned by the
//! [`super::ProxyTable`] every session shares and rendered by `pilot serve --monitoring-listen`.
//!
//! - `pilot_xds{version}` (gauge): sidecars connected now, by the version each reported in its
//!   `Node` (`unknown` for none, or one that is not plain: `super::proxy_version`), as Istio labels it
//!   with the proxy's Istio version. With no sidecar connected, one `unknown` sample of 0.
//! - `pilot_xds_pushes{type}` (counter, no `_total`, as Istio's): responses sent. Istio counts one per
//!   xDS type (`cds`, `eds`, `lds`, `rds`); weft pushes one whole `ProxyConfig` (services, clusters
//!   with their endpoints, listeners, routes) per change, counted once as `type="proxyconfig"`, and a
//!   push that could not be sent (the stream had gone) as `proxyconfig_senderr` (Istio's
//!   `cds_senderr` and friends). Istio's queries summed over `type` mean the same here.
//! - `pilot_xds_push_time{type}` (histogram, seconds, Istio's buckets): building and sending one
//!   push, from the context it is computed from to the response queued on the stream, without the
//!   time spent waiting for a push slot (Istio's push throttle; its queue time is a metric of its own).
//! - `pilot_proxy_convergence_time` (histogram, seconds, Istio's buckets): from the first config or
//!   registry change a push context was debounced from to that context's push being queued on a
//!   sidecar's stream, as Istio measures it (sent, not ACKed: the ACK's delay is the sidecar's and
//!   the network's). Pushes of the first context and first pushes to newly connected sidecars are
//!   not counted (there was no change to converge from).
//! - `pilot_total_xds_rejects{type}` (counter): NACKs of a response, `type="proxyconfig"`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use weft_ca::monitoring::{Exposition, Histogram, Kind};

/// istiod's push-time buckets (pilot_xds_push_time), seconds.
pub const PUSH_TIME_BUCKETS: [f64; 8] = [0.01, 0.1, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];
/// istiod's convergence buckets (pilot_proxy_convergence_time), seconds.
pub const CONVERGENCE_BUCKETS: [f64; 8] = [0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];
/// The `type` label of everything weft pushes: one whole `ProxyConfig`.
pub const PUSH_TYPE: &str = "proxyconfig";
/// The `pilot_xds{version}` of sidecars that report no (plain) version.
pub const UNKNOWN_VERSION: &str = "unknown";

/// Discovery's counters and histograms.
#[derive(Debug)]
pub struct DiscoveryMetrics {
    pushes: AtomicU64,
    send_errors: AtomicU64,
    rejects: AtomicU64,
    push_time: Histogram,
    convergence: Histogram,
}

impl Default for DiscoveryMetrics {
    fn default() -> Self {
        Self {
            pushes: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            push_time: Histogram::new(&PUSH_TIME_BUCKETS),
            convergence: Histogram::new(&CONVERGENCE_BUCKETS),
        }
    }
}

impl DiscoveryMetrics {
    /// Counts a response queued on a stream after `took` building and sending it; `converged` is
    /// the time since the change it carries, if it carries one.
    pub(super) fn pushed(&self, took: Duration, converged: Option<Duration>) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.push_time.observe(took.as_secs_f64());
        if let Some(converged) = converged {
            self.convergence.observe(converged.as_secs_f64());
        }
    }

    /// Counts a push that could not be queued (the stream was gone).
    pub(super) fn send_failed(&self) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a NACK.
    pub(super) fn rejected(&self) {
        self.rejects.fetch_add(1, Ordering::Relaxed);
    }

    /// Responses queued so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// NACKs so far.
    pub fn rejects(&self) -> u64 {
        self.rejects.load(Ordering::Relaxed)
    }

    /// Convergence times observed so far.
    pub fn converged(&self) -> u64 {
        self.convergence.count()
    }

    /// Writes every family, with the sidecars `connected` by version.
    pub fn render(&self, out: &mut Exposition, connected: &BTreeMap<String, usize>) {
        let family = out.family(
            "pilot_xds",
            Kind::Gauge,
            "Number of endpoints connected to this pilot using XDS.",
        );
        if connected.is_empty() {
            family.sample("pilot_xds", &[("version", UNKNOWN_VERSION)], 0.0);
        }
        for (version, n) in connected {
            family.sample("pilot_xds", &[("version", version)], *n as f64);
        }
        out.family(
            "pilot_xds_pushes",
            Kind::Counter,
            "Pilot build and send errors for lds, rds, cds and eds.",
        )
        .sample(
            "pilot_xds_pushes",
            &[("type", PUSH_TYPE)],
            self.pushes() as f64,
        )
        .sample(
            "pilot_xds_pushes",
            &[("type", "proxyconfig_senderr")],
            self.send_errors.load(Ordering::Relaxed) as f64,
        );
        out.family(
            "pilot_total_xds_rejects",
            Kind::Counter,
            "Total number of XDS responses from pilot rejected by proxy.",
        )
        .sample(
            "pilot_total_xds_rejects",
            &[("type", PUSH_TYPE)],
            self.rejects() as f64,
        );
        out.family(
            "pilot_xds_push_time",
            Kind::Histogram,
            "Total time in seconds Pilot takes to push lds, rds, cds and eds.",
        );
        self.push_time
            .render(out, "pilot_xds_push_time", &[("type", PUSH_TYPE)]);
        out.family(
            "pilot_proxy_convergence_time",
            Kind::Histogram,
            "Delay in seconds between config change and a proxy receiving all required configuration.",
        );
        self.convergence
            .render(out, "pilot_proxy_convergence_time", &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_families_with_what_was_counted() {
        let m = DiscoveryMetrics::default();
        m.pushed(Duration::from_millis(5), None);
        m.pushed(Duration::from_millis(50), Some(Duration::from_millis(300)));
        m.send_failed();
        m.rejected();
        let mut out = Exposition::default();
        let connected = BTreeMap::from([("0.1.0".to_owned(), 2), ("unknown".to_owned(), 1)]);
        m.render(&mut out, &connected);
        let text = out.finish();
        let mut none = Exposition::default();
        m.render(&mut none, &BTreeMap::new());
        assert!(
            none.finish()
                .contains("\npilot_xds{version=\"unknown\"} 0\n"),
            "no sidecar: one sample of 0"
        );
        for line in [
            "# TYPE pilot_xds gauge\n",
            "pilot_xds{version=\"0.1.0\"} 2\n",
            "pilot_xds{version=\"unknown\"} 1\n",
            "# TYPE pilot_xds_pushes counter\n",
            "pilot_xds_pushes{type=\"proxyconfig\"} 2\n",
            "pilot_xds_pushes{type=\"proxyconfig_senderr\"} 1\n",
            "pilot_total_xds_rejects{type=\"proxyconfig\"} 1\n",
            "pilot_xds_push_time_bucket{type=\"proxyconfig\",le=\"0.01\"} 1\n",
            "pilot_xds_push_time_bucket{type=\"proxyconfig\",le=\"0.1\"} 2\n",
            "pilot_xds_push_time_count{type=\"proxyconfig\"} 2\n",
            "pilot_proxy_convergence_time_bucket{le=\"0.1\"} 0\n",
            "pilot_proxy_convergence_time_bucket{le=\"0.5\"} 1\n",
            "pilot_proxy_convergence_time_count 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert_eq!((m.pushes(), m.rejects(), m.converged()), (2, 1, 1));
    }
}
