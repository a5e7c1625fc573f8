//! Node addresses: the agent's own addresses (by default 169.254.83.89/32 and
//! fd00:5359::1/128) on `lo` of the network namespace it runs in, so that pods, whose
//! default route points at the node, reach the agent's listener there. A packet to an
//! address on the node's `lo` is delivered locally whatever interface it came in on: the
//! trick NodeLocal DNSCache plays with a dummy interface, without depending on the dummy
//! driver (not every kernel has it).
//!
//! In-process rtnetlink, because the image is a static binary with no `ip`; it needs
//! CAP_NET_ADMIN in the agent's network namespace and nothing more. Each address carries
//! [`ADDR_PROTO`] in IFA_PROTO (Linux 5.18+; iproute2 after 6.1 shows it in
//! `ip -d address show dev lo`), which is how uninstall finds exactly the addresses an
//! agent added, even after a config change, and never one an operator added by hand.
//!
//! The calls are synchronous and short (a few netlink round trips), made at start-up and
//! uninstall; from async code, call them as they are or on `spawn_blocking`.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol},
    link::{LinkAttribute, LinkFlags, LinkMessage},
};
use nix::sys::{
    socket::{
        AddressFamily as SockFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
        sockopt,
    },
    time::TimeVal,
};

/// IFA_PROTO of the addresses switchyard adds: 0x53, "S", after the "SY" of the default
/// SO_MARK. The kernel takes 0 (unspecified) to 3 for itself (loopback, router
/// advertisement, link-local); values above are userspace's, with no registry, so this
/// one only has to be unlikely, and "S" on `lo` is.
pub const ADDR_PROTO: u8 = 0x53;

/// The interface the node addresses live on.
const LOOPBACK: &str = "lo";
/// The kernel answers rtnetlink requests at once; a wait this long means something is
/// wrong, and start-up should say so rather than hang.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// Larger than any message the kernel puts in one dump datagram (it sizes them to the
/// reader's buffer, up to 32 KiB), so a reply is never truncated.
const RECV_BUFFER: usize = 64 * 1024;
/// An address dump that another change on the node interrupted is simply asked again.
const DUMP_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum NodeAddrError {
    #[error("open a netlink route socket to manage the node addresses on lo")]
    Socket(#[source] io::Error),
    #[error("read the addresses on lo of this network namespace")]
    Query(#[source] io::Error),
    #[error(
        "lo is down in the agent's network namespace, so no address on it is reachable: bring it \
         up (`ip link set lo up`) before starting the agent"
    )]
    LoopbackDown,
    #[error("add {addr}/{prefix_len} to lo (needs CAP_NET_ADMIN in the agent's network namespace)")]
    Add {
        addr: IpAddr,
        prefix_len: u8,
        #[source]
        source: io::Error,
    },
    #[error(
        "remove {addr}/{prefix_len} from lo (needs CAP_NET_ADMIN in the agent's network namespace; \
         by hand: `ip address del {addr}/{prefix_len} dev lo`)"
    )]
    Remove {
        addr: IpAddr,
        prefix_len: u8,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel added {addr} to lo without its IFA_PROTO tag, so uninstall could not tell it \
         from an operator's address (removed it again): node addresses need Linux 5.18 or later"
    )]
    Untagged { addr: IpAddr },
}

/// Add each address to `lo` (/32 for v4, /128 for v6 without duplicate address
/// detection), tagged with [`ADDR_PROTO`]. An address already there is fine (a
/// restarted agent, or an operator who added it by hand: it stays theirs). `lo` must be
/// up. Returns the addresses this call added.
pub fn add(addrs: &[IpAddr]) -> Result<Vec<IpAddr>, NodeAddrError> {
    let mut rtnl = Rtnl::open()?;
    let lo = rtnl.loopback().map_err(NodeAddrError::Query)?;
    // On a down lo the kernel takes the address and even lets a listener bind it, but no
    // connect reaches it: refuse rather than start with a listener nobody can reach.
    if !lo.up {
        return Err(NodeAddrError::LoopbackDown);
    }
    let mut added = Vec::new();
    for &addr in addrs {
        let request =
            RouteNetlinkMessage::NewAddress(address_message(lo.index, addr, prefix_len(addr), Some(ADDR_PROTO)));
        match rtnl.request(request, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK) {
            Ok(_) => added.push(addr),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(NodeAddrError::Add { addr, prefix_len: prefix_len(addr), source }),
        }
    }
    // Kernels before 5.18 ignore IFA_PROTO without an error; only a read-back tells.
    if !added.is_empty() {
        let tagged: Vec<IpAddr> = rtnl.ours(lo.index)?.iter().map(|a| a.addr).collect();
        if let Some(&addr) = added.iter().find(|a| !tagged.contains(a)) {
            for &untagged in added.iter().filter(|a| !tagged.contains(a)) {
                let request =
                    RouteNetlinkMessage::DelAddress(address_message(lo.index, untagged, prefix_len(untagged), None));
                // Best effort: the error below is the one to act on.
                let _ = rtnl.request(request, NLM_F_ACK);
            }
            return Err(NodeAddrError::Untagged { addr });
        }
    }
    Ok(added)
}

/// Remove every address on `lo` that carries [`ADDR_PROTO`], whatever its value, so an
/// address from an earlier config is not stranded. Returns the addresses removed.
pub fn remove_ours() -> Result<Vec<IpAddr>, NodeAddrError> {
    remove_where(|_| true)
}

/// Remove those of `addrs` that are on `lo` with [`ADDR_PROTO`] (what a start that failed
/// had added). Returns the addresses removed.
pub fn remove(addrs: &[IpAddr]) -> Result<Vec<IpAddr>, NodeAddrError> {
    remove_where(|a| addrs.contains(a))
}

fn remove_where(wanted: impl Fn(&IpAddr) -> bool) -> Result<Vec<IpAddr>, NodeAddrError> {
    let mut rtnl = Rtnl::open()?;
    let lo = rtnl.loopback().map_err(NodeAddrError::Query)?;
    let mut removed = Vec::new();
    for LoAddr { addr, prefix_len, .. } in rtnl.ours(lo.index)?.into_iter().filter(|a| wanted(&a.addr)) {
        let request = RouteNetlinkMessage::DelAddress(address_message(lo.index, addr, prefix_len, Some(ADDR_PROTO)));
        match rtnl.request(request, NLM_F_ACK) {
            Ok(_) => removed.push(addr),
            // Gone since the dump (another uninstall): not ours to report.
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            Err(source) => return Err(NodeAddrError::Remove { addr, prefix_len, source }),
        }
    }
    Ok(removed)
}

/// The addresses on `lo` that carry [`ADDR_PROTO`] (for /status and tests).
pub fn ours() -> Result<Vec<IpAddr>, NodeAddrError> {
    let mut rtnl = Rtnl::open()?;
    let lo = rtnl.loopback().map_err(NodeAddrError::Query)?;
    Ok(rtnl.ours(lo.index)?.into_iter().map(|a| a.addr).collect())
}

/// Host routes: the address alone, never a subnet that would capture pod traffic.
fn prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// An RTM_NEWADDR/RTM_DELADDR body for `addr` on interface `index`, the way iproute2
/// builds one. IFA_ADDRESS next to IFA_LOCAL makes a v4 delete match the prefix length
/// too, not just the first address with that local part.
fn address_message(index: u32, addr: IpAddr, prefix_len: u8, proto: Option<u8>) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.prefix_len = prefix_len;
    msg.header.index = index;
    // Universe scope (the default): pods on other interfaces must reach it.
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    if addr.is_ipv6() {
        // No DAD: the address is usable at once, not tentative for a second.
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    if let Some(proto) = proto {
        msg.attributes.push(AddressAttribute::Protocol(AddressProtocol::from(proto)));
    }
    msg
}

/// One address on `lo`, as a dump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoAddr {
    addr: IpAddr,
    prefix_len: u8,
    /// IFA_PROTO; `None` when the kernel sent none (it omits 0, "unspecified").
    proto: Option<u8>,
}

/// The address of an RTM_NEWADDR from a dump, if it is on interface `index`.
fn lo_addr(msg: &AddressMessage, index: u32) -> Option<LoAddr> {
    if msg.header.index != index {
        return None;
    }
    // v4 reports the address as IFA_LOCAL (IFA_ADDRESS is the peer); v6 without a peer
    // reports only IFA_ADDRESS.
    let (mut local, mut address, mut proto) = (None, None, None);
    for attribute in &msg.attributes {
        match attribute {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Protocol(p) => proto = Some(u8::from(*p)),
            _ => {}
        }
    }
    Some(LoAddr { addr: local.or(address)?, prefix_len: msg.header.prefix_len, proto })
}

/// `lo` of this network namespace.
struct Loopback {
    index: u32,
    up: bool,
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace (fixed when it is
/// opened), used for one request at a time.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Self, NodeAddrError> {
        let open = || -> nix::Result<OwnedFd> {
            let fd = socket(SockFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &TimeVal::from(libc::timeval { tv_sec: REPLY_WAIT.as_secs() as _, tv_usec: 0 }),
            )?;
            Ok(fd)
        };
        let fd = open().map_err(|e| NodeAddrError::Socket(e.into()))?;
        Ok(Self { fd, seq: 0 })
    }

    fn loopback(&mut self) -> io::Result<Loopback> {
        let mut request = LinkMessage::default();
        request.attributes.push(LinkAttribute::IfName(LOOPBACK.to_owned()));
        let replies = self.request(RouteNetlinkMessage::GetLink(request), NLM_F_ACK)?.replies;
        replies
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => {
                    Some(Loopback { index: link.header.index, up: link.header.flags.contains(LinkFlags::Up) })
                }
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the kernel answered a lookup of lo without it"))
    }

    /// Every address on interface `index`.
    fn addresses(&mut self, index: u32) -> io::Result<Vec<LoAddr>> {
        for _ in 0..DUMP_ATTEMPTS {
            let reply = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
            if reply.interrupted {
                continue;
            }
            return Ok(reply
                .replies
                .iter()
                .filter_map(|r| match r {
                    RouteNetlinkMessage::NewAddress(a) => lo_addr(a, index),
                    _ => None,
                })
                .collect());
        }
        Err(io::Error::new(io::ErrorKind::Interrupted, "address dumps kept being interrupted by other changes"))
    }

    fn ours(&mut self, index: u32) -> Result<Vec<LoAddr>, NodeAddrError> {
        let all = self.addresses(index).map_err(NodeAddrError::Query)?;
        Ok(all.into_iter().filter(|a| a.proto == Some(ADDR_PROTO)).collect())
    }

    /// Send one request and collect its replies, up to the ACK (`NLM_F_ACK`) or the end
    /// of the dump (`NLM_F_DUMP`); a NACK becomes its errno.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Reply> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len().max(RECV_BUFFER)];
        packet.serialize(&mut buf);
        send(self.fd.as_raw_fd(), &buf[..packet.buffer_len()], MsgFlags::empty())?;

        let mut reply = Reply::default();
        loop {
            let len = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Ok(len) => len,
                Err(nix::Error::EAGAIN) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no netlink reply from the kernel"));
                }
                Err(e) => return Err(e.into()),
            };
            if len > buf.len() {
                return Err(invalid("a netlink reply larger than the receive buffer"));
            }
            let mut rest = &buf[..len];
            while !rest.is_empty() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(invalid)?;
                let size = (message.header.length as usize).next_multiple_of(4);
                rest = rest.get(size..).unwrap_or_default();
                if message.header.sequence_number != self.seq {
                    continue; // The late answer to an earlier request that timed out.
                }
                reply.interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => reply.replies.push(inner),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(reply),
                        Some(_) => return Err(e.to_io()),
                    },
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(io::Error::from_raw_os_error(-done.code));
                    }
                    NetlinkPayload::Done(_) => return Ok(reply),
                    _ => {}
                }
            }
        }
    }
}

/// What one request got back.
#[derive(Default)]
struct Reply {
    replies: Vec<RouteNetlinkMessage>,
    /// The dump raced with a change (NLM_F_DUMP_INTR) and may be inconsistent.
    interrupted: bool,
}

fn invalid(what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

    use netlink_packet_core::NLM_F_ACK;

    use super::*;

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 83, 89));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x5359, 0, 0, 0, 0, 0, 1));

    /// The request as it goes on the wire, read back the way a dump reply is read.
    fn round_trip(msg: AddressMessage) -> (Vec<u8>, AddressMessage) {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(msg)),
        );
        packet.finalize();
        let mut wire = vec![0; packet.buffer_len()];
        packet.serialize(&mut wire);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&wire).unwrap().payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(back)) => (wire, back),
            other => panic!("not an address message: {other:?}"),
        }
    }

    #[test]
    fn the_tag_goes_on_the_wire_as_ifa_proto() {
        let (wire, _) = round_trip(address_message(1, V4, 32, Some(ADDR_PROTO)));
        // nla_len 5, nla_type 11 (IFA_PROTO), the value.
        assert!(wire.windows(5).any(|w| w == [5, 0, 11, 0, ADDR_PROTO]), "{wire:?}");
        let (untagged, _) = round_trip(address_message(1, V4, 32, None));
        assert!(!untagged.windows(4).any(|w| w == [5, 0, 11, 0]), "{untagged:?}");
    }

    #[test]
    fn v4_is_a_host_address_v6_one_without_dad() {
        let (_, v4) = round_trip(address_message(7, V4, prefix_len(V4), Some(ADDR_PROTO)));
        assert_eq!(v4.header.family, AddressFamily::Inet);
        assert_eq!(v4.header.prefix_len, 32);
        assert!(!v4.attributes.iter().any(|a| matches!(a, AddressAttribute::Flags(_))));

        let (_, v6) = round_trip(address_message(7, V6, prefix_len(V6), Some(ADDR_PROTO)));
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert_eq!(v6.header.prefix_len, 128);
        assert_eq!(v6.header.flags, AddressHeaderFlags::Nodad);
        assert!(v6.attributes.contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
    }

    #[test]
    fn a_dumped_address_is_read_with_its_tag_and_interface() {
        for addr in [V4, V6] {
            let (_, msg) = round_trip(address_message(1, addr, prefix_len(addr), Some(ADDR_PROTO)));
            assert_eq!(lo_addr(&msg, 1), Some(LoAddr { addr, prefix_len: prefix_len(addr), proto: Some(ADDR_PROTO) }));
            assert_eq!(lo_addr(&msg, 2), None, "another interface's address");
            let (_, msg) = round_trip(address_message(1, addr, prefix_len(addr), None));
            assert_eq!(lo_addr(&msg, 1).unwrap().proto, None);
        }
    }

    #[test]
    fn a_v4_dump_entry_is_named_by_its_local_address_not_its_peer() {
        let mut msg = address_message(1, V4, 32, None);
        msg.attributes.retain(|a| !matches!(a, AddressAttribute::Address(_)));
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(lo_addr(&msg, 1).unwrap().addr, V4);
    }

    /// Without root: a loud skip, except under CI=true, where a skip would pass silently.
    fn require_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root, and CI=true forbids skipping it");
        }
        eprintln!("\n*** SKIPPED {test}: needs root (a throwaway network namespace) ***\n");
        false
    }

    /// Runs `f` on a thread of its own in a new, empty network namespace (only `lo`,
    /// down), which vanishes with the thread: the machine's own `lo` is never touched.
    fn in_new_netns(f: impl FnOnce() + Send + 'static) {
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            f();
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn set_lo_up() {
        let mut rtnl = Rtnl::open().unwrap();
        let index = rtnl.loopback().unwrap().index;
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        rtnl.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK).unwrap();
        assert!(rtnl.loopback().unwrap().up);
    }

    /// An address as an operator would add it: the same message without the tag.
    fn add_untagged(addr: IpAddr) {
        let mut rtnl = Rtnl::open().unwrap();
        let index = rtnl.loopback().unwrap().index;
        let request = RouteNetlinkMessage::NewAddress(address_message(index, addr, prefix_len(addr), None));
        rtnl.request(request, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK).unwrap();
    }

    fn all_on_lo() -> Vec<LoAddr> {
        let mut rtnl = Rtnl::open().unwrap();
        let index = rtnl.loopback().unwrap().index;
        rtnl.addresses(index).unwrap()
    }

    fn sorted(mut addrs: Vec<IpAddr>) -> Vec<IpAddr> {
        addrs.sort();
        addrs
    }

    #[test]
    fn add_and_remove_in_a_throwaway_netns() {
        if !require_root("nodeaddr::add_and_remove_in_a_throwaway_netns") {
            return;
        }
        in_new_netns(|| {
            assert!(matches!(add(&[V4, V6]), Err(NodeAddrError::LoopbackDown)), "lo starts down in a new netns");
            set_lo_up();

            assert_eq!(sorted(add(&[V4, V6]).unwrap()), sorted(vec![V4, V6]));
            assert_eq!(sorted(ours().unwrap()), sorted(vec![V4, V6]));
            for addr in [V4, V6] {
                TcpListener::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            }
            assert_eq!(add(&[V4, V6]).unwrap(), Vec::<IpAddr>::new(), "a restarted agent finds them there");

            let foreign_v4 = IpAddr::V4(Ipv4Addr::new(169, 254, 9, 9));
            let foreign_v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x5359, 0, 0, 0, 0, 0, 9));
            add_untagged(foreign_v4);
            add_untagged(foreign_v6);
            assert_eq!(sorted(ours().unwrap()), sorted(vec![V4, V6]), "untagged addresses are not ours");

            assert_eq!(sorted(remove_ours().unwrap()), sorted(vec![V4, V6]));
            assert_eq!(ours().unwrap(), Vec::<IpAddr>::new());
            for addr in [V4, V6] {
                let err = TcpListener::bind((addr, 0)).expect_err("the address is gone");
                assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "bind {addr}: {err}");
            }
            let left: Vec<IpAddr> = all_on_lo().iter().map(|a| a.addr).collect();
            for addr in [foreign_v4, foreign_v6] {
                assert!(left.contains(&addr), "remove_ours removed {addr}, which it did not add: {left:?}");
                TcpListener::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            }
            assert_eq!(remove_ours().unwrap(), Vec::<IpAddr>::new(), "nothing left to remove");
        });
    }
}
