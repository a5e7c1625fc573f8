//! Routes compiled into the snapshot, and the one walker over them. Every user of the
//! route graph goes through here: a new connection's [`Plan`] (opaque TCP, detection,
//! upgrades), each HTTP request's concrete services, the kernel's weighted endpoint
//! tables, health as `/services` and `switchyard resolve` show it, and the resolve tree's
//! branches.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use smallvec::SmallVec;

use super::Snapshot;
use crate::{
    balance::{Avail, Weighted, hash},
    config::{self, MAX_ROUTE_DEPTH, Protocol},
};

/// A service's route with branch names resolved to snapshot indices.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// A concrete service: it has endpoints of its own.
    Endpoints,
    /// (weight, target) per branch; one branch is drawn per connection.
    Split { branches: Box<[(u32, usize)]>, total: u32 },
    /// Targets in order of preference.
    Failover(Box<[usize]>),
}

impl Route {
    /// Resolve a validated route's names. (Validation already refused unknown targets,
    /// cycles and routes deeper than `MAX_ROUTE_DEPTH`; a name missing anyway is left
    /// out rather than trusted.)
    pub(super) fn compile(route: Option<&config::Route>, index: impl Fn(&str) -> Option<usize>) -> Self {
        let Some(route) = route else { return Self::Endpoints };
        if route.split.is_empty() {
            return Self::Failover(route.failover.iter().filter_map(|n| index(n)).collect());
        }
        let branches: Box<[(u32, usize)]> =
            route.split.iter().filter_map(|b| Some((b.weight, index(&b.service)?))).collect();
        let total = branches.iter().map(|(w, _)| *w).sum();
        Self::Split { branches, total }
    }
}

/// How a connection's bytes are handled, decided before any are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Opaque bytes, balanced per connection.
    Opaque,
    /// HTTP/1.x or HTTP/2, balanced per request (configured, so not detected).
    Http1,
    Http2,
    /// Look at the first bytes (without stalling a server that speaks first).
    Detect,
}

/// What a new connection will try: the decision made before acting on it.
#[derive(Debug)]
pub struct Plan {
    /// The service dialled (index into the snapshot).
    pub service: usize,
    pub mode: Mode,
    /// The client's affinity key (its cgroup, hashed) for ring-hash balancing.
    pub key: u64,
    /// Concrete services to try, in order: a split's branch drawn for this connection, a
    /// failover's healthy branches first.
    pub concrete: Concrete,
}

/// Concrete service indices, on the stack for the common route shapes.
pub type Concrete = SmallVec<[usize; 4]>;

/// What a walk through a route yields at each kind of node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// For a new connection: one split branch drawn by weight; failover branches with a
    /// healthy endpoint first, then the others.
    Connect,
    /// For the kernel's tables: every split branch, scaled by its weight; a failover's
    /// first healthy branch (all of them, equally, if none is).
    Table,
    /// Every branch, whatever its weight or health.
    Every,
}

/// One branch of a route, for the resolve tree.
#[derive(Debug, Clone)]
pub struct Branch {
    pub target: usize,
    /// Split weight as a share of the total, or failover position (from 1).
    pub share: BranchShare,
}

#[derive(Debug, Clone, Copy)]
pub enum BranchShare {
    Weight { weight: u32, total: u32 },
    Position(usize),
}

impl Snapshot {
    /// The decision for a new connection to `dst` from a client in cgroup `cgroup_id`:
    /// which service, how its bytes are handled, where to try. `None` when `dst` is no
    /// service's address.
    pub fn plan(&self, dst: SocketAddr, cgroup_id: u64, now: Instant) -> Option<Plan> {
        let service = self.index_for(dst)?;
        let mode = match self.service(service).config.protocol {
            Protocol::Tcp => Mode::Opaque,
            Protocol::Http1 => Mode::Http1,
            Protocol::Http2 => Mode::Http2,
            Protocol::Auto if self.detect.opaque_ports.contains(&dst.port()) => Mode::Opaque,
            Protocol::Auto => Mode::Detect,
        };
        Some(Plan { service, mode, key: hash(cgroup_id), concrete: self.concrete(service, now) })
    }

    /// The concrete services a new connection or request to `service` may use, in the
    /// order to try (each once).
    pub fn concrete(&self, service: usize, now: Instant) -> Concrete {
        let mut out = Concrete::new();
        self.walk(service, Walk::Connect, now, 0, 1.0, &mut |i, _| {
            if !out.contains(&i) {
                out.push(i);
            }
        });
        out
    }

    /// Whether a new connection to `service` could find a healthy endpoint.
    pub fn has_healthy(&self, service: usize, now: Instant) -> bool {
        self.healthy_at(service, now, 0)
    }

    /// For the kernel's tables (`mode: kernel` services, and every service's fallback
    /// while no agent listens): every service address with the share of new connections
    /// each endpoint should get, as the balancer weighs them (health, weight, locality,
    /// panic) and the route divides them (a split by branch weight, a failover to its
    /// first healthy branch). Endpoints of the address's family only, since the kernel
    /// cannot rewrite a connect across families; sorted by address, so an unchanged
    /// table compares equal. Shares are relative: the encoder scales them.
    pub fn kernel_tables(&self, now: Instant) -> Vec<(SocketAddr, Vec<Weighted>)> {
        self.services().flat_map(|(i, _)| self.kernel_tables_of(i, now)).collect()
    }

    /// [`Snapshot::kernel_tables`] for one service: one table per address it has.
    pub fn kernel_tables_of(&self, service: usize, now: Instant) -> Vec<(SocketAddr, Vec<Weighted>)> {
        // By address: sorted, and the same endpoint reached through two branches is one
        // entry with both shares (a lookup, not a scan: services may have thousands).
        let mut all: BTreeMap<SocketAddr, Weighted> = BTreeMap::new();
        self.walk(service, Walk::Table, now, 0, 1.0, &mut |c, scale| {
            let b = &self.service(c).balancer;
            for s in b.shares(now) {
                let addr = b.endpoints()[s.index].addr;
                let w = all.entry(addr).or_insert(Weighted { addr, share: 0.0, trial: true });
                w.share += scale * s.share;
                w.trial &= s.trial;
            }
        });
        let family = |v4: bool| all.values().filter(|w| w.addr.is_ipv4() == v4).copied().collect::<Vec<_>>();
        self.service(service).config.addresses.iter().map(|addr| (*addr, family(addr.is_ipv4()))).collect()
    }

    /// The kernel table of service address `addr`: `None` when no service has it.
    pub fn kernel_table(&self, addr: SocketAddr, now: Instant) -> Option<Vec<Weighted>> {
        let service = self.index_for(addr)?;
        self.kernel_tables_of(service, now).into_iter().find(|(a, _)| *a == addr).map(|(_, t)| t)
    }

    /// Where endpoint `addr` is among the concrete services `service` leads to: (the
    /// concrete service, the endpoint's index in it). For a connection the kernel sent to
    /// `addr`, whose result the agent learns afterwards.
    pub fn endpoint_in(&self, service: usize, addr: SocketAddr) -> Option<(usize, usize)> {
        let mut found = None;
        self.walk(service, Walk::Every, Instant::now(), 0, 1.0, &mut |c, _| {
            if found.is_none() {
                found = self.service(c).balancer.endpoints().iter().position(|e| e.addr == addr).map(|i| (c, i));
            }
        });
        found
    }

    /// The branches of `service`'s route (none for a concrete service).
    pub fn branches(&self, service: usize) -> Vec<Branch> {
        match self.route(service) {
            Route::Endpoints => Vec::new(),
            Route::Split { branches, total } => branches
                .iter()
                .map(|&(weight, target)| Branch { target, share: BranchShare::Weight { weight, total: *total } })
                .collect(),
            Route::Failover(targets) => targets
                .iter()
                .enumerate()
                .map(|(n, &target)| Branch { target, share: BranchShare::Position(n + 1) })
                .collect(),
        }
    }

    /// The route walker: calls `visit` with each concrete service `service` leads to,
    /// in order, as `walk` says, and the part of `scale` that reaches it (for
    /// `Walk::Connect`, always all of it).
    fn walk(
        &self,
        service: usize,
        walk: Walk,
        now: Instant,
        depth: usize,
        scale: f64,
        visit: &mut impl FnMut(usize, f64),
    ) {
        if depth > MAX_ROUTE_DEPTH {
            return;
        }
        let next = depth + 1;
        match self.route(service) {
            Route::Endpoints => visit(service, scale),
            Route::Split { branches, total } => match walk {
                Walk::Connect => {
                    let mut n = fastrand::u32(..(*total).max(1));
                    for &(weight, target) in branches.iter() {
                        if n < weight {
                            return self.walk(target, walk, now, next, scale, visit);
                        }
                        n -= weight;
                    }
                }
                Walk::Table | Walk::Every => {
                    for &(weight, target) in branches.iter().filter(|(w, _)| *w > 0 || walk == Walk::Every) {
                        self.walk(target, walk, now, next, scale * weight as f64 / (*total).max(1) as f64, visit);
                    }
                }
            },
            Route::Failover(targets) => {
                let healthy = |t: &&usize| self.healthy_at(**t, now, next);
                match walk {
                    Walk::Every => {
                        for &t in targets.iter() {
                            self.walk(t, walk, now, next, scale, visit);
                        }
                    }
                    Walk::Connect => {
                        for &t in targets.iter().filter(healthy) {
                            self.walk(t, walk, now, next, scale, visit);
                        }
                        for &t in targets.iter().filter(|t| !healthy(t)) {
                            self.walk(t, walk, now, next, scale, visit);
                        }
                    }
                    Walk::Table => match targets.iter().find(healthy) {
                        Some(&first) => self.walk(first, walk, now, next, scale, visit),
                        None => {
                            let each = scale / targets.len().max(1) as f64;
                            for &t in targets.iter() {
                                self.walk(t, walk, now, next, each, visit);
                            }
                        }
                    },
                }
            }
        }
    }

    fn healthy_at(&self, service: usize, now: Instant, depth: usize) -> bool {
        if depth > MAX_ROUTE_DEPTH {
            return false;
        }
        match self.route(service) {
            Route::Endpoints => self
                .service(service)
                .balancer
                .endpoints()
                .iter()
                .any(|e| !e.terminating && e.state.availability(now) != Avail::Out),
            Route::Split { branches, .. } => branches.iter().any(|&(_, t)| self.healthy_at(t, now, depth + 1)),
            Route::Failover(targets) => targets.iter().any(|&t| self.healthy_at(t, now, depth + 1)),
        }
    }
}
