//! Endpoint choice for one service, in three steps:
//!
//! 1. Health: endpoints ejected by failure accrual or failed by active checks are left
//!    out, unless more than `max_ejected_percent` are out (panic mode: health is ignored
//!    rather than piling the whole service onto a few endpoints, as Envoy does).
//! 2. Locality: the nearest tier with healthy endpoints keeps its traffic while its
//!    healthy share is at least `spill_threshold`; below that, the deficit spills to the
//!    next tier in proportion.
//! 3. Policy: p2c over peak-EWMA cost (default), least connections, round robin,
//!    random, or ring hash on the client; all weighted.
//!
//! Endpoints already tried by this client connection are skipped while others remain.

mod endpoint;
mod health;
mod ring;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Instant,
};

pub use endpoint::{ActiveGuard, Endpoint, EndpointState, Tier};
pub use health::{Avail, Change};
use ring::Ring;
pub use ring::hash;

use crate::config::{BalanceKind, FailureAccrualConfig};

/// What picks did, per service, for logs and metrics.
#[derive(Debug, Default)]
pub struct PickStats {
    /// Picks by the tier they landed in (indexed by `Tier as usize`).
    pub by_tier: [AtomicU64; 3],
    /// Picks made in panic mode.
    pub panics: AtomicU64,
}

#[derive(Debug)]
pub struct Balancer {
    kind: BalanceKind,
    endpoints: Vec<Endpoint>,
    ring: Ring,
    next: AtomicUsize,
    accrual: FailureAccrualConfig,
    spill_threshold: f64,
    /// Whether the last pick was made in panic mode, to report transitions once.
    in_panic: AtomicBool,
    pub stats: PickStats,
}

/// One pick: the endpoint, the tier it came from, and whether health was ignored.
#[derive(Debug)]
pub struct Pick<'a> {
    pub endpoint: &'a Endpoint,
    pub tier: Tier,
    pub panic: bool,
    /// This pick entered or left panic mode (the caller logs it).
    pub panic_changed: bool,
}

impl Balancer {
    pub fn new(
        kind: BalanceKind,
        endpoints: Vec<Endpoint>,
        accrual: FailureAccrualConfig,
        spill_threshold: f64,
    ) -> Self {
        let ring = match kind {
            BalanceKind::RingHash => Ring::new(endpoints.iter().map(|e| (e.addr, e.weight))),
            _ => Ring::default(),
        };
        Self {
            kind,
            endpoints,
            ring,
            next: AtomicUsize::new(0),
            accrual,
            spill_threshold,
            in_panic: AtomicBool::new(false),
            stats: PickStats::default(),
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn kind(&self) -> BalanceKind {
        self.kind
    }

    pub fn accrual(&self) -> &FailureAccrualConfig {
        &self.accrual
    }

    /// Choose an endpoint for a new connection. `key` identifies the client (ring hash),
    /// `exclude` lists endpoints this connection already tried.
    pub fn pick(&self, key: u64, exclude: &[SocketAddr], now: Instant) -> Option<Pick<'_>> {
        let eps = &self.endpoints;
        let live: Vec<usize> = (0..eps.len()).filter(|&i| !eps[i].terminating).collect();
        if live.is_empty() {
            return None;
        }
        let avail: Vec<Avail> = eps.iter().map(|e| e.state.availability(now)).collect();
        let out = live.iter().filter(|&&i| avail[i] == Avail::Out).count();
        let panic = out > 0 && out * 100 > live.len() * self.accrual.max_ejected_percent as usize;
        let fresh = |i: &usize| !exclude.contains(&eps[*i].addr);

        let (mut pool, tier) = if panic {
            let untried: Vec<usize> = live.iter().copied().filter(fresh).collect();
            (if untried.is_empty() { live.clone() } else { untried }, None)
        } else {
            match self.tier_pool(&live, &avail, &fresh, self.draw(key)) {
                Some((pool, tier)) => (pool, Some(tier)),
                // Every healthy endpoint was tried already: try one of them again.
                None => (live.iter().copied().filter(|&i| avail[i] != Avail::Out).collect(), None),
            }
        };
        while !pool.is_empty() {
            let i = self.select(&pool, key);
            // An endpoint out of back-off takes one trial connection at a time.
            if panic || avail[i] != Avail::Trial || eps[i].state.claim_trial(now) {
                let tier = tier.unwrap_or(eps[i].tier);
                self.stats.by_tier[tier as usize].fetch_add(1, Ordering::Relaxed);
                if panic {
                    self.stats.panics.fetch_add(1, Ordering::Relaxed);
                }
                let panic_changed = self.in_panic.swap(panic, Ordering::Relaxed) != panic;
                return Some(Pick { endpoint: &eps[i], tier, panic, panic_changed });
            }
            pool.retain(|&j| j != i);
        }
        None
    }

    /// A number in [0, 1) for the locality draw: random, except under ring hash, where it
    /// follows the client so that spilling does not break affinity more than it must.
    fn draw(&self, key: u64) -> f64 {
        match self.kind {
            BalanceKind::RingHash => (hash((key, "locality")) >> 11) as f64 / (1u64 << 53) as f64,
            _ => fastrand::f64(),
        }
    }

    /// The healthy, untried endpoints of the tier the locality draw `u` lands in.
    fn tier_pool(
        &self,
        live: &[usize],
        avail: &[Avail],
        fresh: &impl Fn(&usize) -> bool,
        mut u: f64,
    ) -> Option<(Vec<usize>, Tier)> {
        let mut fallback = None;
        for tier in Tier::ALL {
            let members: Vec<usize> = live.iter().copied().filter(|&i| self.endpoints[i].tier == tier).collect();
            let healthy = members.iter().filter(|&&i| avail[i] != Avail::Out).count();
            let usable: Vec<usize> = members.iter().copied().filter(|i| avail[*i] != Avail::Out && fresh(i)).collect();
            if usable.is_empty() {
                continue;
            }
            let share = (healthy as f64 / members.len() as f64 / self.spill_threshold).min(1.0);
            if u < share {
                return Some((usable, tier));
            }
            // Rescale what is left of the draw to the remaining probability mass.
            u = (u - share) / (1.0 - share);
            fallback = Some((usable, tier));
        }
        fallback
    }

    /// Apply the policy to a non-empty pool of endpoint indices.
    fn select(&self, pool: &[usize], key: u64) -> usize {
        let eps = &self.endpoints;
        let weight = |i: usize| eps[i].weight.max(1) as u64;
        match self.kind {
            BalanceKind::RoundRobin => {
                let n = self.next.fetch_add(1, Ordering::Relaxed) as u64;
                weighted_nth(pool, n % pool.iter().map(|&i| weight(i)).sum::<u64>(), weight)
            }
            BalanceKind::Random => {
                weighted_nth(pool, fastrand::u64(..pool.iter().map(|&i| weight(i)).sum::<u64>()), weight)
            }
            BalanceKind::LeastConnections => {
                let load = |i: usize| eps[i].state.active() as f64 / weight(i) as f64;
                let min = pool.iter().map(|&i| load(i)).fold(f64::INFINITY, f64::min);
                let least: Vec<usize> = pool.iter().copied().filter(|&i| load(i) <= min).collect();
                least[fastrand::usize(..least.len())]
            }
            BalanceKind::P2cEwma => {
                if pool.len() == 1 {
                    return pool[0];
                }
                let a = fastrand::usize(..pool.len());
                let b = (a + 1 + fastrand::usize(..pool.len() - 1)) % pool.len();
                let cost = |i: usize| eps[i].state.cost() / weight(i) as f64;
                let (a, b) = (pool[a], pool[b]);
                if cost(b) < cost(a) { b } else { a }
            }
            BalanceKind::RingHash => self.ring.pick(key, |i| pool.contains(&i)).unwrap_or(pool[0]),
        }
    }
}

/// The pool member that the `n`th unit of weight falls on.
fn weighted_nth(pool: &[usize], mut n: u64, weight: impl Fn(usize) -> u64) -> usize {
    for &i in pool {
        let w = weight(i);
        if n < w {
            return i;
        }
        n -= w;
    }
    pool[pool.len() - 1]
}

#[cfg(test)]
mod tests;
