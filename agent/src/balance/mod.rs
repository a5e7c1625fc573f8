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
//! With session affinity ([`affinity`]), a client's remembered endpoint comes before all
//! of this.

pub mod affinity;
pub mod budget;
mod endpoint;
mod health;
mod ring;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Instant,
};

pub use affinity::Affinity;
pub use endpoint::{ActiveGuard, Endpoint, EndpointState, RTT_FLOOR, Tier, availability_epoch};
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
    /// Session affinity, if the service has it.
    affinity: Option<Affinity>,
}

/// One pick: the endpoint, the tier it came from, and whether health was ignored.
#[derive(Debug)]
pub struct Pick<'a> {
    /// The endpoint's index in [`Balancer::endpoints`].
    pub index: usize,
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
            affinity: None,
        }
    }

    /// This balancer with session affinity (see [`affinity`]).
    pub fn with_affinity(self, affinity: Option<Affinity>) -> Self {
        Self { affinity, ..self }
    }

    pub fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
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

    /// Choose an endpoint for a new connection. `key` identifies the client (ring hash,
    /// affinity), `exclude` lists endpoints this connection already tried.
    ///
    /// Allocation-free and lock-free: a few passes over the endpoints, reading each one's
    /// published availability, instead of building candidate lists. With session
    /// affinity, one lock (the client's shard of the table).
    pub fn pick(&self, key: u64, exclude: &[SocketAddr], now: Instant) -> Option<Pick<'_>> {
        match &self.affinity {
            None => self.pick_by_policy(key, exclude, now),
            Some(a) => self.pick_with_affinity(a, key, exclude, now),
        }
    }

    /// A pick by health, locality and the policy alone.
    fn pick_by_policy(&self, key: u64, exclude: &[SocketAddr], now: Instant) -> Option<Pick<'_>> {
        // Only an ejected endpoint and p2c's decay need the time: convert it once, if at all.
        let clock = std::cell::OnceCell::new();
        // A trial claimed by another pick meanwhile shows as out on the next pass.
        for _ in 0..4 {
            let view = View { eps: &self.endpoints, exclude, now, clock: &clock };
            let (pool, tier, panic) = self.pool(&view, key)?;
            let i = self.select(&view, pool, key)?;
            // An endpoint out of back-off takes one trial connection at a time.
            if panic || view.avail(i) != Avail::Trial || self.endpoints[i].state.claim_trial(now) {
                let tier = tier.unwrap_or(self.endpoints[i].tier);
                self.stats.by_tier[tier as usize].fetch_add(1, Ordering::Relaxed);
                if panic {
                    self.stats.panics.fetch_add(1, Ordering::Relaxed);
                }
                // Read first: the swap (a write every pick) only on a transition.
                let panic_changed = self.in_panic.load(Ordering::Relaxed) != panic
                    && self.in_panic.swap(panic, Ordering::Relaxed) != panic;
                return Some(Pick { index: i, endpoint: &self.endpoints[i], tier, panic, panic_changed });
            }
        }
        None
    }

    /// Which endpoints the policy chooses among: health (or panic), then locality.
    /// Returns the pool (with its size and weight, counted in the same pass), the tier
    /// it was drawn from, and whether health is ignored.
    fn pool(&self, view: &View<'_>, key: u64) -> Option<(Pool, Option<Tier>, bool)> {
        let (mut live, mut out) = (0usize, 0usize);
        // Sizes and weights of the candidate pools: per tier the healthy untried members,
        // then live untried, live, and healthy (tried or not).
        let mut tiers = [Tally::default(); 3];
        let (mut fresh, mut all, mut healthy_any) = (Tally::default(), Tally::default(), Tally::default());
        for (i, e) in view.eps.iter().enumerate() {
            if e.terminating {
                continue;
            }
            live += 1;
            let w = e.weight.max(1) as u64;
            let healthy = view.avail(i) != Avail::Out;
            let untried = view.fresh(i);
            out += usize::from(!healthy);
            all.add(w);
            let t = &mut tiers[e.tier as usize];
            t.members += 1;
            if untried {
                fresh.add(w);
            }
            if healthy {
                t.healthy += 1;
                healthy_any.add(w);
                if untried {
                    t.add(w);
                }
            }
        }
        if live == 0 {
            return None;
        }
        let panic = out > 0 && out * 100 > live * self.accrual.max_ejected_percent as usize;
        if panic {
            let (tally, fresh_only) = if fresh.count > 0 { (fresh, true) } else { (all, false) };
            return Some((Pool { tier: None, healthy: false, fresh: fresh_only, tally }, None, true));
        }
        // The nearest tier with healthy untried endpoints keeps its share; the rest of
        // the draw spills onward.
        let mut u = self.draw(key);
        let mut chosen = None;
        for tier in Tier::ALL {
            let t = tiers[tier as usize];
            if t.count == 0 {
                continue;
            }
            chosen = Some(tier);
            let share = (t.healthy as f64 / t.members as f64 / self.spill_threshold).min(1.0);
            if u < share {
                break;
            }
            // Rescale what is left of the draw to the remaining probability mass.
            u = (u - share) / (1.0 - share);
        }
        Some(match chosen {
            Some(tier) => {
                let tally = tiers[tier as usize];
                (Pool { tier: Some(tier), healthy: true, fresh: true, tally }, Some(tier), false)
            }
            // Every healthy endpoint was tried already, and failed this client: the health
            // view is behind (an ejected endpoint may be back, as a checked-in one died).
            // Last resort before repeating one: an untried endpoint that is out. Only
            // then one of the healthy ones again.
            None if fresh.count > 0 => (Pool { tier: None, healthy: false, fresh: true, tally: fresh }, None, false),
            None => (Pool { tier: None, healthy: true, fresh: false, tally: healthy_any }, None, false),
        })
    }

    /// The share of new connections each endpoint should get, for a table the kernel
    /// draws from instead of a pick (`mode: kernel`, and the fallback): the same health,
    /// panic and locality rules as [`Balancer::pick`], with the policy reduced to weight
    /// (a table cannot see load or latency). An endpoint out of back-off is flagged
    /// `trial`: the table gives it the least it can, where a pick gives it one connection
    /// at a time. Shares sum to 1; empty when no endpoint is live.
    pub fn shares(&self, now: Instant) -> Vec<Share> {
        let avail: Vec<Avail> = self.endpoints.iter().map(|e| e.state.availability(now)).collect();
        let live = || self.endpoints.iter().enumerate().filter(|(_, e)| !e.terminating);
        let (count, out) = live().fold((0, 0), |(n, o), (i, _)| (n + 1, o + usize::from(avail[i] == Avail::Out)));
        let weight = |i: usize| self.endpoints[i].weight.max(1) as f64;
        let mut shares = Vec::new();
        let mut spread = |members: &mut dyn Iterator<Item = usize>, mass: f64| {
            let members: Vec<usize> = members.collect();
            let total: f64 = members.iter().map(|&i| weight(i)).sum();
            for i in members {
                shares.push(Share { index: i, share: mass * weight(i) / total, trial: avail[i] == Avail::Trial });
            }
        };
        if count == 0 {
            return shares;
        }
        if out == count || out * 100 > count * self.accrual.max_ejected_percent as usize {
            spread(&mut live().map(|(i, _)| i), 1.0);
            return shares;
        }
        // Tiers with a healthy member, nearest first: each keeps its share of what the
        // nearer ones left, the last takes the rest (as a pick's draw spills onward).
        let tiers: Vec<(Tier, f64)> = Tier::ALL
            .into_iter()
            .filter_map(|tier| {
                let members = live().filter(|(_, e)| e.tier == tier).count();
                let healthy = live().filter(|(i, e)| e.tier == tier && avail[*i] != Avail::Out).count();
                (healthy > 0).then(|| (tier, (healthy as f64 / members as f64 / self.spill_threshold).min(1.0)))
            })
            .collect();
        let mut left = 1.0;
        for (n, &(tier, share)) in tiers.iter().enumerate() {
            let mass = if n + 1 == tiers.len() { left } else { left * share };
            if mass <= 0.0 {
                break;
            }
            left -= mass;
            spread(&mut live().filter(|(i, e)| e.tier == tier && avail[*i] != Avail::Out).map(|(i, _)| i), mass);
        }
        shares
    }

    /// A digest of every endpoint's availability now: besides the config, all that
    /// [`Balancer::shares`] depends on, so equal digests mean equal shares. The flag says
    /// whether some endpoint is not plainly healthy, so the digest can change with the
    /// clock alone (an ejection running out).
    pub fn availability_digest(&self, now: Instant) -> (u64, bool) {
        let clock = std::cell::OnceCell::new();
        let now_ns = || *clock.get_or_init(|| endpoint::nanos(now));
        self.endpoints.iter().fold((0xcbf2_9ce4_8422_2325, false), |(h, timed), e| {
            let a = e.state.availability_with(now_ns);
            ((h ^ (a as u64 + 1)).wrapping_mul(0x100_0000_01b3), timed || a != Avail::Healthy)
        })
    }

    /// A number in [0, 1) for the locality draw: random, except under ring hash, where it
    /// follows the client so that spilling does not break affinity more than it must.
    fn draw(&self, key: u64) -> f64 {
        match self.kind {
            BalanceKind::RingHash => (mix(key) >> 11) as f64 / (1u64 << 53) as f64,
            _ => fastrand::f64(),
        }
    }

    /// Apply the policy to the endpoints in `pool`; `None` if it is empty.
    fn select(&self, view: &View<'_>, pool: Pool, key: u64) -> Option<usize> {
        let eps = &self.endpoints;
        let member = |i: usize| pool.holds(view, i);
        let weight = |i: usize| eps[i].weight.max(1) as u64;
        let Tally { count, weight: total, .. } = pool.tally;
        if count == 0 {
            return None;
        }
        let members = || (0..eps.len()).filter(move |&i| member(i));
        Some(match self.kind {
            BalanceKind::RoundRobin => {
                let n = self.next.fetch_add(1, Ordering::Relaxed) as u64;
                weighted_nth(members(), n % total, weight)
            }
            BalanceKind::Random => weighted_nth(members(), fastrand::u64(..total), weight),
            BalanceKind::LeastConnections => {
                // The least loaded (open connections per unit of weight, compared by
                // cross-multiplying: no division). The scan starts at a random endpoint,
                // so ties go to a random one of them (uniform when all are tied, the
                // common case at low load) with one random draw.
                let active = |i: usize| eps[i].state.active() as u64;
                let start = fastrand::usize(..eps.len());
                let mut best = usize::MAX;
                for i in (start..eps.len()).chain(0..start).filter(|&i| member(i)) {
                    if best == usize::MAX || active(i) * weight(best) < active(best) * weight(i) {
                        best = i;
                    }
                }
                best
            }
            BalanceKind::P2cEwma => {
                if count == 1 {
                    return members().next();
                }
                let a = fastrand::usize(..count);
                let b = (a + 1 + fastrand::usize(..count - 1)) % count;
                let (mut ia, mut ib) = (0, 0);
                for (rank, i) in members().enumerate() {
                    if rank == a {
                        ia = i;
                    }
                    if rank == b {
                        ib = i;
                    }
                }
                let now = view.now_ns();
                let cost = |i: usize| eps[i].state.cost(now) / weight(i) as f64;
                if cost(ib) < cost(ia) { ib } else { ia }
            }
            BalanceKind::RingHash => match self.ring.pick(key, member) {
                Some(i) => i,
                None => members().next()?,
            },
        })
    }
}

/// One endpoint's part of [`Balancer::shares`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    /// Index in [`Balancer::endpoints`].
    pub index: usize,
    /// Fraction of new connections, in (0, 1].
    pub share: f64,
    /// Out of back-off, not yet proven healthy again.
    pub trial: bool,
}

/// An endpoint with its share of a service address's new connections, across the
/// service's route: what the kernel's table for that address is built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weighted {
    pub addr: SocketAddr,
    /// Relative: the table scales shares to its slots.
    pub share: f64,
    pub trial: bool,
}

/// What one pick sees of the endpoints.
struct View<'a> {
    eps: &'a [Endpoint],
    exclude: &'a [SocketAddr],
    now: Instant,
    /// `now` in `endpoint::nanos`, computed on first need.
    clock: &'a std::cell::OnceCell<u64>,
}

impl View<'_> {
    fn avail(&self, i: usize) -> Avail {
        self.eps[i].state.availability_with(|| self.now_ns())
    }

    fn now_ns(&self) -> u64 {
        *self.clock.get_or_init(|| endpoint::nanos(self.now))
    }

    /// Not tried yet by this connection.
    fn fresh(&self, i: usize) -> bool {
        !self.exclude.contains(&self.eps[i].addr)
    }
}

/// The endpoints a policy chooses among, as a filter (no list is built).
#[derive(Debug, Clone, Copy)]
struct Pool {
    tier: Option<Tier>,
    /// Only endpoints not out (false in panic mode).
    healthy: bool,
    /// Only endpoints not tried yet.
    fresh: bool,
    /// How many endpoints the filter holds, and their weight.
    tally: Tally,
}

/// Endpoints counted into a pool: how many and their weight; for a tier also its
/// members and healthy members (for the locality share).
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    count: usize,
    weight: u64,
    members: usize,
    healthy: usize,
}

impl Tally {
    fn add(&mut self, weight: u64) {
        self.count += 1;
        self.weight += weight;
    }
}

impl Pool {
    fn holds(&self, view: &View<'_>, i: usize) -> bool {
        let e = &view.eps[i];
        !e.terminating
            && self.tier.is_none_or(|t| e.tier == t)
            && (!self.healthy || view.avail(i) != Avail::Out)
            && (!self.fresh || view.fresh(i))
    }
}

/// A cheap, stable scramble of a client key (splitmix64's finaliser): the ring-hash
/// locality draw, kept apart from the ring's own hash of the key.
fn mix(key: u64) -> u64 {
    let mut z = key ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pool member that the `n`th unit of weight falls on.
fn weighted_nth(pool: impl Iterator<Item = usize>, mut n: u64, weight: impl Fn(usize) -> u64) -> usize {
    let mut last = 0;
    for i in pool {
        let w = weight(i);
        if n < w {
            return i;
        }
        n -= w;
        last = i;
    }
    last
}

#[cfg(test)]
mod tests;
