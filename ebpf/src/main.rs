//! Switchyard's kernel side: thin entry points, each calling a `try_*` helper and failing
//! open (the connect proceeds unchanged, the error is counted).
//!
//! * `cgroup/connect4`, `cgroup/connect6`: a TCP connect to a service address is rewritten
//!   to the agent's listener if one listens (its socket in `SY_LISTENERS1`, looked up on
//!   every connect): loopback from the agent's own network namespace, the node address
//!   from any other (a pod, once its path is known to work, see `SY_NETNS1`); else
//!   straight to a healthy endpoint the agent left in `SY_BACKENDS1` (agent killed or
//!   restarting, pod path blocked); the original destination is remembered by socket
//!   cookie.
//! * `sockops`: when such a socket sends its SYN, publish "client address -> original
//!   destination" for the agent, which looks it up by the peer address of the connection
//!   it accepts; when the socket closes, drop both entries.
//! * `cgroup/getpeername4`, `cgroup/getpeername6`: the application sees the service
//!   address as its peer, not the agent's listener.
//!
//! Why sock_ops rather than an SO_ORIGINAL_DST emulation in `cgroup/getsockopt`: the
//! agent's listener then need not live in the hooked cgroup, the lookup is a plain map
//! read with no syscall hooking, and the entry is published at TCP_CONNECT_CB, before the
//! SYN leaves, so it is in place before the agent can possibly accept the connection.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod maps;
mod redirect;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use switchyard_common::{AF_INET, AF_INET6, counter};

/// Verdict for cgroup sock_addr programs: 1 lets the syscall proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sy_connect4(ctx: SockAddrContext) -> i32 {
    fail_open(redirect::try_connect(&ctx, AF_INET))
}

#[cgroup_sock_addr(connect6)]
pub fn sy_connect6(ctx: SockAddrContext) -> i32 {
    fail_open(redirect::try_connect(&ctx, AF_INET6))
}

#[cgroup_sock_addr(getpeername4)]
pub fn sy_getpeername4(ctx: SockAddrContext) -> i32 {
    fail_open(redirect::try_getpeername(&ctx, AF_INET))
}

#[cgroup_sock_addr(getpeername6)]
pub fn sy_getpeername6(ctx: SockAddrContext) -> i32 {
    fail_open(redirect::try_getpeername(&ctx, AF_INET6))
}

#[sock_ops]
pub fn sy_sock_ops(ctx: SockOpsContext) -> u32 {
    // sock_ops return values are ignored for the callbacks we use; errors are counted.
    let _ = fail_open(redirect::try_sock_ops(&ctx));
    1
}

#[inline(always)]
fn fail_open(result: Result<(), i64>) -> i32 {
    if result.is_err() {
        maps::count(counter::ERRORS);
    }
    ALLOW
}

/// The crate also compiles for the host so that `cargo test --workspace` and clippy work
/// over the whole workspace; there it is an empty program.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a loaded program: the verifier rejects code that could get here.
    loop {}
}
