//! Pod network namespaces whose path to the agent's node address is blocked: decided
//! here, from what the kernel maps say (pure; the reconciler reads the maps, calls
//! [`PodPaths::tick`] and carries out the actions).
//!
//! The kernel probes each new namespace with its first connect (docs/design.md, "Pods").
//! A namespace is blocked when its probe was never confirmed within `WINDOW`, or when a
//! connection it sent to the agent was never accepted within `WINDOW` (a NetworkPolicy
//! added later). A blocked namespace is served by the in-kernel fallback and probed again
//! after `retry`, doubling each time it fails again, up to `MAX_BACKOFF` times `retry`; it
//! is reported blocked until a probe reaches the agent.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use switchyard_common::{NetnsV1, netns};

/// How long a SYN to the node address may take to be accepted. Locally delivered, an
/// accept takes microseconds; a second covers a busy agent's backlog.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The longest wait between probes of a blocked namespace, in multiples of `retry`.
const MAX_BACKOFF: u32 = 16;

/// What the reconciler must do to the kernel's namespace states, or tell the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Mark the namespace blocked: its connects take the in-kernel fallback.
    Block(u64),
    /// Forget the namespace: its next connect probes the path again.
    Reprobe(u64),
    /// A blocked namespace's probe reached the agent: nothing to change, only to say.
    Recovered(u64),
}

impl Action {
    /// The namespace it is about.
    pub fn netns(self) -> u64 {
        match self {
            Self::Block(n) | Self::Reprobe(n) | Self::Recovered(n) => n,
        }
    }
}

/// A namespace found blocked, until a probe shows it reachable again.
#[derive(Debug, Clone, Copy)]
struct Blocked {
    since_unix_ms: u128,
    retry_at_ns: u64,
    /// Probes failed in a row; the next wait is `retry * 2^(failures - 1)`.
    failures: u32,
    /// When it was forgotten for a new probe, if it was: still reported blocked (nothing
    /// has shown otherwise), and no longer in the kernel's map until its next connect.
    reprobed_at_ns: Option<u64>,
}

/// How long a namespace forgotten for a new probe stays reported if no connect comes from
/// it any more (its pod is gone).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// The agent's view of pod namespaces, between ticks.
#[derive(Debug)]
pub struct PodPaths {
    retry: Duration,
    blocked: HashMap<u64, Blocked>,
    reachable: usize,
    probing: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub reachable: usize,
    pub probing: usize,
    pub blocked: usize,
}

/// `/status` of one blocked namespace.
#[derive(Debug, Clone, Serialize)]
pub struct BlockedView {
    pub netns: u64,
    pub since_unix_ms: u128,
    /// 0 while a new probe is under way.
    pub retry_in_ms: u64,
}

impl PodPaths {
    pub fn new(retry: Duration) -> Self {
        Self { retry, blocked: HashMap::new(), reachable: 0, probing: 0 }
    }

    /// One look at the kernel: `namespaces` as SY_NETNS holds them, `stuck` the namespaces
    /// with an agent-bound connection older than `WINDOW` that was never accepted. Returns
    /// what to change; the reconciler applies it (and calls [`PodPaths::applied`]).
    pub fn tick(&mut self, now_ns: u64, namespaces: &[(u64, NetnsV1)], stuck: &HashSet<u64>) -> Vec<Action> {
        let window = WINDOW.as_nanos() as u64;
        let mut actions = Vec::new();
        let (mut reachable, mut probing) = (0, 0);
        let mut present = HashSet::new();
        for &(cookie, n) in namespaces {
            present.insert(cookie);
            let overdue = n.state == netns::PROBING && now_ns.saturating_sub(n.since_ns) > window;
            match n.state {
                netns::BLOCKED => {
                    // Blocked by a previous agent: adopt it, with a first retry.
                    let entry = self.blocked.entry(cookie).or_insert(Blocked {
                        since_unix_ms: unix_ms(),
                        retry_at_ns: now_ns + self.retry.as_nanos() as u64,
                        failures: 1,
                        reprobed_at_ns: None,
                    });
                    if now_ns >= entry.retry_at_ns {
                        actions.push(Action::Reprobe(cookie));
                    }
                }
                _ if overdue || stuck.contains(&cookie) => actions.push(Action::Block(cookie)),
                netns::REACHABLE => {
                    reachable += 1;
                    if self.blocked.remove(&cookie).is_some() {
                        actions.push(Action::Recovered(cookie));
                    }
                }
                _ if self.blocked.contains_key(&cookie) => {}
                _ => probing += 1,
            }
        }
        // A blocked namespace that left the map was evicted or its pod is gone; one we
        // forgot for a probe is kept a while for the connect that recreates it.
        self.blocked.retain(|cookie, b| {
            present.contains(cookie)
                || b.reprobed_at_ns.is_some_and(|t| now_ns.saturating_sub(t) < FORGET_AFTER.as_nanos() as u64)
        });
        (self.reachable, self.probing) = (reachable, probing);
        actions
    }

    /// `action` was carried out at `now_ns`.
    pub fn applied(&mut self, action: Action, now_ns: u64) {
        match action {
            Action::Block(cookie) => {
                let failures = self.blocked.get(&cookie).map_or(0, |b| b.failures) + 1;
                let wait = self.retry * (1 << (failures - 1).min(MAX_BACKOFF.ilog2()));
                let since_unix_ms = self.blocked.get(&cookie).map_or_else(unix_ms, |b| b.since_unix_ms);
                let retry_at_ns = now_ns + wait.as_nanos() as u64;
                self.blocked.insert(cookie, Blocked { since_unix_ms, retry_at_ns, failures, reprobed_at_ns: None });
            }
            Action::Reprobe(cookie) => {
                if let Some(b) = self.blocked.get_mut(&cookie) {
                    b.reprobed_at_ns = Some(now_ns);
                }
            }
            Action::Recovered(_) => {}
        }
    }

    /// How long until namespace `cookie` is probed again, if it is blocked.
    pub fn retry_in(&self, cookie: u64, now_ns: u64) -> Option<Duration> {
        self.blocked.get(&cookie).map(|b| Duration::from_nanos(b.retry_at_ns.saturating_sub(now_ns)))
    }

    pub fn counts(&self) -> Counts {
        Counts { reachable: self.reachable, probing: self.probing, blocked: self.blocked.len() }
    }

    pub fn blocked(&self, now_ns: u64) -> Vec<BlockedView> {
        let mut out: Vec<BlockedView> = self
            .blocked
            .iter()
            .map(|(&netns, b)| BlockedView {
                netns,
                since_unix_ms: b.since_unix_ms,
                retry_in_ms: b.retry_at_ns.saturating_sub(now_ns) / 1_000_000,
            })
            .collect();
        out.sort_by_key(|b| b.netns);
        out
    }
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ns(state: u32, since_ns: u64) -> NetnsV1 {
        NetnsV1 { state, _pad: 0, since_ns }
    }

    /// Apply what a tick asks for, as the reconciler does, and return it.
    fn tick(p: &mut PodPaths, now: u64, map: &mut Vec<(u64, NetnsV1)>, stuck: &[u64]) -> Vec<Action> {
        let actions = p.tick(now, map, &stuck.iter().copied().collect());
        for &a in &actions {
            match a {
                Action::Block(c) => {
                    map.retain(|(k, _)| *k != c);
                    map.push((c, ns(netns::BLOCKED, now)));
                }
                Action::Reprobe(c) => map.retain(|(k, _)| *k != c),
                Action::Recovered(_) => {}
            }
            p.applied(a, now);
        }
        actions
    }

    #[test]
    fn an_unconfirmed_probe_blocks_after_the_window_and_is_retried_with_back_off() {
        let mut p = PodPaths::new(Duration::from_secs(10));
        let mut map = vec![(7, ns(netns::PROBING, 100 * S))];
        assert!(tick(&mut p, 100 * S + S / 2, &mut map, &[]).is_empty(), "within the window: still probing");
        assert_eq!(p.counts().probing, 1);
        assert_eq!(tick(&mut p, 102 * S, &mut map, &[]), [Action::Block(7)]);
        assert_eq!(p.counts(), Counts { reachable: 0, probing: 0, blocked: 1 });
        assert_eq!(p.retry_in(7, 102 * S), Some(Duration::from_secs(10)));
        assert!(tick(&mut p, 111 * S, &mut map, &[]).is_empty(), "not yet");
        assert_eq!(tick(&mut p, 112 * S, &mut map, &[]), [Action::Reprobe(7)]);
        assert!(map.is_empty(), "forgotten: the next connect probes");
        assert_eq!(p.counts().blocked, 1, "still reported blocked while nothing shows otherwise");
        // The new probe fails too: twice as long this time, blocked since the first time.
        map.push((7, ns(netns::PROBING, 113 * S)));
        assert!(tick(&mut p, 113 * S, &mut map, &[]).is_empty());
        assert_eq!(p.counts(), Counts { reachable: 0, probing: 0, blocked: 1 });
        let since = p.blocked(113 * S)[0].since_unix_ms;
        assert_eq!(tick(&mut p, 115 * S, &mut map, &[]), [Action::Block(7)]);
        assert_eq!(p.retry_in(7, 115 * S), Some(Duration::from_secs(20)));
        assert_eq!(p.blocked(115 * S)[0].since_unix_ms, since);
        // And once a probe succeeds, it is no longer blocked and the back-off starts over.
        assert_eq!(tick(&mut p, 135 * S, &mut map, &[]), [Action::Reprobe(7)]);
        map.push((7, ns(netns::REACHABLE, 136 * S)));
        assert_eq!(tick(&mut p, 137 * S, &mut map, &[]), [Action::Recovered(7)]);
        assert_eq!(p.counts(), Counts { reachable: 1, probing: 0, blocked: 0 });
        assert!(p.blocked(137 * S).is_empty());
        map[0] = (7, ns(netns::PROBING, 140 * S));
        assert_eq!(tick(&mut p, 142 * S, &mut map, &[]), [Action::Block(7)]);
        assert_eq!(p.retry_in(7, 142 * S), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_reachable_namespace_with_a_stuck_connection_is_blocked() {
        let mut p = PodPaths::new(Duration::from_secs(60));
        let mut map = vec![(1, ns(netns::REACHABLE, 0)), (2, ns(netns::REACHABLE, 0))];
        assert!(tick(&mut p, 10 * S, &mut map, &[]).is_empty());
        assert_eq!(p.counts().reachable, 2);
        assert_eq!(tick(&mut p, 11 * S, &mut map, &[2]), [Action::Block(2)]);
        assert_eq!(p.counts(), Counts { reachable: 1, probing: 0, blocked: 1 });
        let view = p.blocked(11 * S);
        assert_eq!(view.len(), 1);
        assert_eq!((view[0].netns, view[0].retry_in_ms), (2, 60_000));
    }

    #[test]
    fn back_off_is_capped_and_vanished_namespaces_are_forgotten() {
        let mut p = PodPaths::new(Duration::from_secs(1));
        let mut map = Vec::new();
        let mut now = 0;
        for _ in 0..10 {
            map.push((9, ns(netns::PROBING, now)));
            now += 2 * S;
            assert_eq!(tick(&mut p, now, &mut map, &[]), [Action::Block(9)]);
            now += p.retry_in(9, now).unwrap().as_nanos() as u64;
            assert_eq!(tick(&mut p, now, &mut map, &[]), [Action::Reprobe(9)]);
        }
        map.push((9, ns(netns::PROBING, now)));
        now += 2 * S;
        tick(&mut p, now, &mut map, &[]);
        assert_eq!(p.retry_in(9, now), Some(Duration::from_secs(16)), "at most MAX_BACKOFF times retry");
        // Evicted while blocked: forgotten at once.
        map.clear();
        tick(&mut p, now, &mut map, &[]);
        assert_eq!(p.counts(), Counts::default());
        // Forgotten for a probe that never comes (the pod is gone): reported a while, then not.
        map.push((3, ns(netns::PROBING, now)));
        now += 2 * S;
        tick(&mut p, now, &mut map, &[]);
        now += p.retry_in(3, now).unwrap().as_nanos() as u64;
        assert_eq!(tick(&mut p, now, &mut map, &[]), [Action::Reprobe(3)]);
        tick(&mut p, now + S, &mut map, &[]);
        assert_eq!(p.counts().blocked, 1);
        tick(&mut p, now + FORGET_AFTER.as_nanos() as u64, &mut map, &[]);
        assert_eq!(p.counts(), Counts::default());
    }

    #[test]
    fn a_namespace_blocked_by_a_previous_agent_is_adopted() {
        let mut p = PodPaths::new(Duration::from_secs(5));
        let mut map = vec![(4, ns(netns::BLOCKED, 0))];
        assert!(tick(&mut p, 100 * S, &mut map, &[]).is_empty());
        assert_eq!(p.counts().blocked, 1);
        assert_eq!(tick(&mut p, 105 * S, &mut map, &[]), [Action::Reprobe(4)]);
    }
}
