//! What the agent knows about its traffic: the live connection table (`conns`),
//! Prometheus metrics (`metrics`), and cgroup id -> path (`cgroup`). Shared by the proxy
//! (which writes) and the admin API (which reads) as one [`Stats`].

pub mod cgroup;
pub mod conns;
pub mod metrics;

use std::sync::Arc;

pub use conns::{ConnHandle, ConnTable, ConnView};
pub use metrics::Metrics;

pub struct Stats {
    pub conns: Arc<ConnTable>,
    pub metrics: Metrics,
    /// Per-connection bookkeeping on (`agent.stats`): the table, live byte counts, the
    /// per-connection metrics and close lines. Off only to measure what it costs.
    pub enabled: bool,
}

impl Stats {
    /// `cgroup_root`: the cgroup2 mount, where client cgroup ids are found as paths.
    pub fn new(cgroup_root: Option<std::path::PathBuf>, enabled: bool) -> Arc<Self> {
        Arc::new(Self { conns: Arc::new(ConnTable::new(cgroup_root, enabled)), metrics: Metrics::default(), enabled })
    }
}
