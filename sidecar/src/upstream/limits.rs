//! A cluster's connection-pool limits (DestinationRule `trafficPolicy.connectionPool`), Envoy's
//! circuit breakers as Istio users rely on them.
//!
//! Decision: between sidecars weft carries every request to an endpoint over ONE HTTP/2
//! connection, where Istio's default mesh hop uses HTTP/1.1 connections with one request in
//! flight each. Bounding weft's connections would bound nothing, so weft keeps the meaning users
//! rely on (Istio's circuit-breaking task with fortio) instead:
//! - `tcp.maxConnections` bounds the requests in flight to the cluster (in Istio each would hold
//!   a connection), and `http.http2MaxRequests` bounds them too: the lower of the two applies;
//! - a request over that bound waits, first come first served, in a queue of at most
//!   `http.http1MaxPendingRequests`;
//! - a request that finds the queue full is refused at once ([`Overflow`]; the request path
//!   answers 503 with response flag `UO` and `x-envoy-overloaded: true`);
//! - `http.maxRetries` bounds the retries outstanding at once in the cluster: a retry over it is
//!   not made and the request ends with its last result.
//!
//! 0 is unlimited for each (pilot maps Istio's defaults to 0). `maxRequestsPerConnection`,
//! `idleTimeout` and `connectTimeout` belong to the connection pools, not here.
//!
//! The guards ([`Admitted`], [`RetryBudget`]) own semaphore permits, so they are `Send + 'static`
//! and can ride inside a response body until it ends. An unlimited cluster costs one branch: no
//! atomic read-modify-write, no allocation.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};

pub use crate::route::policy::PoolLimits as Settings;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_proto::discovery as pb;

/// A cluster's limits and what currently counts against them.
#[derive(Debug)]
pub struct Limits {
    settings: Settings,
    /// One permit per request in flight; `None` when unlimited.
    active: Option<Arc<Semaphore>>,
    /// One permit per retry outstanding; `None` when unlimited.
    retries: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    overflows: AtomicU64,
    retry_overflows: AtomicU64,
}

/// A request refused because the cluster's pending queue is full (Envoy's
/// `upstream_rq_pending_overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("upstream connection pool overflow: too many requests in flight and pending")]
pub struct Overflow;

/// A request's place among the cluster's requests in flight; dropping it frees the place.
#[derive(Debug)]
#[must_use = "the place is freed when this is dropped"]
pub struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
}

/// A retry's place among the cluster's retries outstanding; dropping it frees the place.
#[derive(Debug)]
#[must_use = "the place is freed when this is dropped"]
pub struct RetryBudget {
    _permit: Option<OwnedSemaphorePermit>,
}

/// A snapshot for `/stats`. `active` and `retries_active` are counted only for a bounded
/// cluster (0 when unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitStats {
    /// Requests holding a place now.
    pub active: u32,
    /// Requests waiting for a place now.
    pub pending: u32,
    /// Requests refused so far because the queue was full.
    pub overflows: u64,
    /// Retries holding a place now.
    pub retries_active: u32,
    /// Retries not made so far because `maxRetries` were outstanding.
    pub retry_overflows: u64,
}

impl Limits {
    /// The limits pilot set for a cluster (`None`: none).
    pub fn from_pb(p: Option<&pb::ConnectionPool>) -> Self {
        p.map_or_else(Self::unlimited, |p| Self::new(Settings::from_pb(p)))
    }

    /// Limits with these settings, nothing counted yet.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            active: semaphore(settings.max_active),
            retries: semaphore(settings.max_retries),
            pending: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            retry_overflows: AtomicU64::new(0),
        }
    }

    /// No limit at all.
    pub fn unlimited() -> Self {
        Self::new(Settings::default())
    }

    /// What this enforces, to compare with a new push's.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Whether nothing is bounded (then [`Limits::admit`] and [`Limits::try_retry`] always
    /// succeed at once and the caller may skip them).
    pub fn is_unlimited(&self) -> bool {
        self.active.is_none() && self.retries.is_none()
    }

    /// A place for one request: at once if one is free, after waiting in the queue if it has
    /// room, else [`Overflow`] at once. Dropping the future while it waits leaves the queue.
    pub async fn admit(&self) -> Result<Admitted, Overflow> {
        let Some(active) = &self.active else {
            return Ok(Admitted { _permit: None });
        };
        // The semaphore is fair: while requests wait, no permit is free, so a newcomer cannot
        // overtake them here.
        if let Ok(permit) = Arc::clone(active).try_acquire_owned() {
            return Ok(Admitted {
                _permit: Some(permit),
            });
        }
        let Some(_queued) = self.enter_queue() else {
            self.overflows.fetch_add(1, Relaxed);
            return Err(Overflow);
        };
        // `_queued` leaves the queue when this returns or when the future is dropped mid-wait
        // (a route timeout, the client going away).
        match Arc::clone(active).acquire_owned().await {
            Ok(permit) => Ok(Admitted {
                _permit: Some(permit),
            }),
            // Never closed; refusing is the safe reading should that change.
            Err(_) => Err(Overflow),
        }
    }

    /// A place for one retry, or `None` when `maxRetries` are outstanding (the retry is not made).
    pub fn try_retry(&self) -> Option<RetryBudget> {
        let Some(retries) = &self.retries else {
            return Some(RetryBudget { _permit: None });
        };
        match Arc::clone(retries).try_acquire_owned() {
            Ok(permit) => Some(RetryBudget {
                _permit: Some(permit),
            }),
            Err(_) => {
                self.retry_overflows.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// What counts against the limits now.
    pub fn stats(&self) -> LimitStats {
        LimitStats {
            active: in_use(self.active.as_deref(), self.settings.max_active),
            pending: self.pending.load(Relaxed),
            overflows: self.overflows.load(Relaxed),
            retries_active: in_use(self.retries.as_deref(), self.settings.max_retries),
            retry_overflows: self.retry_overflows.load(Relaxed),
        }
    }

    fn enter_queue(&self) -> Option<Queued<'_>> {
        let max = self.settings.max_pending;
        let entered = if max == 0 {
            self.pending.fetch_add(1, Relaxed);
            true
        } else {
            self.pending
                .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
                .is_ok()
        };
        // Built only once entered: dropping a guard leaves the queue.
        entered.then(|| Queued(&self.pending))
    }
}

/// A request's place in the pending queue.
struct Queued<'a>(&'a AtomicU32);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn semaphore(max: u32) -> Option<Arc<Semaphore>> {
    (max != 0).then(|| {
        let permits =
            usize::try_from(max).map_or(Semaphore::MAX_PERMITS, |n| n.min(Semaphore::MAX_PERMITS));
        Arc::new(Semaphore::new(permits))
    })
}

fn in_use(semaphore: Option<&Semaphore>, max: u32) -> u32 {
    semaphore.map_or(0, |s| {
        max.saturating_sub(u32::try_from(s.available_permits()).unwrap_or(u32::MAX))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::Notify;

    fn limits(max_active: u32, max_pending: u32, max_retries: u32) -> Arc<Limits> {
        Arc::new(Limits::new(Settings {
            max_active,
            max_pending,
            max_retries,
        }))
    }

    /// Waits (bounded) until `cond` holds of the limits' stats.
    async fn until(l: &Limits, cond: impl Fn(LimitStats) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond(l.stats()) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("stats never got there: {:?}", l.stats()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_active_one_pending_the_rest_overflow_at_once() {
        let l = limits(1, 1, 0);
        let release = Arc::new(Notify::new());
        let running = Arc::new(AtomicUsize::new(0));
        let most_running = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (l, release) = (l.clone(), release.clone());
                let (running, most_running) = (running.clone(), most_running.clone());
                tokio::spawn(async move {
                    let admitted = l.admit().await?;
                    let now = running.fetch_add(1, Relaxed) + 1;
                    most_running.fetch_max(now, Relaxed);
                    release.notified().await;
                    running.fetch_sub(1, Relaxed);
                    drop(admitted);
                    Ok::<(), Overflow>(())
                })
            })
            .collect();
        // 18 refused while the first still runs and the second waits: refused at once.
        until(&l, |s| s.active == 1 && s.pending == 1 && s.overflows == 18).await;
        assert_eq!(running.load(Relaxed), 1);
        release.notify_one();
        // The waiter gets the place the first gave back, then runs.
        until(&l, |s| s.pending == 0 && s.active == 1).await;
        until(&l, |_| running.load(Relaxed) == 1).await;
        release.notify_one();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 18);
        assert_eq!(most_running.load(Relaxed), 1, "never two in flight");
        let s = l.stats();
        assert_eq!((s.active, s.pending, s.overflows), (0, 0, 18));
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let l = limits(1, 1, 0);
        let first = l.admit().await.unwrap();
        // Waits, then its deadline drops it mid-wait.
        let waited = tokio::time::timeout(Duration::from_millis(20), l.admit()).await;
        assert!(waited.is_err(), "still waiting when the deadline fired");
        assert_eq!(l.stats().pending, 0);
        // The queue place is free again: the next one waits instead of overflowing.
        let l2 = l.clone();
        let second = tokio::spawn(async move { l2.admit().await.map(drop) });
        until(&l, |s| s.pending == 1).await;
        drop(first);
        second.await.unwrap().unwrap();
        let s = l.stats();
        assert_eq!((s.active, s.pending, s.overflows), (0, 0, 0));
    }

    #[tokio::test]
    async fn max_requests_alone_queues_without_bound() {
        let pool = pb::ConnectionPool {
            max_requests: 2,
            ..Default::default()
        };
        let l = Arc::new(Limits::from_pb(Some(&pool)));
        assert_eq!(l.settings().max_active, 2);
        let held = [l.admit().await.unwrap(), l.admit().await.unwrap()];
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.admit().await.map(drop) })
            })
            .collect();
        until(&l, |s| s.active == 2 && s.pending == 50).await;
        drop(held);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(l.stats(), LimitStats::default());
    }

    #[test]
    fn the_lower_of_max_connections_and_max_requests_applies() {
        let settings = |max_connections, max_requests| {
            Settings::from_pb(&pb::ConnectionPool {
                max_connections,
                max_requests,
                ..Default::default()
            })
            .max_active
        };
        assert_eq!(settings(0, 0), 0);
        assert_eq!(settings(3, 0), 3);
        assert_eq!(settings(0, 7), 7);
        assert_eq!(settings(3, 7), 3);
        assert_eq!(settings(9, 7), 7);
    }

    #[test]
    fn max_retries_bounds_retries_outstanding() {
        let l = limits(0, 0, 2);
        let a = l.try_retry().expect("first");
        let b = l.try_retry().expect("second");
        assert!(l.try_retry().is_none());
        assert_eq!(l.stats().retries_active, 2);
        drop(a);
        let c = l.try_retry().expect("a place came back");
        assert!(l.try_retry().is_none());
        drop((b, c));
        let s = l.stats();
        assert_eq!((s.retries_active, s.retry_overflows), (0, 2));
    }

    #[tokio::test]
    async fn unlimited_never_refuses() {
        let l = Limits::from_pb(None);
        assert!(l.is_unlimited());
        assert!(Limits::from_pb(Some(&pb::ConnectionPool::default())).is_unlimited());
        let mut held = Vec::new();
        let mut retries = Vec::new();
        for _ in 0..10_000 {
            held.push(l.admit().await.unwrap());
            retries.push(l.try_retry().expect("unlimited retries"));
        }
        assert_eq!(l.stats(), LimitStats::default());
    }

    #[test]
    fn settings_compare_for_a_push() {
        let a = Limits::from_pb(Some(&pb::ConnectionPool {
            max_connections: 5,
            max_requests: 10,
            ..Default::default()
        }));
        let b = Limits::from_pb(Some(&pb::ConnectionPool {
            max_requests: 5,
            connect_timeout_ms: 100,
            ..Default::default()
        }));
        assert_eq!(a.settings(), b.settings(), "same behaviour, same settings");
        assert_ne!(a.settings(), Limits::unlimited().settings());
    }

    #[test]
    fn guards_can_outlive_the_request() {
        fn send_static<T: Send + 'static>() {}
        send_static::<Admitted>();
        send_static::<RetryBudget>();
        send_static::<Overflow>();
    }
}
