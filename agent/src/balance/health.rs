//! Health of one endpoint: passive failure accrual (ejection with jittered exponential
//! back-off, then one trial connection before full return) and the verdict of active
//! checks (rise/fall). Pure state machine, clocked by the caller's `now`.

use std::time::{Duration, Instant};

use crate::config::FailureAccrualConfig;

/// Whether an endpoint may take a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avail {
    Healthy,
    /// Back-off over: the next connection is a trial, and only one at a time.
    Trial,
    /// Ejected, its trial in flight, or failed by active checks.
    Out,
}

#[derive(Debug)]
pub struct Health {
    consecutive_failures: u32,
    /// Ejections since the last success: the back-off exponent.
    ejections: u32,
    ejected_until: Option<Instant>,
    trial_in_flight: bool,
    /// Active checks' verdict (true when there are none).
    checked_healthy: bool,
    /// Consecutive check results agreeing with each other, towards rise or fall.
    check_streak: u32,
    last_check_ok: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            trial_in_flight: false,
            checked_healthy: true,
            check_streak: 0,
            last_check_ok: true,
        }
    }
}

/// What a connect outcome changed, for logging by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    Ejected(Duration),
    Returned,
}

impl Health {
    pub fn availability(&self, now: Instant) -> Avail {
        if !self.checked_healthy {
            return Avail::Out;
        }
        match self.ejected_until {
            None => Avail::Healthy,
            Some(until) if now < until || self.trial_in_flight => Avail::Out,
            Some(_) => Avail::Trial,
        }
    }

    /// Take the single trial slot; false if the endpoint is not in trial or it is taken.
    pub fn claim_trial(&mut self, now: Instant) -> bool {
        if self.availability(now) != Avail::Trial {
            return false;
        }
        self.trial_in_flight = true;
        true
    }

    pub fn on_success(&mut self) -> Change {
        self.consecutive_failures = 0;
        let was_ejected = self.ejected_until.take().is_some();
        self.trial_in_flight = false;
        self.ejections = 0;
        if was_ejected { Change::Returned } else { Change::None }
    }

    pub fn on_failure(&mut self, now: Instant, cfg: &FailureAccrualConfig, jitter: f64) -> Change {
        self.consecutive_failures += 1;
        let failed_trial = std::mem::take(&mut self.trial_in_flight);
        if self.is_ejected(now) || !(failed_trial || self.consecutive_failures >= cfg.consecutive_failures) {
            return Change::None;
        }
        self.ejections += 1;
        let exp = cfg.base_ejection.saturating_mul(1u32 << (self.ejections - 1).min(16));
        // jitter in [0, 1): spread returns by +-25% so ejected endpoints do not come back
        // in lock-step.
        let backoff = exp.min(cfg.max_ejection).mul_f64(0.75 + jitter * 0.5);
        self.ejected_until = Some(now + backoff);
        Change::Ejected(backoff)
    }

    /// Feed one active check result; returns the new verdict when it changed.
    pub fn on_check(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.last_check_ok {
            self.check_streak += 1;
        } else {
            self.last_check_ok = ok;
            self.check_streak = 1;
        }
        let flip =
            if self.checked_healthy { !ok && self.check_streak >= fall } else { ok && self.check_streak >= rise };
        if flip {
            self.checked_healthy = ok;
            Some(ok)
        } else {
            None
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    pub fn checked_healthy(&self) -> bool {
        self.checked_healthy
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    pub fn trial_in_flight(&self) -> bool {
        self.trial_in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FailureAccrualConfig {
        FailureAccrualConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_and_returns_through_one_trial() {
        let (mut h, t0) = (Health::default(), Instant::now());
        assert_eq!(h.on_failure(t0, &cfg(), 0.5), Change::None);
        assert_eq!(h.on_failure(t0, &cfg(), 0.5), Change::None);
        assert_eq!(h.on_failure(t0, &cfg(), 0.5), Change::Ejected(Duration::from_secs(1)));
        assert_eq!(h.availability(t0), Avail::Out);
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(h.availability(later), Avail::Trial);
        assert!(h.claim_trial(later));
        assert!(!h.claim_trial(later), "only one trial at a time");
        assert_eq!(h.availability(later), Avail::Out);
        assert_eq!(h.on_success(), Change::Returned);
        assert_eq!(h.availability(later), Avail::Healthy);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let (mut h, t0) = (Health::default(), Instant::now());
        h.on_failure(t0, &cfg(), 0.5);
        h.on_failure(t0, &cfg(), 0.5);
        h.on_success();
        assert_eq!(h.on_failure(t0, &cfg(), 0.5), Change::None);
        assert_eq!(h.availability(t0), Avail::Healthy);
    }

    #[test]
    fn failed_trials_double_the_back_off_up_to_the_cap_with_jitter() {
        let (mut h, mut now) = (Health::default(), Instant::now());
        for _ in 0..3 {
            h.on_failure(now, &cfg(), 0.5);
        }
        let mut backoffs = vec![];
        for _ in 0..5 {
            now += Duration::from_secs(10);
            assert!(h.claim_trial(now));
            match h.on_failure(now, &cfg(), 0.5) {
                Change::Ejected(d) => backoffs.push(d.as_secs()),
                other => panic!("trial failure must eject again, got {other:?}"),
            }
        }
        assert_eq!(backoffs, [2, 4, 5, 5, 5]);
        // Jitter spreads one step over [0.75, 1.25) of it.
        let mut h = Health::default();
        for _ in 0..3 {
            h.on_failure(now, &cfg(), 0.0);
        }
        assert_eq!(h.ejected_until, Some(now + Duration::from_millis(750)));
    }

    #[test]
    fn active_checks_need_fall_failures_to_fail_and_rise_successes_to_return() {
        let mut h = Health::default();
        assert_eq!(h.on_check(false, 2, 3), None);
        assert_eq!(h.on_check(false, 2, 3), None);
        assert_eq!(h.on_check(true, 2, 3), None, "a success breaks the streak");
        assert_eq!(h.on_check(false, 2, 3), None);
        assert_eq!(h.on_check(false, 2, 3), None);
        assert_eq!(h.on_check(false, 2, 3), Some(false));
        assert_eq!(h.availability(Instant::now()), Avail::Out);
        assert_eq!(h.on_check(true, 2, 3), None);
        assert_eq!(h.on_check(true, 2, 3), Some(true));
        assert_eq!(h.availability(Instant::now()), Avail::Healthy);
    }
}
