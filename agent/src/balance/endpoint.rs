//! One endpoint of a service: its address and locality from config, and the live state
//! (load, latency estimate, health, drain) that survives config reloads.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::health::{Avail, Change, Health};
use crate::config::FailureAccrualConfig;

/// Where an endpoint runs, relative to this node: lower is nearer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Same zone (or no zones configured).
    Local = 0,
    /// Same region, another zone.
    Region = 1,
    /// Another region, or unknown.
    Remote = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Local, Tier::Region, Tier::Remote];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Region => "region",
            Tier::Remote => "remote",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub node: Option<String>,
    pub tier: Tier,
    pub terminating: bool,
    pub state: Arc<EndpointState>,
}

/// Default connect-latency estimate for an endpoint never measured: a LAN round trip,
/// so a new endpoint is neither flooded nor starved before its first sample.
const DEFAULT_RTT: Duration = Duration::from_micros(250);
/// How fast old latency samples lose weight (linkerd2-proxy uses 10 s too).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Peak-sensitive EWMA of connect latency (Finagle / linkerd): a slower sample replaces
/// the estimate at once, a faster one is blended in, so an endpoint that turns slow is
/// avoided immediately and forgiven gradually.
#[derive(Debug)]
struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }
}

/// Live state shared by every snapshot that lists the endpoint.
#[derive(Debug)]
pub struct EndpointState {
    /// Connections open or being opened to it.
    active: AtomicU32,
    ewma: Mutex<PeakEwma>,
    health: Mutex<Health>,
    drain: Mutex<Drain>,
    pub connects_ok: AtomicU64,
    pub connects_failed: AtomicU64,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self {
            active: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma { estimate_ns: DEFAULT_RTT.as_nanos() as f64, stamp: Instant::now() }),
            health: Mutex::new(Health::default()),
            drain: Mutex::new(Drain::default()),
            connects_ok: AtomicU64::new(0),
            connects_failed: AtomicU64::new(0),
        }
    }
}

/// Counts one connection against the endpoint for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Start counting a connection (attempt) against this endpoint.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(self))
    }

    /// Load estimate for p2c: latency estimate times (open connections + 1).
    pub fn cost(&self) -> f64 {
        let ewma = self.ewma.lock().unwrap().estimate_ns;
        ewma * (self.active() as f64 + 1.0)
    }

    pub fn availability(&self, now: Instant) -> Avail {
        self.health.lock().unwrap().availability(now)
    }

    pub fn claim_trial(&self, now: Instant) -> bool {
        self.health.lock().unwrap().claim_trial(now)
    }

    pub fn on_connect_ok(&self, latency: Duration, now: Instant) -> Change {
        self.connects_ok.fetch_add(1, Ordering::Relaxed);
        self.ewma.lock().unwrap().observe(latency, now);
        self.health.lock().unwrap().on_success()
    }

    pub fn on_connect_failed(&self, now: Instant, cfg: &FailureAccrualConfig) -> Change {
        self.connects_failed.fetch_add(1, Ordering::Relaxed);
        self.health.lock().unwrap().on_failure(now, cfg, fastrand::f64())
    }

    pub fn on_check(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.health.lock().unwrap().on_check(ok, rise, fall)
    }

    pub fn checked_healthy(&self) -> bool {
        self.health.lock().unwrap().checked_healthy()
    }

    /// Token a connection watches: cancelled when this endpoint's drain deadline passes.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.lock().unwrap().token.clone()
    }

    /// Mark draining (removed or terminating). On the transition, returns the generation
    /// to hand to [`EndpointState::cut_if_still_draining`] when the deadline passes.
    pub fn start_draining(&self) -> Option<u64> {
        let mut d = self.drain.lock().unwrap();
        if d.draining {
            return None;
        }
        d.draining = true;
        d.generation += 1;
        Some(d.generation)
    }

    /// Back in service: a pending deadline no longer cuts anything.
    pub fn stop_draining(&self) {
        let mut d = self.drain.lock().unwrap();
        d.draining = false;
        d.generation += 1;
        if d.token.is_cancelled() {
            d.token = CancellationToken::new();
        }
    }

    /// The drain deadline of `generation` passed: cut open connections, unless the
    /// endpoint came back (or came back and left again) in the meantime.
    pub fn cut_if_still_draining(&self, generation: u64) {
        let d = self.drain.lock().unwrap();
        if d.draining && d.generation == generation {
            d.token.cancel();
        }
    }
}

/// Drain bookkeeping: the token is shared by every connection to the endpoint and only
/// replaced once cancelled, so connections from before a brief return are still cut.
#[derive(Debug, Default)]
struct Drain {
    draining: bool,
    generation: u64,
    token: CancellationToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma { estimate_ns: 1000.0, stamp: t0 };
        e.observe(Duration::from_nanos(5000), t0);
        assert_eq!(e.estimate_ns, 5000.0, "a slower sample is taken at once");
        e.observe(Duration::from_nanos(1000), t0 + EWMA_DECAY);
        // One decay period later the old estimate keeps weight 1/e.
        let expected = 5000.0 / std::f64::consts::E + 1000.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e.estimate_ns - expected).abs() < 1.0, "{} vs {expected}", e.estimate_ns);
    }

    #[test]
    fn cost_grows_with_open_connections_and_guards_release_them() {
        let s = Arc::new(EndpointState::default());
        let base = s.cost();
        let g1 = s.begin();
        let g2 = s.begin();
        assert_eq!(s.active(), 2);
        assert!((s.cost() - 3.0 * base).abs() < 1e-6);
        drop((g1, g2));
        assert_eq!(s.active(), 0);
    }

    #[test]
    fn draining_cuts_only_if_still_draining_at_the_deadline() {
        let s = EndpointState::default();
        let first = s.start_draining().expect("transition");
        assert_eq!(s.start_draining(), None, "already draining");
        let token = s.drain_token();
        s.stop_draining();
        s.cut_if_still_draining(first);
        assert!(!token.is_cancelled(), "the endpoint came back before the deadline");
        let second = s.start_draining().expect("transition");
        s.cut_if_still_draining(first);
        assert!(!token.is_cancelled(), "a stale deadline cuts nothing");
        s.cut_if_still_draining(second);
        assert!(token.is_cancelled(), "connections from before the return are cut too");
        s.stop_draining();
        assert!(!s.drain_token().is_cancelled(), "new connections get a fresh token");
    }
}
