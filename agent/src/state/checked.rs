//! Changes to single services (from the Kubernetes source) checked against the running
//! snapshot instead of validating the whole merged config again: a cluster of 10,000
//! services changes a few at a time, and each change must cost what it touches.
//!
//! The checks are those of whole-config validation, split the same way: what a service
//! must satisfy on its own (`ServiceConfig::own_problems`, shared with it), and what it
//! must not clash with (names and addresses of the others, routes that name it). A change
//! that fails is held back with its problems; the others go ahead.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use super::Snapshot;
use crate::config::{AgentConfig, ServiceConfig};

/// What a service's change is: the service as it should be now, or `None` (gone).
pub type Wanted = (String, Option<ServiceConfig>);

/// The changes that may go ahead, and those held back.
#[derive(Debug, Default)]
pub struct Checked {
    pub upsert: Vec<ServiceConfig>,
    pub remove: Vec<String>,
    pub held: Vec<Held>,
}

/// A change held back, and why (one `  field: message` line per problem, as whole-config
/// validation reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub name: String,
    pub change: Option<ServiceConfig>,
    pub problems: String,
}

/// Check `changes` (at most one per name) against `snapshot`, in order.
pub fn check(snapshot: &Snapshot, agent: &AgentConfig, changes: Vec<Wanted>) -> Checked {
    let listeners = agent.listeners();
    // Routing services name their targets: a named service must stay, and needs no address.
    let named_by = |name: &str| {
        snapshot.routing().map(|i| snapshot.service(i)).find(|s| {
            s.config.route.as_ref().is_some_and(|r| r.targets().contains(&name))
                || s.config.http.allow_override.iter().any(|o| o == name)
        })
    };
    let removing: HashSet<String> = changes.iter().filter(|(_, c)| c.is_none()).map(|(n, _)| n.clone()).collect();
    let mut out = Checked::default();
    let mut claimed: HashMap<SocketAddr, String> = HashMap::new();
    for (name, change) in changes {
        let Some(mut svc) = change else {
            match named_by(&name) {
                Some(by) => out.held.push(Held {
                    problems: format!("  {name}: is named by the route of `{}`; it stays until that changes", by.name),
                    name,
                    change: None,
                }),
                None => out.remove.push(name),
            }
            continue;
        };
        svc.canonicalize();
        let label = svc.origin.label(0, &svc.name);
        let mut problems = Vec::new();
        let mut problem = |field: String, message: String| problems.push(format!("  {field}: {message}"));
        // Another service's address, unless that one is leaving in this change.
        let mut owner = |addr: SocketAddr| {
            let other = claimed.get(&addr).cloned().or_else(|| {
                let o = snapshot.service_for(addr)?;
                (o.name != name && !removing.contains(&o.name)).then(|| o.name.clone())
            })?;
            (other != name).then(|| {
                snapshot
                    .service_named(&other)
                    .map_or_else(|| format!("`{other}`"), |s| s.config.origin.label(0, &other))
            })
        };
        svc.own_problems(&label, &listeners, named_by(&name).is_some(), &mut owner, &mut problem);
        if let Some(other) = snapshot.service_named(&name)
            && other.config.origin != svc.origin
        {
            problem(
                format!("{label}.name"),
                format!("`{name}` is already the name of {}", other.config.origin.label(0, &name)),
            );
        }
        for (j, addr) in svc.addresses.iter().enumerate() {
            if agent.node_address.contains(&addr.ip()) {
                problem(format!("{label}.addresses[{j}]"), format!("{} is the agent's node address", addr.ip()));
            }
        }
        let targets =
            svc.route.iter().flat_map(|r| r.targets()).chain(svc.http.allow_override.iter().map(String::as_str));
        for target in targets {
            if snapshot.index_named(target).is_none() || removing.contains(target) {
                problem(format!("{label}.route"), format!("names `{target}`, which is not a service"));
            }
        }
        if problems.is_empty() {
            for addr in &svc.addresses {
                claimed.insert(*addr, name.clone());
            }
            out.upsert.push(svc);
        } else {
            out.held.push(Held { name, change: Some(svc), problems: problems.join("\n") });
        }
    }
    out
}
