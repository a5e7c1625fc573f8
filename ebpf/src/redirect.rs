//! The redirect logic behind the entry points. v4 and v6 share every decision; they
//! differ only in which context fields hold the address, which `Family` hides.
//!
//! Context fields are read and written one 32-bit word at a time with volatile accesses:
//! the kernel only accepts 4-byte accesses to `user_ip6` / `local_ip6`, and a plain
//! struct copy may be merged into 8-byte loads.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr,
        bpf_sock_ops,
    },
    cty::c_void,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_release,
    },
    programs::{SockAddrContext, SockOpsContext},
};
use switchyard_common::{
    AF_INET, AgentV2, ConnEventV1, MAX_EXCLUDE_DEPTH, NetnsV1, ORIG_EVENTS, ORIG_TO_AGENT, OrigDstV3, SockAddrV1,
    TABLE_SLOTS, counter, event, listener, netns, pods, service,
};

use crate::maps::{
    AGENT, BACKENDS, CLIENT_ORIG, EVENTS, EVENTS_WAKE_AT, EXCLUDE, LISTENERS, NETNS, SERVICES, SOCK_ORIG, count,
};

const SOCK_STREAM: u32 = 1;
/// Error code for a failed map update (the helpers' own return is not kept).
const EMAP: i64 = -1;

/// Word-wise access to a 16-byte address field.
#[inline(always)]
unsafe fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let p = field as *const u32;
    unsafe { [read_volatile(p), read_volatile(p.add(1)), read_volatile(p.add(2)), read_volatile(p.add(3))] }
}

#[inline(always)]
unsafe fn write_ip6(field: *mut [u32; 4], v: [u32; 4]) {
    let p = field as *mut u32;
    unsafe {
        write_volatile(p, v[0]);
        write_volatile(p.add(1), v[1]);
        write_volatile(p.add(2), v[2]);
        write_volatile(p.add(3), v[3]);
    }
}

/// The destination (connect) or peer (getpeername) held in a sock_addr context.
#[inline(always)]
unsafe fn read_user_addr(sa: *mut bpf_sock_addr, family: u16) -> SockAddrV1 {
    unsafe {
        // user_port: network-order port in the low 16 bits of a 4-byte field.
        let port = read_volatile(&(*sa).user_port) as u16;
        if family == AF_INET {
            SockAddrV1::from_v4_raw(read_volatile(&(*sa).user_ip4), port)
        } else {
            SockAddrV1::from_v6_raw(read_ip6(&(*sa).user_ip6), port)
        }
    }
}

/// Overwrite the context's address. An AF_INET socket takes the IPv4 word; an AF_INET6
/// socket takes all 16 bytes, which for a v4-mapped address keeps it v4-mapped.
#[inline(always)]
unsafe fn write_user_addr(sa: *mut bpf_sock_addr, family: u16, to: &SockAddrV1) {
    unsafe {
        if family == AF_INET {
            write_volatile(&mut (*sa).user_ip4, to.addr[3]);
        } else {
            write_ip6(&mut (*sa).user_ip6, to.addr);
        }
        write_volatile(&mut (*sa).user_port, to.port as u32);
    }
}

/// Which agent listener a connect to `dst` goes to, by where it comes from: the loopback
/// listeners for the agent's own namespace, the node address for any other (127.0.0.1
/// there is the pod itself). IPv4 and v4-mapped destinations take the v4 listener (a
/// dual-stack socket reaches 127.0.0.1 as ::ffff:127.0.0.1), others the v6 one. Returns
/// the address and its `SY_LISTENERS` slot.
#[inline(always)]
fn listener_for(agent: &AgentV2, dst: &SockAddrV1, host: bool) -> (SockAddrV1, u32) {
    match (dst.is_v4_mapped(), host) {
        (true, true) => (SockAddrV1::from_v4_raw(agent.listen_v4, agent.listen_port), listener::LOOPBACK_V4),
        (false, true) => (SockAddrV1::from_v6_raw(agent.listen_v6, agent.listen_port), listener::LOOPBACK_V6),
        (true, false) => (SockAddrV1::from_v4_raw(agent.node_v4, agent.listen_port), listener::NODE_V4),
        (false, false) => (SockAddrV1::from_v6_raw(agent.node_v6, agent.listen_port), listener::NODE_V6),
    }
}

/// Where a connect goes, and the counter that says so.
enum Verdict {
    /// Leave the connect alone, counting why.
    Pass(u32),
    /// To an agent listener.
    Agent(SockAddrV1),
    /// To a healthy endpoint, in the kernel (counted `FALLBACK` plus the reason, if any).
    Fallback(SockAddrV1, Option<u32>),
    /// To an endpoint of a `mode: kernel` service's table.
    Kernel(SockAddrV1),
}

// Inlined into each entry point so `family` is a constant there: connect4 programs may
// not even read user_ip6, so the other family's branch must not survive compilation.
#[inline(always)]
pub fn try_connect(ctx: &SockAddrContext, family: u16) -> Result<(), i64> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the verifier-checked context; `sk` is always set for connect hooks.
    let (sock_type, dst, mark) =
        unsafe { (read_volatile(&(*sa).type_), read_user_addr(sa, family), (*(*sa).__bindgen_anon_1.sk).mark) };
    if sock_type != SOCK_STREAM {
        count(counter::SKIPPED_NOT_TCP);
        return Ok(());
    }
    // SAFETY: a hash lookup returning a reference valid for this program run.
    let Some(flags) = (unsafe { SERVICES.get(dst) }).map(|s| s.flags) else {
        count(counter::PASSED);
        return Ok(());
    };
    let Some(agent) = AGENT.get(0) else { return Err(EMAP) };
    // The agent writes its slot before it attaches anything, so this only guards against
    // a map emptied by hand.
    if agent.listen_port == 0 {
        count(counter::SKIPPED_NOT_READY);
        return Ok(());
    }
    if mark == agent.mark {
        count(counter::SKIPPED_MARK);
        return Ok(());
    }
    if agent.excluded != 0 && excluded(agent) {
        count(counter::SKIPPED_EXCLUDED);
        return Ok(());
    }
    // SAFETY: helper valid for cgroup sock_addr programs (Linux 5.7+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = agent.netns_cookie == 0 || netns_cookie == agent.netns_cookie;
    let (to, listener) = listener_for(agent, &dst, host);
    let verdict = if flags & service::KERNEL != 0 && (host || agent.pods != pods::OFF) {
        // From the host or any covered pod: the endpoint is dialled directly, no agent
        // path involved. With no endpoint, the agent (if there) answers the connection
        // the way it does for any service without one; else the connect is passed as it is.
        match table_endpoint(&dst) {
            Some(endpoint) => Verdict::Kernel(endpoint),
            None if listener_alive(listener) && (host || agent.pods == pods::REDIRECT) => Verdict::Agent(to),
            None => Verdict::Pass(counter::SKIPPED_NOT_READY),
        }
    } else if host {
        // The agent's listener if it is there; else, in-kernel, a healthy endpoint (the
        // agent was killed or is restarting: the connection must not fail meanwhile).
        if listener_alive(listener) { Verdict::Agent(to) } else { fallback(&dst, None) }
    } else {
        match agent.pods {
            pods::REDIRECT if !listener_alive(listener) => fallback(&dst, None),
            pods::REDIRECT => match path(netns_cookie) {
                Path::Usable => Verdict::Agent(to),
                // Unconfirmed: its probe is in flight; blocked: the agent saw SYNs lost.
                Path::Unconfirmed => match fallback(&dst, Some(counter::FALLBACK_BLOCKED)) {
                    Verdict::Pass(_) => Verdict::Agent(to),
                    v => v,
                },
                Path::Blocked => fallback(&dst, Some(counter::FALLBACK_BLOCKED)),
            },
            pods::FALLBACK => fallback(&dst, None),
            _ => Verdict::Pass(counter::SKIPPED_NETNS),
        }
    };
    let (to, flags) = match verdict {
        Verdict::Pass(why) => {
            count(why);
            return Ok(());
        }
        Verdict::Agent(to) => (to, ORIG_TO_AGENT),
        Verdict::Fallback(to, _) | Verdict::Kernel(to) => (to, ORIG_EVENTS),
    };
    // Remember the destination before rewriting it: if we cannot, the agent could not
    // route the connection, so leave it alone. Fallback connections are recorded too, so
    // getpeername shows them the service address as well.
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // connect() runs in the calling task, so "current" is the client process.
    // SAFETY: helpers valid for cgroup sock_addr programs.
    let orig = unsafe {
        OrigDstV3 {
            dst,
            family,
            flags,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            cgroup_id: bpf_get_current_cgroup_id(),
            netns_cookie,
            comm: current_comm(),
            ..Default::default()
        }
    };
    SOCK_ORIG.insert(cookie, orig, 0).map_err(|_| EMAP)?;
    // SAFETY: user_ip4/user_ip6/user_port are writable in connect hooks.
    unsafe { write_user_addr(sa, family, &to) };
    match verdict {
        Verdict::Agent(_) => {
            count(counter::REDIRECTED);
            if !host {
                count(counter::REDIRECTED_POD);
            }
        }
        Verdict::Fallback(_, why) => {
            count(counter::FALLBACK);
            if let Some(why) = why {
                count(why);
            }
        }
        Verdict::Kernel(_) => count(counter::KERNEL),
        Verdict::Pass(_) => {}
    }
    Ok(())
}

/// The calling task's command name. The helper fills all 16 bytes (NUL-padded, or zeros
/// when it fails), so the buffer is handed over uninitialised: aya's wrapper zeroes it
/// first, with a call to the program's byte-at-a-time `memset`, on every connect.
#[inline(always)]
fn current_comm() -> [u8; 16] {
    let mut comm = core::mem::MaybeUninit::<[u8; 16]>::uninit();
    // SAFETY: helper valid in every program type; its buffer argument may be
    // uninitialised stack (ARG_PTR_TO_UNINIT_MEM), which it writes in full.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), 16);
        comm.assume_init()
    }
}

/// Whether the agent's listening socket for `slot` exists. A killed agent's sockets leave
/// SY_LISTENERS with its process, and a starting agent's enter it only once bound, so this
/// is what keeps a connection from ever being sent to a listener that is not there.
#[inline(always)]
fn listener_alive(slot: u32) -> bool {
    // aya-ebpf's SockMap has no lookup; the map definition is the static itself (both
    // types are repr(transparent) over the kernel's bpf_map_def).
    let map = core::ptr::from_ref(&LISTENERS).cast_mut().cast::<c_void>();
    // SAFETY: a SOCKMAP lookup (Linux 5.x+) from a program type that may hold sockets;
    // the key lives on this stack frame for the call.
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&slot).cast()) };
    if sk.is_null() {
        return false;
    }
    // The lookup took a reference on the socket; the verifier refuses to load a program
    // that can exit without releasing it.
    // SAFETY: `sk` is the non-null socket the lookup returned.
    unsafe { bpf_sk_release(sk) };
    true
}

/// What is known of a pod namespace's path to the node address.
enum Path {
    Usable,
    Unconfirmed,
    Blocked,
}

/// The path state of network namespace `cookie`; the first connect from an unknown
/// namespace claims the probe (and is `Usable`: it goes to the agent, which confirms).
#[inline(always)]
fn path(cookie: u64) -> Path {
    // SAFETY: a hash lookup returning a reference valid for this program run.
    match unsafe { NETNS.get(cookie) }.map(|n| n.state) {
        Some(netns::REACHABLE) => Path::Usable,
        Some(netns::BLOCKED) => Path::Blocked,
        Some(_) => Path::Unconfirmed,
        None => {
            // SAFETY: helper valid in every program type.
            let probe = NetnsV1 { state: netns::PROBING, _pad: 0, since_ns: unsafe { bpf_ktime_get_ns() } };
            // NOEXIST: of two first connects racing, one is the probe, the other waits.
            if NETNS.insert(cookie, probe, BPF_NOEXIST as u64).is_ok() { Path::Usable } else { Path::Unconfirmed }
        }
    }
}

/// Whether the calling task's cgroup, or one of its ancestors below the attach cgroup, is
/// in SY_EXCLUDE.
#[inline(always)]
fn excluded(agent: &AgentV2) -> bool {
    // Counted from 0 to a constant, not from the attach level: a loop between two bounds
    // read from a map is one the verifier cannot see the end of.
    // Verifier: "The sequence of 8193 jumps is too complex."
    for depth in 0..MAX_EXCLUDE_DEPTH {
        // SAFETY: helper valid for cgroup sock_addr programs; 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id((agent.cgroup_level + depth) as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: a hash lookup returning a reference valid for this program run.
        if unsafe { EXCLUDE.get(id) }.is_some() {
            return true;
        }
    }
    false
}

/// An endpoint of the service at `dst` drawn from its table in SY_BACKENDS (the fallback
/// while no agent listens), or a pass when it has none.
#[inline(always)]
fn fallback(dst: &SockAddrV1, why: Option<u32>) -> Verdict {
    match table_endpoint(dst) {
        Some(endpoint) => Verdict::Fallback(endpoint, why),
        None => Verdict::Pass(counter::SKIPPED_NOT_READY),
    }
}

/// One draw from the service's weighted table: a random slot, the endpoint it names. No
/// loop: the agent fills every slot, with endpoints in proportion to their share.
#[inline(always)]
fn table_endpoint(dst: &SockAddrV1) -> Option<SockAddrV1> {
    // SAFETY: a hash lookup returning a reference valid for this program run; the agent
    // replaces values whole (BPF_F_NO_PREALLOC map: an update never rewrites in place).
    let backends = unsafe { BACKENDS.get(dst) }?;
    if backends.count == 0 {
        return None;
    }
    // SAFETY: helper valid in every program type.
    let slot = unsafe { bpf_get_prandom_u32() } as usize & (TABLE_SLOTS - 1);
    // `get` bounds each index by its array's length, which is what the verifier needs to
    // see before a variable-offset read.
    let i = *backends.table.get(slot)?;
    backends.addrs.get(i as usize).copied()
}

#[inline(always)]
pub fn try_getpeername(ctx: &SockAddrContext, family: u16) -> Result<(), i64> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the reference is used within this run only.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie) }) else { return Ok(()) };
    let dst = orig.dst;
    // SAFETY: user_ip4/user_ip6/user_port are writable in getpeername hooks.
    unsafe { write_user_addr(ctx.sock_addr, family, &dst) };
    count(counter::PEER_REWRITTEN);
    Ok(())
}

pub fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            on_established(ctx);
            Ok(())
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            on_close(ctx);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The client's local address, in the form the agent sees as the accepted peer.
#[inline(always)]
fn local_addr(ops: *mut bpf_sock_ops, family: u32) -> SockAddrV1 {
    // Both address fields are read whatever the family, and the choice is made between
    // values: choosing between the two field addresses makes the compiler emit one load
    // through a computed context pointer, which the verifier refuses.
    // Verifier: "dereference of modified ctx ptr R7 off=60 disallowed"
    // SAFETY: verifier-checked context fields, read 4 bytes at a time.
    let (ip4, ip6, port) =
        unsafe { (read_volatile(&(*ops).local_ip4), read_ip6(&(*ops).local_ip6), read_volatile(&(*ops).local_port)) };
    // local_port is in host order (unlike remote_port).
    let port = (port as u16).to_be();
    if family == AF_INET as u32 { SockAddrV1::from_v4_raw(ip4, port) } else { SockAddrV1::from_v6_raw(ip6, port) }
}

/// The SYN is about to leave: source address and port are chosen. Publish the entry the
/// agent will look up, and ask for the state callback so we can clean up at close.
fn on_connect(ctx: &SockOpsContext) -> Result<(), i64> {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the reference is used within this run only.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie) }) else { return Ok(()) };
    // Fallback connects went straight to an endpoint: the agent will never look them up,
    // but they still want the close callback that clears SY_SOCK_ORIG.
    if orig.flags & ORIG_TO_AGENT != 0 {
        let mut orig = *orig;
        // SAFETY: helper valid in every program type.
        orig.published_ns = unsafe { bpf_ktime_get_ns() };
        let client = local_addr(ctx.ops, ctx.family());
        CLIENT_ORIG.insert(client, orig, 0).map_err(|_| EMAP)?;
        count(counter::ORIG_DST_PUBLISHED);
    } else if orig.flags & ORIG_EVENTS != 0 {
        publish(event::CONNECT, cookie, |ev| {
            ev.endpoint = remote_addr(ctx.ops, ctx.family());
            ev.client = local_addr(ctx.ops, ctx.family());
            ev.orig = *orig;
        });
    }
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).map_err(|e| e as i64)
}

/// The peer address of a sock_ops socket: for a rewritten connect, the endpoint.
#[inline(always)]
fn remote_addr(ops: *mut bpf_sock_ops, family: u32) -> SockAddrV1 {
    // Read both families and choose between values, as in `local_addr`.
    // SAFETY: verifier-checked context fields, read 4 bytes at a time.
    let (ip4, ip6, port) = unsafe {
        (read_volatile(&(*ops).remote_ip4), read_ip6(&(*ops).remote_ip6), read_volatile(&(*ops).remote_port))
    };
    // remote_port is in network order; sock_ops has long shifted it into the upper half
    // of the word, where other program types keep it in the lower.
    let port = if port > 0xffff { (port >> 16) as u16 } else { port as u16 };
    if family == AF_INET as u32 { SockAddrV1::from_v4_raw(ip4, port) } else { SockAddrV1::from_v6_raw(ip6, port) }
}

/// Write a `kind` record to SY_EVENTS, stamped now and filled by `fill`; a full ring (no
/// agent reading) is counted.
///
/// Written where it lies in the ring (reserve, fill, submit) and zeroed a word at a
/// time: a record built on the stack was zeroed by a call to the program's byte-at-a-time
/// `memset`, about 700 instructions for each handshake and close record.
#[inline(always)]
fn publish(kind: u32, cookie: u64, fill: impl FnOnce(&mut ConnEventV1)) {
    let Some(mut entry) = EVENTS.reserve::<ConnEventV1>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let words = entry.as_mut_ptr().cast::<u64>();
    // SAFETY: the reservation is a whole, 8-byte aligned ConnEventV1, every bit pattern
    // of which is valid (integers only). Volatile so that the compiler does not fold the
    // stores back into a memset call.
    let ev = unsafe {
        for i in 0..size_of::<ConnEventV1>() / 8 {
            write_volatile(words.add(i), 0);
        }
        &mut *entry.as_mut_ptr()
    };
    ev.kind = kind;
    ev.cookie = cookie;
    // SAFETY: helper valid in every program type.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    fill(ev);
    // No wake-up per record: each one costs the connecting CPU an irq_work and an IPI
    // to the agent, which halved a new-connection-per-request load. The agent reads on
    // a short timer, and is woken once a quarter of the ring is waiting.
    let flags =
        if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= EVENTS_WAKE_AT { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(flags as u64);
}

/// The sock_ops socket's cookie, and the flags of its SY_SOCK_ORIG entry if it has one.
#[inline(always)]
fn recorded(ctx: &SockOpsContext) -> (u64, Option<u16>) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the reference is used within this run only.
    (cookie, unsafe { SOCK_ORIG.get(cookie) }.map(|o| o.flags))
}

/// The cookie of the sock_ops socket if it is one whose life SY_EVENTS follows.
#[inline(always)]
fn followed(ctx: &SockOpsContext) -> Option<u64> {
    let (cookie, flags) = recorded(ctx);
    flags.is_some_and(|f| f & ORIG_EVENTS != 0).then_some(cookie)
}

/// A connect sent straight to an endpoint completed its handshake.
fn on_established(ctx: &SockOpsContext) {
    let Some(cookie) = followed(ctx) else { return };
    // SAFETY: verifier-checked context field.
    let srtt = unsafe { read_volatile(&(*ctx.ops).srtt_us) };
    // The kernel keeps srtt scaled by 8.
    publish(event::ESTABLISHED, cookie, |ev| ev.srtt_us = srtt >> 3);
}

/// A redirected client socket closed: its entries are no longer needed, and one the
/// kernel sent straight to an endpoint is reported with the bytes it moved.
fn on_close(ctx: &SockOpsContext) {
    let (cookie, flags) = recorded(ctx);
    if flags.is_some_and(|f| f & ORIG_EVENTS != 0) {
        // SAFETY: verifier-checked context fields of a full socket.
        let (received, acked, retrans) = unsafe {
            let ops = ctx.ops;
            (
                read_volatile(&(*ops).bytes_received),
                read_volatile(&(*ops).bytes_acked),
                read_volatile(&(*ops).total_retrans),
            )
        };
        publish(event::CLOSED, cookie, |ev| {
            ev.old_state = ctx.arg(0);
            ev.bytes_received = received;
            ev.bytes_acked = acked;
            ev.retrans = retrans;
        });
    }
    let _ = SOCK_ORIG.remove(cookie);
    // Only connects sent to the agent publish a client entry; one whose SOCK_ORIG entry
    // was evicted may have, so it is removed then too.
    if flags.is_none_or(|f| f & ORIG_TO_AGENT != 0) {
        let _ = CLIENT_ORIG.remove(local_addr(ctx.ops, ctx.family()));
    }
}
