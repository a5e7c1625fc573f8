//! Consistent-hash ring (ketama style) for session affinity. Each endpoint owns
//! `VNODES_PER_WEIGHT * weight` points; a client hashes to a point and takes the first
//! endpoint at or after it that is eligible. An endpoint leaving (or being skipped while
//! unhealthy) moves only the clients that were on it, to their next point.

use std::hash::{DefaultHasher, Hash, Hasher};

/// Points per unit of weight: enough for an even spread over a handful of endpoints.
const VNODES_PER_WEIGHT: u32 = 160;
/// Weight is capped so one endpoint cannot blow up the ring's size.
const MAX_WEIGHT: u32 = 64;

#[derive(Debug, Default)]
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

/// A stable 64-bit hash (SipHash with fixed keys: the same in every agent process).
pub fn hash(value: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

impl Ring {
    /// `endpoints`: (identity, weight) by index; the identity is what a point hashes.
    pub fn new<K: Hash>(endpoints: impl IntoIterator<Item = (K, u32)>) -> Self {
        let mut points = Vec::new();
        for (i, (key, weight)) in endpoints.into_iter().enumerate() {
            for v in 0..VNODES_PER_WEIGHT * weight.clamp(1, MAX_WEIGHT) {
                points.push((hash((&key, v)), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The first endpoint index at or after `key` on the ring for which `eligible` holds.
    pub fn pick(&self, key: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.points.partition_point(|&(p, _)| p < key);
        let n = self.points.len();
        (0..n).map(|k| self.points[(start + k) % n].1).find(|&i| eligible(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(ring: &Ring, eligible: impl Fn(usize) -> bool + Copy) -> Vec<usize> {
        (0..2000u64).map(|c| ring.pick(hash(c), eligible).unwrap()).collect()
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_clients() {
        let ring = Ring::new(["a", "b", "c", "d"].map(|k| (k, 1)));
        let before = owners(&ring, |_| true);
        let after = owners(&ring, |i| i != 2);
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "a client not on the removed endpoint moved");
            } else {
                assert_ne!(*a, 2);
            }
        }
        // The spread is even enough to matter: every endpoint has 15-35% of clients.
        for e in 0..4 {
            let share = before.iter().filter(|&&o| o == e).count() as f64 / before.len() as f64;
            assert!((0.15..0.35).contains(&share), "endpoint {e} has {share}");
        }
    }

    #[test]
    fn weights_scale_the_share() {
        let ring = Ring::new([("a", 3), ("b", 1)]);
        let o = owners(&ring, |_| true);
        let share_a = o.iter().filter(|&&e| e == 0).count() as f64 / o.len() as f64;
        assert!((0.65..0.85).contains(&share_a), "weight 3 of 4 got {share_a}");
    }

    #[test]
    fn nothing_eligible_means_none() {
        assert_eq!(Ring::new([("a", 1)]).pick(7, |_| false), None);
        assert_eq!(Ring::default().pick(7, |_| true), None);
    }
}
