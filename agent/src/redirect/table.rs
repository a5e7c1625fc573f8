//! The kernel's endpoint table for one service address (`SY_BACKENDS`): endpoint shares
//! turned into `TABLE_SLOTS` slots, from which connect4/6 draw one at random. See
//! `BackendsV2` for why a weighted table and not Maglev.

use std::hash::{Hash as _, Hasher as _};

use switchyard_common::{BackendsV2, MAX_BACKENDS, SockAddrV1, TABLE_SLOTS};

use crate::balance::Weighted;

/// The table for `endpoints` (sorted by address, so equal input encodes equally). An
/// endpoint on trial gets one slot, the least the table can give it (a pick gives it one
/// connection at a time); every other endpoint at least one, the rest by largest
/// remainder on its share. More than `MAX_BACKENDS` endpoints: the table keeps a subset
/// chosen by weighted rendezvous hashing on `node` (each node keeps a different one, so
/// every endpoint is in some nodes' tables, in proportion to its share).
pub fn encode(endpoints: &[Weighted], node: &str) -> BackendsV2 {
    let mut value = BackendsV2::default();
    let mut kept: Vec<Weighted> = endpoints.iter().filter(|w| w.share.is_finite() && w.share > 0.0).copied().collect();
    if kept.is_empty() {
        return value;
    }
    if kept.len() > MAX_BACKENDS {
        let score = |w: &Weighted| -> f64 {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (node, w.addr).hash(&mut h);
            // A uniform draw in (0, 1) per (node, endpoint); the highest share/-ln(u) win,
            // which keeps an endpoint with probability growing with its share.
            let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            w.share / -u.ln()
        };
        kept.sort_by(|a, b| score(b).total_cmp(&score(a)));
        kept.truncate(MAX_BACKENDS);
        kept.sort_by_key(|w| w.addr);
    }
    let slots = slot_counts(&kept);
    let mut next = 0;
    for (i, (w, n)) in kept.iter().zip(slots).enumerate() {
        value.addrs[i] = SockAddrV1::from(w.addr);
        value.table[next..next + n].fill(i as u8);
        next += n;
    }
    debug_assert_eq!(next, TABLE_SLOTS);
    value.count = kept.len() as u32;
    value
}

/// Slots per endpoint, summing to `TABLE_SLOTS`.
fn slot_counts(kept: &[Weighted]) -> Vec<usize> {
    // Trials keep one slot, unless every endpoint is on trial (then shares decide).
    let all_trial = kept.iter().all(|w| w.trial);
    let trial = |w: &Weighted| w.trial && !all_trial;
    let mut slots: Vec<usize> = vec![1; kept.len()];
    let spare = TABLE_SLOTS - kept.len();
    // Shares relative to the largest: a sum or product of large finite shares would
    // overflow to infinity and give one endpoint usize::MAX slots (found by
    // fuzz/fuzz_targets/map_encoding.rs).
    let max = kept.iter().filter(|w| !trial(w)).map(|w| w.share).fold(0.0, f64::max);
    let relative = |w: &Weighted| w.share / max;
    let total: f64 = kept.iter().filter(|w| !trial(w)).map(relative).sum();
    let quota: Vec<f64> =
        kept.iter().map(|w| if trial(w) { 0.0 } else { spare as f64 * relative(w) / total }).collect();
    for (s, q) in slots.iter_mut().zip(&quota) {
        *s += q.floor() as usize;
    }
    let mut left = TABLE_SLOTS - slots.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..kept.len()).filter(|&i| !trial(&kept[i])).collect();
    by_remainder.sort_by(|&a, &b| (quota[b] - quota[b].floor()).total_cmp(&(quota[a] - quota[a].floor())));
    for &i in by_remainder.iter().cycle() {
        if left == 0 {
            break;
        }
        slots[i] += 1;
        left -= 1;
    }
    slots
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::SocketAddr};

    use super::*;

    fn ep(i: u32, share: f64) -> Weighted {
        Weighted { addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 80)), share, trial: false }
    }

    fn slots_of(v: &BackendsV2, i: usize) -> usize {
        v.table.iter().filter(|&&s| s as usize == i).count()
    }

    #[test]
    fn slots_follow_shares_and_fill_the_table() {
        let v = encode(&[ep(1, 3.0), ep(2, 1.0)], "n");
        assert_eq!(v.count, 2);
        assert_eq!(v.addrs[0], SockAddrV1::from(ep(1, 0.0).addr));
        assert_eq!((slots_of(&v, 0), slots_of(&v, 1)), (768, 256));
        // A tiny share still gets a slot; the rest stay in proportion within a slot.
        let v = encode(&[ep(1, 0.9999), ep(2, 0.0001), ep(3, 0.0)], "n");
        assert_eq!(v.count, 2, "a zero share is no endpoint");
        assert_eq!((slots_of(&v, 0), slots_of(&v, 1)), (1023, 1));
        let thirds = encode(&[ep(1, 1.0), ep(2, 1.0), ep(3, 1.0)], "n");
        let n: Vec<usize> = (0..3).map(|i| slots_of(&thirds, i)).collect();
        assert_eq!(n.iter().sum::<usize>(), TABLE_SLOTS);
        assert!(n.iter().all(|&k| (341..=342).contains(&k)), "{n:?}");
        assert!(thirds.table.iter().all(|&s| s < 3), "every slot names a kept endpoint");
    }

    #[test]
    fn a_trial_gets_one_slot_unless_all_are_on_trial() {
        let t = |i, s| Weighted { trial: true, ..ep(i, s) };
        let v = encode(&[ep(1, 1.0), t(2, 1.0)], "n");
        assert_eq!((slots_of(&v, 0), slots_of(&v, 1)), (1023, 1));
        let v = encode(&[t(1, 1.0), t(2, 1.0)], "n");
        assert_eq!((slots_of(&v, 0), slots_of(&v, 1)), (512, 512));
    }

    #[test]
    fn huge_shares_are_shares_like_any_other() {
        // Once spare * share overflowed to infinity and the slot count with it.
        let v = encode(&[ep(1, f64::MAX), ep(2, f64::MAX / 4.0)], "n");
        assert_eq!(v, encode(&[ep(1, 4.0), ep(2, 1.0)], "n"));
        assert_eq!((slots_of(&v, 0), slots_of(&v, 1)), (819, 205));
        let v = encode(&[ep(1, 1e308)], "n");
        assert_eq!(slots_of(&v, 0), TABLE_SLOTS);
    }

    #[test]
    fn nothing_to_send_to_is_an_empty_table() {
        assert_eq!(encode(&[], "n"), BackendsV2::default());
        assert_eq!(encode(&[ep(1, 0.0), ep(2, f64::NAN)], "n").count, 0);
    }

    #[test]
    fn past_the_limit_each_node_keeps_its_own_stable_subset_and_all_are_covered() {
        let eps: Vec<Weighted> = (0..200).map(|i| ep(i, 1.0)).collect();
        let kept = |node: &str| -> HashSet<SockAddrV1> {
            let v = encode(&eps, node);
            assert_eq!(v.count as usize, MAX_BACKENDS);
            v.addrs.iter().copied().collect()
        };
        assert_eq!(kept("a"), kept("a"), "stable for one node");
        assert_ne!(kept("a"), kept("b"), "another node, another subset");
        let covered: HashSet<SockAddrV1> = (0..40).flat_map(|n| kept(&format!("node-{n}"))).collect();
        assert_eq!(covered.len(), 200, "every endpoint is in some node's table");
        // A heavier endpoint is kept by more nodes.
        let mut heavy = eps.clone();
        heavy[7].share = 20.0;
        let addr = SockAddrV1::from(heavy[7].addr);
        let nodes = (0..40).filter(|n| encode(&heavy, &format!("node-{n}")).addrs.contains(&addr)).count();
        assert!(nodes >= 38, "kept by {nodes} of 40 nodes");
    }
}
