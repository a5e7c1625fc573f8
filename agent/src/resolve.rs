//! The resolution tree of a service, as linkerd 1's delegator showed it: from what an
//! application dials, through routes (split weights, failover order), down to each
//! endpoint with its health, weight and locality. Built from the live snapshot (for the
//! admin API) and rendered as text (for `switchyard resolve`).

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use serde::{Deserialize, Serialize};

use crate::{
    balance::{Avail, Endpoint},
    config::{MAX_ROUTE_DEPTH, PlaceOf},
    state::{
        Service, Snapshot,
        route::{Branch, BranchShare},
    },
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub service: String,
    pub addresses: Vec<String>,
    /// "split", "failover" or "endpoints".
    pub kind: String,
    /// Split weight, as a percentage, or failover position, for a branch.
    pub branch: Option<String>,
    /// A new connection here would find a healthy endpoint.
    pub healthy: bool,
    pub children: Vec<Node>,
    pub endpoints: Vec<EndpointNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointNode {
    pub address: String,
    /// healthy, trial, ejected, failing-checks or terminating.
    pub health: String,
    pub weight: u32,
    pub locality: String,
    pub zone: Option<String>,
    pub node: Option<String>,
    pub open_connections: u32,
    pub connects_ok: u64,
    pub connects_failed: u64,
    /// HTTP responses that were acceptable, and those that failed (5xx, retryable
    /// status, timeout, broken connection): kept apart from connects.
    #[serde(default)]
    pub responses_ok: u64,
    #[serde(default)]
    pub responses_failed: u64,
}

/// One service for `/services`: its own endpoints, or where its route leads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSummary {
    pub service: String,
    pub addresses: Vec<String>,
    pub origin: String,
    pub balance: String,
    /// "endpoints", "split" or "failover".
    pub kind: String,
    pub route: Vec<String>,
    pub healthy: bool,
    pub endpoints: Vec<EndpointNode>,
    /// Session affinity, when the service has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinitySummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AffinitySummary {
    /// Clients remembered and not expired.
    pub clients: usize,
    pub timeout_secs: u64,
}

/// Up to `limit` services by name, after the name `after`, whose names start with
/// `prefix`; and the name to continue after when there are more.
pub fn services(
    snapshot: &Snapshot,
    now: Instant,
    after: Option<&str>,
    prefix: &str,
    limit: usize,
) -> (Vec<ServiceSummary>, Option<String>) {
    use std::ops::Bound;
    let from = match after {
        Some(a) if a >= prefix => Bound::Excluded(a),
        _ => Bound::Included(prefix),
    };
    let mut matching = snapshot.services_from(from).take_while(|(_, s)| s.name.starts_with(prefix));
    let page: Vec<ServiceSummary> = matching.by_ref().take(limit).map(|(i, s)| summary(snapshot, i, s, now)).collect();
    let more = matching.next().is_some();
    let next = more.then(|| page.last().map(|s| s.service.clone())).flatten();
    (page, next)
}

/// The service called `name`.
pub fn service(snapshot: &Snapshot, name: &str, now: Instant) -> Option<ServiceSummary> {
    let i = snapshot.index_named(name)?;
    Some(summary(snapshot, i, snapshot.service(i), now))
}

fn summary(snapshot: &Snapshot, i: usize, svc: &Service, now: Instant) -> ServiceSummary {
    let route = svc.config.route.as_ref();
    ServiceSummary {
        service: svc.name.to_string(),
        addresses: svc.config.addresses.iter().map(ToString::to_string).collect(),
        origin: format!("{:?}", svc.config.origin).to_lowercase(),
        balance: serde_json::to_value(svc.balancer.kind())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        kind: route_kind(&svc.config).into(),
        route: route.map(|r| r.targets().into_iter().map(str::to_owned).collect()).unwrap_or_default(),
        healthy: snapshot.has_healthy(i, now),
        endpoints: svc.balancer.endpoints().iter().map(|e| endpoint(e, now)).collect(),
        affinity: svc
            .balancer
            .affinity()
            .map(|a| AffinitySummary { clients: a.clients(now), timeout_secs: a.timeout().as_secs() }),
    }
}

/// The tree for `target`: a service name or one of its addresses (`ip:port`).
pub fn tree(snapshot: &Snapshot, target: &str, now: Instant) -> Option<Node> {
    let service = match target.parse::<SocketAddr>() {
        Ok(addr) => snapshot.index_for(addr)?,
        Err(_) => snapshot.index_named(target)?,
    };
    Some(node(snapshot, service, None, now, 0))
}

fn node(snapshot: &Snapshot, index: usize, branch: Option<String>, now: Instant, depth: usize) -> Node {
    let svc = snapshot.service(index);
    let branches = snapshot.branches(index);
    let mut n = Node {
        service: svc.name.to_string(),
        addresses: svc.config.addresses.iter().map(ToString::to_string).collect(),
        kind: route_kind(&svc.config).into(),
        branch,
        healthy: snapshot.has_healthy(index, now),
        children: Vec::new(),
        endpoints: Vec::new(),
    };
    if svc.config.route.is_none() {
        n.endpoints = svc.balancer.endpoints().iter().map(|e| endpoint(e, now)).collect();
    } else if depth < MAX_ROUTE_DEPTH {
        for Branch { target, share } in branches {
            let label = match share {
                BranchShare::Weight { weight, total } => {
                    format!("{:.0}%", 100.0 * weight as f64 / total.max(1) as f64)
                }
                BranchShare::Position(p) => format!("#{p}"),
            };
            n.children.push(node(snapshot, target, Some(label), now, depth + 1));
        }
    }
    n
}

/// "endpoints", "split" or "failover".
fn route_kind(config: &crate::config::ServiceConfig) -> &'static str {
    match &config.route {
        None => "endpoints",
        Some(r) if !r.split.is_empty() => "split",
        Some(_) => "failover",
    }
}

fn endpoint(e: &Endpoint, now: Instant) -> EndpointNode {
    let health = if e.terminating {
        "terminating"
    } else if !e.state.checked_healthy() {
        "failing-checks"
    } else {
        match e.state.availability(now) {
            Avail::Healthy => "healthy",
            Avail::Trial => "trial",
            Avail::Out => "ejected",
        }
    };
    EndpointNode {
        address: e.addr.to_string(),
        health: health.into(),
        weight: e.weight,
        locality: e.tier.name().into(),
        zone: e.place.zone().map(str::to_owned),
        node: e.place.node().map(str::to_owned),
        open_connections: e.state.active(),
        connects_ok: e.state.connects_ok.load(std::sync::atomic::Ordering::Relaxed),
        connects_failed: e.state.connects_failed.load(std::sync::atomic::Ordering::Relaxed),
        responses_ok: e.state.responses_ok.load(std::sync::atomic::Ordering::Relaxed),
        responses_failed: e.state.responses_failed.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// Text rendering, one line per node, with tree branches.
pub fn render(root: &Node) -> String {
    let mut out = String::new();
    line(&mut out, root, "", "");
    out
}

fn line(out: &mut String, n: &Node, lead: &str, child_lead: &str) {
    let branch = n.branch.as_deref().map(|b| format!("{b} ")).unwrap_or_default();
    let addrs = if n.addresses.is_empty() { String::new() } else { format!(" [{}]", n.addresses.join(", ")) };
    let health = if n.healthy { "healthy" } else { "NO HEALTHY ENDPOINT" };
    let _ = writeln!(out, "{lead}{branch}{}{addrs}  {} ({health})", n.service, n.kind);
    let count = n.children.len() + n.endpoints.len();
    for (i, c) in n.children.iter().enumerate() {
        let last = i + 1 == count;
        line(
            out,
            c,
            &format!("{child_lead}{}", if last { "└─ " } else { "├─ " }),
            &format!("{child_lead}{}", if last { "   " } else { "│  " }),
        );
    }
    for (i, e) in n.endpoints.iter().enumerate() {
        let last = n.children.len() + i + 1 == count;
        let _ = writeln!(
            out,
            "{child_lead}{}{}  {}  weight={} locality={} open={}",
            if last { "└─ " } else { "├─ " },
            e.address,
            e.health,
            e.weight,
            e.locality,
            e.open_connections
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Config, state::Resolved};

    #[test]
    fn services_page_by_name_with_a_prefix() {
        let yaml: String = ["b/x", "a/y", "a/x", "c/z", "a"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!("  - {{ name: \"{n}\", addresses: [\"10.96.0.{i}:80\"], endpoints: [\"10.0.0.1:80\"] }}\n")
            })
            .collect();
        let snap = Snapshot::build(
            &Config::parse(&format!("services:\n{yaml}"), Path::new("t.yaml")).unwrap(),
            &Resolved::new(),
            None,
        );
        let now = Instant::now();
        let names = |(page, next): (Vec<ServiceSummary>, Option<String>)| {
            (page.into_iter().map(|s| s.service).collect::<Vec<_>>(), next)
        };
        assert_eq!(names(services(&snap, now, None, "", 2)), (vec!["a".into(), "a/x".into()], Some("a/x".into())));
        assert_eq!(
            names(services(&snap, now, Some("a/x"), "", 2)),
            (vec!["a/y".into(), "b/x".into()], Some("b/x".into()))
        );
        assert_eq!(names(services(&snap, now, Some("b/x"), "", 2)), (vec!["c/z".into()], None));
        assert_eq!(names(services(&snap, now, None, "a/", 10)), (vec!["a/x".into(), "a/y".into()], None));
        assert_eq!(names(services(&snap, now, Some("a/x"), "a/", 10)), (vec!["a/y".into()], None));
        assert_eq!(service(&snap, "c/z", now).map(|s| s.service).as_deref(), Some("c/z"));
    }

    #[test]
    fn a_summary_counts_the_clients_affinity_remembers() {
        let snap = Snapshot::build(
            &Config::parse(
                "services:\n  - { name: a, addresses: [\"10.96.0.1:80\"], endpoints: [\"10.0.0.1:80\"], session_affinity: { timeout: 90s } }\n  - { name: b, addresses: [\"10.96.0.2:80\"], endpoints: [\"10.0.0.1:80\"] }\n",
                Path::new("t.yaml"),
            )
            .unwrap(),
            &Resolved::new(),
            None,
        );
        let now = Instant::now();
        for key in [1, 2, 1] {
            snap.service_named("a").unwrap().balancer.pick(key, &[], now);
        }
        let a = service(&snap, "a", now).unwrap();
        assert_eq!(a.affinity, Some(AffinitySummary { clients: 2, timeout_secs: 90 }));
        let json = serde_json::to_value(service(&snap, "b", now).unwrap()).unwrap();
        assert!(json.get("affinity").is_none(), "left out without affinity: {json}");
    }

    #[test]
    fn tree_follows_routes_down_to_endpoint_health() {
        let cfg = Config::parse(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\"], route: { split: [{ service: v1, weight: 9 }, { service: v2, weight: 1 }] } }\n  - { name: v1, endpoints: [\"10.0.0.1:80\", \"10.0.0.2:80\"], failure_accrual: { consecutive_failures: 1 } }\n  - { name: v2, endpoints: [{ address: \"10.0.0.3:80\", terminating: true }] }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let v1 = snap.service_named("v1").unwrap();
        v1.balancer.endpoints()[1].state.on_connect_failed(now, v1.balancer.accrual());
        let t = tree(&snap, "10.96.0.1:80", now).unwrap();
        assert_eq!(tree(&snap, "web", now), Some(t.clone()), "by name or by address");
        assert_eq!((t.kind.as_str(), t.children.len()), ("split", 2));
        assert_eq!(t.children[0].branch.as_deref(), Some("90%"));
        let health: Vec<&str> = t.children[0].endpoints.iter().map(|e| e.health.as_str()).collect();
        assert_eq!(health, ["healthy", "ejected"]);
        assert!(!t.children[1].healthy, "only a terminating endpoint");
        let text = render(&t);
        assert!(text.starts_with("web [10.96.0.1:80]  split (healthy)\n"), "{text}");
        assert!(text.contains("├─ 90% v1  endpoints (healthy)"), "{text}");
        assert!(text.contains("│  └─ 10.0.0.2:80  ejected  weight=1"), "{text}");
        assert!(text.contains("└─ 10% v2  endpoints (NO HEALTHY ENDPOINT)"), "{text}");
        assert!(tree(&snap, "nope", now).is_none());
    }
}
