//! Where services come from, besides the main config file: a watched catalog file, DNS
//! names in endpoint lists, and the Kubernetes API. One file per source; each sends
//! [`Update`]s on a channel, and the agent (app.rs) folds them into [`Sources`], merges
//! them with the main config, validates the result and, only if it is valid, publishes a
//! new snapshot. An update that would make the whole invalid is rejected with its
//! problems logged, and that source's last good contribution stays in force.
//!
//! The Kubernetes source sends changes, not its whole view: a cluster holds thousands of
//! services and changes a few at a time. Its services are checked one by one against the
//! running state (see `state::checked`); a bad one is held back and reported, the rest
//! apply.

pub mod catalog;
pub mod dns;
pub mod kubernetes;

use std::{collections::BTreeSet, net::SocketAddr};

use crate::{
    config::{Config, ServiceConfig, Target},
    state::Resolved,
};

/// What a source has to say.
#[derive(Debug)]
pub enum Update {
    /// The catalog file's services, or why the file cannot be used.
    Catalog(Result<Vec<ServiceConfig>, String>),
    /// A fresh answer for a DNS name.
    Dns { target: Target, answer: Vec<(SocketAddr, u32)> },
    /// Services the cluster added, changed or removed, and this node's locality.
    Cluster(kubernetes::ClusterDelta),
}

impl Update {
    /// The source's name, for logs.
    pub fn source(&self) -> &'static str {
        match self {
            Update::Catalog(_) => "catalog",
            Update::Dns { .. } => "dns",
            Update::Cluster(_) => "kubernetes",
        }
    }
}

/// The latest accepted contributions of the sources other than the cluster (whose
/// services live in the snapshot, where they were checked in).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub catalog: Vec<ServiceConfig>,
    pub resolved: Resolved,
    /// The Node's zone and region labels.
    pub zone: Option<String>,
    pub region: Option<String>,
}

impl Sources {
    /// The effective config: the main file's agent settings and services, then the
    /// catalog's, then `cluster`'s. The node's zone and region come from the file when
    /// set there, else from the Node's labels.
    pub fn merge(&self, main: &Config, cluster: impl IntoIterator<Item = ServiceConfig>) -> Config {
        let mut merged = main.clone();
        merged.services.extend(self.catalog.iter().cloned());
        merged.services.extend(cluster);
        merged.agent.zone = merged.agent.zone.or_else(|| self.zone.clone());
        merged.agent.region = merged.agent.region.or_else(|| self.region.clone());
        merged
    }
}

/// Every DNS name the services' endpoints mention.
pub fn dns_targets<'a>(services: impl IntoIterator<Item = &'a ServiceConfig>) -> BTreeSet<Target> {
    services
        .into_iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.target.addr().is_none())
        .map(|e| e.target.clone())
        .collect()
}
