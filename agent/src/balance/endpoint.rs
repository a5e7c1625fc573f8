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
use crate::config::{FailureAccrualConfig, Place};

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
    /// Shared with the config (a cluster has 100,000 endpoints on a few hundred nodes).
    pub place: Option<Arc<Place>>,
    pub tier: Tier,
    pub terminating: bool,
    pub state: Arc<EndpointState>,
}

/// Counts changes of any endpoint's availability, so that whoever follows availability
/// (the kernel's tables) looks at every endpoint only after something changed.
static AVAIL_EPOCH: AtomicU64 = AtomicU64::new(0);

/// See [`AVAIL_EPOCH`].
pub fn availability_epoch() -> u64 {
    AVAIL_EPOCH.load(Ordering::Relaxed)
}

/// The finest latency p2c tells apart: a faster sample counts as this. Below a
/// millisecond the differences between endpoints on one network are the node's
/// scheduling noise (a busy 2-core CI machine showed 100 µs and 800 µs connects to the
/// same veth peer), and a peak-sensitive estimate takes such an outlier at once: one
/// unlucky connect made an endpoint lose every pairing. Between equals, load (open
/// connections) decides, which is what matters there.
pub const RTT_FLOOR: Duration = Duration::from_millis(1);
/// Estimate for an endpoint never measured: the floor, what a nearby endpoint measures,
/// so a new endpoint is neither flooded nor starved before its first sample.
const DEFAULT_RTT: Duration = RTT_FLOOR;
/// How fast old latency samples lose weight (linkerd2-proxy uses 10 s too).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Peak-sensitive EWMA of connect latency (Finagle / linkerd): a slower sample replaces
/// the estimate at once, a faster one is blended in, so an endpoint that turns slow is
/// avoided immediately and forgiven gradually.
#[derive(Debug)]
struct PeakEwma {
    estimate_ns: f64,
    /// When the last sample came, as [`nanos`] (8 bytes, an `Instant` 16: there is one
    /// of these per input per endpoint, 100,000 endpoints in a large cluster).
    stamp_ns: u64,
}

impl PeakEwma {
    fn new(estimate_ns: f64, now: Instant) -> Self {
        Self { estimate_ns, stamp_ns: nanos(now) }
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.max(RTT_FLOOR).as_nanos() as f64;
        let current = self.decayed(now);
        if rtt > current {
            self.estimate_ns = rtt;
        } else {
            let w = decay(self.since(now));
            self.estimate_ns = current * w + rtt * (1.0 - w);
        }
        self.stamp_ns = nanos(now);
    }

    /// The estimate at `now` as p2c reads it: decayed toward zero since the last sample.
    fn decayed(&self, now: Instant) -> f64 {
        self.estimate_ns * decay(self.since(now))
    }

    fn since(&self, now: Instant) -> Duration {
        Duration::from_nanos(nanos(now).saturating_sub(self.stamp_ns))
    }
}

/// The two latency inputs, under one lock (they are read together).
#[derive(Debug)]
struct Latency {
    connect: PeakEwma,
    response: PeakEwma,
}

/// How much of an estimate is left after `idle` without a sample.
fn decay(idle: Duration) -> f64 {
    (-(idle.as_nanos() as f64) / EWMA_DECAY.as_nanos() as f64).exp()
}

/// Live state shared by every snapshot that lists the endpoint.
///
/// Written under locks, read without: every pick reads the availability and cost of
/// several endpoints, so each mutation publishes what picks need (`avail`, the latency
/// estimates) in atomics, and a pick takes no lock (linkerd2-proxy and Envoy keep their
/// balancers lock-free on the read side for the same reason).
#[derive(Debug)]
pub struct EndpointState {
    /// Connections open or being opened to it.
    active: AtomicU32,
    /// Connect latency (every endpoint has it) and response latency (HTTP only): two
    /// inputs, so a slow response never reads as a slow connect or the reverse.
    latency: Mutex<Latency>,
    /// The larger of the two estimates, as f64 bits, and when it was last updated
    /// ([`nanos`]): what p2c weighs, decayed by the time since.
    estimate: AtomicU64,
    estimate_stamp: AtomicU64,
    health: Mutex<Health>,
    /// `Health` as picks see it, see [`Summary`].
    avail: AtomicU64,
    drain: Mutex<Drain>,
    pub connects_ok: AtomicU64,
    pub connects_failed: AtomicU64,
    pub responses_ok: AtomicU64,
    pub responses_failed: AtomicU64,
}

impl Default for EndpointState {
    fn default() -> Self {
        let now = Instant::now();
        let rtt = DEFAULT_RTT.as_nanos() as f64;
        Self {
            active: AtomicU32::new(0),
            latency: Mutex::new(Latency {
                connect: PeakEwma::new(rtt, now),
                // No response seen yet: zero, so the connect estimate decides.
                response: PeakEwma::new(0.0, now),
            }),
            estimate: AtomicU64::new(rtt.to_bits()),
            estimate_stamp: AtomicU64::new(nanos(now)),
            health: Mutex::new(Health::default()),
            avail: AtomicU64::new(0),
            drain: Mutex::new(Drain::default()),
            connects_ok: AtomicU64::new(0),
            connects_failed: AtomicU64::new(0),
            responses_ok: AtomicU64::new(0),
            responses_failed: AtomicU64::new(0),
        }
    }
}

/// `Health` packed into one word for lock-free reads: the active checks' verdict, the
/// trial in flight, and the end of the ejection in nanoseconds since [`epoch`] (0: not
/// ejected).
struct Summary;

impl Summary {
    const CHECKED_OUT: u64 = 1 << 63;
    const TRIAL: u64 = 1 << 62;
    const UNTIL: u64 = (1 << 62) - 1;

    fn pack(h: &Health) -> u64 {
        let mut word = h.ejected_until().map_or(0, |until| nanos(until).max(1) & Self::UNTIL);
        if !h.checked_healthy() {
            word |= Self::CHECKED_OUT;
        }
        if h.trial_in_flight() {
            word |= Self::TRIAL;
        }
        word
    }

    /// The same answer as `Health::availability`.
    fn availability(word: u64, now_ns: impl FnOnce() -> u64) -> Avail {
        if word & Self::CHECKED_OUT != 0 {
            return Avail::Out;
        }
        match word & Self::UNTIL {
            0 => Avail::Healthy,
            _ if word & Self::TRIAL != 0 => Avail::Out,
            until if now_ns() < until => Avail::Out,
            _ => Avail::Trial,
        }
    }
}

/// The process's reference point for [`nanos`].
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` as nanoseconds since [`epoch`], the clock picks compare with.
pub fn nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
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

    /// Load estimate for p2c at `now_ns` ([`nanos`]): latency estimate times (open
    /// connections + 1). The estimate decays toward zero while no sample comes (as
    /// tower's PeakEwma does on every read): p2c stops picking an endpoint whose one
    /// sample was slow, so without the decay nothing would ever correct that sample and
    /// one scheduling hiccup could starve an endpoint for good.
    pub fn cost(&self, now_ns: u64) -> f64 {
        let idle = Duration::from_nanos(now_ns.saturating_sub(self.estimate_stamp.load(Ordering::Relaxed)));
        f64::from_bits(self.estimate.load(Ordering::Relaxed)) * decay(idle) * (self.active() as f64 + 1.0)
    }

    pub fn availability(&self, now: Instant) -> Avail {
        self.availability_with(|| nanos(now))
    }

    /// [`EndpointState::availability`] with the time asked for only when it matters (an
    /// ejected endpoint): what a pick reads, one atomic load for a healthy endpoint.
    pub fn availability_with(&self, now_ns: impl FnOnce() -> u64) -> Avail {
        Summary::availability(self.avail.load(Ordering::Acquire), now_ns)
    }

    pub fn claim_trial(&self, now: Instant) -> bool {
        self.with_health(|h| h.claim_trial(now))
    }

    /// A connect to the endpoint worked.
    pub fn on_connect_ok(&self, latency: Duration, now: Instant) -> Change {
        self.connects_ok.fetch_add(1, Ordering::Relaxed);
        self.observe(|l| &mut l.connect, latency, now);
        self.with_health(Health::on_success)
    }

    /// A connect to the endpoint was refused, unreachable or timed out.
    pub fn on_connect_failed(&self, now: Instant, cfg: &FailureAccrualConfig) -> Change {
        self.connects_failed.fetch_add(1, Ordering::Relaxed);
        self.with_health(|h| h.on_failure(now, cfg, fastrand::f64()))
    }

    /// An HTTP response came back acceptable, `latency` after the request went out.
    pub fn on_response_ok(&self, latency: Duration, now: Instant) -> Change {
        self.responses_ok.fetch_add(1, Ordering::Relaxed);
        self.observe(|l| &mut l.response, latency, now);
        self.with_health(Health::on_success)
    }

    /// An HTTP exchange failed on the endpoint's side: a 5xx or retryable status, no
    /// response in time, or the connection broke. Counts towards ejection as a failed
    /// connect does.
    pub fn on_response_failed(&self, now: Instant, cfg: &FailureAccrualConfig) -> Change {
        self.responses_failed.fetch_add(1, Ordering::Relaxed);
        self.with_health(|h| h.on_failure(now, cfg, fastrand::f64()))
    }

    pub fn on_check(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.with_health(|h| h.on_check(ok, rise, fall))
    }

    /// Change health under its lock and publish the result for lock-free picks.
    fn with_health<T>(&self, f: impl FnOnce(&mut Health) -> T) -> T {
        let mut h = self.health.lock().unwrap();
        let out = f(&mut h);
        let word = Summary::pack(&h);
        if self.avail.swap(word, Ordering::Release) != word {
            AVAIL_EPOCH.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn observe(&self, input: impl FnOnce(&mut Latency) -> &mut PeakEwma, latency: Duration, now: Instant) {
        let mut l = self.latency.lock().unwrap();
        input(&mut l).observe(latency, now);
        // Each input decayed to now, so the published value decays on from here exactly
        // as the larger of the two would.
        let estimate = l.connect.decayed(now).max(l.response.decayed(now));
        self.estimate.store(estimate.to_bits(), Ordering::Relaxed);
        self.estimate_stamp.store(nanos(now), Ordering::Relaxed);
    }

    pub fn checked_healthy(&self) -> bool {
        self.avail.load(Ordering::Acquire) & Summary::CHECKED_OUT == 0
    }

    /// Token a connection watches: cancelled when this endpoint's drain deadline passes.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.lock().unwrap().token.get_or_insert_with(CancellationToken::new).clone()
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
        if d.token.as_ref().is_some_and(CancellationToken::is_cancelled) {
            d.token = None;
        }
    }

    /// The drain deadline of `generation` passed: cut open connections, unless the
    /// endpoint came back (or came back and left again) in the meantime.
    pub fn cut_if_still_draining(&self, generation: u64) {
        let d = self.drain.lock().unwrap();
        if d.draining
            && d.generation == generation
            && let Some(t) = &d.token
        {
            t.cancel();
        }
    }
}

/// Drain bookkeeping: the token is shared by every connection to the endpoint and only
/// replaced once cancelled, so connections from before a brief return are still cut.
#[derive(Debug, Default)]
struct Drain {
    draining: bool,
    generation: u64,
    /// Made when the first connection asks for it: most of a cluster's endpoints never
    /// see one from this node, and a token is an allocation.
    token: Option<CancellationToken>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let ms = |n: f64| n * 1e6;
        // The clock's epoch before t0, so that t0 and later times map to it exactly.
        nanos(Instant::now());
        let t0 = Instant::now();
        let mut e = PeakEwma::new(ms(2.0), t0);
        e.observe(Duration::from_millis(10), t0);
        assert_eq!(e.estimate_ns, ms(10.0), "a slower sample is taken at once");
        e.observe(Duration::from_millis(2), t0 + EWMA_DECAY);
        // One decay period later the old estimate has decayed to 1/e and keeps weight 1/e.
        let e1 = 1.0 / std::f64::consts::E;
        let expected = ms(10.0) * e1 * e1 + ms(2.0) * (1.0 - e1);
        assert!((e.estimate_ns - expected).abs() < 1.0, "{} vs {expected}", e.estimate_ns);
    }

    #[test]
    fn latency_below_the_floor_is_not_told_apart() {
        let (fast, jittery) = (EndpointState::default(), EndpointState::default());
        let now = Instant::now();
        fast.on_connect_ok(Duration::from_micros(90), now);
        jittery.on_connect_ok(Duration::from_micros(800), now);
        assert_eq!(fast.cost(nanos(now)), jittery.cost(nanos(now)));
        assert_eq!(fast.cost(nanos(now)), RTT_FLOOR.as_nanos() as f64);
    }

    #[test]
    fn a_slow_sample_nothing_corrects_fades_with_time() {
        let s = EndpointState::default();
        let t0 = Instant::now();
        s.on_connect_ok(Duration::from_millis(1), t0);
        let at = |d: Duration| s.cost(nanos(t0 + d));
        assert_eq!(at(Duration::ZERO), 1e6);
        let later = at(EWMA_DECAY);
        assert!((later - 1e6 / std::f64::consts::E).abs() < 1.0, "{later}");
        assert!(at(EWMA_DECAY * 5) < DEFAULT_RTT.as_nanos() as f64, "after a while it is worth a try again");
    }

    #[test]
    fn cost_grows_with_open_connections_and_guards_release_them() {
        let s = Arc::new(EndpointState::default());
        let now = nanos(Instant::now());
        let base = s.cost(now);
        let g1 = s.begin();
        let g2 = s.begin();
        assert_eq!(s.active(), 2);
        assert!((s.cost(now) - 3.0 * base).abs() < 1e-6);
        drop((g1, g2));
        assert_eq!(s.active(), 0);
    }

    #[test]
    fn connect_and_response_results_are_separate_inputs() {
        let s = EndpointState::default();
        let now = Instant::now();
        s.on_response_ok(Duration::from_millis(50), now);
        assert_eq!(
            s.latency.lock().unwrap().connect.estimate_ns,
            DEFAULT_RTT.as_nanos() as f64,
            "connect EWMA untouched"
        );
        assert_eq!(
            s.cost(nanos(now)),
            Duration::from_millis(50).as_nanos() as f64,
            "a slow response makes the endpoint costly"
        );
        s.on_response_failed(now, &FailureAccrualConfig::default());
        s.on_connect_ok(Duration::from_micros(100), now);
        let counts = [&s.connects_ok, &s.connects_failed, &s.responses_ok, &s.responses_failed]
            .map(|c| c.load(Ordering::Relaxed));
        assert_eq!(counts, [1, 0, 1, 1]);
    }

    #[test]
    fn the_lock_free_summary_agrees_with_health() {
        let cfg = FailureAccrualConfig { consecutive_failures: 1, ..Default::default() };
        let s = EndpointState::default();
        let t0 = Instant::now();
        assert_eq!(s.availability(t0), Avail::Healthy);
        assert!(matches!(s.on_connect_failed(t0, &cfg), Change::Ejected(_)));
        assert_eq!(s.availability(t0), Avail::Out);
        let later = t0 + cfg.max_ejection * 2;
        assert_eq!(s.availability(later), Avail::Trial);
        assert!(s.claim_trial(later));
        assert_eq!(s.availability(later), Avail::Out, "its trial is in flight");
        assert_eq!(s.on_connect_ok(Duration::from_micros(100), later), Change::Returned);
        assert_eq!(s.availability(later), Avail::Healthy);
        for _ in 0..3 {
            s.on_check(false, 2, 3);
        }
        assert_eq!(s.availability(later), Avail::Out, "failed by active checks");
        let h = s.health.lock().unwrap();
        for t in [t0, later] {
            assert_eq!(s.availability(t), h.availability(t));
        }
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
