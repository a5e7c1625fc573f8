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
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr, bpf_sock_ops, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    programs::{SockAddrContext, SockOpsContext},
};
use switchyard_common::{AF_INET, AgentV1, OrigDstV2, SockAddrV1, counter};

use crate::maps::{AGENT, BACKENDS, CLIENT_ORIG, SERVICES, SOCK_ORIG, count};

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

/// Where to send a connect to `dst`: the v4 listener for IPv4 and v4-mapped destinations
/// (a dual-stack socket reaches 127.0.0.1 as ::ffff:127.0.0.1), the v6 listener otherwise.
#[inline(always)]
fn listener_for(agent: &AgentV1, dst: &SockAddrV1) -> SockAddrV1 {
    if dst.is_v4_mapped() {
        SockAddrV1::from_v4_raw(agent.listen_v4, agent.listen_port)
    } else {
        SockAddrV1::from_v6_raw(agent.listen_v6, agent.listen_port)
    }
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
    if unsafe { SERVICES.get(dst) }.is_none() {
        count(counter::PASSED);
        return Ok(());
    }
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
    // SAFETY: helper valid for cgroup sock_addr programs (Linux 5.7+).
    if agent.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != agent.netns_cookie {
        count(counter::SKIPPED_NETNS);
        return Ok(());
    }
    // The agent's listener if it is there; else, in-kernel, a healthy endpoint (the agent
    // was killed or is restarting: the connection must not fail meanwhile); else nothing.
    let (to, decision) = if listener_exists(ctx, agent, &dst) {
        (listener_for(agent, &dst), counter::REDIRECTED)
    } else if let Some(endpoint) = fallback_endpoint(&dst) {
        (endpoint, counter::FALLBACK)
    } else {
        count(counter::SKIPPED_NOT_READY);
        return Ok(());
    };
    // Remember the destination before rewriting it: if we cannot, the agent could not
    // route the connection, so leave it alone. Fallback connections are recorded too, so
    // getpeername shows them the service address as well.
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // connect() runs in the calling task, so "current" is the client process.
    // SAFETY: helpers valid for cgroup sock_addr programs.
    let orig = unsafe {
        OrigDstV2 {
            dst,
            family,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            cgroup_id: bpf_get_current_cgroup_id(),
            comm: bpf_get_current_comm().unwrap_or_default(),
            ..Default::default()
        }
    };
    SOCK_ORIG.insert(cookie, orig, 0).map_err(|_| EMAP)?;
    // SAFETY: user_ip4/user_ip6/user_port are writable in connect hooks.
    unsafe { write_user_addr(sa, family, &to) };
    count(decision);
    Ok(())
}

/// Whether a TCP socket listens on the agent's listener address for `dst`'s family in the
/// caller's network namespace (the agent's, checked above by cookie). A killed agent's
/// listener goes with its process, and a starting agent's exists only once bound, so this
/// is what keeps a connection from ever being sent to a listener that is not there.
#[inline(always)]
fn listener_exists(ctx: &SockAddrContext, agent: &AgentV1, dst: &SockAddrV1) -> bool {
    // Zeroed first: the helper reads the whole tuple, and the verifier refuses a read of
    // uninitialised stack. Source address and port 0 match no established socket, so the
    // lookup falls through to the listener table.
    // SAFETY: a plain-old-data union, valid when zeroed.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if dst.is_v4_mapped() {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: agent.listen_v4,
            sport: 0,
            dport: agent.listen_port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: [0; 4],
            daddr: agent.listen_v6,
            sport: 0,
            dport: agent.listen_port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: helper valid for cgroup sock_addr programs (Linux 4.20+); the tuple lives on
    // this stack frame for the call. A negative 32-bit netns id means "the caller's".
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    // The lookup took a reference on the socket; the verifier refuses to load a program
    // that can exit without releasing it.
    // SAFETY: `sk` is the non-null socket the lookup returned.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// A random healthy endpoint of the service at `dst`, from the set the agent keeps in
/// SY_BACKENDS. No loop: the set holds healthy endpoints only, so one draw is enough.
#[inline(always)]
fn fallback_endpoint(dst: &SockAddrV1) -> Option<SockAddrV1> {
    // SAFETY: a hash lookup returning a reference valid for this program run; the agent
    // replaces values whole (BPF_F_NO_PREALLOC map: an update never rewrites in place).
    let backends = unsafe { BACKENDS.get(dst) }?;
    let n = backends.count;
    if n == 0 {
        return None;
    }
    // SAFETY: helper valid in every program type.
    let i = unsafe { bpf_get_prandom_u32() } % n;
    // `get` bounds the index by the array length, which is what the verifier needs to
    // see before the variable-offset read.
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
    let orig = *orig;
    let client = local_addr(ctx.ops, ctx.family());
    CLIENT_ORIG.insert(client, orig, 0).map_err(|_| EMAP)?;
    count(counter::ORIG_DST_PUBLISHED);
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).map_err(|e| e as i64)
}

/// A redirected client socket closed: its entries are no longer needed.
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_ORIG.remove(cookie);
    let _ = CLIENT_ORIG.remove(local_addr(ctx.ops, ctx.family()));
}
