//! Endpoint selection within a cluster: the route model's endpoints, their runtime state
//! ([`ClusterState`]: requests in flight, the round-robin cursor).

use std::sync::atomic::Ordering;

use crate::route::{Cluster, Endpoint, LbPolicy};
use crate::upstream::state::{ClusterState, EndpointState};

/// Picks an endpoint, or `None` when the cluster has none. `skip` excludes an endpoint that just
/// failed (a retry goes elsewhere when there is an elsewhere).
pub fn pick<'c>(
    cluster: &'c Cluster,
    state: &ClusterState,
    skip: Option<usize>,
) -> Option<(usize, &'c Endpoint)> {
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
        LbPolicy::RoundRobin => map(state.cursor.fetch_add(1, Ordering::Relaxed) % candidates),
        LbPolicy::Random | LbPolicy::Passthrough => map(fastrand::usize(..candidates)),
        LbPolicy::LeastRequest => {
            // Power of two choices (Envoy's LEAST_REQUEST with the default choice_count 2).
            let a = map(fastrand::usize(..candidates));
            let b = map(fastrand::usize(..candidates));
            let load = |i: usize| {
                state
                    .endpoints
                    .get(i)
                    .map_or(0, |e| e.in_flight.load(Ordering::Relaxed))
            };
            if load(b) < load(a) { b } else { a }
        }
    };
    let i = match &state.outlier {
        Some(detector) => {
            let now = std::time::Instant::now();
            if detector.is_ejected(i, now) {
                // Envoy leaves ejected hosts out of the balancer (panic aside, which `is_ejected`
                // already answers): the next one in service, else no healthy upstream.
                (1..n)
                    .map(|k| (i + k) % n)
                    .find(|&j| Some(j) != skip && !detector.is_ejected(j, now))
                    .or_else(|| skip.filter(|&s| !detector.is_ejected(s, now)))?
            } else {
                i
            }
        }
        None => i,
    };
    cluster.endpoints.get(i).map(|e| (i, e))
}

/// Counts a request in flight on an endpoint for as long as it lives.
#[derive(Debug)]
pub struct InFlight<'a>(Option<&'a EndpointState>);

impl<'a> InFlight<'a> {
    /// Starts counting on endpoint `idx` of `state`.
    pub fn new(state: &'a ClusterState, idx: usize) -> Self {
        let e = state.endpoints.get(idx).map(|e| &**e);
        if let Some(e) = e {
            e.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        Self(e)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.0 {
            e.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cluster(lb: LbPolicy, n: usize) -> (Cluster, ClusterState) {
        let c = Cluster {
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
                    workload_name: String::new(),
                    app: String::new(),
                    version: String::new(),
                    canonical_service: String::new(),
                    canonical_revision: String::new(),
                })
                .collect(),
            lb,
            tls: crate::route::TlsMode::Auto,
            connect_timeout: Duration::from_secs(1),
            outlier: None,
            limits: Default::default(),
            max_requests_per_connection: 0,
            idle_timeout: None,
            index: 0,
        };
        let state = ClusterState::for_cluster(&c);
        (c, state)
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let (c, s) = cluster(LbPolicy::RoundRobin, 3);
        let picks: Vec<usize> = (0..6).map(|_| pick(&c, &s, None).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        let (c, s) = cluster(LbPolicy::RoundRobin, 0);
        assert!(pick(&c, &s, None).is_none());
    }

    #[test]
    fn retries_skip_the_failed_endpoint_when_there_is_another() {
        for lb in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
        ] {
            let (c, s) = cluster(lb, 3);
            for _ in 0..50 {
                assert_ne!(pick(&c, &s, Some(1)).unwrap().0, 1, "{lb:?}");
            }
            let (one, s) = cluster(lb, 1);
            assert_eq!(
                pick(&one, &s, Some(0)).unwrap().0,
                0,
                "a lone endpoint is retried"
            );
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let (c, s) = cluster(LbPolicy::LeastRequest, 2);
        s.endpoints[0].in_flight.store(100, Ordering::Relaxed);
        let busy = (0..200)
            .filter(|_| pick(&c, &s, None).unwrap().0 == 0)
            .count();
        // Only when both random choices land on the busy one (about 1 in 4).
        assert!(busy < 90, "busy endpoint picked {busy} of 200 times");
        let _guard = InFlight::new(&s, 1);
        assert_eq!(s.endpoints[1].in_flight.load(Ordering::Relaxed), 1);
    }
}
