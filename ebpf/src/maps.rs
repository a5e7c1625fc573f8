//! The maps shared with the agent. Names come from `switchyard_common::map`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use switchyard_common::{AgentV1, OrigDstV2, ServiceV1, SockAddrV1, counter};

/// Service addresses to redirect. Key: service address (v4 as v4-mapped); value: the
/// service's index. Written by the agent, read by connect4/6.
/// HASH, not LRU: a service address must never be evicted. 65,536 covers a large cluster
/// (Kubernetes' default ClusterIP range is a /12, but few clusters pass 10k services with a
/// handful of ports each).
#[map(name = "SY_SERVICES")]
pub static SERVICES: HashMap<SockAddrV1, ServiceV1> = HashMap::with_max_entries(65_536, 0);

/// One slot: the agent's listener, mark and network namespace. Written by the agent once
/// its listeners are bound; read by connect4/6. A zero port means "not ready".
#[map(name = "SY_AGENT")]
pub static AGENT: Array<AgentV1> = Array::with_max_entries(1, 0);

/// Socket cookie -> original destination, for every redirected client socket.
/// Written by connect4/6; read by sock_ops (to publish for the agent) and getpeername4/6;
/// deleted by sock_ops when the socket closes. LRU so that an entry whose close we never
/// saw (a connect that failed before the SYN) cannot leak forever; sized for 65,536
/// concurrent redirected connections on a node, past which the oldest lose only their
/// getpeername rewrite.
#[map(name = "SY_SOCK_ORIG2")]
pub static SOCK_ORIG: LruHashMap<u64, OrigDstV2> = LruHashMap::with_max_entries(65_536, 0);

/// Client address (as the agent sees the peer) -> original destination.
/// Written by sock_ops at TCP_CONNECT_CB; read and deleted by the agent after accept, and
/// deleted by sock_ops when the client socket closes. Entries live only between connect
/// and accept, so the size only has to cover an accept backlog; LRU for the same leak
/// reason as SY_SOCK_ORIG.
#[map(name = "SY_CLIENT_ORIG2")]
pub static CLIENT_ORIG: LruHashMap<SockAddrV1, OrigDstV2> = LruHashMap::with_max_entries(65_536, 0);

/// Per-CPU decision counters, indexed by `switchyard_common::counter`. Written by every
/// program; summed and exported by the agent. Per-CPU so the hot path needs no atomics.
#[map(name = "SY_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}
