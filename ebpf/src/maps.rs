//! The maps shared with the agent. Names come from `switchyard_common::map`.
//!
//! Every map is pinned by name (`pinned`): the agent loads with its bpffs directory as the
//! pin root, so a restarted or upgraded agent gets the same maps back, contents included,
//! and the programs keep working on them while no agent runs.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockMap},
};
use switchyard_common::{AgentV2, BackendsV2, NetnsV1, OrigDstV3, ServiceV2, SockAddrV1, counter, listener};

/// Service addresses to redirect. Key: service address (v4 as v4-mapped); value: the
/// service's index and mode. Written by the agent, read by connect4/6.
/// HASH, not LRU: a service address must never be evicted. 65,536 covers a large cluster
/// (Kubernetes' default ClusterIP range is a /12, but few clusters pass 10k services with a
/// handful of ports each).
#[map(name = "SY_SERVICES2")]
pub static SERVICES: HashMap<SockAddrV1, ServiceV2> = HashMap::pinned(65_536, 0);

/// One slot: the agent's listener addresses, mark, network namespace and pod policy.
/// Written by the agent once its listeners are bound; read by connect4/6, which also check
/// in SY_LISTENERS that the listener exists.
#[map(name = "SY_AGENT2")]
pub static AGENT: Array<AgentV2> = Array::pinned(1, 0);

/// The agent's listening sockets, by `switchyard_common::listener` slot. Written by the
/// agent after it binds (or inherits) them; read by connect4/6 as the liveness check. A
/// SOCKMAP because the kernel deletes a socket's entry when its last fd closes: a killed
/// agent's listeners vanish from it at once, while a hand-over (the same sockets, held by
/// both agents) keeps them. Unlike bpf_sk_lookup_tcp, it answers from any network
/// namespace, which is where pods connect from. Four slots, one per listener.
#[map(name = "SY_LISTENERS1")]
pub static LISTENERS: SockMap = SockMap::pinned(listener::COUNT, 0);

/// Network namespace cookie -> can it reach the agent (`switchyard_common::NetnsV1`).
/// Inserted (PROBING) by connect4/6 on the first connect from a namespace; set REACHABLE or
/// BLOCKED by the agent, and deleted by it to probe a blocked namespace again. LRU: pods
/// come and go and their namespaces' cookies are never reused, so old entries must age out
/// on their own; an evicted live namespace is merely probed again. 16,384 namespaces is far
/// above the pods one node runs (Kubernetes' default limit is 110).
#[map(name = "SY_NETNS1")]
pub static NETNS: LruHashMap<u64, NetnsV1> = LruHashMap::pinned(16_384, 0);

/// cgroup ids of `agent.exclude_cgroups`: connects from tasks in them or below are passed
/// untouched. Written by the agent (it resolves the paths, also when they appear later);
/// read by connect4/6 while AgentV2::excluded is non-zero. HASH, never evicted: a dropped
/// exclusion would start proxying a pod that asked not to be. 1,024 cgroups.
#[map(name = "SY_EXCLUDE1")]
pub static EXCLUDE: HashMap<u64, u32> = HashMap::pinned(1_024, 0);

/// Socket cookie -> original destination, for every redirected client socket.
/// Written by connect4/6; read by sock_ops (to publish for the agent) and getpeername4/6;
/// deleted by sock_ops when the socket closes. LRU so that an entry whose close we never
/// saw (a connect that failed before the SYN) cannot leak forever; sized for 65,536
/// concurrent redirected connections on a node, past which the oldest lose only their
/// getpeername rewrite.
#[map(name = "SY_SOCK_ORIG3")]
pub static SOCK_ORIG: LruHashMap<u64, OrigDstV3> = LruHashMap::pinned(65_536, 0);

/// Client address (as the agent sees the peer: 127.0.0.1:port on the node, the pod's
/// address and port from a pod) -> original destination, for connects sent to the agent.
/// Written by sock_ops at TCP_CONNECT_CB; read and deleted by the agent after accept, and
/// deleted by sock_ops when the client socket closes. Entries live only between connect
/// and accept, so the size only has to cover an accept backlog, and one the agent finds
/// old means a SYN that never arrived (a blocked path); LRU for the same leak reason as
/// SY_SOCK_ORIG.
#[map(name = "SY_CLIENT_ORIG3")]
pub static CLIENT_ORIG: LruHashMap<SockAddrV1, OrigDstV3> = LruHashMap::pinned(65_536, 0);

/// Per-CPU decision counters, indexed by `switchyard_common::counter`. Written by every
/// program; summed and exported by the agent. Per-CPU so the hot path needs no atomics.
/// Pinned like the rest, so the counts survive agent restarts.
#[map(name = "SY_COUNTERS4")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Service address -> the table the kernel draws an endpoint from (`BackendsV2`): read
/// by connect4/6 for `mode: kernel` services on every connect, and for the others only
/// when no agent listener exists (agent killed or restarting, the fallback); written by
/// the agent whenever a table changes (health, weights, locality). Same keys and size as
/// SY_SERVICES; HASH, never evicted. BPF_F_NO_PREALLOC because a value is 2,320 bytes:
/// preallocating 65,536 of them would pin 150 MiB of kernel memory for a map that holds a
/// few hundred entries on most nodes.
#[map(name = "SY_BACKENDS2")]
pub static BACKENDS: HashMap<SockAddrV1, BackendsV2> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

/// Connections sent straight to an endpoint (`switchyard_common::ConnEventV1`): written by
/// sock_ops at their SYN, handshake and close; read by the agent, which shows them in
/// `/conns` and counts them in its metrics and endpoint health. 256 KiB (about 1,500
/// records, three per connection) is what the agent maps, resident, so it is kept small:
/// the agent reads every 50 ms and is woken once `EVENTS_WAKE_AT` bytes wait, so it
/// keeps up with thousands of connections a second. While no agent reads (the
/// fallback), the ring fills and further records are counted lost, not queued.
#[map(name = "SY_EVENTS1")]
pub static EVENTS: RingBuf = RingBuf::pinned(1 << 18, 0);

/// Bytes waiting in `EVENTS` past which a record wakes the agent.
pub const EVENTS_WAKE_AT: u64 = 1 << 16;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}
