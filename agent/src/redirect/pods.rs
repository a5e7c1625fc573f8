//! The maps behind pod coverage, seen from the agent: each pod network namespace's path
//! state (`SY_NETNS`), the excluded cgroups (`SY_EXCLUDE`, counted in `SY_AGENT`), and the
//! scan of `SY_CLIENT_ORIG` for connections whose SYN never reached the agent. What to do
//! with what they say is decided in `crate::pods`; this only reads and writes.

use std::collections::HashSet;

use aya::maps::{Array, HashMap, MapData, MapError};
use switchyard_common::{AgentV2, NetnsV1, OrigDstV3, SockAddrV1, map, netns};

use super::RedirectError;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps the
/// kernel's entries.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub struct PodMaps {
    agent: AgentV2,
    agent_map: Array<MapData, AgentV2>,
    netns: HashMap<MapData, u64, NetnsV1>,
    exclude: HashMap<MapData, u64, u32>,
    excluded: HashSet<u64>,
    client_orig: HashMap<MapData, SockAddrV1, OrigDstV3>,
}

impl PodMaps {
    /// Probes left by a previous agent are dropped: it can no longer confirm them, and the
    /// next connect from such a namespace simply probes again. Reachable and blocked
    /// states carry over, as do exclusions until the first `sync_excluded`.
    pub(super) fn new(
        agent: AgentV2,
        agent_map: Array<MapData, AgentV2>,
        mut netns: HashMap<MapData, u64, NetnsV1>,
        exclude: HashMap<MapData, u64, u32>,
        client_orig: HashMap<MapData, SockAddrV1, OrigDstV3>,
    ) -> Result<Self, RedirectError> {
        let probes: Vec<u64> =
            netns.iter().filter_map(Result::ok).filter(|(_, v)| v.state == netns::PROBING).map(|(k, _)| k).collect();
        for cookie in probes {
            forgiving_remove(&mut netns, &cookie, map::NETNS)?;
        }
        let excluded = exclude.keys().filter_map(Result::ok).collect();
        Ok(Self { agent, agent_map, netns, exclude, excluded, client_orig })
    }

    /// Every namespace the kernel knows, with its state.
    pub fn namespaces(&self) -> Vec<(u64, NetnsV1)> {
        self.netns.iter().filter_map(Result::ok).collect()
    }

    /// Pod namespaces with an agent-bound connection published more than `window_ns` ago
    /// and still not accepted: their SYNs are lost on the way to the node address.
    pub fn stuck_namespaces(&self, now_ns: u64, window_ns: u64) -> HashSet<u64> {
        self.client_orig
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, o)| o.netns_cookie != self.agent.netns_cookie)
            .filter(|(_, o)| o.published_ns != 0 && now_ns.saturating_sub(o.published_ns) > window_ns)
            .map(|(_, o)| o.netns_cookie)
            .collect()
    }

    /// Serve namespace `cookie` by the in-kernel fallback from now on.
    pub fn block(&mut self, cookie: u64, now_ns: u64) -> Result<(), RedirectError> {
        let value = NetnsV1 { state: netns::BLOCKED, _pad: 0, since_ns: now_ns };
        self.netns.insert(cookie, value, 0).map_err(|source| RedirectError::Map { name: map::NETNS, source })
    }

    /// Forget namespace `cookie`: its next connect probes the path again.
    pub fn forget(&mut self, cookie: u64) -> Result<(), RedirectError> {
        forgiving_remove(&mut self.netns, &cookie, map::NETNS)
    }

    /// Make the excluded cgroups exactly `ids`, and tell the programs how many there are
    /// (none: they skip the ancestor walk).
    pub fn sync_excluded(&mut self, ids: &HashSet<u64>) -> Result<(), RedirectError> {
        let err = |source| RedirectError::Map { name: map::EXCLUDE, source };
        for id in ids.difference(&self.excluded) {
            self.exclude.insert(id, 1, 0).map_err(err)?;
        }
        for id in self.excluded.difference(ids) {
            forgiving_remove(&mut self.exclude, id, map::EXCLUDE)?;
        }
        self.excluded.clone_from(ids);
        let count = ids.len() as u32;
        if self.agent.excluded != count {
            self.agent.excluded = count;
            self.agent_map.set(0, self.agent, 0).map_err(|source| RedirectError::Map { name: map::AGENT, source })?;
        }
        Ok(())
    }
}

/// Remove `key`; already gone is fine (the LRU or the kernel may have removed it).
fn forgiving_remove<V: aya::Pod>(
    map: &mut HashMap<MapData, u64, V>,
    key: &u64,
    name: &'static str,
) -> Result<(), RedirectError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(RedirectError::Map { name, source }),
    }
}
