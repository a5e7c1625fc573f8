//! Endpoint choice. Round robin for now; the policies that weigh load and health replace
//! it behind the same `pick`.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

/// Lock-free round robin: each pick takes the next endpoint in order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn pick(&self, endpoints: &[SocketAddr]) -> Option<SocketAddr> {
        if endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(endpoints[i % endpoints.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_through_every_endpoint_evenly() {
        let eps: Vec<SocketAddr> =
            ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"].iter().map(|s| s.parse().unwrap()).collect();
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..9).map(|_| rr.pick(&eps).unwrap()).collect();
        for ep in &eps {
            assert_eq!(picks.iter().filter(|p| *p == ep).count(), 3);
        }
        assert_eq!(&picks[..3], &eps[..]);
        assert_eq!(rr.pick(&[]), None);
    }
}
