//! Retry budget (Finagle's `RetryBudget`, linkerd's `retry_budget`): retries may add
//! `ratio` of the requests seen in the last `window`, plus `min_per_second` so a quiet
//! service can still retry. When every endpoint fails, clients see the failures instead
//! of the agent multiplying the load on a service that is already down.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Requests and retries in one-second slots over the window.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_second: u32,
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// (requests, retries) per second, ring indexed by second since `epoch`.
    counts: Vec<(u64, u64)>,
    epoch: Instant,
    /// The last second written; slots between it and now are stale and get cleared.
    current: u64,
}

impl Budget {
    pub fn new(ratio: f64, min_per_second: u32, window: Duration, now: Instant) -> Self {
        let seconds = window.as_secs().max(1) as usize;
        Self {
            ratio,
            min_per_second,
            slots: Mutex::new(Slots { counts: vec![(0, 0); seconds], epoch: now, current: 0 }),
        }
    }

    /// Count a request (its first attempt).
    pub fn deposit(&self, now: Instant) {
        self.slots.lock().unwrap().at(now).0 += 1;
    }

    /// Take a retry out of the budget if there is one left.
    pub fn withdraw(&self, now: Instant) -> bool {
        let mut slots = self.slots.lock().unwrap();
        slots.at(now);
        let (requests, retries) = slots.counts.iter().fold((0, 0), |(a, b), (r, t)| (a + r, b + t));
        let window = slots.counts.len() as f64;
        let allowed = self.ratio * requests as f64 + self.min_per_second as f64 * window;
        if (retries as f64) < allowed {
            slots.at(now).1 += 1;
            true
        } else {
            false
        }
    }
}

impl Slots {
    /// The slot for `now`, after clearing every slot that fell out of the window.
    fn at(&mut self, now: Instant) -> &mut (u64, u64) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let n = self.counts.len() as u64;
        if second > self.current {
            for s in (self.current + 1)..=second.min(self.current + n) {
                self.counts[(s % n) as usize] = (0, 0);
            }
            self.current = second;
        }
        &mut self.counts[(self.current % n) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor() {
        let t0 = Instant::now();
        // 20% of requests, no floor.
        let b = Budget::new(0.2, 0, Duration::from_secs(10), t0);
        for _ in 0..100 {
            b.deposit(t0);
        }
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn the_floor_lets_a_quiet_service_retry() {
        let t0 = Instant::now();
        let b = Budget::new(0.2, 1, Duration::from_secs(10), t0);
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 10, "1 per second over a 10 s window");
    }

    #[test]
    fn old_requests_and_retries_leave_the_window() {
        let t0 = Instant::now();
        let b = Budget::new(0.5, 0, Duration::from_secs(2), t0);
        for _ in 0..10 {
            b.deposit(t0);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(t0)).count(), 5);
        // Three seconds on, the window holds nothing: no requests, so no retries...
        let later = t0 + Duration::from_secs(3);
        assert!(!b.withdraw(later));
        // ...until new requests come.
        for _ in 0..4 {
            b.deposit(later);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(later)).count(), 2);
    }
}
