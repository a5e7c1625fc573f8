//! Session affinity, kube-proxy's `sessionAffinity: ClientIP`: a client keeps the
//! endpoint it was given for new connections until `timeout` passes without one from it;
//! each new connection restarts the timer. The client is the balancer's key (the
//! client's cgroup, hashed: every local client comes from 127.0.0.1, so the address
//! would say nothing). It sits on top of the service's policy: a client not remembered,
//! or whose endpoint is gone, terminating, out (ejected, failing checks) or already
//! tried by this connection, is balanced by the policy and remembers the result.
//!
//! The table outlives the balancer: a service rebuilt with a change (an endpoint added,
//! a policy edited) is handed the previous balancer's table, as its endpoints are handed
//! their live state, so a reload does not reshuffle clients. Entries name endpoints by
//! address, not index, for the same reason. It resets with the agent (as endpoint state
//! does) and when `session_affinity` is removed.
//!
//! Bounded: at most [`MAX_CLIENTS`] clients per service. Expired entries are swept
//! lazily, when a shard grows to twice what it held after its last sweep (at least
//! [`MIN_SWEEP`]) or is full; a full shard with nothing expired remembers no new
//! client (that client is balanced per connection until room is made).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Avail, Balancer, Pick, mix};

/// Clients remembered per service, at most: far more than the cgroups (pods, units) of
/// one node, so only a leak or an attack reaches it.
pub const MAX_CLIENTS: usize = 65_536;
/// Shards by client key, so concurrent picks for one service rarely wait on each other.
const SHARDS: usize = 8;
/// Entries a shard may hold before its first sweep.
const MIN_SWEEP: usize = 64;

/// A service's session affinity: the table, shared across rebuilds, and the timeout now
/// in force (the entries keep when they were last used, so a new timeout applies to
/// them at once).
#[derive(Clone)]
pub struct Affinity {
    timeout: Duration,
    table: Arc<Table>,
}

struct Table {
    shards: [Mutex<Shard>; SHARDS],
    /// Entries per shard, at most (the service's cap, split evenly: keys are hashes, so
    /// shards fill evenly).
    cap: usize,
}

#[derive(Default)]
struct Shard {
    clients: HashMap<u64, Client>,
    /// Sweep when this many are held.
    sweep_at: usize,
    /// No entry was last used before this (the oldest left by the last sweep: entries
    /// only get newer), so until it expires a sweep would free nothing.
    oldest: Option<Instant>,
}

struct Client {
    addr: SocketAddr,
    /// Where `addr` was in the endpoints when last seen: checked, then looked for by
    /// address if the endpoints changed.
    index: usize,
    last: Instant,
}

impl Affinity {
    /// Affinity with `timeout`, carrying on `prev`'s table (the service's previous
    /// balancer), or a new one.
    pub fn new(timeout: Duration, prev: Option<&Affinity>) -> Self {
        let table = prev.map_or_else(|| Arc::new(Table::new(MAX_CLIENTS)), |p| Arc::clone(&p.table));
        Self { timeout, table }
    }

    /// A new table holding at most `cap` clients (rounded up to a multiple of the shards).
    #[cfg(test)]
    pub(super) fn with_cap(timeout: Duration, cap: usize) -> Self {
        Self { timeout, table: Arc::new(Table::new(cap)) }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Clients remembered and not expired at `now` (a pass over the table, for the admin
    /// API).
    pub fn clients(&self, now: Instant) -> usize {
        let live = |c: &Client| now.saturating_duration_since(c.last) < self.timeout;
        self.table.shards.iter().map(|s| s.lock().unwrap().clients.values().filter(|c| live(c)).count()).sum()
    }

    /// Entries held, expired or not.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.table.shards.iter().map(|s| s.lock().unwrap().clients.len()).sum()
    }

    /// Whether `other` uses the same table (it was carried over).
    pub fn shares_table_with(&self, other: &Affinity) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Table {
    fn new(cap: usize) -> Self {
        Self { shards: Default::default(), cap: cap.div_ceil(SHARDS) }
    }
}

impl Shard {
    /// Remember that `key` was given endpoint `index` at `now`.
    fn remember(&mut self, key: u64, addr: SocketAddr, index: usize, now: Instant, timeout: Duration, cap: usize) {
        let client = Client { addr, index, last: now };
        if let Some(c) = self.clients.get_mut(&key) {
            *c = client;
            return;
        }
        let len = self.clients.len();
        if len >= cap || len >= self.sweep_at.max(MIN_SWEEP) {
            self.sweep(now, timeout);
        }
        if self.clients.len() < cap {
            self.clients.insert(key, client);
        }
    }

    /// Drop expired entries, if any can have expired; then wait for the shard to double.
    fn sweep(&mut self, now: Instant, timeout: Duration) {
        if self.oldest.is_none_or(|o| now.saturating_duration_since(o) >= timeout) {
            let mut oldest = None;
            self.clients.retain(|_, c| {
                let keep = now.saturating_duration_since(c.last) < timeout;
                if keep {
                    oldest = Some(oldest.map_or(c.last, |o: Instant| o.min(c.last)));
                }
                keep
            });
            self.oldest = oldest;
        }
        self.sweep_at = self.clients.len() * 2;
    }
}

impl Balancer {
    /// [`Balancer::pick`] for a service with affinity: the remembered endpoint if it is
    /// still usable, else the policy's pick, remembered. One lock, held across the
    /// policy's pick so that two first connections of a client agree.
    pub(super) fn pick_with_affinity(
        &self,
        affinity: &Affinity,
        key: u64,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<Pick<'_>> {
        let table = &affinity.table;
        let mut shard = table.shards[(mix(key) % SHARDS as u64) as usize].lock().unwrap();
        if let Some(c) = shard.clients.get_mut(&key)
            && now.saturating_duration_since(c.last) < affinity.timeout
            && let Some(i) = self.position(c.addr, c.index)
            && self.usable(i, exclude, now)
        {
            c.index = i;
            c.last = c.last.max(now);
            let endpoint = &self.endpoints[i];
            self.stats.by_tier[endpoint.tier as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some(Pick { index: i, endpoint, tier: endpoint.tier, panic: false, panic_changed: false });
        }
        let pick = self.pick_by_policy(key, exclude, now)?;
        shard.remember(key, pick.endpoint.addr, pick.index, now, affinity.timeout, table.cap);
        Some(pick)
    }

    /// The index of the endpoint at `addr`: `hint` if it is still there, else a scan
    /// (once per client after the endpoints changed).
    fn position(&self, addr: SocketAddr, hint: usize) -> Option<usize> {
        if self.endpoints.get(hint).is_some_and(|e| e.addr == addr) {
            return Some(hint);
        }
        self.endpoints.iter().position(|e| e.addr == addr)
    }

    /// Whether a remembered endpoint may take this connection: live, not tried by it,
    /// and not out (past its back-off, only as its one trial connection).
    fn usable(&self, i: usize, exclude: &[SocketAddr], now: Instant) -> bool {
        let e = &self.endpoints[i];
        !e.terminating
            && !exclude.contains(&e.addr)
            && match e.state.availability(now) {
                Avail::Healthy => true,
                Avail::Trial => e.state.claim_trial(now),
                Avail::Out => false,
            }
    }
}
