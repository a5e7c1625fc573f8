//! Where services come from, besides the main config file: a watched catalog file, DNS
//! names in endpoint lists, and the Kubernetes API. One file per source; each sends
//! [`Update`]s on a channel, and the agent (app.rs) folds them into [`Sources`], merges
//! them with the main config, validates the result and, only if it is valid, publishes a
//! new snapshot. An update that would make the whole invalid is rejected with its
//! problems logged, and that source's last good contribution stays in force.

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
    /// The cluster's services and this node's locality.
    Kubernetes(kubernetes::ClusterView),
}

impl Update {
    /// The source's name, for logs.
    pub fn source(&self) -> &'static str {
        match self {
            Update::Catalog(_) => "catalog",
            Update::Dns { .. } => "dns",
            Update::Kubernetes(_) => "kubernetes",
        }
    }
}

/// Every source's latest accepted contribution.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub catalog: Vec<ServiceConfig>,
    pub resolved: Resolved,
    pub cluster: kubernetes::ClusterView,
}

impl Sources {
    /// Fold in an update. Errors (a broken catalog) are returned for logging and change
    /// nothing.
    pub fn apply(&mut self, update: Update) -> Result<(), String> {
        match update {
            Update::Catalog(Ok(services)) => self.catalog = services,
            Update::Catalog(Err(e)) => return Err(e),
            Update::Dns { target, answer } => {
                self.resolved.insert(target, answer);
            }
            Update::Kubernetes(view) => self.cluster = view,
        }
        Ok(())
    }

    /// The effective config: the main file's agent settings and services, then the
    /// catalog's, then the cluster's. The node's zone and region come from the file when
    /// set there, else from the Node's labels.
    pub fn merge(&self, main: &Config) -> Config {
        let mut merged = main.clone();
        merged.services.extend(self.catalog.iter().cloned());
        merged.services.extend(self.cluster.services.iter().cloned());
        merged.agent.zone = merged.agent.zone.or_else(|| self.cluster.zone.clone());
        merged.agent.region = merged.agent.region.or_else(|| self.cluster.region.clone());
        merged
    }
}

/// Every DNS name the config's endpoints mention.
pub fn dns_targets(config: &Config) -> BTreeSet<Target> {
    config
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.target.addr().is_none())
        .map(|e| e.target.clone())
        .collect()
}
