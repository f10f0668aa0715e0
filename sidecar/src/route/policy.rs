//! The cluster policies of the route model that the upstream side enforces: outlier detection's
//! settings (`upstream::outlier` keeps the state) and the connection pool's limits
//! (`upstream::limits` counts against them), as pilot sends them with Envoy's reading of Istio's
//! fields. Pure data, so the route model depends on nothing of the upstream side.

use std::time::Duration;

use weft_proto::discovery as pb;

/// Envoy's `max_ejection_time` when unset; Istio leaves it unset unless `baseEjectionTime` is
/// longer, in which case it sets it to the base (so the cap is the larger of the two).
const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// One cluster's outlier detection settings, with Envoy's reading of Istio's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive 5xx (and, unless split, local-origin failures) that eject; 0 = off.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and, unless split, local-origin failures) that eject; 0 = off.
    pub consecutive_gateway_errors: u32,
    /// Local-origin failures count apart from the upstream's answers.
    pub split_local_origin: bool,
    /// With `split_local_origin`: consecutive local-origin failures that eject; 0 = off.
    pub consecutive_local_origin: u32,
    /// How often ejections are reviewed (never zero).
    pub interval: Duration,
    /// Ejection time of a first ejection (never zero).
    pub base_ejection_time: Duration,
    /// Cap on base × multiplier: the larger of 300 s and the base.
    pub max_ejection_time: Duration,
    /// At most this percent (0..=100) of the cluster's endpoints are ejected at once.
    pub max_ejection_percent: u32,
    /// Allow one ejection when none is in effect even if it exceeds `max_ejection_percent`
    /// (Envoy's `always_eject_one_host`; Istio never sets it).
    pub always_eject_one: bool,
    /// Below this percent (0..=100) of non-ejected endpoints the cluster is in panic and ejections
    /// are ignored (Envoy's `healthy_panic_threshold`); 0 = never.
    pub min_health_percent: u32,
}

impl OutlierPolicy {
    /// The policy pilot sent (it has already filled Istio's defaults in), or `None` when no
    /// ejection can ever happen: every detector is off, or `max_ejection_percent` is 0.
    pub fn from_pb(p: &pb::OutlierDetection) -> Option<OutlierPolicy> {
        let split = p.split_external_local_origin_errors;
        // Envoy reads consecutive_local_origin_failure only in split mode.
        let local = if split {
            p.consecutive_local_origin_failures
        } else {
            0
        };
        if p.consecutive_5xx == 0 && p.consecutive_gateway_errors == 0 && local == 0 {
            return None;
        }
        let max_ejection_percent = p.max_ejection_percent.min(100);
        if max_ejection_percent == 0 {
            return None;
        }
        // Validation refuses durations under 1 ms; a zero here would divide by zero in the ticks.
        let interval = Duration::from_millis(p.interval_ms.max(1));
        let base_ejection_time = Duration::from_millis(p.base_ejection_time_ms.max(1));
        Some(OutlierPolicy {
            consecutive_5xx: p.consecutive_5xx,
            consecutive_gateway_errors: p.consecutive_gateway_errors,
            split_local_origin: split,
            consecutive_local_origin: local,
            interval,
            base_ejection_time,
            max_ejection_time: base_ejection_time.max(DEFAULT_MAX_EJECTION_TIME),
            max_ejection_percent,
            always_eject_one: false,
            min_health_percent: p.min_health_percent.min(100),
        })
    }
}

/// The resolved limits; equal settings mean equal behaviour, so a push that leaves them unchanged
/// can keep the old `upstream::limits::Limits` (and the requests it counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PoolLimits {
    /// Requests in flight to the cluster at once; 0 = unlimited.
    pub max_active: u32,
    /// Requests waiting for one of those places; 0 = unlimited.
    pub max_pending: u32,
    /// Retries outstanding to the cluster at once; 0 = unlimited.
    pub max_retries: u32,
}

impl PoolLimits {
    /// From pilot's model: the lower non-zero of `maxConnections` and `http2MaxRequests` bounds
    /// the requests in flight.
    pub fn from_pb(p: &pb::ConnectionPool) -> Self {
        Self {
            max_active: lower_limit(p.max_connections, p.max_requests),
            max_pending: p.max_pending_requests,
            max_retries: p.max_retries,
        }
    }
}

/// The lower of two limits where 0 means none.
fn lower_limit(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}
