//! What the upstream side learns while requests run, per cluster of the current route table:
//! the round-robin cursor, requests in flight per endpoint (for LEAST_REQUEST), outlier ejections
//! and connection-pool limits. Built next to each route table (`snapshot`), and carried over from
//! the previous one: an endpoint keeps its state by address within a cluster of the same name, so a
//! push (which pilot sends for any change anywhere) neither forgets an ejection nor resets a pool's
//! accounting while requests on the old table are still counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::route::{Cluster, RouteTable};
use crate::upstream::limits::Limits;
use crate::upstream::outlier::{Detector, EndpointHealth};

/// Runtime state of every cluster of one route table, by [`Cluster::index`].
#[derive(Debug, Default)]
pub struct Runtime {
    clusters: Box<[Arc<ClusterState>]>,
}

/// Runtime state of one cluster.
#[derive(Debug)]
pub struct ClusterState {
    /// Round-robin cursor.
    pub cursor: AtomicUsize,
    /// Per endpoint, in the order of [`Cluster::endpoints`].
    pub endpoints: Box<[Arc<EndpointState>]>,
    /// Outlier detection over those endpoints, when the cluster has it.
    pub outlier: Option<Detector>,
    /// Connection-pool limits (shared with the previous snapshot's state while unchanged, so
    /// requests admitted under the old table still count).
    pub limits: Arc<Limits>,
    /// Ejections by outlier detection (carried over across pushes).
    pub ejections: Arc<AtomicU64>,
    /// Which definition of the cluster its connections were opened under: a push that changes
    /// the definition (not just endpoints) gives a new, higher epoch, and the pool then replaces
    /// connections opened under a lower one (Envoy drains a changed cluster's pools). 0 for a
    /// cluster first seen.
    pub pool_epoch: u64,
    /// Plaintext requests sent (for `maxRequestsPerConnection` to endpoints without a sidecar).
    pub plain_requests: AtomicU32,
}

/// Epochs of changed cluster definitions, increasing for the process's life.
static EPOCHS: AtomicU64 = AtomicU64::new(0);

/// Runtime state of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Its address (what it is known by across pushes).
    pub addr: SocketAddr,
    /// Requests in flight, for LEAST_REQUEST.
    pub in_flight: AtomicU32,
    /// Consecutive errors and ejections.
    pub health: Arc<EndpointHealth>,
}

impl Runtime {
    /// State for `table`'s clusters, reusing what `previous` (the state of `previous_table`) knew
    /// about the same clusters and endpoints.
    pub fn build(table: &RouteTable, previous: Option<(&RouteTable, &Runtime)>) -> Self {
        let mut old: HashMap<&str, (&Cluster, &ClusterState)> = HashMap::new();
        if let Some((t, r)) = previous {
            for c in t.clusters() {
                if let Some(state) = r.clusters.get(c.index) {
                    old.insert(c.name.as_str(), (c, state));
                }
            }
        }
        let clusters = table
            .clusters()
            .iter()
            .map(|c| Arc::new(ClusterState::build(c, old.get(c.name.as_str()).copied())))
            .collect();
        Self { clusters }
    }

    /// The state of the cluster at `index`; a cluster of the table this runtime was built for always
    /// has one.
    pub fn cluster(&self, index: usize) -> Option<&Arc<ClusterState>> {
        self.clusters.get(index)
    }
}

impl ClusterState {
    /// Fresh state for `cluster` (nothing carried over).
    pub fn for_cluster(cluster: &Cluster) -> Self {
        Self::build(cluster, None)
    }

    fn build(cluster: &Cluster, previous: Option<(&Cluster, &ClusterState)>) -> Self {
        let pool_epoch = match previous {
            None => 0,
            Some((c, s)) if c.same_definition(cluster) => s.pool_epoch,
            Some(_) => EPOCHS.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let previous = previous.map(|(_, s)| s);
        let known: HashMap<SocketAddr, &Arc<EndpointState>> = previous
            .map(|p| p.endpoints.iter().map(|s| (s.addr, s)).collect())
            .unwrap_or_default();
        let endpoints = cluster
            .endpoints
            .iter()
            .map(|e| {
                known
                    .get(&e.dial)
                    .map(|s| Arc::clone(s))
                    .unwrap_or_else(|| {
                        Arc::new(EndpointState {
                            addr: e.dial,
                            in_flight: AtomicU32::new(0),
                            health: Arc::default(),
                        })
                    })
            })
            .collect::<Box<[_]>>();
        let outlier = cluster.outlier.clone().map(|policy| {
            Detector::new(policy, endpoints.iter().map(|e| e.health.clone()).collect())
        });
        let limits = match previous {
            Some(p) if p.limits.settings() == cluster.limits => p.limits.clone(),
            _ => Arc::new(Limits::new(cluster.limits)),
        };
        Self {
            cursor: AtomicUsize::new(previous.map_or(0, |p| p.cursor.load(Ordering::Relaxed))),
            endpoints,
            outlier,
            limits,
            ejections: previous.map_or_else(Arc::default, |p| p.ejections.clone()),
            pool_epoch,
            plain_requests: AtomicU32::new(0),
        }
    }
}
