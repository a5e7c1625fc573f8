//! The maps shared with the agent. Names come from `switchyard_common::map`.
//!
//! Every map is pinned by name (`pinned`): the agent loads with its bpffs directory as the
//! pin root, so a restarted or upgraded agent gets the same maps back, contents included,
//! and the programs keep working on them while no agent runs.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use switchyard_common::{AgentV1, BackendsV1, OrigDstV2, ServiceV1, SockAddrV1, counter};

/// Service addresses to redirect. Key: service address (v4 as v4-mapped); value: the
/// service's index. Written by the agent, read by connect4/6.
/// HASH, not LRU: a service address must never be evicted. 65,536 covers a large cluster
/// (Kubernetes' default ClusterIP range is a /12, but few clusters pass 10k services with a
/// handful of ports each).
#[map(name = "SY_SERVICES")]
pub static SERVICES: HashMap<SockAddrV1, ServiceV1> = HashMap::pinned(65_536, 0);

/// One slot: the agent's listener, mark and network namespace. Written by the agent once
/// its listeners are bound; read by connect4/6, which also check that the listener exists.
#[map(name = "SY_AGENT")]
pub static AGENT: Array<AgentV1> = Array::pinned(1, 0);

/// Socket cookie -> original destination, for every redirected client socket.
/// Written by connect4/6; read by sock_ops (to publish for the agent) and getpeername4/6;
/// deleted by sock_ops when the socket closes. LRU so that an entry whose close we never
/// saw (a connect that failed before the SYN) cannot leak forever; sized for 65,536
/// concurrent redirected connections on a node, past which the oldest lose only their
/// getpeername rewrite.
#[map(name = "SY_SOCK_ORIG2")]
pub static SOCK_ORIG: LruHashMap<u64, OrigDstV2> = LruHashMap::pinned(65_536, 0);

/// Client address (as the agent sees the peer) -> original destination.
/// Written by sock_ops at TCP_CONNECT_CB; read and deleted by the agent after accept, and
/// deleted by sock_ops when the client socket closes. Entries live only between connect
/// and accept, so the size only has to cover an accept backlog; LRU for the same leak
/// reason as SY_SOCK_ORIG.
#[map(name = "SY_CLIENT_ORIG2")]
pub static CLIENT_ORIG: LruHashMap<SockAddrV1, OrigDstV2> = LruHashMap::pinned(65_536, 0);

/// Per-CPU decision counters, indexed by `switchyard_common::counter`. Written by every
/// program; summed and exported by the agent. Per-CPU so the hot path needs no atomics.
/// Pinned like the rest, so the counts survive agent restarts.
#[map(name = "SY_COUNTERS2")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Service address -> its healthy endpoints, for the in-kernel fallback: read by
/// connect4/6 only when no agent listener exists (agent killed or restarting), written by
/// the agent whenever a service's healthy set changes. Same keys and size as
/// SY_SERVICES; HASH, never evicted. BPF_F_NO_PREALLOC because a value is 648 bytes:
/// preallocating 65,536 of them would pin 42 MiB of kernel memory for a map that holds a
/// few hundred entries on most nodes.
#[map(name = "SY_BACKENDS1")]
pub static BACKENDS: HashMap<SockAddrV1, BackendsV1> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}
