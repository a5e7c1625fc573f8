//! The shared map encodings (`switchyard-common`) and the kernel's endpoint table
//! (`redirect::table`), on any values:
//!
//! * a `SockAddrV1` read from a map turns into a socket address and back unchanged, a
//!   socket address into the key and back as its canonical form (IPv4 for v4-mapped;
//!   no flow info or scope), and the kernel's raw v4/v6 words encode like the agent's;
//! * the command name a record carries (`origin::Comm`, as the agent keeps it) reads as a
//!   NUL-free prefix of its bytes, or `?`;
//! * a table from any shares (NaN, infinities, huge, subnormal, trials, more endpoints
//!   than fit) fills every slot with a kept endpoint, gives each kept one a slot, a trial
//!   exactly one unless all are on trial, the others slots in proportion to their share
//!   to within a slot, and is the same for the same input.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use libfuzzer_sys::fuzz_target;
use switchyard::{balance::Weighted, fuzzing::backends_table, origin::Comm};
use switchyard_common::{BackendsV2, MAX_BACKENDS, SockAddrV1, TABLE_SLOTS};

/// Bytes of one table entry: an f64 share and a flags byte.
const ENTRY: usize = 9;

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    let (key, rest) = data.split_at(40);
    sock_addr(key[..20].try_into().unwrap());
    let comm: [u8; 16] = key[20..36].try_into().unwrap();
    let read = Comm::new(&comm);
    let s = read.as_str();
    assert!(s == "?" || (comm.starts_with(s.as_bytes()) && !s.contains('\0')), "comm {comm:?} read as {s:?}");
    table(rest);
});

fn sock_addr(raw: [u8; 20]) {
    let word = |i: usize| u32::from_ne_bytes(raw[i * 4..i * 4 + 4].try_into().unwrap());
    let port_be = u16::from_ne_bytes([raw[16], raw[17]]);
    let key = SockAddrV1 { addr: [word(0), word(1), word(2), word(3)], port: port_be, _pad: 0 };
    let sa = key.to_socket_addr();
    assert_eq!(SockAddrV1::from(sa), key, "{key:?} -> {sa} -> back");
    assert_eq!(sa.is_ipv4(), key.is_v4_mapped());
    assert_eq!(SockAddrV1::from_v6_raw(key.addr, port_be), key);
    let v4 = Ipv4Addr::from(word(3).to_ne_bytes());
    assert_eq!(
        SockAddrV1::from_v4_raw(word(3), port_be),
        SockAddrV1::from(SocketAddr::new(IpAddr::V4(v4), u16::from_be(port_be)))
    );
    // A socket address from the agent side: flow info and scope are not part of the key.
    let octets: [u8; 16] = raw[..16].try_into().unwrap();
    let v6 = Ipv6Addr::from(octets);
    let flow = u32::from_ne_bytes([raw[17], raw[18], raw[19], raw[0]]);
    let given = SocketAddr::V6(SocketAddrV6::new(v6, port_be, flow, word(1)));
    let back = SockAddrV1::from(given).to_socket_addr();
    assert_eq!(back, SocketAddr::new(given.ip().to_canonical(), given.port()), "{given} round trip");
}

fn table(rest: &[u8]) {
    let n = (rest.len() / ENTRY).min(MAX_BACKENDS * 2);
    let (entries, node) = rest.split_at(n * ENTRY);
    // Distinct addresses in order, as the balancer hands them over.
    let eps: Vec<Weighted> = entries
        .chunks_exact(ENTRY)
        .enumerate()
        .map(|(i, e)| Weighted {
            addr: SocketAddr::from(([10, 0, 0, i as u8], 80)),
            share: f64::from_le_bytes(e[..8].try_into().unwrap()),
            trial: e[8] & 1 == 1,
        })
        .collect();
    let node = String::from_utf8_lossy(node);
    let value = backends_table(&eps, &node);
    assert_eq!(value, backends_table(&eps, &node), "the same input, another table");
    let usable: Vec<&Weighted> = eps.iter().filter(|w| w.share.is_finite() && w.share > 0.0).collect();
    let count = value.count as usize;
    assert_eq!(count, usable.len().min(MAX_BACKENDS));
    if count == 0 {
        assert_eq!(value, BackendsV2::default());
        return;
    }
    let kept: Vec<&Weighted> = value.addrs[..count]
        .iter()
        .map(|a| *usable.iter().find(|w| SockAddrV1::from(w.addr) == *a).expect("a kept endpoint was given"))
        .collect();
    assert!(value.addrs[count..].iter().all(|a| *a == SockAddrV1::default()));
    let mut slots = vec![0usize; count];
    for &s in &value.table {
        assert!((s as usize) < count, "slot names endpoint {s} of {count}");
        slots[s as usize] += 1;
    }
    let all_trial = kept.iter().all(|w| w.trial);
    let trial = |w: &Weighted| w.trial && !all_trial;
    // Shares relative to the largest, so that the check itself cannot overflow.
    let max = kept.iter().filter(|w| !trial(w)).map(|w| w.share).fold(0.0, f64::max);
    let total: f64 = kept.iter().filter(|w| !trial(w)).map(|w| w.share / max).sum();
    let spare = (TABLE_SLOTS - count) as f64;
    for (w, &got) in kept.iter().zip(&slots) {
        assert!(got >= 1, "{w:?} has no slot");
        if trial(w) {
            assert_eq!(got, 1, "a trial endpoint among others has one slot");
        } else {
            let want = 1.0 + spare * (w.share / max) / total;
            assert!((got as f64 - want).abs() < 1.0 + 1e-6, "{w:?}: {got} slots, {want:.3} due; {slots:?}");
        }
    }
}
