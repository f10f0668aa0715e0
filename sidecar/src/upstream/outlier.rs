//! Outlier detection: Envoy's consecutive-error ejection, as Istio configures it from a
//! DestinationRule's `trafficPolicy.outlierDetection` (semantics §2.5; Envoy's
//! `outlier_detection_impl.cc` is the reference for what the docs leave open). Success-rate and
//! failure-percentage ejection are off in Istio and not built.
//!
//! What the request path does with it:
//! - keeps one [`EndpointHealth`] per endpoint of a cluster and hands the same `Arc` to the
//!   [`Detector`] built for the next config push while the endpoint is still in that cluster, so an
//!   ejection (and the counters and multiplier behind it) outlives pushes. Health belongs to the
//!   endpoint *in one cluster*, as in Envoy: key it by cluster and address, not by address alone;
//! - asks [`Detector::is_ejected`] for each candidate of a pick (one relaxed atomic load while the
//!   endpoint is not ejected; no lock ever);
//! - tells [`Detector::report`] how each attempt ended, and logs and counts the [`Ejection`] it may
//!   return.
//!
//! Time is always passed in, never read here, so tests run hours of ejections in microseconds.
//! Instants are stored as signed nanoseconds from a process-wide epoch (the first instant this
//! module ever converts is pinned as `Instant::now()`; earlier instants are negative), which keeps
//! the ejection deadline in one `AtomicI64`.
//!
//! Envoy reviews ejections on a timer every `interval`; weft has no background task and instead
//! evaluates that timer lazily. The ticks lie on a fixed grid (epoch + k × interval): an ejected
//! endpoint returns at the first tick at or after its ejection time has passed, and every tick an
//! endpoint spends back in service lowers its ejection multiplier by one. Envoy's timer phase is
//! arbitrary too (it starts with the cluster), so a fixed grid loses nothing.
//!
//! `max_ejection_percent`: Envoy 1.28 started checking it on the first ejection as well (runtime
//! guard `check_mep_on_first_eject`, legacy path removed in 1.31), so an ejection happens only if
//! the ejected share *after* it is at most that percent, unless `always_eject_one_host` is set,
//! which Istio never sets. With Istio's default of 10 %, a cluster of fewer than ten endpoints
//! therefore ejects nothing. weft follows current Envoy; [`Policy::always_eject_one`] keeps the
//! older "at least one" rule available but [`Policy::from_pb`] leaves it off.

use std::sync::atomic::AtomicI64;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub use crate::route::policy::OutlierPolicy as Policy;

/// `ejected_until` of an endpoint that is not ejected (and never compares greater than a time).
const NOT_EJECTED: i64 = i64::MIN;

/// Bound on every nanosecond value kept here (about 73 years), so sums of a time and a duration
/// never overflow an `i64`.
const MAX_NANOS: i64 = i64::MAX / 4;

/// How one attempt to one endpoint ended, as the request path saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status (a retry-triggering 5xx included).
    Status(u16),
    /// No answer came because of the path to the endpoint: connect failure or timeout, TLS
    /// failure, reset, or a per-try or route timeout before the response head.
    LocalOrigin,
}

/// Which detector ejected an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectionKind {
    /// `consecutive5xxErrors`.
    Consecutive5xx,
    /// `consecutiveGatewayErrors`.
    ConsecutiveGatewayErrors,
    /// `consecutiveLocalOriginFailures` (split mode only).
    ConsecutiveLocalOrigin,
}

impl EjectionKind {
    /// Envoy's name for the detector (its `ejections_enforced_<name>` stats), for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consecutive5xx => "consecutive_5xx",
            Self::ConsecutiveGatewayErrors => "consecutive_gateway_failure",
            Self::ConsecutiveLocalOrigin => "consecutive_local_origin_failure",
        }
    }
}

/// An ejection that [`Detector::report`] just made: one log line and one metric for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Index of the endpoint in the detector's list.
    pub endpoint: usize,
    /// What ejected it.
    pub kind: EjectionKind,
    /// base ejection time × multiplier, capped: how long Envoy would call the ejection.
    pub duration: Duration,
    /// From the reported instant until the interval tick that returns the endpoint (at least
    /// `duration`, less than `duration + interval`).
    pub returns_in: Duration,
    /// The multiplier this ejection used (1 on a first ejection, growing while it keeps failing).
    pub multiplier: u32,
    /// How many times this endpoint has been ejected, this time included.
    pub times_ejected: u32,
    /// Endpoints of the cluster ejected now, this one included.
    pub ejected_now: usize,
}

/// What outlier detection knows of one endpoint; shared by every [`Detector`] the endpoint's
/// cluster gets across config pushes.
#[derive(Debug)]
pub struct EndpointHealth {
    /// Nanoseconds (see the module doc) of the tick at which the current ejection ends, or
    /// [`NOT_EJECTED`]. Read on every pick.
    ejected_until: AtomicI64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Only touched when an ejection is decided.
    history: Mutex<History>,
}

#[derive(Debug, Default)]
struct History {
    multiplier: u32,
    times_ejected: u32,
    /// When the last ejection ended (a tick), so the multiplier's decay can be caught up lazily.
    last_until: Option<i64>,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        Self {
            ejected_until: AtomicI64::new(NOT_EJECTED),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            history: Mutex::new(History::default()),
        }
    }
}

impl EndpointHealth {
    /// How many times the endpoint has been ejected (for the admin view).
    pub fn times_ejected(&self) -> u32 {
        lock(&self.history).times_ejected
    }

    fn is_ejected_at(&self, now_ns: i64) -> bool {
        self.ejected_until.load(Relaxed) > now_ns
    }

    fn counter(&self, kind: EjectionKind) -> &AtomicU32 {
        match kind {
            EjectionKind::Consecutive5xx => &self.consecutive_5xx,
            EjectionKind::ConsecutiveGatewayErrors => &self.consecutive_gateway,
            EjectionKind::ConsecutiveLocalOrigin => &self.consecutive_local,
        }
    }

    fn reset_counters(&self) {
        reset(&self.consecutive_5xx);
        reset(&self.consecutive_gateway);
        reset(&self.consecutive_local);
    }
}

/// Outlier detection of one cluster as one config push built it: the policy and the endpoints'
/// health, in the cluster's endpoint order (the indices the balancer uses).
#[derive(Debug)]
pub struct Detector {
    policy: Policy,
    interval_ns: i64,
    base_ns: i64,
    max_ns: i64,
    endpoints: Vec<Arc<EndpointHealth>>,
    /// Makes "count the ejected, then eject" one step, so concurrent ejections cannot both pass
    /// `max_ejection_percent`. Two detectors of one cluster (the old one still finishing requests
    /// after a push) do not share it: at worst one ejection too many, once, around a push.
    ejecting: Mutex<()>,
}

impl Detector {
    /// Detection for a cluster whose endpoints (in balancer order) have these health handles.
    pub fn new(policy: Policy, endpoints: Vec<Arc<EndpointHealth>>) -> Self {
        Self {
            interval_ns: nanos_of(policy.interval).max(1),
            base_ns: nanos_of(policy.base_ejection_time).max(1),
            max_ns: nanos_of(policy.max_ejection_time).max(1),
            policy,
            endpoints,
            ejecting: Mutex::new(()),
        }
    }

    /// The policy this detector enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The health handle of endpoint `idx`, to hand to the next push's detector.
    pub fn health(&self, idx: usize) -> Option<&Arc<EndpointHealth>> {
        self.endpoints.get(idx)
    }

    /// Records how an attempt to endpoint `idx` ended; returns the ejection it caused, if any.
    ///
    /// A non-5xx answer costs a few relaxed loads (and a store only when a counter was running);
    /// a lock is taken only when a counter reaches its threshold.
    pub fn report(&self, idx: usize, outcome: Outcome, now: Instant) -> Option<Ejection> {
        let ep = self.endpoints.get(idx)?;
        let until = ep.ejected_until.load(Relaxed);
        if until != NOT_EJECTED {
            if to_nanos(now) < until {
                // Answers to requests sent before the ejection (or during panic) do not count:
                // Envoy ignores a threshold reached while ejected and clears every counter when
                // the endpoint returns, which comes to the same.
                return None;
            }
            // Over: later reports take the fast path. A failed exchange means a new ejection has
            // just been stored, which must stay.
            let _ = ep
                .ejected_until
                .compare_exchange(until, NOT_EJECTED, Relaxed, Relaxed);
        }
        let p = &self.policy;
        match outcome {
            Outcome::Status(code) if !(500..600).contains(&code) => {
                reset(&ep.consecutive_5xx);
                reset(&ep.consecutive_gateway);
                if p.split_local_origin {
                    reset(&ep.consecutive_local);
                }
                None
            }
            Outcome::Status(code) => {
                // Any answer proves the path to the endpoint works (Envoy's
                // LocalOriginConnectSuccess), whatever its status.
                if p.split_local_origin {
                    reset(&ep.consecutive_local);
                }
                self.count_5xx(idx, ep, matches!(code, 502..=504), now)
            }
            Outcome::LocalOrigin if p.split_local_origin => {
                if bump(&ep.consecutive_local, p.consecutive_local_origin) {
                    self.try_eject(idx, ep, EjectionKind::ConsecutiveLocalOrigin, now)
                } else {
                    None
                }
            }
            // Unsplit, Envoy maps a connect failure to 503 and a timeout to 504: a gateway error
            // either way.
            Outcome::LocalOrigin => self.count_5xx(idx, ep, true, now),
        }
    }

    fn count_5xx(
        &self,
        idx: usize,
        ep: &EndpointHealth,
        gateway: bool,
        now: Instant,
    ) -> Option<Ejection> {
        let p = &self.policy;
        // A 5xx that is not a gateway error breaks a run of gateway errors (Envoy does the same).
        let gateway_hit = if gateway {
            bump(&ep.consecutive_gateway, p.consecutive_gateway_errors)
        } else {
            reset(&ep.consecutive_gateway);
            false
        };
        let hit_5xx = bump(&ep.consecutive_5xx, p.consecutive_5xx);
        if gateway_hit
            && let Some(ejection) =
                self.try_eject(idx, ep, EjectionKind::ConsecutiveGatewayErrors, now)
        {
            return Some(ejection);
        }
        if hit_5xx {
            return self.try_eject(idx, ep, EjectionKind::Consecutive5xx, now);
        }
        None
    }

    fn try_eject(
        &self,
        idx: usize,
        ep: &EndpointHealth,
        kind: EjectionKind,
        now: Instant,
    ) -> Option<Ejection> {
        let _ejecting = lock(&self.ejecting);
        let now_ns = to_nanos(now);
        if ep.is_ejected_at(now_ns) {
            return None;
        }
        let p = &self.policy;
        let ejected = self.ejected_at(now_ns);
        let total = self.endpoints.len();
        let within_share =
            (ejected + 1).saturating_mul(100) <= (p.max_ejection_percent as usize) * total;
        if !(within_share || (p.always_eject_one && ejected == 0)) {
            // Envoy clears the counter that fired, so the next try needs a full new run.
            ep.counter(kind).store(0, Relaxed);
            return None;
        }
        let mut history = lock(&ep.history);
        if let Some(last_until) = history.last_until {
            let healthy_ticks = ticks_between(last_until, now_ns, self.interval_ns);
            history.multiplier = history
                .multiplier
                .saturating_sub(u32::try_from(healthy_ticks).unwrap_or(u32::MAX));
        }
        // Envoy stops growing the multiplier one step past the cap, so a healthy interval does
        // not at once shorten an ejection that sits at the cap.
        if i128::from(history.multiplier) * i128::from(self.base_ns)
            < i128::from(self.max_ns) + i128::from(self.base_ns)
        {
            history.multiplier += 1;
        }
        let duration_ns = (i128::from(history.multiplier) * i128::from(self.base_ns))
            .min(i128::from(self.max_ns));
        let duration_ns = i64::try_from(duration_ns).unwrap_or(MAX_NANOS);
        let until = tick_at_or_after(now_ns.saturating_add(duration_ns), self.interval_ns);
        history.last_until = Some(until);
        history.times_ejected = history.times_ejected.saturating_add(1);
        let (multiplier, times_ejected) = (history.multiplier, history.times_ejected);
        drop(history);
        ep.reset_counters();
        ep.ejected_until.store(until, Relaxed);
        Some(Ejection {
            endpoint: idx,
            kind,
            duration: duration_of(duration_ns),
            returns_in: duration_of(until.saturating_sub(now_ns)),
            multiplier,
            times_ejected,
            ejected_now: ejected + 1,
        })
    }

    /// Whether the balancer must skip endpoint `idx` now: it is ejected and the cluster is not in
    /// panic. One relaxed load while the endpoint is not ejected; a scan of the cluster only for
    /// an ejected endpoint when a panic threshold is set.
    pub fn is_ejected(&self, idx: usize, now: Instant) -> bool {
        let Some(ep) = self.endpoints.get(idx) else {
            return false;
        };
        let until = ep.ejected_until.load(Relaxed);
        if until == NOT_EJECTED {
            return false;
        }
        let now_ns = to_nanos(now);
        until > now_ns && !self.panic_at(now_ns)
    }

    /// Whether the cluster is in panic: fewer than `min_health_percent` of its endpoints are in
    /// service, so the balancer uses them all.
    pub fn in_panic(&self, now: Instant) -> bool {
        self.panic_at(to_nanos(now))
    }

    /// Endpoints ejected now (whether or not the cluster is in panic).
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.ejected_at(to_nanos(now))
    }

    fn panic_at(&self, now_ns: i64) -> bool {
        let threshold = self.policy.min_health_percent as usize;
        if threshold == 0 {
            return false;
        }
        let total = self.endpoints.len();
        let healthy = total - self.ejected_at(now_ns);
        healthy * 100 < threshold * total
    }

    fn ejected_at(&self, now_ns: i64) -> usize {
        self.endpoints
            .iter()
            .filter(|ep| ep.is_ejected_at(now_ns))
            .count()
    }
}

/// Adds one to a consecutive counter; true when this report made it reach `threshold` (exactly,
/// so concurrent reports past it cannot eject twice). A threshold of 0 is an off detector.
fn bump(counter: &AtomicU32, threshold: u32) -> bool {
    threshold != 0 && counter.fetch_add(1, Relaxed).wrapping_add(1) == threshold
}

/// Clears a counter, writing only if it ran, so successes leave the cache line shared.
fn reset(counter: &AtomicU32) {
    if counter.load(Relaxed) != 0 {
        counter.store(0, Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; if something did, the counters are still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` as signed nanoseconds from the module's epoch, bounded by ±[`MAX_NANOS`].
fn to_nanos(t: Instant) -> i64 {
    let epoch = epoch();
    match t.checked_duration_since(epoch) {
        Some(after) => nanos_of(after),
        None => -nanos_of(epoch.duration_since(t)),
    }
}

fn nanos_of(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).map_or(MAX_NANOS, |n| n.min(MAX_NANOS))
}

fn duration_of(nanos: i64) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

/// The first review tick at or after `t`.
fn tick_at_or_after(t: i64, interval: i64) -> i64 {
    let floor = t.div_euclid(interval) * interval;
    if floor == t { t } else { floor + interval }
}

/// How many review ticks fall in `(after, upto]`.
fn ticks_between(after: i64, upto: i64, interval: i64) -> i64 {
    if upto <= after {
        0
    } else {
        upto.div_euclid(interval) - after.div_euclid(interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::discovery as pb;

    const SEC: Duration = Duration::from_secs(1);

    fn policy() -> Policy {
        Policy {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 0,
            split_local_origin: false,
            consecutive_local_origin: 0,
            interval: 10 * SEC,
            base_ejection_time: 30 * SEC,
            max_ejection_time: 300 * SEC,
            max_ejection_percent: 100,
            always_eject_one: false,
            min_health_percent: 0,
        }
    }

    fn handles(n: usize) -> Vec<Arc<EndpointHealth>> {
        (0..n)
            .map(|_| Arc::new(EndpointHealth::default()))
            .collect()
    }

    fn detector(policy: Policy, n: usize) -> Detector {
        Detector::new(policy, handles(n))
    }

    /// Reports `outcome` `times` times at `now`; the ejections it caused.
    fn fail(
        d: &Detector,
        idx: usize,
        outcome: Outcome,
        times: usize,
        now: Instant,
    ) -> Vec<Ejection> {
        (0..times)
            .filter_map(|_| d.report(idx, outcome, now))
            .collect()
    }

    /// The instant of the review tick that returns an endpoint ejected at `at` for `d`.
    fn tick_after(at: Instant, d: Duration, interval: Duration) -> Instant {
        let t = to_nanos(at + d);
        let tick = tick_at_or_after(t, nanos_of(interval));
        at + d + Duration::from_nanos(u64::try_from(tick - t).unwrap())
    }

    const E500: Outcome = Outcome::Status(500);
    const E503: Outcome = Outcome::Status(503);

    #[test]
    fn ejects_at_exactly_n_consecutive_5xx() {
        let d = detector(policy(), 3);
        let t = Instant::now();
        assert!(fail(&d, 0, E500, 2, t).is_empty());
        assert!(!d.is_ejected(0, t));
        let ejection = d.report(0, E500, t).expect("third 5xx ejects");
        assert_eq!(ejection.endpoint, 0);
        assert_eq!(ejection.kind, EjectionKind::Consecutive5xx);
        assert_eq!(ejection.duration, 30 * SEC);
        assert!(ejection.returns_in >= 30 * SEC && ejection.returns_in < 40 * SEC);
        assert_eq!((ejection.multiplier, ejection.times_ejected), (1, 1));
        assert_eq!(ejection.ejected_now, 1);
        assert!(d.is_ejected(0, t));
        assert!(!d.is_ejected(1, t));
        assert_eq!(d.ejected_count(t), 1);
    }

    #[test]
    fn a_non_5xx_answer_breaks_the_run() {
        let d = detector(policy(), 2);
        let t = Instant::now();
        for between in [200, 302, 404, 499] {
            assert!(fail(&d, 0, E500, 2, t).is_empty());
            assert!(d.report(0, Outcome::Status(between), t).is_none());
        }
        assert!(fail(&d, 0, E500, 2, t).is_empty());
        assert!(!d.is_ejected(0, t), "runs were broken every two errors");
        assert!(d.report(0, E500, t).is_some());
    }

    #[test]
    fn consecutive_gateway_errors_and_what_breaks_them() {
        let p = Policy {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 3,
            ..policy()
        };
        let d = detector(p, 2);
        let t = Instant::now();
        // A 500 is a 5xx but not a gateway error: it breaks the run.
        for o in [502, 503, 500, 504, 502].map(Outcome::Status) {
            assert!(d.report(0, o, t).is_none());
        }
        // So is a success.
        assert!(d.report(0, Outcome::Status(200), t).is_none());
        assert!(
            fail(&d, 0, Outcome::Status(500), 10, t).is_empty(),
            "500s alone never eject"
        );
        assert!(d.report(0, Outcome::Status(504), t).is_none());
        assert!(
            d.report(0, Outcome::LocalOrigin, t).is_none(),
            "unsplit: a gateway error"
        );
        let e = d.report(0, E503, t).expect("third gateway error ejects");
        assert_eq!(e.kind, EjectionKind::ConsecutiveGatewayErrors);
        assert!(d.is_ejected(0, t));
    }

    #[test]
    fn unsplit_local_origin_failures_count_as_5xx() {
        let p = Policy {
            consecutive_5xx: 2,
            ..policy()
        };
        let d = detector(p, 2);
        let t = Instant::now();
        assert!(d.report(0, Outcome::LocalOrigin, t).is_none());
        let e = d
            .report(0, E500, t)
            .expect("a reset then a 500 are two 5xx");
        assert_eq!(e.kind, EjectionKind::Consecutive5xx);
    }

    #[test]
    fn split_local_origin_failures_have_their_own_counter() {
        let p = Policy {
            consecutive_5xx: 3,
            split_local_origin: true,
            consecutive_local_origin: 2,
            ..policy()
        };
        let d = detector(p, 4);
        let t = Instant::now();
        // Any answer, a 500 too, shows the path works and breaks a local-origin run.
        assert!(d.report(0, Outcome::LocalOrigin, t).is_none());
        assert!(d.report(0, E500, t).is_none());
        assert!(d.report(0, Outcome::LocalOrigin, t).is_none());
        let e = d
            .report(0, Outcome::LocalOrigin, t)
            .expect("two in a row eject");
        assert_eq!(e.kind, EjectionKind::ConsecutiveLocalOrigin);

        // Local-origin failures neither count as 5xx nor break a run of them.
        for o in [E500, E500, Outcome::LocalOrigin, Outcome::Status(201)] {
            assert!(d.report(1, o, t).is_none());
        }
        assert!(
            fail(&d, 1, E500, 2, t).is_empty(),
            "the 201 broke the 5xx run"
        );
        assert!(d.report(1, Outcome::LocalOrigin, t).is_none());
        let e = d.report(1, E500, t).expect("third 5xx ejects");
        assert_eq!(e.kind, EjectionKind::Consecutive5xx);

        // With the local-origin detector off, they never eject.
        let p = Policy {
            consecutive_local_origin: 0,
            ..d.policy().clone()
        };
        let d = detector(p, 2);
        assert!(fail(&d, 0, Outcome::LocalOrigin, 50, t).is_empty());
    }

    #[test]
    fn an_ejected_endpoint_returns_at_the_review_tick() {
        let d = detector(policy(), 2);
        let t = Instant::now() + Duration::from_millis(3_700);
        let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
        let back = tick_after(t, 30 * SEC, 10 * SEC);
        assert_eq!(e.returns_in, back - t);
        assert!(d.is_ejected(0, t + 30 * SEC - Duration::from_nanos(1)));
        assert!(d.is_ejected(0, back - Duration::from_nanos(1)));
        assert!(!d.is_ejected(0, back), "returns at the tick");
        assert_eq!(d.ejected_count(back), 0);
    }

    #[test]
    fn reports_while_ejected_do_not_count_and_counters_restart() {
        let d = detector(policy(), 2);
        let t = Instant::now();
        let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
        assert!(fail(&d, 0, E500, 10, t + SEC).is_empty());
        let back = t + e.returns_in;
        assert!(
            fail(&d, 0, E500, 2, back).is_empty(),
            "starts again from zero"
        );
        assert!(d.report(0, E500, back).is_some());
    }

    #[test]
    fn each_ejection_in_a_row_lasts_longer_up_to_the_cap() {
        let p = Policy {
            base_ejection_time: 100 * SEC,
            ..policy()
        };
        let d = detector(p, 2);
        let mut t = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..6 {
            let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
            seen.push((e.multiplier, e.duration.as_secs(), e.times_ejected));
            // Back at the tick, failing again at once: no healthy interval passes.
            t += e.returns_in;
        }
        assert_eq!(
            seen,
            [
                (1, 100, 1),
                (2, 200, 2),
                (3, 300, 3),
                (4, 300, 4),
                (4, 300, 5),
                (4, 300, 6)
            ]
        );
    }

    #[test]
    fn healthy_intervals_lower_the_multiplier() {
        let d = detector(policy(), 2);
        let mut t = Instant::now();
        for _ in 0..3 {
            t += fail(&d, 0, E500, 3, t).pop().expect("ejected").returns_in;
        }
        // Multiplier 3 now. Two ticks after the return: 3 - 2 = 1, so the next ejection is 2x.
        t += 2 * 10 * SEC;
        let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
        assert_eq!((e.multiplier, e.duration), (2, 60 * SEC));
        // Back, then 1 ns short of the first tick after it: no decay, 3x.
        t += e.returns_in + 10 * SEC - Duration::from_nanos(1);
        let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
        assert_eq!((e.multiplier, e.duration), (3, 90 * SEC));
        // A long healthy time brings it back to a first ejection.
        t += e.returns_in + 3600 * SEC;
        let e = fail(&d, 0, E500, 3, t).pop().expect("ejected");
        assert_eq!(
            (e.multiplier, e.duration, e.times_ejected),
            (1, 30 * SEC, 6)
        );
    }

    #[test]
    fn max_ejection_percent_caps_the_ejected_share() {
        let p = Policy {
            max_ejection_percent: 20,
            ..policy()
        };
        let d = detector(p, 10);
        let t = Instant::now();
        assert_eq!(fail(&d, 0, E500, 3, t).len(), 1);
        assert_eq!(fail(&d, 1, E500, 3, t).len(), 1);
        assert!(fail(&d, 2, E500, 3, t).is_empty(), "a third would be 30 %");
        assert!(!d.is_ejected(2, t));
        // The refused run was cleared: once there is room, it takes a full run again.
        let later = t + fail_free_until_back(&d, 0, t);
        assert!(!d.is_ejected(0, later) && !d.is_ejected(1, later));
        assert!(fail(&d, 2, E500, 2, later).is_empty());
        assert_eq!(fail(&d, 2, E500, 1, later).len(), 1);
    }

    /// How long until endpoint `idx`, ejected at `t`, is back.
    fn fail_free_until_back(d: &Detector, idx: usize, t: Instant) -> Duration {
        let mut dt = Duration::ZERO;
        while d.is_ejected(idx, t + dt) {
            dt += SEC;
        }
        dt
    }

    #[test]
    fn a_small_cluster_ejects_nothing_under_the_default_percent_as_current_envoy() {
        let p = Policy {
            max_ejection_percent: 10,
            ..policy()
        };
        let d = detector(p.clone(), 3);
        let t = Instant::now();
        assert!(fail(&d, 0, E500, 30, t).is_empty(), "1 of 3 is 33 % > 10 %");

        let d = detector(
            Policy {
                always_eject_one: true,
                ..p
            },
            3,
        );
        assert_eq!(
            fail(&d, 0, E500, 3, t).len(),
            1,
            "always_eject_one allows one"
        );
        assert!(
            fail(&d, 1, E500, 30, t).is_empty(),
            "but only when none is ejected"
        );
    }

    #[test]
    fn below_min_health_the_cluster_panics_and_ignores_ejections() {
        let p = Policy {
            min_health_percent: 75,
            ..policy()
        };
        let d = detector(p, 4);
        let t = Instant::now();
        assert_eq!(fail(&d, 0, E500, 3, t).len(), 1);
        assert!(!d.in_panic(t), "75 % in service is not below 75 %");
        assert!(d.is_ejected(0, t));
        assert_eq!(fail(&d, 1, E500, 3, t).len(), 1);
        assert!(d.in_panic(t));
        assert!(
            !d.is_ejected(0, t) && !d.is_ejected(1, t),
            "panic: all take traffic"
        );
        assert_eq!(d.ejected_count(t), 2, "still ejected underneath");
        // Without a threshold there is no panic even with everything ejected.
        let d = detector(policy(), 2);
        fail(&d, 0, E500, 3, t);
        fail(&d, 1, E500, 3, t);
        assert!(!d.in_panic(t) && d.is_ejected(0, t) && d.is_ejected(1, t));
    }

    #[test]
    fn health_outlives_a_rebuilt_detector() {
        let hs = handles(3);
        let d1 = Detector::new(policy(), hs.clone());
        let t = Instant::now();
        assert_eq!(fail(&d1, 1, E500, 3, t).len(), 1);
        assert!(fail(&d1, 0, E500, 2, t).is_empty());
        // A push: endpoint 2 is gone, the others are listed in another order.
        let d2 = Detector::new(policy(), vec![hs[1].clone(), hs[0].clone()]);
        assert!(d2.is_ejected(0, t), "the ejection survived the push");
        assert!(!d2.is_ejected(1, t));
        assert_eq!(
            d2.report(1, E500, t).map(|e| e.endpoint),
            Some(1),
            "run continued"
        );
        // The multiplier survived too.
        let back = t + fail_free_until_back(&d2, 0, t);
        let e = fail(&d2, 0, E500, 3, back).pop().expect("ejected");
        assert_eq!((e.multiplier, e.times_ejected), (2, 2));
    }

    #[test]
    fn concurrent_failures_eject_once() {
        let d = detector(policy(), 4);
        let t = Instant::now();
        let ejections: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| fail(&d, 2, E503, 1000, t).len()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(ejections, 1);
        assert!(d.is_ejected(2, t));
    }

    #[test]
    fn concurrent_ejections_respect_the_percent() {
        let p = Policy {
            max_ejection_percent: 50,
            consecutive_5xx: 1,
            ..policy()
        };
        let d = detector(p, 10);
        let t = Instant::now();
        let ejections: Vec<Ejection> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..10)
                .map(|i| {
                    let d = &d;
                    s.spawn(move || fail(d, i, E500, 5, t))
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert_eq!(ejections.len(), 5, "no lost and no extra ejection");
        assert_eq!(d.ejected_count(t), 5);
        let mut shares: Vec<usize> = ejections.iter().map(|e| e.ejected_now).collect();
        shares.sort_unstable();
        assert_eq!(shares, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn policy_from_pilot() {
        let mut p = pb::OutlierDetection {
            consecutive_5xx: 5,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
            ..Default::default()
        };
        let policy = Policy::from_pb(&p).expect("on");
        assert_eq!(policy.max_ejection_time, 300 * SEC);
        assert!(!policy.always_eject_one);
        p.base_ejection_time_ms = 600_000;
        assert_eq!(Policy::from_pb(&p).unwrap().max_ejection_time, 600 * SEC);
        // Local-origin failures only count in split mode.
        p.consecutive_local_origin_failures = 3;
        assert_eq!(Policy::from_pb(&p).unwrap().consecutive_local_origin, 0);
        p.consecutive_5xx = 0;
        assert_eq!(Policy::from_pb(&p), None, "every detector off");
        p.split_external_local_origin_errors = true;
        assert_eq!(Policy::from_pb(&p).unwrap().consecutive_local_origin, 3);
        p.max_ejection_percent = 0;
        assert_eq!(Policy::from_pb(&p), None, "nothing may ever be ejected");
    }

    #[test]
    fn tick_arithmetic() {
        assert_eq!(tick_at_or_after(20, 10), 20);
        assert_eq!(tick_at_or_after(21, 10), 30);
        assert_eq!(tick_at_or_after(-5, 10), 0);
        assert_eq!(tick_at_or_after(-15, 10), -10);
        assert_eq!(ticks_between(20, 20, 10), 0);
        assert_eq!(ticks_between(20, 29, 10), 0);
        assert_eq!(ticks_between(20, 30, 10), 1);
        assert_eq!(ticks_between(-1, 30, 10), 4);
        if let Some(before) = epoch().checked_sub(SEC) {
            assert_eq!(to_nanos(before), -1_000_000_000);
        }
    }
}
