//! Endpoint selection within a cluster.

use std::sync::atomic::Ordering;

use crate::route::{Cluster, Endpoint, LbPolicy};

/// Picks an endpoint, or `None` when the cluster has none. `skip` excludes an endpoint that just
/// failed (a retry goes elsewhere when there is an elsewhere).
pub fn pick(cluster: &Cluster, skip: Option<usize>) -> Option<(usize, &Endpoint)> {
    let n = cluster.endpoints.len();
    let candidates = match skip {
        Some(_) if n > 1 => n - 1,
        _ => n,
    };
    if candidates == 0 {
        return None;
    }
    // Index among the candidates, mapped past the skipped endpoint.
    let map = |i: usize| match skip {
        Some(s) if n > 1 && i >= s => i + 1,
        _ => i,
    };
    let i = match cluster.lb {
        LbPolicy::RoundRobin => map(cluster.cursor.fetch_add(1, Ordering::Relaxed) % candidates),
        LbPolicy::Random | LbPolicy::Passthrough => map(fastrand::usize(..candidates)),
        LbPolicy::LeastRequest => {
            // Power of two choices (Envoy's LEAST_REQUEST with the default choice_count 2).
            let a = map(fastrand::usize(..candidates));
            let b = map(fastrand::usize(..candidates));
            let load = |i: usize| cluster.endpoints[i].in_flight.load(Ordering::Relaxed);
            if load(b) < load(a) { b } else { a }
        }
    };
    cluster.endpoints.get(i).map(|e| (i, e))
}

/// Counts a request in flight on an endpoint for as long as it lives.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Endpoint);

impl<'a> InFlight<'a> {
    /// Starts counting.
    pub fn new(e: &'a Endpoint) -> Self {
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(e)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicUsize};
    use std::time::Duration;

    fn cluster(lb: LbPolicy, n: usize) -> Cluster {
        Cluster {
            name: "c".into(),
            service_hostname: "h".into(),
            port: 80,
            subset: String::new(),
            endpoints: (0..n)
                .map(|i| Endpoint {
                    dial: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                    app_port: 80,
                    identity: None,
                    workload: format!("ns/p{i}"),
                    in_flight: AtomicU32::new(0),
                    metric_labels: crate::telemetry::Labels::new(String::new()),
                })
                .collect(),
            lb,
            tls: crate::route::TlsMode::Auto,
            connect_timeout: Duration::from_secs(1),
            cursor: AtomicUsize::new(0),
            metric_labels: crate::telemetry::Labels::new(String::new()),
        }
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let c = cluster(LbPolicy::RoundRobin, 3);
        let picks: Vec<usize> = (0..6).map(|_| pick(&c, None).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert!(pick(&cluster(LbPolicy::RoundRobin, 0), None).is_none());
    }

    #[test]
    fn retries_skip_the_failed_endpoint_when_there_is_another() {
        for lb in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
        ] {
            let c = cluster(lb, 3);
            for _ in 0..50 {
                assert_ne!(pick(&c, Some(1)).unwrap().0, 1, "{lb:?}");
            }
            let one = cluster(lb, 1);
            assert_eq!(
                pick(&one, Some(0)).unwrap().0,
                0,
                "a lone endpoint is retried"
            );
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let c = cluster(LbPolicy::LeastRequest, 2);
        c.endpoints[0].in_flight.store(100, Ordering::Relaxed);
        let busy = (0..200).filter(|_| pick(&c, None).unwrap().0 == 0).count();
        // Only when both random choices land on the busy one (about 1 in 4).
        assert!(busy < 90, "busy endpoint picked {busy} of 200 times");
        let _guard = InFlight::new(&c.endpoints[1]);
        assert_eq!(c.endpoints[1].in_flight.load(Ordering::Relaxed), 1);
    }
}
