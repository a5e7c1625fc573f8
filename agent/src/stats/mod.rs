//! What the agent knows about its traffic: the live connection table (`conns`),
//! Prometheus metrics (`metrics`), golden signals per route and endpoint (`signals`),
//! and the live tap (`tap`); clients are named by `crate::workload`. Shared by the proxy
//! (which writes) and the admin API (which reads) as one [`Stats`].

pub mod conns;
pub mod metrics;
pub mod signals;
pub mod stat;
pub mod tap;

use std::sync::Arc;

pub use conns::{ConnHandle, ConnTable, ConnView};
pub use metrics::Metrics;

pub struct Stats {
    pub conns: Arc<ConnTable>,
    pub metrics: Metrics,
    pub tap: Arc<tap::Tap>,
    /// Per-connection bookkeeping on (`agent.stats`): the table, live byte counts, the
    /// per-connection metrics and close lines. Off only to measure what it costs.
    pub enabled: bool,
}

impl Stats {
    /// `workloads`: who clients are, by cgroup.
    pub fn new(workloads: Arc<crate::workload::Workloads>, enabled: bool) -> Arc<Self> {
        let metrics = Metrics::default();
        let conns = ConnTable::new(workloads, Arc::clone(&metrics.edges), enabled);
        let tap = Arc::clone(&conns.tap);
        Arc::new(Self { conns: Arc::new(conns), metrics, tap, enabled })
    }
}
