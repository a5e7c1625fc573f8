//! The agent's picture of the world: which service owns each service address, its
//! endpoints and its policy. A [`Snapshot`] is immutable; a config change builds a new one
//! that carries the live endpoint state (load, health, drain) over from the last, and is
//! published on a `tokio::sync::watch`. The data path only ever reads the latest one.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    balance::{Avail, Balancer, Endpoint, EndpointState, Tier},
    config::{Config, DetectConfig, MAX_ROUTE_DEPTH, ServiceConfig, Target},
};

/// DNS answers by name: (address, weight) pairs; weight is the SRV weight, 1 for A/AAAA.
pub type Resolved = HashMap<Target, Vec<(SocketAddr, u32)>>;

/// One logical service.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub config: ServiceConfig,
    pub balancer: Balancer,
}

/// Every service, indexed by service address and by name.
#[derive(Debug, Default)]
pub struct Snapshot {
    services: Vec<Service>,
    by_addr: HashMap<SocketAddr, usize>,
    by_name: HashMap<String, usize>,
    /// How connections' protocols are detected (agent-wide; reloadable like the rest).
    pub detect: DetectConfig,
}

/// An endpoint that left service (removed, or now terminating): its open connections get
/// `drain_timeout`, after which the caller cuts them with `cut_if_still_draining(generation)`.
pub struct Departure {
    pub service: String,
    pub addr: SocketAddr,
    pub state: Arc<EndpointState>,
    pub drain_timeout: Duration,
    pub generation: u64,
}

impl Snapshot {
    /// Build from a validated config, with DNS names as `resolved` has them (a name not
    /// resolved yet contributes no endpoint), reusing the live state of endpoints `prev`
    /// knew.
    pub fn build(config: &Config, resolved: &Resolved, prev: Option<&Snapshot>) -> Self {
        let mut snap = Self { detect: config.agent.detect.clone(), ..Self::default() };
        for (id, svc) in config.services.iter().enumerate() {
            for addr in &svc.addresses {
                snap.by_addr.insert(*addr, id);
            }
            let old = prev.and_then(|p| p.service_named(&svc.name));
            let mut endpoints: Vec<Endpoint> = Vec::new();
            for e in &svc.endpoints {
                let concrete = match &e.target {
                    Target::Addr(a) => vec![(*a, 1)],
                    name => resolved.get(name).cloned().unwrap_or_default(),
                };
                for (addr, weight) in concrete {
                    // Two names may resolve to one address: the first listing wins.
                    if endpoints.iter().any(|x| x.addr == addr) {
                        continue;
                    }
                    let state = old
                        .and_then(|o| o.balancer.endpoints().iter().find(|x| x.addr == addr))
                        .map(|x| Arc::clone(&x.state))
                        .unwrap_or_default();
                    endpoints.push(Endpoint {
                        addr,
                        weight: e.weight.saturating_mul(weight.max(1)),
                        tier: tier(&config.agent.zone, &config.agent.region, &e.zone, &e.region),
                        terminating: e.terminating,
                        zone: e.zone.clone(),
                        region: e.region.clone(),
                        node: e.node.clone(),
                        state,
                    });
                }
            }
            let balancer =
                Balancer::new(svc.balance, endpoints, svc.failure_accrual.clone(), svc.locality.spill_threshold);
            snap.by_name.insert(svc.name.clone(), snap.services.len());
            snap.services.push(Service { name: svc.name.clone(), config: svc.clone(), balancer });
        }
        snap
    }

    /// The service a connection to `dst` is for. v4-mapped destinations match their IPv4
    /// service address.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Service> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.by_addr.get(&dst).map(|&i| &self.services[i])
    }

    pub fn service_named(&self, name: &str) -> Option<&Service> {
        self.by_name.get(name).map(|&i| &self.services[i])
    }

    /// The concrete services (those with endpoints) a new connection to `service` may
    /// use, in the order to try: a split contributes the one branch drawn for this
    /// connection, a failover its healthy branches in order, then the others.
    pub fn concrete_for<'a>(&'a self, service: &'a Service, now: Instant) -> Vec<&'a Service> {
        let mut out = Vec::new();
        self.expand(service, now, 0, &mut out);
        out
    }

    fn expand<'a>(&'a self, svc: &'a Service, now: Instant, depth: usize, out: &mut Vec<&'a Service>) {
        if depth > MAX_ROUTE_DEPTH {
            return;
        }
        let Some(route) = &svc.config.route else {
            if !out.iter().any(|s| std::ptr::eq(*s, svc)) {
                out.push(svc);
            }
            return;
        };
        if !route.split.is_empty() {
            let total: u32 = route.split.iter().map(|b| b.weight).sum();
            let mut n = fastrand::u32(..total.max(1));
            for b in &route.split {
                if n < b.weight {
                    if let Some(t) = self.service_named(&b.service) {
                        self.expand(t, now, depth + 1, out);
                    }
                    return;
                }
                n -= b.weight;
            }
        } else {
            let branches: Vec<&Service> = route.failover.iter().filter_map(|n| self.service_named(n)).collect();
            let (healthy, rest): (Vec<&Service>, Vec<&Service>) =
                branches.into_iter().partition(|b| self.has_healthy(b, now, depth + 1));
            for b in healthy.into_iter().chain(rest) {
                self.expand(b, now, depth + 1, out);
            }
        }
    }

    /// Whether a new connection to `svc` could find a healthy endpoint.
    pub fn has_healthy(&self, svc: &Service, now: Instant, depth: usize) -> bool {
        if depth > MAX_ROUTE_DEPTH {
            return false;
        }
        match &svc.config.route {
            None => svc.balancer.endpoints().iter().any(|e| !e.terminating && e.state.availability(now) != Avail::Out),
            Some(r) => {
                r.targets().iter().filter_map(|n| self.service_named(n)).any(|t| self.has_healthy(t, now, depth + 1))
            }
        }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// (service index, service address) pairs, for the kernel's services map.
    pub fn service_addresses(&self) -> impl Iterator<Item = (u32, SocketAddr)> + '_ {
        self.services.iter().enumerate().flat_map(|(i, s)| s.config.addresses.iter().map(move |a| (i as u32, *a)))
    }

    /// Compare with the snapshot this one replaces: endpoints back in service stop
    /// draining; endpoints that left start, and are returned so the caller can arm their
    /// drain deadlines.
    pub fn departures_since(&self, prev: &Snapshot) -> Vec<Departure> {
        let mut out = Vec::new();
        let in_service: HashMap<(&str, SocketAddr), &Endpoint> = self
            .services
            .iter()
            .flat_map(|s| s.balancer.endpoints().iter().map(move |e| ((s.name.as_str(), e.addr), e)))
            .filter(|(_, e)| !e.terminating)
            .collect();
        for e in in_service.values() {
            e.state.stop_draining();
        }
        for svc in &prev.services {
            // A service that disappeared drains under its old timeout.
            let drain_timeout = self.service_named(&svc.name).unwrap_or(svc).config.drain_timeout;
            for e in svc.balancer.endpoints() {
                if in_service.contains_key(&(svc.name.as_str(), e.addr)) {
                    continue;
                }
                if let Some(generation) = e.state.start_draining() {
                    out.push(Departure {
                        service: svc.name.clone(),
                        addr: e.addr,
                        state: Arc::clone(&e.state),
                        drain_timeout,
                        generation,
                    });
                }
            }
        }
        // Endpoints that arrive already terminating drain too (their connections may
        // predate an agent restart only in theory, but the state must say draining).
        for svc in &self.services {
            for e in svc.balancer.endpoints().iter().filter(|e| e.terminating) {
                if let Some(generation) = e.state.start_draining() {
                    out.push(Departure {
                        service: svc.name.clone(),
                        addr: e.addr,
                        state: Arc::clone(&e.state),
                        drain_timeout: svc.config.drain_timeout,
                        generation,
                    });
                }
            }
        }
        out
    }

    /// For the in-kernel fallback (connects made while no agent listens): every service
    /// address with the endpoints a connect to it may be sent to, sorted, so an unchanged
    /// set compares equal. Healthy endpoints of the service's family only (the kernel
    /// cannot rewrite a connect across families); if none is healthy, every endpoint that
    /// is not terminating, as the balancer's panic mode would. Routes: a split offers all
    /// its branches, a failover its first branch with a healthy endpoint. Weights and
    /// locality are not kept: the fallback is for the seconds until an agent is back.
    pub fn fallback_backends(&self, now: Instant) -> Vec<(SocketAddr, Vec<SocketAddr>)> {
        let mut out = Vec::new();
        for svc in &self.services {
            let (mut healthy, mut any) = (Vec::new(), Vec::new());
            self.fallback_walk(svc, now, 0, &mut healthy, &mut any);
            let pool = if healthy.is_empty() { any } else { healthy };
            for addr in &svc.config.addresses {
                let mut eps: Vec<SocketAddr> = pool.iter().copied().filter(|e| e.is_ipv4() == addr.is_ipv4()).collect();
                eps.sort();
                eps.dedup();
                out.push((*addr, eps));
            }
        }
        out
    }

    fn fallback_walk(
        &self,
        svc: &Service,
        now: Instant,
        depth: usize,
        healthy: &mut Vec<SocketAddr>,
        any: &mut Vec<SocketAddr>,
    ) {
        if depth > MAX_ROUTE_DEPTH {
            return;
        }
        let Some(route) = &svc.config.route else {
            for e in svc.balancer.endpoints().iter().filter(|e| !e.terminating) {
                any.push(e.addr);
                if e.state.availability(now) == Avail::Healthy {
                    healthy.push(e.addr);
                }
            }
            return;
        };
        let targets: Vec<&Service> = if route.split.is_empty() {
            let branches: Vec<&Service> = route.failover.iter().filter_map(|n| self.service_named(n)).collect();
            match branches.iter().find(|b| self.has_healthy(b, now, depth + 1)) {
                Some(first) => vec![*first],
                None => branches,
            }
        } else {
            route.split.iter().filter(|b| b.weight > 0).filter_map(|b| self.service_named(&b.service)).collect()
        };
        for t in targets {
            self.fallback_walk(t, now, depth + 1, healthy, any);
        }
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Locality tier of an endpoint seen from this node. Without a node zone every endpoint
/// is local: locality is opt-in.
fn tier(
    node_zone: &Option<String>,
    node_region: &Option<String>,
    zone: &Option<String>,
    region: &Option<String>,
) -> Tier {
    let Some(node_zone) = node_zone else { return Tier::Local };
    let same_region = match (node_region, region) {
        (Some(a), Some(b)) => a == b,
        // Zones are unique across regions in every cloud's naming; no region given on
        // either side means "the same region" when the zones match.
        _ => true,
    };
    if same_region && zone.as_ref() == Some(node_zone) {
        Tier::Local
    } else if node_region.is_some() && node_region == region {
        Tier::Region
    } else {
        Tier::Remote
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn lookup_by_any_spelling_of_a_service_address() {
        let snap = Snapshot::build(
            &config(
                "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\", \"[fd96::1]:80\"]\n    endpoints: [\"10.0.0.1:8080\"]\n",
            ),
            &Resolved::new(),
            None,
        );
        for dst in ["10.96.0.1:80", "[::ffff:10.96.0.1]:80", "[fd96::1]:80"] {
            assert_eq!(snap.service_for(dst.parse().unwrap()).map(|s| s.name.as_str()), Some("web"), "{dst}");
        }
        assert!(snap.service_for("10.96.0.1:81".parse().unwrap()).is_none());
        assert_eq!(snap.service_addresses().count(), 2);
    }

    #[test]
    fn dns_names_expand_to_their_answers_with_srv_weights() {
        let cfg = config(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"web.example:8080\", { srv: _http._tcp.web.example, weight: 2 }, \"10.0.0.9:80\"]\n",
        );
        let mut resolved = Resolved::new();
        resolved.insert(
            Target::Host { name: "web.example".into(), port: 8080 },
            vec![("10.0.0.1:8080".parse().unwrap(), 1), ("10.0.0.2:8080".parse().unwrap(), 1)],
        );
        resolved.insert(
            Target::Srv("_http._tcp.web.example".into()),
            vec![("10.0.0.2:8080".parse().unwrap(), 5), ("10.0.0.3:9090".parse().unwrap(), 3)],
        );
        let snap = Snapshot::build(&cfg, &resolved, None);
        let eps: Vec<(String, u32)> =
            snap.services()[0].balancer.endpoints().iter().map(|e| (e.addr.to_string(), e.weight)).collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1:8080".into(), 1),
                ("10.0.0.2:8080".into(), 1),
                ("10.0.0.3:9090".into(), 6),
                ("10.0.0.9:80".into(), 1)
            ]
        );
        // Not resolved yet: the name contributes nothing, the address still counts.
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        assert_eq!(snap.services()[0].balancer.endpoints().len(), 1);
    }

    #[test]
    fn routes_split_by_weight_and_fail_over_to_healthy_branches() {
        let cfg = config(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\"], route: { split: [{ service: v1, weight: 90 }, { service: v2, weight: 10 }] } }\n  - { name: v1, endpoints: [\"10.0.0.1:80\"] }\n  - { name: v2, endpoints: [\"10.0.0.2:80\"], failure_accrual: { consecutive_failures: 1 } }\n  - { name: db, addresses: [\"10.96.0.2:80\"], route: { failover: [v2, v1] } }\n",
        );
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let web = snap.service_named("web").unwrap();
        let picks: Vec<&str> = (0..2000).map(|_| snap.concrete_for(web, now)[0].name.as_str()).collect();
        let v2 = picks.iter().filter(|n| **n == "v2").count() as f64 / picks.len() as f64;
        assert!((0.07..0.13).contains(&v2), "90/10 split gave v2 {v2}");
        let db = snap.service_named("db").unwrap();
        let order = |s: &Snapshot| s.concrete_for(db, now).iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(order(&snap), ["v2", "v1"], "first healthy branch first");
        let v2_ep = &snap.service_named("v2").unwrap().balancer.endpoints()[0];
        v2_ep.state.on_connect_failed(now, snap.service_named("v2").unwrap().balancer.accrual());
        assert_eq!(order(&snap), ["v1", "v2"], "unhealthy branch last");
        assert!(snap.has_healthy(db, now, 0));
    }

    #[test]
    fn fallback_keeps_healthy_endpoints_of_the_address_family() {
        let cfg = config(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\", \"[fd96::1]:80\"], endpoints: [\"10.0.0.2:80\", \"10.0.0.1:80\", \"[fd10::1]:80\", { address: \"10.0.0.3:80\", terminating: true }], failure_accrual: { consecutive_failures: 1 } }\n  - { name: db, addresses: [\"10.96.0.2:80\"], route: { failover: [v1, v2] } }\n  - { name: v1, endpoints: [\"10.0.1.1:80\"], failure_accrual: { consecutive_failures: 1 } }\n  - { name: v2, endpoints: [\"10.0.2.1:80\"] }\n",
        );
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let of = |s: &Snapshot, addr: &str| -> Vec<String> {
            let addr: SocketAddr = addr.parse().unwrap();
            let all = s.fallback_backends(now);
            all.into_iter().find(|(a, _)| *a == addr).unwrap().1.iter().map(|e| e.to_string()).collect()
        };
        assert_eq!(of(&snap, "10.96.0.1:80"), ["10.0.0.1:80", "10.0.0.2:80"], "v4 only, sorted, no terminating");
        assert_eq!(of(&snap, "[fd96::1]:80"), ["[fd10::1]:80"]);
        assert_eq!(of(&snap, "10.96.0.2:80"), ["10.0.1.1:80"], "failover: first healthy branch");
        let web = snap.service_named("web").unwrap();
        web.balancer.endpoints()[0].state.on_connect_failed(now, web.balancer.accrual());
        assert_eq!(of(&snap, "10.96.0.1:80"), ["10.0.0.1:80"], "an ejected endpoint leaves the set");
        let v1 = snap.service_named("v1").unwrap();
        v1.balancer.endpoints()[0].state.on_connect_failed(now, v1.balancer.accrual());
        assert_eq!(of(&snap, "10.96.0.2:80"), ["10.0.2.1:80"], "failover moves on");
    }

    #[test]
    fn tiers_follow_the_node_zone_and_region() {
        let (z, r) = (Some("a".to_owned()), Some("r1".to_owned()));
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(tier(&None, &None, &s("b"), &s("r2")), Tier::Local, "no node zone: locality off");
        assert_eq!(tier(&z, &r, &s("a"), &s("r1")), Tier::Local);
        assert_eq!(tier(&z, &r, &s("a"), &None), Tier::Local);
        assert_eq!(tier(&z, &r, &s("b"), &s("r1")), Tier::Region);
        assert_eq!(tier(&z, &r, &s("c"), &s("r2")), Tier::Remote);
        assert_eq!(tier(&z, &r, &None, &None), Tier::Remote);
    }

    #[test]
    fn a_rebuild_keeps_endpoint_state_and_reports_departures() {
        let one = config(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\n    drain_timeout: 7s\n",
        );
        let a = Snapshot::build(&one, &Resolved::new(), None);
        let state_of = |s: &Snapshot, i: usize| Arc::clone(&s.services()[0].balancer.endpoints()[i].state);
        let two = config(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"10.0.0.1:80\", { address: \"10.0.0.3:80\", terminating: true }]\n    drain_timeout: 7s\n",
        );
        let b = Snapshot::build(&two, &Resolved::new(), Some(&a));
        assert!(Arc::ptr_eq(&state_of(&a, 0), &state_of(&b, 0)), "state carried over");
        let gone: Vec<SocketAddr> = b.departures_since(&a).iter().map(|d| d.addr).collect();
        assert_eq!(gone.len(), 2);
        assert!(gone.contains(&"10.0.0.2:80".parse().unwrap()) && gone.contains(&"10.0.0.3:80".parse().unwrap()));
        assert!(b.departures_since(&a).is_empty(), "already draining: reported once");
        // Back in service: the pending deadline must not cut it.
        let c = Snapshot::build(&one, &Resolved::new(), Some(&b));
        assert!(c.departures_since(&b).is_empty());
        let token = state_of(&a, 2).drain_token();
        state_of(&a, 2).cut_if_still_draining(1);
        assert!(!token.is_cancelled());
    }
}
