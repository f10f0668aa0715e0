//! What the request path reads for each request, through one `Arc` clone from a `watch`: the route
//! table pilot pushed, the upstream runtime state of its clusters and its metric labels. Built once
//! per accepted push, off the request path; the runtime state carries over from the previous
//! snapshot (`upstream::state`).

use std::sync::Arc;

use crate::route::RouteTable;
use crate::telemetry::TableLabels;
use crate::upstream::state::Runtime;

/// One accepted config and everything built from it.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The route model.
    pub routes: RouteTable,
    /// Runtime state per cluster.
    pub upstream: Runtime,
    /// Metric labels per Service, cluster and endpoint.
    pub labels: TableLabels,
}

impl Snapshot {
    /// Before pilot's first push: every outbound request answers 503 "no config".
    pub fn empty() -> Self {
        Self::default()
    }

    /// The snapshot of a newly accepted `routes`, keeping what `previous` learnt at run time.
    pub fn next(routes: RouteTable, previous: &Snapshot) -> Self {
        let upstream = Runtime::build(&routes, Some((&previous.routes, &previous.upstream)));
        let labels = TableLabels::build(&routes);
        Self {
            routes,
            upstream,
            labels,
        }
    }
}

/// The receiving end the listeners read snapshots from.
pub type Snapshots = tokio::sync::watch::Receiver<Arc<Snapshot>>;
