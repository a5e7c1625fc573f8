//! The agent's picture of the world: which service owns each service address, its
//! endpoints, its policy and where its route leads. A [`Snapshot`] is immutable; a config
//! change builds a new one that carries the live endpoint state (load, health, drain) over
//! from the last, and is published on a `tokio::sync::watch`. The data path only ever
//! reads the latest one.
//!
//! Built once, read per connection: routes are compiled when the snapshot is built
//! (branch names resolved to indices; depth and cycles were checked by validation), and
//! [`route`] turns a snapshot, an original destination and a client into a [`Plan`] (what
//! to try, in order) with one route walker. A service whose config and endpoints did not
//! change is the same `Arc` in the next snapshot, with its balancer, retry budget and
//! metric handles.

pub mod checked;
#[cfg(test)]
mod incremental_tests;
pub mod route;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use imbl::{HashMap as PMap, OrdMap, OrdSet};

use self::route::Route;
pub use self::route::{Mode, Plan};
use crate::{
    balance::{Affinity, Balancer, Endpoint, EndpointState, Tier, budget::Budget},
    config::{Config, DetectConfig, EndpointConfig, PlaceOf, RetryConfig, ServiceConfig, ServiceMode, Target},
    redirect::{KernelEntry, ServiceAddr},
    stats::metrics::ServiceMetrics,
};

/// DNS answers by name: (address, weight) pairs; weight is the SRV weight, 1 for A/AAAA.
pub type Resolved = std::collections::HashMap<Target, Vec<(SocketAddr, u32)>>;

/// One logical service.
#[derive(Debug)]
pub struct Service {
    /// Shared with every connection entry that names it (`stats::conns`): one allocation
    /// per service, not one per connection.
    pub name: Arc<str>,
    /// Its config, without the endpoints when they are all addresses: the balancer's
    /// endpoints hold the same, and a cluster has 100,000 of them. [`Service::full_config`]
    /// puts them back.
    pub config: ServiceConfig,
    /// `config.endpoints` was emptied (see above).
    endpoints_in_balancer: bool,
    pub balancer: Balancer,
    /// HTTP retries it may still make; shared with the previous snapshot's service of
    /// the same name while the budget policy stays the same, dropped with the service.
    pub budget: Arc<Budget>,
    /// Its metric handles, indexed like `balancer.endpoints()`.
    pub metrics: ServiceMetrics,
}

/// Every service, indexed by service address and by name.
///
/// The indexes are persistent maps (imbl): a snapshot made from the last one by a change
/// to a few services shares everything else with it, so building it costs what changed,
/// not the size of the cluster, and two snapshots alive at once cost one plus the change.
/// Each service keeps its slot (the index plans and routes use, and the kernel's service
/// id) for as long as a service of that name exists.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    slots: OrdMap<u32, Slot>,
    by_addr: PMap<SocketAddr, u32>,
    by_name: OrdMap<Arc<str>, u32>,
    /// Services with a route or allowed overrides: the only ones that name others.
    routing: OrdSet<u32>,
    next_slot: u32,
    /// How connections' protocols are detected (agent-wide; reloadable like the rest).
    pub detect: DetectConfig,
    /// The node's zone and region, which the endpoints' tiers are relative to.
    locality: (Option<String>, Option<String>),
    /// The shortest `http.pool_idle_timeout` of any service, worked out on first use
    /// (a pass over every service; reset by every change).
    pool_idle: std::sync::OnceLock<Option<Duration>>,
}

#[derive(Debug, Clone)]
struct Slot {
    service: Arc<Service>,
    route: Route,
}

/// A service a new snapshot added, rebuilt or removed, relative to the one it was made
/// from.
#[derive(Debug)]
pub struct Change {
    /// Its slot (a name keeps its slot while it exists).
    pub slot: usize,
    /// The service of that name before, if there was one.
    pub old: Option<Arc<Service>>,
    /// It was removed (else it was added or rebuilt, and the new snapshot has it).
    pub gone: bool,
}

impl Change {
    fn new_in<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Arc<Service>> {
        (!self.gone).then(|| snapshot.service(self.slot))
    }
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
    /// resolved yet contributes no endpoint), reusing what `prev` knew: unchanged
    /// services whole, the live state of endpoints otherwise.
    pub fn build(config: &Config, resolved: &Resolved, prev: Option<&Snapshot>) -> Self {
        prev.cloned().unwrap_or_default().rebuilt(config, resolved).0
    }

    /// The snapshot for a whole validated config, made from this one: services no longer
    /// named are removed, the others compared and rebuilt only if they changed.
    pub fn rebuilt(&self, config: &Config, resolved: &Resolved) -> (Self, Vec<Change>) {
        let mut base = self.clone();
        base.detect = config.agent.detect.clone();
        base.locality = (config.agent.zone.clone(), config.agent.region.clone());
        let named: std::collections::HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = self.by_name.keys().filter(|n| !named.contains(&***n)).map(|n| n.to_string()).collect();
        base.changed(&config.services, &gone, resolved)
    }

    /// This snapshot with `upsert` added or replacing the services of the same names and
    /// the services named in `remove` gone. The caller validated the result. Costs what
    /// changed: an upserted service equal to the one it replaces (config, endpoints as
    /// resolved) is kept as it is.
    pub fn changed(&self, upsert: &[ServiceConfig], remove: &[String], resolved: &Resolved) -> (Self, Vec<Change>) {
        let mut next = self.clone();
        next.pool_idle = Default::default();
        let mut changes = Vec::new();
        let now = Instant::now();
        for name in remove {
            let Some(slot) = next.by_name.remove(name.as_str()) else { continue };
            let Some(old) = next.slots.remove(&slot) else { continue };
            next.unindex_addresses(&old.service, slot);
            next.routing.remove(&slot);
            changes.push(Change { slot: slot as usize, old: Some(old.service), gone: true });
        }
        for svc in upsert {
            let old_slot = next.by_name.get(svc.name.as_str()).copied();
            let old = old_slot.and_then(|s| next.slots.get(&s)).map(|s| Arc::clone(&s.service));
            let endpoints = endpoints(&next.locality, svc, resolved, old.as_deref());
            if let Some(o) = &old
                && o.same_config(svc)
                && same_endpoints(o.balancer.endpoints(), &endpoints)
            {
                continue;
            }
            let slot = old_slot.unwrap_or_else(|| {
                next.next_slot += 1;
                next.next_slot - 1
            });
            if let Some(o) = &old {
                next.unindex_addresses(o, slot);
            }
            for addr in &svc.addresses {
                next.by_addr.insert(*addr, slot);
            }
            let service = Arc::new(Service::new(svc, endpoints, old.as_ref(), now));
            next.slots.insert(slot, Slot { service, route: Route::Endpoints });
            next.by_name.insert(Arc::from(svc.name.as_str()), slot);
            if svc.route.is_some() || !svc.http.allow_override.is_empty() {
                next.routing.insert(slot);
            } else {
                next.routing.remove(&slot);
            }
            changes.push(Change { slot: slot as usize, old, gone: false });
        }
        // Routes name their targets; a target's slot is stable while it exists, but a
        // route may name one that is new. There are few routing services: compile all.
        if !changes.is_empty() {
            for slot in next.routing.clone() {
                let Some(entry) = next.slots.get(&slot) else { continue };
                let route = Route::compile(entry.service.config.route.as_ref(), |n| next.index_named(n));
                if let Some(entry) = next.slots.get_mut(&slot) {
                    entry.route = route;
                }
            }
        }
        (next, changes)
    }

    /// Drop the address index entries that still point at `slot` (another service may
    /// have taken an address over in the same change).
    fn unindex_addresses(&mut self, svc: &Service, slot: u32) {
        for addr in &svc.config.addresses {
            if self.by_addr.get(addr) == Some(&slot) {
                self.by_addr.remove(addr);
            }
        }
    }

    /// The service a connection to `dst` is for. v4-mapped destinations match their IPv4
    /// service address.
    pub fn service_for(&self, dst: SocketAddr) -> Option<&Arc<Service>> {
        self.index_for(dst).map(|i| self.service(i))
    }

    pub fn index_for(&self, dst: SocketAddr) -> Option<usize> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.by_addr.get(&dst).map(|&s| s as usize)
    }

    pub fn service_named(&self, name: &str) -> Option<&Arc<Service>> {
        self.index_named(name).map(|i| self.service(i))
    }

    pub fn index_named(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&s| s as usize)
    }

    /// The service at `index` (as plans and [`Snapshot::index_for`] give them).
    pub fn service(&self, index: usize) -> &Arc<Service> {
        &self.slots[&(index as u32)].service
    }

    /// Every service with its index, in the order they were first added.
    pub fn services(&self) -> impl Iterator<Item = (usize, &Arc<Service>)> + '_ {
        self.slots.iter().map(|(&i, s)| (i as usize, &s.service))
    }

    /// Services by name, from `from` on (for paging through a large set).
    pub fn services_from<'a>(
        &'a self,
        from: std::ops::Bound<&str>,
    ) -> impl Iterator<Item = (usize, &'a Arc<Service>)> + 'a {
        let from = from.map(Arc::<str>::from);
        self.by_name.range((from, std::ops::Bound::Unbounded)).map(|(_, &i)| (i as usize, self.service(i as usize)))
    }

    /// The kernel's services map entry for `addr`, if a service owns it.
    pub fn service_address(&self, addr: SocketAddr) -> Option<ServiceAddr> {
        let id = self.index_for(addr)?;
        Some(ServiceAddr { id: id as u32, addr, kernel: self.service(id).config.mode == ServiceMode::Kernel })
    }

    /// Every service address with its service's index and mode, for the kernel's
    /// services map.
    pub fn service_addresses(&self) -> impl Iterator<Item = ServiceAddr> + '_ {
        self.services().flat_map(|(i, s)| {
            let kernel = s.config.mode == ServiceMode::Kernel;
            s.config.addresses.iter().map(move |&addr| ServiceAddr { id: i as u32, addr, kernel })
        })
    }

    /// The service addresses whose kernel entries (service, endpoint table) `changes` may
    /// have changed: those of the services changed, before and after, and those of every
    /// routing service, whose tables follow their targets.
    pub fn touched_addresses(&self, changes: &[Change]) -> std::collections::BTreeSet<SocketAddr> {
        let mut out = std::collections::BTreeSet::new();
        for c in changes {
            out.extend(c.old.iter().flat_map(|o| o.config.addresses.iter().copied()));
            out.extend(c.new_in(self).iter().flat_map(|n| n.config.addresses.iter().copied()));
        }
        if !changes.is_empty() {
            for &slot in &self.routing {
                out.extend(self.service(slot as usize).config.addresses.iter().copied());
            }
        }
        out
    }

    /// The kernel's entries for `addrs` as this snapshot has them.
    pub fn kernel_entries(&self, addrs: impl IntoIterator<Item = SocketAddr>, now: Instant) -> Vec<KernelEntry> {
        addrs
            .into_iter()
            .map(|addr| KernelEntry { addr, service: self.service_address(addr), table: self.kernel_table(addr, now) })
            .collect()
    }

    /// Services that route to others (their tables follow their targets' health).
    pub fn routing(&self) -> impl Iterator<Item = usize> + '_ {
        self.routing.iter().map(|&s| s as usize)
    }

    /// Endpoint departures and returns of `changes` (see [`Departure`]): endpoints back in
    /// service stop draining; endpoints that left start, and are returned so the caller can
    /// arm their drain deadlines.
    pub fn departures(&self, changes: &[Change]) -> Vec<Departure> {
        let mut out = Vec::new();
        for c in changes {
            let new = c.new_in(self);
            let in_service = |addr: SocketAddr| {
                new.is_some_and(|n| n.balancer.endpoints().iter().any(|e| e.addr == addr && !e.terminating))
            };
            if let Some(n) = new {
                for e in n.balancer.endpoints() {
                    if !e.terminating {
                        e.state.stop_draining();
                    }
                }
            }
            // A service that disappeared drains under its old timeout.
            if let Some(old) = &c.old {
                let drain_timeout = new.unwrap_or(old).config.drain_timeout;
                for e in old.balancer.endpoints().iter().filter(|e| !in_service(e.addr)) {
                    out.extend(departure(old, e, drain_timeout));
                }
            }
            // Endpoints that arrive already terminating drain too (their connections may
            // predate an agent restart only in theory, but the state must say draining).
            if let Some(n) = new {
                for e in n.balancer.endpoints().iter().filter(|e| e.terminating) {
                    out.extend(departure(n, e, n.config.drain_timeout));
                }
            }
        }
        out
    }

    /// Every service as a change from nothing (for the first snapshot).
    pub fn all_new(&self) -> Vec<Change> {
        self.services().map(|(slot, _)| Change { slot, old: None, gone: false }).collect()
    }

    /// The shortest idle time of pooled upstream connections any service allows.
    pub fn pool_idle_timeout(&self) -> Option<Duration> {
        *self.pool_idle.get_or_init(|| self.services().map(|(_, s)| s.config.http.pool_idle_timeout).min())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(crate) fn route(&self, index: usize) -> &Route {
        &self.slots[&(index as u32)].route
    }
}

fn departure(svc: &Service, e: &Endpoint, drain_timeout: Duration) -> Option<Departure> {
    let generation = e.state.start_draining()?;
    Some(Departure {
        service: svc.name.to_string(),
        addr: e.addr,
        state: Arc::clone(&e.state),
        drain_timeout,
        generation,
    })
}

impl Service {
    /// A service built anew; `old` (the same name in the previous snapshot) lends its
    /// retry budget when the retry policy is unchanged, and its affinity table.
    fn new(config: &ServiceConfig, endpoints: Vec<Endpoint>, old: Option<&Arc<Service>>, now: Instant) -> Self {
        let retry = &config.http.retry;
        let budget = match old {
            Some(o) if same_budget(&o.config.http.retry, retry) => Arc::clone(&o.budget),
            _ => Arc::new(Budget::new(retry.budget_ratio, retry.budget_min_per_second, retry.budget_window, now)),
        };
        let metrics = ServiceMetrics::new(&config.name, endpoints.len());
        // The affinity table carries over as endpoint state does: a rebuild for an edit
        // does not reshuffle clients.
        let affinity =
            config.session_affinity.as_ref().map(|a| Affinity::new(a.timeout, old.and_then(|o| o.balancer.affinity())));
        let balancer =
            Balancer::new(config.balance, endpoints, config.failure_accrual.clone(), config.locality.spill_threshold)
                .with_affinity(affinity);
        let endpoints_in_balancer = config.endpoints.iter().all(|e| e.target.addr().is_some());
        let config = if endpoints_in_balancer { without_endpoints(config) } else { config.clone() };
        Self { name: config.name.as_str().into(), config, endpoints_in_balancer, balancer, budget, metrics }
    }

    /// The metric handles of endpoint `i` (of the balancer's endpoints).
    pub fn endpoint_metrics(&self, i: usize) -> crate::stats::metrics::EndpointHandles<'_> {
        self.metrics.endpoint(i, self.balancer.endpoints()[i].addr)
    }

    /// Its config, whole.
    pub fn full_config(&self) -> ServiceConfig {
        if !self.endpoints_in_balancer {
            return self.config.clone();
        }
        let endpoints = self
            .balancer
            .endpoints()
            .iter()
            .map(|e| EndpointConfig {
                weight: e.weight,
                terminating: e.terminating,
                place: e.place.clone(),
                ..EndpointConfig::new(Target::Addr(e.addr))
            })
            .collect();
        ServiceConfig { endpoints, ..self.config.clone() }
    }

    /// Whether `config` is this service's config, apart from its endpoints (which the
    /// caller compares as the balancer holds them).
    fn same_config(&self, config: &ServiceConfig) -> bool {
        if self.endpoints_in_balancer {
            config.endpoints.iter().all(|e| e.target.addr().is_some()) && self.config == without_endpoints(config)
        } else {
            self.config == *config
        }
    }
}

fn without_endpoints(config: &ServiceConfig) -> ServiceConfig {
    let mut c = config.clone();
    c.endpoints = Vec::new();
    c
}

fn same_budget(a: &RetryConfig, b: &RetryConfig) -> bool {
    (a.budget_ratio, a.budget_min_per_second, a.budget_window)
        == (b.budget_ratio, b.budget_min_per_second, b.budget_window)
}

/// The endpoints of `svc` from its config and DNS answers, with the live state of those
/// `old` had.
fn endpoints(
    (zone, region): &(Option<String>, Option<String>),
    svc: &ServiceConfig,
    resolved: &Resolved,
    old: Option<&Service>,
) -> Vec<Endpoint> {
    // By address, for services with thousands of endpoints: the state each one had, and
    // which are listed already.
    let states: std::collections::HashMap<SocketAddr, &Arc<EndpointState>> =
        old.iter().flat_map(|o| o.balancer.endpoints()).map(|x| (x.addr, &x.state)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(svc.endpoints.len());
    for e in &svc.endpoints {
        let concrete = match &e.target {
            Target::Addr(a) => vec![(*a, 1)],
            name => resolved.get(name).cloned().unwrap_or_default(),
        };
        for (addr, weight) in concrete {
            // Two names may resolve to one address: the first listing wins.
            if !seen.insert(addr) {
                continue;
            }
            endpoints.push(Endpoint {
                addr,
                weight: e.weight.saturating_mul(weight.max(1)),
                tier: if svc.locality.enabled { tier(zone.as_deref(), region.as_deref(), e) } else { Tier::Local },
                terminating: e.terminating,
                place: e.place.clone(),
                state: states.get(&addr).map(|s| Arc::clone(s)).unwrap_or_default(),
            });
        }
    }
    endpoints
}

/// The same endpoints in the same order, with the same attributes and live state.
fn same_endpoints(a: &[Endpoint], b: &[Endpoint]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (x.addr, x.weight, x.tier, x.terminating) == (y.addr, y.weight, y.tier, y.terminating)
                && x.place == y.place
                && Arc::ptr_eq(&x.state, &y.state)
        })
}

/// Locality tier of an endpoint seen from this node. Without a node zone every endpoint
/// is local: locality is opt-in. Topology hints, where given, decide the zone question.
fn tier(node_zone: Option<&str>, node_region: Option<&str>, e: &EndpointConfig) -> Tier {
    let Some(node_zone) = node_zone else { return Tier::Local };
    if let Some(hints) = e.place.hints() {
        return if hints.split(',').any(|z| z == node_zone) { Tier::Local } else { Tier::Remote };
    }
    let (zone, region) = (e.place.zone(), e.place.region());
    let same_region = match (node_region, region) {
        (Some(a), Some(b)) => a == b,
        // Zones are unique across regions in every cloud's naming; no region given on
        // either side means "the same region" when the zones match.
        _ => true,
    };
    if same_region && zone == Some(node_zone) {
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
    use crate::config::Place;

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
            assert_eq!(snap.service_for(dst.parse().unwrap()).map(|s| &*s.name), Some("web"), "{dst}");
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
        let eps: Vec<(String, u32)> = snap
            .services()
            .next()
            .unwrap()
            .1
            .balancer
            .endpoints()
            .iter()
            .map(|e| (e.addr.to_string(), e.weight))
            .collect();
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
        assert_eq!(snap.services().next().unwrap().1.balancer.endpoints().len(), 1);
    }

    #[test]
    fn routes_split_by_weight_and_fail_over_to_healthy_branches() {
        let cfg = config(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\"], route: { split: [{ service: v1, weight: 90 }, { service: v2, weight: 10 }] } }\n  - { name: v1, endpoints: [\"10.0.0.1:80\"] }\n  - { name: v2, endpoints: [\"10.0.0.2:80\"], failure_accrual: { consecutive_failures: 1 } }\n  - { name: db, addresses: [\"10.96.0.2:80\"], route: { failover: [v2, v1] } }\n",
        );
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let web = snap.index_named("web").unwrap();
        let picks: Vec<&str> = (0..2000).map(|_| &*snap.service(snap.concrete(web, now)[0]).name).collect();
        let v2 = picks.iter().filter(|n| **n == "v2").count() as f64 / picks.len() as f64;
        assert!((0.07..0.13).contains(&v2), "90/10 split gave v2 {v2}");
        let db = snap.index_named("db").unwrap();
        let order =
            |s: &Snapshot| s.concrete(db, now).iter().map(|&i| s.service(i).name.to_string()).collect::<Vec<_>>();
        assert_eq!(order(&snap), ["v2", "v1"], "first healthy branch first");
        let v2_ep = &snap.service_named("v2").unwrap().balancer.endpoints()[0];
        v2_ep.state.on_connect_failed(now, snap.service_named("v2").unwrap().balancer.accrual());
        assert_eq!(order(&snap), ["v1", "v2"], "unhealthy branch last");
        assert!(snap.has_healthy(db, now));
    }

    #[test]
    fn a_plan_decides_service_mode_and_concrete_services_before_anything_is_read() {
        let cfg = config(
            r#"
agent: { detect: { opaque_ports: [6379] } }
services:
  - { name: web, addresses: ["10.96.0.1:80", "10.96.0.1:6379"], route: { failover: [v1, v2] } }
  - { name: v1, endpoints: ["10.0.0.1:80"] }
  - { name: v2, endpoints: ["10.0.0.2:80"] }
  - { name: grpc, addresses: ["10.96.0.3:80"], protocol: http2, endpoints: ["10.0.0.3:80"] }
"#,
        );
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let plan = snap.plan("10.96.0.1:80".parse().unwrap(), 7, now).unwrap();
        assert_eq!(&*snap.service(plan.service).name, "web");
        assert_eq!(plan.mode, Mode::Detect);
        let names: Vec<&str> = plan.concrete.iter().map(|&i| &*snap.service(i).name).collect();
        assert_eq!(names, ["v1", "v2"]);
        assert_eq!(plan.key, crate::balance::hash(7u64), "affinity follows the client cgroup");
        assert_eq!(snap.plan("10.96.0.1:6379".parse().unwrap(), 7, now).unwrap().mode, Mode::Opaque, "opaque port");
        assert_eq!(snap.plan("10.96.0.3:80".parse().unwrap(), 7, now).unwrap().mode, Mode::Http2, "configured");
        assert!(snap.plan("10.96.0.9:80".parse().unwrap(), 7, now).is_none(), "no such service");
    }

    #[test]
    fn unchanged_services_are_shared_between_snapshots() {
        let one = config(
            r#"
services:
  - { name: web, addresses: ["10.96.0.1:80"], endpoints: ["10.0.0.1:80"] }
  - { name: db, addresses: ["10.96.0.2:80"], endpoints: ["10.0.1.1:80"] }
"#,
        );
        let a = Snapshot::build(&one, &Resolved::new(), None);
        let two = config(
            r#"
services:
  - { name: web, addresses: ["10.96.0.1:80"], endpoints: ["10.0.0.1:80"] }
  - { name: db, addresses: ["10.96.0.2:80"], endpoints: ["10.0.1.1:80", "10.0.1.2:80"] }
"#,
        );
        let b = Snapshot::build(&two, &Resolved::new(), Some(&a));
        assert!(Arc::ptr_eq(a.service_named("web").unwrap(), b.service_named("web").unwrap()), "web did not change");
        let (db_a, db_b) = (a.service_named("db").unwrap(), b.service_named("db").unwrap());
        assert!(!Arc::ptr_eq(db_a, db_b), "db gained an endpoint");
        assert!(Arc::ptr_eq(&db_a.budget, &db_b.budget), "same retry policy: the budget carries over");
        assert!(Arc::ptr_eq(&db_a.balancer.endpoints()[0].state, &db_b.balancer.endpoints()[0].state));
    }

    #[test]
    fn the_affinity_table_carries_over_while_the_service_has_affinity() {
        let with = |affinity: &str, eps: &str| {
            config(&format!(
                "services:\n  - {{ name: db, addresses: [\"10.96.0.2:80\"], endpoints: [{eps}]{affinity} }}\n"
            ))
        };
        let a =
            Snapshot::build(&with(", session_affinity: { timeout: 1m }", "\"10.0.1.1:80\""), &Resolved::new(), None);
        let table = |s: &Snapshot| s.service_named("db").unwrap().balancer.affinity().cloned();
        assert_eq!(table(&a).unwrap().timeout(), Duration::from_secs(60));
        // An endpoint added and the timeout changed: rebuilt, the same table.
        let b = Snapshot::build(
            &with(", session_affinity: { timeout: 2m }", "\"10.0.1.1:80\", \"10.0.1.2:80\""),
            &Resolved::new(),
            Some(&a),
        );
        assert!(!Arc::ptr_eq(a.service_named("db").unwrap(), b.service_named("db").unwrap()));
        assert!(table(&b).unwrap().shares_table_with(&table(&a).unwrap()));
        assert_eq!(table(&b).unwrap().timeout(), Duration::from_secs(120));
        // Removed, then given again: a new table.
        let c = Snapshot::build(&with("", "\"10.0.1.1:80\""), &Resolved::new(), Some(&b));
        assert!(table(&c).is_none());
        let d = Snapshot::build(&with(", session_affinity: {}", "\"10.0.1.1:80\""), &Resolved::new(), Some(&c));
        assert!(!table(&d).unwrap().shares_table_with(&table(&a).unwrap()));
    }

    #[test]
    fn kernel_tables_keep_healthy_endpoints_of_the_address_family_with_their_shares() {
        let cfg = config(
            "services:\n  - { name: web, addresses: [\"10.96.0.1:80\", \"[fd96::1]:80\"], endpoints: [\"10.0.0.2:80\", { address: \"10.0.0.1:80\", weight: 3 }, \"[fd10::1]:80\", { address: \"10.0.0.3:80\", terminating: true }], failure_accrual: { consecutive_failures: 1 } }\n  - { name: db, addresses: [\"10.96.0.2:80\"], route: { failover: [v1, v2] } }\n  - { name: v1, endpoints: [\"10.0.1.1:80\"], failure_accrual: { consecutive_failures: 1 } }\n  - { name: v2, endpoints: [\"10.0.2.1:80\"] }\n  - { name: canary, addresses: [\"10.96.0.3:80\"], route: { split: [{ service: v1, weight: 9 }, { service: v2, weight: 1 }] } }\n",
        );
        let snap = Snapshot::build(&cfg, &Resolved::new(), None);
        let now = Instant::now();
        let of = |s: &Snapshot, addr: &str| -> Vec<(String, f64)> {
            let addr: SocketAddr = addr.parse().unwrap();
            let all = s.kernel_tables(now);
            let table = all.into_iter().find(|(a, _)| *a == addr).unwrap().1;
            let total: f64 = table.iter().map(|w| w.share).sum();
            table.iter().map(|w| (w.addr.to_string(), (w.share / total * 100.0).round())).collect()
        };
        // Four endpoints, one terminating, one of the other family: 3 of 4 weight units
        // to 10.0.0.1 among the v4 ones (the v6 one is in the other table).
        assert_eq!(of(&snap, "10.96.0.1:80"), [("10.0.0.1:80".into(), 75.0), ("10.0.0.2:80".into(), 25.0)]);
        assert_eq!(of(&snap, "[fd96::1]:80"), [("[fd10::1]:80".into(), 100.0)]);
        assert_eq!(of(&snap, "10.96.0.2:80"), [("10.0.1.1:80".into(), 100.0)], "failover: first healthy branch");
        assert_eq!(
            of(&snap, "10.96.0.3:80"),
            [("10.0.1.1:80".into(), 90.0), ("10.0.2.1:80".into(), 10.0)],
            "a split by branch weight"
        );
        let web = snap.service_named("web").unwrap();
        web.balancer.endpoints()[1].state.on_connect_failed(now, web.balancer.accrual());
        assert_eq!(of(&snap, "10.96.0.1:80"), [("10.0.0.2:80".into(), 100.0)], "an ejected endpoint leaves the table");
        let v1 = snap.service_named("v1").unwrap();
        v1.balancer.endpoints()[0].state.on_connect_failed(now, v1.balancer.accrual());
        assert_eq!(of(&snap, "10.96.0.2:80"), [("10.0.2.1:80".into(), 100.0)], "failover moves on");
        let db = snap.index_named("db").unwrap();
        let v1_index = snap.index_named("v1").unwrap();
        assert_eq!(snap.endpoint_in(db, "10.0.1.1:80".parse().unwrap()), Some((v1_index, 0)), "found in any branch");
        assert_eq!(snap.endpoint_in(db, "10.0.0.1:80".parse().unwrap()), None);
    }

    #[test]
    fn tiers_follow_the_node_zone_and_region() {
        let (z, r) = (Some("a"), Some("r1"));
        let at = |zone: Option<&str>, region: Option<&str>, hints: Option<&str>| EndpointConfig {
            place: Place {
                zone: zone.map(Into::into),
                region: region.map(Into::into),
                node: None,
                hints: hints.map(Into::into),
            }
            .some(),
            ..EndpointConfig::new(Target::Addr("10.0.0.1:80".parse().unwrap()))
        };
        let ep = |zone, region| at(zone, region, None);
        let s = Some;
        assert_eq!(tier(None, None, &ep(s("b"), s("r2"))), Tier::Local, "no node zone: locality off");
        assert_eq!(tier(z, r, &ep(s("a"), s("r1"))), Tier::Local);
        assert_eq!(tier(z, r, &ep(s("a"), None)), Tier::Local);
        assert_eq!(tier(z, r, &ep(s("b"), s("r1"))), Tier::Region);
        assert_eq!(tier(z, r, &ep(s("c"), s("r2"))), Tier::Remote);
        assert_eq!(tier(z, r, &ep(None, None)), Tier::Remote);
        // Hints decide: an endpoint in zone b hinted for a is local to a node in a, and
        // one in zone a hinted only for b is not.
        let hinted = |zone: &str, hints: &str| at(Some(zone), r, Some(hints));
        assert_eq!(tier(z, r, &hinted("b", "a")), Tier::Local);
        assert_eq!(tier(z, r, &hinted("b", "c,a")), Tier::Local);
        assert_eq!(tier(z, r, &hinted("a", "b")), Tier::Remote);
    }

    #[test]
    fn a_rebuild_keeps_endpoint_state_and_reports_departures() {
        let one = config(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\n    drain_timeout: 7s\n",
        );
        let a = Snapshot::build(&one, &Resolved::new(), None);
        let state_of =
            |s: &Snapshot, i: usize| Arc::clone(&s.services().next().unwrap().1.balancer.endpoints()[i].state);
        let two = config(
            "services:\n  - name: web\n    addresses: [\"10.96.0.1:80\"]\n    endpoints: [\"10.0.0.1:80\", { address: \"10.0.0.3:80\", terminating: true }]\n    drain_timeout: 7s\n",
        );
        let (b, changes) = a.rebuilt(&two, &Resolved::new());
        assert!(Arc::ptr_eq(&state_of(&a, 0), &state_of(&b, 0)), "state carried over");
        let gone: Vec<SocketAddr> = b.departures(&changes).iter().map(|d| d.addr).collect();
        assert_eq!(gone.len(), 2);
        assert!(gone.contains(&"10.0.0.2:80".parse().unwrap()) && gone.contains(&"10.0.0.3:80".parse().unwrap()));
        assert!(b.departures(&changes).is_empty(), "already draining: reported once");
        // Back in service: the pending deadline must not cut it.
        let (c, changes) = b.rebuilt(&one, &Resolved::new());
        assert!(c.departures(&changes).is_empty());
        let token = state_of(&a, 2).drain_token();
        state_of(&a, 2).cut_if_still_draining(1);
        assert!(!token.is_cancelled());
    }
}
