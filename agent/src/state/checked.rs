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
                    problems: format!(
                        "  {}: is named by the route of `{}`, so it stays until that route changes",
                        crate::config::Origin::Kubernetes.named(&name),
                        by.name
                    ),
                    name,
                    change: None,
                }),
                None => out.remove.push(name),
            }
            continue;
        };
        svc.canonicalize();
        let label = svc.origin.named(&svc.name);
        let mut problems = Vec::new();
        let mut problem = |field: String, message: String| problems.push(format!("  {field}: {message}"));
        // Another service's address, unless that one is leaving in this change.
        let mut owner = |addr: SocketAddr| {
            let other = claimed.get(&addr).cloned().or_else(|| {
                let o = snapshot.service_for(addr)?;
                (*o.name != *name && !removing.contains(&*o.name)).then(|| o.name.to_string())
            })?;
            (other != name).then(|| {
                snapshot.service_named(&other).map_or_else(|| format!("`{other}`"), |s| s.config.origin.named(&other))
            })
        };
        svc.own_problems(&label, &listeners, named_by(&name).is_some(), &mut owner, &mut problem);
        if let Some(other) = snapshot.service_named(&name)
            && other.config.origin != svc.origin
        {
            problem(
                format!("{label}.name"),
                format!("`{name}` is already the name of {}", other.config.origin.named(&name)),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        config::{Config, Origin},
        state::Resolved,
    };

    fn cluster(name: &str, addr: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            addresses: vec![addr.parse().unwrap()],
            origin: Origin::Kubernetes,
            ..ServiceConfig::named("")
        }
    }

    #[test]
    fn a_clash_holds_back_that_service_only_and_names_what_it_clashes_with() {
        let file = Config::parse(
            "services:\n  - { name: static, addresses: [\"10.96.0.30:80\"], endpoints: [\"10.0.0.1:80\"] }\n  - { name: front, addresses: [\"10.96.0.31:80\"], route: { failover: [\"ns/db:tcp\"] } }\n  - { name: \"ns/taken:http\", addresses: [\"10.96.0.32:80\"], endpoints: [\"10.0.0.1:80\"] }\n  - { name: \"ns/db:tcp\", endpoints: [\"10.0.0.2:80\"] }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let snap = Snapshot::build(&file, &Resolved::new(), None);
        let (snap, _) = snap.changed(&[cluster("ns/old:http", "10.96.0.40:80")], &[], &Resolved::new());
        let checked = check(
            &snap,
            &file.agent,
            vec![
                ("ns/web:http".into(), Some(cluster("ns/web:http", "10.96.0.20:80"))),
                ("ns/clash:http".into(), Some(cluster("ns/clash:http", "10.96.0.30:80"))),
                ("ns/taken:http".into(), Some(cluster("ns/taken:http", "10.96.0.33:80"))),
                ("ns/db:tcp".into(), None),
                ("ns/old:http".into(), None),
                // Takes over the address of a service leaving in the same change.
                ("ns/new:http".into(), Some(cluster("ns/new:http", "[::ffff:10.96.0.40]:80"))),
                ("ns/loop:http".into(), Some(cluster("ns/loop:http", "127.0.0.1:15001"))),
            ],
        );
        let names = |v: &[ServiceConfig]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&checked.upsert), ["ns/web:http", "ns/new:http"]);
        assert_eq!(checked.upsert[1].addresses, ["10.96.0.40:80".parse().unwrap()], "canonical form");
        assert_eq!(checked.remove, ["ns/old:http"]);
        let held: Vec<(&str, &str)> = checked.held.iter().map(|h| (h.name.as_str(), h.problems.as_str())).collect();
        assert_eq!(
            held,
            [
                (
                    "ns/clash:http",
                    "  kubernetes service `ns/clash:http`.addresses[0]: 10.96.0.30:80 is already an address of the config file's service `static`"
                ),
                (
                    "ns/taken:http",
                    "  kubernetes service `ns/taken:http`.name: `ns/taken:http` is already the name of the config file's service `ns/taken:http`"
                ),
                (
                    "ns/db:tcp",
                    "  kubernetes service `ns/db:tcp`: is named by the route of `front`, so it stays until that route changes"
                ),
                (
                    "ns/loop:http",
                    "  kubernetes service `ns/loop:http`.addresses[0]: 127.0.0.1:15001 is the agent's own listener; connections would loop"
                ),
            ]
        );
    }
}
