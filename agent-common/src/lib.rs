//! Types shared by the kernel programs (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here crosses the user/kernel boundary through BPF maps, so every type is
//! `#[repr(C)]`, made of fixed-width integers with explicit padding, and has its size
//! pinned by a compile-time assert. Byte order is stated on each field. A layout change
//! gets a new `_V2` type and new map names rather than a silent reinterpretation.
//!
//! Addresses are always carried as 16 bytes: IPv6 as is, IPv4 as the v4-mapped IPv6
//! address `::ffff:a.b.c.d`. That lets one map and one code path serve connect4,
//! connect6 and v4-mapped connects from dual-stack sockets.
#![no_std]

use core::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// Program names: the entry function names in `ebpf/src/main.rs`.
///
/// Prefixed so they clash neither with ELF section names nor with libc symbols
/// (a program called `sockops` or `getsockopt` confuses the loader).
pub mod prog {
    pub const CONNECT4: &str = "sy_connect4";
    pub const CONNECT6: &str = "sy_connect6";
    pub const GETPEERNAME4: &str = "sy_getpeername4";
    pub const GETPEERNAME6: &str = "sy_getpeername6";
    pub const SOCK_OPS: &str = "sy_sock_ops";
    /// Every program the agent attaches, in attach order.
    pub const ALL: [&str; 5] = [SOCK_OPS, GETPEERNAME4, GETPEERNAME6, CONNECT4, CONNECT6];
    /// Prefix of every program name: what the tests recognise as ours in `bpftool` output.
    pub const PREFIX: &str = "sy_";
}

/// Map names (at most 15 bytes: the kernel's BPF_OBJ_NAME_LEN).
///
/// Every map is pinned under the agent's bpffs directory by this name, and a restarted or
/// upgraded agent reuses the pinned map of the same name with its contents. So a name
/// must change whenever the layout of its key or value (or, for `SY_COUNTERS`, its length)
/// changes: the suffix follows the version of the type it holds.
pub mod map {
    pub const SERVICES: &str = "SY_SERVICES2";
    pub const AGENT: &str = "SY_AGENT2";
    pub const SOCK_ORIG: &str = "SY_SOCK_ORIG3";
    pub const CLIENT_ORIG: &str = "SY_CLIENT_ORIG3";
    /// Holds `counter::COUNT` slots: bump the suffix when counters are added.
    pub const COUNTERS: &str = "SY_COUNTERS4";
    pub const BACKENDS: &str = "SY_BACKENDS2";
    /// SOCKMAP of the agent's listening sockets, indexed by `listener::*`.
    pub const LISTENERS: &str = "SY_LISTENERS1";
    /// Network namespace cookie -> `NetnsV1`: can that namespace reach the agent?
    pub const NETNS: &str = "SY_NETNS1";
    /// cgroup ids whose connects are never touched (`agent.exclude_cgroups`).
    pub const EXCLUDE: &str = "SY_EXCLUDE1";
    /// Ring buffer of `ConnEventV1`: connections the kernel sent straight to an endpoint.
    pub const EVENTS: &str = "SY_EVENTS1";
    /// Every map, all pinned.
    pub const ALL: [&str; 10] =
        [SERVICES, AGENT, SOCK_ORIG, CLIENT_ORIG, COUNTERS, BACKENDS, LISTENERS, NETNS, EXCLUDE, EVENTS];
    /// Prefix of every map name: what `switchyard uninstall` and the tests recognise as ours.
    pub const PREFIX: &str = "SY_";
}

/// Names of the pinned files in the agent's bpffs directory besides the maps (which are
/// pinned under their own names).
pub mod pin {
    /// Prefix of a pinned cgroup link; the program name follows (`link_sy_connect4`).
    /// Not a dot: bpffs refuses names with dots (EPERM), reserving them for itself.
    pub const LINK_PREFIX: &str = "link_";
}

/// An IP address and port in the map encoding.
///
/// Used as the service-address key (`SY_SERVICES`), as the client-address key
/// (`SY_CLIENT_ORIG`) and as the remembered original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddrV1 {
    /// IPv6 address or v4-mapped IPv4 address, as four words each holding four bytes in
    /// network order (the kernel's `s6_addr32` / `user_ip6` layout).
    pub addr: [u32; 4],
    /// Port in network byte order (the kernel's `user_port` layout, low 16 bits).
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockAddrV1>() == 20);

/// Third word of a v4-mapped address (`::ffff:0:0/96`), in network order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl SockAddrV1 {
    /// From an IPv4 address word as the kernel hands it over (network order) and a
    /// network-order port.
    pub const fn from_v4_raw(ip4: u32, port_be: u16) -> Self {
        Self { addr: [0, 0, V4_MAPPED_WORD, ip4], port: port_be, _pad: 0 }
    }

    /// From IPv6 address words (network order) and a network-order port.
    pub const fn from_v6_raw(ip6: [u32; 4], port_be: u16) -> Self {
        Self { addr: ip6, port: port_be, _pad: 0 }
    }

    /// True when the address is v4-mapped (`::ffff:a.b.c.d`).
    pub const fn is_v4_mapped(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == V4_MAPPED_WORD
    }

    fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// The socket address, with v4-mapped addresses turned back into IPv4.
    pub fn to_socket_addr(&self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.octets());
        let port = u16::from_be(self.port);
        match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
            None => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
        }
    }
}

impl From<SocketAddr> for SockAddrV1 {
    /// IPv4 becomes v4-mapped; a v4-mapped IPv6 address is already in that form, so both
    /// spellings of one destination encode to the same key, as they are the same
    /// destination to the kernel.
    fn from(sa: SocketAddr) -> Self {
        let v6 = match sa.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        let mut addr = [0u32; 4];
        for (i, word) in addr.iter_mut().enumerate() {
            *word = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
        }
        Self { addr, port: sa.port().to_be(), _pad: 0 }
    }
}

/// Value of `SY_SERVICES`: which service a service address belongs to, and how its
/// connects are handled. V2: `flags` (was reserved).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceV2 {
    /// Index of the service in the agent's configuration (host order), for `bpftool map
    /// dump` readers.
    pub id: u32,
    /// `service::*` (host order).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceV2>() == 8);

/// `ServiceV2::flags`.
pub mod service {
    /// `mode: kernel`: every connect goes straight to an endpoint drawn from the
    /// service's `SY_BACKENDS` table, agent or not; the agent sees it through
    /// `SY_EVENTS`. Without it a connect goes to the agent, and to the table only while no
    /// agent listens (the fallback).
    pub const KERNEL: u32 = 1;
}

/// Value of the single-slot `SY_AGENT` array: where redirected connects go. V2: adds the
/// node addresses (for connects from other network namespaces), the pod mode and the
/// exclusion walk.
///
/// The programs redirect to a listener only while its socket is in `SY_LISTENERS` (the
/// kernel drops the entry when the socket's last fd closes), so a half-started or dead
/// agent never receives a connection; until the agent writes the slot
/// (`listen_port == 0`) nothing is redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentV2 {
    /// IPv4 loopback listener address, network order (127.0.0.1): for clients in the
    /// agent's own network namespace.
    pub listen_v4: u32,
    /// IPv6 loopback listener address, network-order words (::1).
    pub listen_v6: [u32; 4],
    /// IPv4 node address, network order (default 169.254.83.89): on the agent's `lo`, and
    /// reached from other network namespaces through their default route. 0: none.
    pub node_v4: u32,
    /// IPv6 node address, network-order words (default fd00:5359::1). Zero: none.
    pub node_v6: [u32; 4],
    /// Listener port, network order. 0 means "no agent yet: redirect to no listener".
    pub listen_port: u16,
    /// What to do with connects from other network namespaces: `pods::*` (host order).
    pub pods: u16,
    /// SO_MARK carried by the agent's own upstream sockets (host order). Sockets with
    /// this mark are never redirected; setting SO_MARK needs CAP_NET_ADMIN, so an
    /// application cannot use it to slip past the redirect.
    pub mark: u32,
    /// How many cgroups `SY_EXCLUDE` holds (host order); 0 skips the ancestor walk.
    pub excluded: u32,
    /// cgroup v2 level of the attach cgroup (host order; the root is 0): the exclusion
    /// walk starts there, since nothing above it runs our programs.
    pub cgroup_level: u32,
    /// Network namespace cookie of the agent (host order). Connects from this namespace
    /// go to the loopback listener, from any other to the node address.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<AgentV2>() == 64);

/// `AgentV2::pods`: connects from network namespaces other than the agent's.
pub mod pods {
    /// Passed untouched (counted `skipped_netns`).
    pub const OFF: u16 = 0;
    /// To the agent's node address while the path is known to work; see `NetnsV1`.
    pub const REDIRECT: u16 = 1;
    /// Always to a healthy endpoint in the kernel (`fallback`), never the agent.
    pub const FALLBACK: u16 = 2;
}

/// Slots of `SY_LISTENERS`.
pub mod listener {
    pub const LOOPBACK_V4: u32 = 0;
    pub const LOOPBACK_V6: u32 = 1;
    pub const NODE_V4: u32 = 2;
    pub const NODE_V6: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// How many cgroup levels below the attach cgroup the exclusion walk looks at: kubelet's
/// deepest layout (kubepods/burstable/pod<uid>/<container>) is four, systemd's slices a
/// few more.
pub const MAX_EXCLUDE_DEPTH: u32 = 12;

/// Value of `SY_NETNS`: whether a network namespace's connects can reach the agent's node
/// address. The first connect from an unknown namespace inserts `PROBING` and goes to the
/// agent; while the probe is unconfirmed, that namespace's connects take the in-kernel
/// fallback; the agent sets `REACHABLE` when it accepts a connection from it, or `BLOCKED`
/// when one never arrives (a NetworkPolicy, an ipvlan pod, a firewall), and deletes a
/// `BLOCKED` entry later to probe again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsV1 {
    /// `netns::*` (host order).
    pub state: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the state was entered.
    pub since_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NetnsV1>() == 16);

/// `NetnsV1::state`.
pub mod netns {
    pub const PROBING: u32 = 1;
    pub const REACHABLE: u32 = 2;
    pub const BLOCKED: u32 = 3;
}

/// Original destination of a redirected connection, as the client dialled it, and who
/// dialled it. V2 added the client's process and cgroup (recorded at connect time, when
/// the kernel knows them and the agent cannot); V3 adds its network namespace, where the
/// connect was sent and when sock_ops published it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDstV3 {
    /// The service address the application connected to.
    pub dst: SockAddrV1,
    /// Address family of the client's socket (host order: AF_INET = 2, AF_INET6 = 10).
    /// A dual-stack socket dialling a v4-mapped address has AF_INET6 here.
    pub family: u16,
    /// `ORIG_TO_AGENT` when the connect went to an agent listener (host order); only those
    /// are published for the agent.
    pub flags: u16,
    /// Process (thread group) id of the task that called connect (host order).
    pub pid: u32,
    pub _pad: u32,
    /// cgroup v2 id of that task (host order): the pod or unit it belongs to.
    pub cgroup_id: u64,
    /// Cookie of the network namespace the connect was made in (host order).
    pub netns_cookie: u64,
    /// CLOCK_MONOTONIC nanoseconds when sock_ops published the entry for the agent (the
    /// SYN left); an entry the agent has not taken a while later means the SYN is lost.
    pub published_ns: u64,
    /// Its command name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<OrigDstV3>() == 72);

/// `OrigDstV3::flags`: the connect was rewritten to an agent listener (not the fallback).
pub const ORIG_TO_AGENT: u16 = 1;

/// Most endpoints one service address keeps in its `SY_BACKENDS` table. A service with
/// more keeps a subset chosen per node (see the agent's `redirect::table`), so that every
/// endpoint still gets traffic from some nodes.
pub const MAX_BACKENDS: usize = 64;

/// Slots of a `SY_BACKENDS` table: a power of two, so a draw is a mask. With 1,024 slots
/// an endpoint's share is kept to within 0.1% of all connections.
pub const TABLE_SLOTS: usize = 1024;

/// Value of `SY_BACKENDS`: where the kernel sends a connect to one service address when
/// it chooses the endpoint itself (`mode: kernel` services always, every service while no
/// agent listens). The agent turns the balancer's view (health, weights, locality tiers
/// and their spill) into a table of `TABLE_SLOTS` slots in which each endpoint holds
/// slots in proportion to the share of new connections it should get; the kernel draws
/// one slot at random. The agent rewrites an entry whole whenever the table changes, so
/// the kernel sees either the old or the new one, never a mix.
///
/// Why a weighted table rather than Maglev's permutation: a socket-level balancer decides
/// once per connection, at connect, so nothing needs the same flow to land on the same
/// endpoint when the table changes, which is what Maglev's consistency buys a per-packet
/// balancer. What matters here is proportion, and a table gives it in one draw with no
/// loop for the verifier.
///
/// Only endpoints of the service address's own family are kept (an IPv4 service address
/// keeps IPv4 endpoints as v4-mapped addresses), since a connect can only be rewritten
/// within its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendsV2 {
    /// How many of `addrs` are valid (host order); 0 means "none".
    pub count: u32,
    pub _pad: u32,
    pub addrs: [SockAddrV1; MAX_BACKENDS],
    /// Index into `addrs` per slot; every slot is valid while `count > 0`.
    pub table: [u8; TABLE_SLOTS],
}
const _: () = assert!(core::mem::size_of::<BackendsV2>() == 8 + 20 * MAX_BACKENDS + TABLE_SLOTS);
const _: () = assert!(TABLE_SLOTS.is_power_of_two() && MAX_BACKENDS <= u8::MAX as usize + 1);

impl Default for BackendsV2 {
    fn default() -> Self {
        Self { count: 0, _pad: 0, addrs: [SockAddrV1::default(); MAX_BACKENDS], table: [0; TABLE_SLOTS] }
    }
}

/// One record of `SY_EVENTS`: the life of a connection the kernel sent straight to an
/// endpoint (`mode: kernel`, or the fallback), which the agent never accepts and so can
/// only learn of this way. sock_ops writes one at the SYN (`event::CONNECT`, with who and
/// where), one when the handshake completes (`ESTABLISHED`) and one at close (`CLOSED`,
/// with the bytes moved); all carry the socket cookie that ties them together.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEventV1 {
    /// `event::*` (host order).
    pub kind: u32,
    /// CLOSED: the TCP state the socket left (`tcp_state::*`, host order); a close from
    /// SYN_SENT is a connect that failed.
    pub old_state: u32,
    /// The socket cookie (host order).
    pub cookie: u64,
    /// CLOCK_MONOTONIC nanoseconds of the event.
    pub ts_ns: u64,
    /// CLOSED: bytes received and bytes the peer acknowledged (host order).
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// CONNECT: the endpoint (the socket's peer after the rewrite) and the client's own
    /// address.
    pub endpoint: SockAddrV1,
    pub client: SockAddrV1,
    /// ESTABLISHED: smoothed RTT in microseconds (host order).
    pub srtt_us: u32,
    /// CLOSED: segments retransmitted (host order). A connect that failed with none was
    /// refused (answered by a reset); with some, its SYNs went unanswered.
    pub retrans: u32,
    /// CONNECT: who dialled what.
    pub orig: OrigDstV3,
}
const _: () = assert!(core::mem::size_of::<ConnEventV1>() == 88 + 72);

/// `ConnEventV1::kind`.
pub mod event {
    pub const CONNECT: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    pub const CLOSED: u32 = 3;
}

/// Linux TCP states (include/net/tcp_states.h), as sock_ops reports them.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// `OrigDstV3::flags`: the connect went straight to an endpoint and is reported in
/// `SY_EVENTS` (not set for connects to the agent, which sees those itself).
pub const ORIG_EVENTS: u16 = 2;

/// Linux address family numbers (stable ABI; libc is not available in the kernel crate).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Indices into the per-CPU `SY_COUNTERS` array: one per kernel-side decision.
pub mod counter {
    /// connect rewritten to the agent's listener.
    pub const REDIRECTED: u32 = 0;
    /// TCP connect whose destination is not a service address.
    pub const PASSED: u32 = 1;
    /// connect from a socket carrying the agent's mark (the agent's own upstreams).
    pub const SKIPPED_MARK: u32 = 2;
    /// connect from another network namespace than the agent's while `agent.pods` is off.
    pub const SKIPPED_NETNS: u32 = 3;
    /// connect of a non-TCP socket (UDP, raw...).
    pub const SKIPPED_NOT_TCP: u32 = 4;
    /// service address hit while no agent listener exists and the service has no
    /// fallback endpoint: passed unchanged.
    pub const SKIPPED_NOT_READY: u32 = 5;
    /// a map update or helper failed; the connect was let through unchanged.
    pub const ERRORS: u32 = 6;
    /// sock_ops published a client address -> original destination entry.
    pub const ORIG_DST_PUBLISHED: u32 = 7;
    /// getpeername answered with the service address instead of the listener.
    pub const PEER_REWRITTEN: u32 = 8;
    /// no agent listener (killed, restarting): the connect was sent straight to a healthy
    /// endpoint from `SY_BACKENDS`.
    pub const FALLBACK: u32 = 9;
    /// connect from another network namespace sent to the agent's node address (also
    /// counted in `REDIRECTED`).
    pub const REDIRECTED_POD: u32 = 10;
    /// connect from an excluded cgroup (`agent.exclude_cgroups`): passed untouched.
    pub const SKIPPED_EXCLUDED: u32 = 11;
    /// connect from a network namespace whose path to the agent is blocked or not yet
    /// confirmed: sent to a healthy endpoint in the kernel (also counted in `FALLBACK`).
    pub const FALLBACK_BLOCKED: u32 = 12;
    /// connect to a `mode: kernel` service sent straight to an endpoint of its table.
    pub const KERNEL: u32 = 13;
    /// a `SY_EVENTS` record could not be written (ring full: no agent reading).
    pub const EVENTS_LOST: u32 = 14;
    /// Number of counters (the array's max_entries; bump `map::COUNTERS` with it).
    pub const COUNT: u32 = 15;
    /// Names, by index, for logs and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected",
        "passed",
        "skipped_mark",
        "skipped_netns",
        "skipped_not_tcp",
        "skipped_not_ready",
        "errors",
        "orig_dst_published",
        "peer_rewritten",
        "fallback",
        "redirected_pod",
        "skipped_excluded",
        "fallback_blocked",
        "kernel",
        "events_lost",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all seven are repr(C), integers only, with explicit padding, so every bit
    // pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::SockAddrV1 {}
    unsafe impl aya::Pod for super::ServiceV2 {}
    unsafe impl aya::Pod for super::AgentV2 {}
    unsafe impl aya::Pod for super::OrigDstV3 {}
    unsafe impl aya::Pod for super::BackendsV2 {}
    unsafe impl aya::Pod for super::ConnEventV1 {}
    unsafe impl aya::Pod for super::NetnsV1 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v4_mapped_encode_alike_and_round_trip() {
        let v4: SocketAddr = "10.96.0.10:6379".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:6379".parse().unwrap();
        let k = SockAddrV1::from(v4);
        assert_eq!(k, SockAddrV1::from(mapped));
        assert!(k.is_v4_mapped());
        assert_eq!(k.to_socket_addr(), v4);
        // The kernel hands over user_ip4 as a network-order word and user_port likewise.
        let raw_ip = u32::from_ne_bytes([10, 96, 0, 10]);
        assert_eq!(SockAddrV1::from_v4_raw(raw_ip, 6379u16.to_be()), k);
    }

    #[test]
    fn v6_round_trips() {
        let v6: SocketAddr = "[fd96::10]:80".parse().unwrap();
        let k = SockAddrV1::from(v6);
        assert!(!k.is_v4_mapped());
        assert_eq!(k.to_socket_addr(), v6);
        assert_eq!(k.addr[0].to_ne_bytes(), [0xfd, 0x96, 0, 0]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
    }
}
