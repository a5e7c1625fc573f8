//! The attempt engine: the one loop behind every upstream try, for opaque connects,
//! HTTP requests and upgrades alike. It owns the tried set, the deadline and the attempt
//! count, picks the next endpoint across a plan's concrete services, counts the attempt
//! against the endpoint while it lives, and takes the result back as endpoint feedback:
//! connect results and response results are separate inputs (see
//! `EndpointState::on_connect_*` and `on_response_*`).
//!
//! What to do after a failure is not decided here: opaque connects simply go on while
//! the limits allow, HTTP asks its retry policy (`http::retry`) first.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use smallvec::SmallVec;
use tracing::{debug, info, warn};

use super::upstream::ConnectTime;
use crate::{
    balance::{ActiveGuard, Change, Endpoint, Tier},
    capacity::{self, Shortage},
    state::{Service, Snapshot},
    stats::{
        Metrics,
        metrics::{EndpointHandles, FailReason},
    },
};

/// How many attempts may be made, and until when.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Opaque connects: each concrete service in turn, with its own `connect.attempts`
    /// and `connect.deadline`, so a failover moves on once a branch is spent.
    PerService,
    /// HTTP requests: `attempts` in all, each from the first concrete service that has
    /// an endpoint to offer, until `deadline`.
    Total { attempts: u32, deadline: Option<Instant> },
}

/// Why no further attempt is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// No endpoint left to pick (none at all, all terminating, or all tried and out).
    NoEndpoint,
    Attempts,
    Deadline,
}

/// The attempts of one connection or request.
pub struct Attempts<'s> {
    snapshot: &'s Snapshot,
    concrete: &'s [usize],
    key: u64,
    limit: Limit,
    tried: SmallVec<[SocketAddr; 4]>,
    /// Attempts made in all.
    made: u32,
    /// PerService: the concrete service being tried, its attempts, its deadline.
    at: usize,
    made_here: u32,
    deadline_here: Option<Instant>,
}

impl<'s> Attempts<'s> {
    /// Attempts over `concrete` (snapshot indices, in order) for a client with affinity
    /// `key`.
    pub fn new(snapshot: &'s Snapshot, concrete: &'s [usize], key: u64, limit: Limit) -> Self {
        Self {
            snapshot,
            concrete,
            key,
            limit,
            tried: SmallVec::new(),
            made: 0,
            at: 0,
            made_here: 0,
            deadline_here: None,
        }
    }

    /// Attempts made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// The next endpoint to try, counted against it until the attempt is dropped, or why
    /// there is none.
    pub fn next(&mut self, now: Instant) -> Result<Attempt<'s>, Spent> {
        match self.limit {
            Limit::Total { attempts, deadline } => {
                if self.made >= attempts {
                    return Err(Spent::Attempts);
                }
                if deadline.is_some_and(|d| now >= d) {
                    return Err(Spent::Deadline);
                }
                for &c in self.concrete {
                    if let Some(a) = self.pick(c, now, deadline) {
                        return Ok(a);
                    }
                }
                Err(Spent::NoEndpoint)
            }
            Limit::PerService => {
                let mut spent = Spent::NoEndpoint;
                while let Some(&c) = self.concrete.get(self.at) {
                    let connect = &self.snapshot.service(c).config.connect;
                    let deadline = *self.deadline_here.get_or_insert(now + connect.deadline);
                    let why = if self.made_here >= connect.attempts {
                        Some(Spent::Attempts)
                    } else if now >= deadline {
                        Some(Spent::Deadline)
                    } else {
                        None
                    };
                    if why.is_none()
                        && let Some(a) = self.pick(c, now, Some(deadline))
                    {
                        self.made_here += 1;
                        return Ok(a);
                    }
                    // This branch is spent: fail over to the next, with its own limits.
                    spent = why.unwrap_or(Spent::NoEndpoint);
                    if self.at + 1 < self.concrete.len() {
                        let service = &self.snapshot.service(c).name;
                        debug!(%service, why = ?spent, "no endpoint reachable here; failing over to the next branch");
                    }
                    self.at += 1;
                    self.made_here = 0;
                    self.deadline_here = None;
                }
                Err(spent)
            }
        }
    }

    fn pick(&mut self, concrete: usize, now: Instant, deadline: Option<Instant>) -> Option<Attempt<'s>> {
        let service = self.snapshot.service(concrete);
        let pick = service.balancer.pick(self.key, &self.tried, now)?;
        if pick.panic_changed {
            if pick.panic {
                warn!(service = %service.name, "most endpoints are unhealthy: ignoring health (panic mode)");
            } else {
                info!(service = %service.name, "enough endpoints healthy again: leaving panic mode");
            }
        }
        self.tried.push(pick.endpoint.addr);
        self.made += 1;
        Some(Attempt {
            service,
            index: pick.index,
            endpoint: pick.endpoint,
            tier: pick.tier,
            number: self.made,
            deadline,
            guard: pick.endpoint.state.begin(),
        })
    }
}

/// One try of one endpoint. Holds the endpoint's in-flight count until dropped (or
/// until its guard is taken for the connection's life).
pub struct Attempt<'s> {
    /// The concrete service the endpoint belongs to.
    pub service: &'s Arc<Service>,
    /// The endpoint's index in the service (for its metric handles).
    pub index: usize,
    pub endpoint: &'s Endpoint,
    pub tier: Tier,
    /// 1 for the first attempt.
    pub number: u32,
    /// The limit's deadline for this attempt, if there is one.
    pub deadline: Option<Instant>,
    pub guard: ActiveGuard,
}

impl<'s> Attempt<'s> {
    /// How long a connect may take: the service's connect timeout, within the deadline.
    pub fn connect_timeout(&self, now: Instant) -> Duration {
        let timeout = self.service.config.connect.timeout;
        self.deadline.map_or(timeout, |d| timeout.min(d.saturating_duration_since(now)))
    }

    pub fn handles(&self) -> EndpointHandles<'s> {
        self.target().handles()
    }

    /// The endpoint, as results are reported against it.
    pub fn target(&self) -> Target<'s> {
        Target { service: self.service, index: self.index }
    }

    /// A connect worked, taking `time`.
    pub fn connected(&self, metrics: &Metrics, time: ConnectTime) {
        self.target().connected(metrics, time);
    }

    /// A connect failed with `error`: the endpoint's failure, or the agent's own
    /// shortage (returned, counted as the agent's and not against the endpoint: another
    /// endpoint would fail the same way).
    pub fn connect_failed(&self, metrics: &Metrics, error: &io::Error) -> Option<Shortage> {
        if let Some(what) = Shortage::of(error) {
            capacity::shortage(metrics, "connect", what);
            return Some(what);
        }
        self.target().connect_failed(metrics, FailReason::of(error));
        None
    }

    /// An HTTP exchange ended: acceptable (`latency` to the response headers), or failed
    /// on the endpoint's side.
    pub fn responded(&self, metrics: &Metrics, ok: bool, latency: Duration) {
        let state = &self.endpoint.state;
        let change = if ok {
            state.on_response_ok(latency, Instant::now())
        } else {
            state.on_response_failed(Instant::now(), self.service.balancer.accrual())
        };
        self.target().report(metrics, change, "failed responses");
    }
}

/// One endpoint of a concrete service, as connect results are fed back into its health,
/// metrics and logs: by the attempt engine, and for connections the kernel made (see
/// `direct`).
#[derive(Clone, Copy)]
pub struct Target<'s> {
    pub service: &'s Arc<Service>,
    /// Index in the service's balancer (and metric handles).
    pub index: usize,
}

impl<'s> Target<'s> {
    pub fn endpoint(&self) -> &'s Endpoint {
        &self.service.balancer.endpoints()[self.index]
    }

    pub fn handles(&self) -> EndpointHandles<'s> {
        self.service.endpoint_metrics(self.index)
    }

    /// A connect worked, taking `time`: the endpoint's part feeds its latency estimate,
    /// what the client waited goes to the histogram.
    pub fn connected(&self, metrics: &Metrics, time: ConnectTime) {
        self.report(metrics, self.endpoint().state.on_connect_ok(time.endpoint, Instant::now()), "connect failures");
        self.service.metrics.connect_latency(metrics).observe(time.waited.as_secs_f64());
    }

    /// A connect failed, for `reason`.
    pub fn connect_failed(&self, metrics: &Metrics, reason: FailReason) {
        self.handles().connect_failed(metrics, reason);
        let accrual = self.service.balancer.accrual();
        self.report(metrics, self.endpoint().state.on_connect_failed(Instant::now(), accrual), "connect failures");
    }

    /// Log (and count) what a result changed; `cause` names what ejects.
    fn report(&self, metrics: &Metrics, change: Change, cause: &str) {
        let (service, endpoint) = (&self.service.name, self.endpoint().addr);
        match change {
            Change::None => {}
            Change::Ejected(back_off) => {
                self.handles().ejected(metrics);
                warn!(%service, %endpoint, ?back_off, "ejecting endpoint after {cause}");
            }
            Change::Returned => info!(%service, %endpoint, "endpoint back in service"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Config, state::Resolved};

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::build(&Config::parse(yaml, Path::new("t.yaml")).unwrap(), &Resolved::new(), None)
    }

    const FAILOVER: &str = r#"
services:
  - { name: web, addresses: ["10.96.0.1:80"], route: { failover: [a, b] } }
  - { name: a, endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], connect: { attempts: 2 } }
  - { name: b, endpoints: ["10.0.1.1:80"], connect: { attempts: 5 } }
"#;

    #[test]
    fn opaque_connects_spend_each_branch_by_its_own_limits_then_fail_over() {
        let snap = snapshot(FAILOVER);
        let now = Instant::now();
        let concrete = snap.concrete(snap.index_named("web").unwrap(), now);
        let mut attempts = Attempts::new(&snap, &concrete, 0, Limit::PerService);
        let mut tried = Vec::new();
        while let Ok(a) = attempts.next(now) {
            tried.push((a.service.name.clone(), a.endpoint.addr, a.number));
        }
        let services: Vec<&str> = tried.iter().map(|(s, _, _)| &**s).collect();
        // Two attempts in a (its limit), then b's five (a single endpoint still gets its
        // service's attempts).
        assert_eq!(services, ["a", "a", "b", "b", "b", "b", "b"]);
        assert_ne!(tried[0].1, tried[1].1, "a retry goes to another endpoint");
        assert_eq!(tried.iter().map(|t| t.2).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(attempts.made(), 7);
    }

    #[test]
    fn requests_spend_a_total_within_the_deadline() {
        let snap = snapshot(FAILOVER);
        let now = Instant::now();
        let concrete = snap.concrete(snap.index_named("web").unwrap(), now);
        let limit = Limit::Total { attempts: 3, deadline: Some(now + Duration::from_secs(1)) };
        let mut attempts = Attempts::new(&snap, &concrete, 0, limit);
        let picked: std::collections::HashSet<SocketAddr> =
            (0..3).map(|_| attempts.next(now).unwrap().endpoint.addr).collect();
        assert_eq!(picked.len(), 3, "each attempt on an endpoint not tried yet");
        assert_eq!(attempts.next(now).err(), Some(Spent::Attempts), "3 in all, not 3 per branch");
        let mut late = Attempts::new(&snap, &concrete, 0, limit);
        assert_eq!(late.next(now + Duration::from_secs(2)).err(), Some(Spent::Deadline));
    }

    #[test]
    fn affinity_holds_across_connections_and_requests_and_a_retry_moves_the_client() {
        let snap = snapshot(
            r#"
services:
  - name: s
    addresses: ["10.96.0.1:80"]
    endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    balance: round-robin
    session_affinity: { timeout: 1m }
"#,
        );
        let now = Instant::now();
        let concrete = [snap.index_named("s").unwrap()];
        // Opaque connections and HTTP requests pick through the same engine, with the
        // client's key: each one's first attempt goes to the client's endpoint.
        let first = |limit| Attempts::new(&snap, &concrete, 7, limit).next(now).unwrap().endpoint.addr;
        let request = Limit::Total { attempts: 3, deadline: None };
        let stuck = first(Limit::PerService);
        assert!((0..10).all(|i| first(if i % 2 == 0 { Limit::PerService } else { request }) == stuck));
        // A failed attempt is retried elsewhere, and the client stays where that went.
        let mut retried = Attempts::new(&snap, &concrete, 7, request);
        assert_eq!(retried.next(now).unwrap().endpoint.addr, stuck);
        let moved = retried.next(now).unwrap().endpoint.addr;
        assert_ne!(moved, stuck);
        assert!((0..10).all(|_| first(request) == moved));
    }

    #[test]
    fn an_attempt_holds_its_endpoint_until_dropped() {
        let snap = snapshot(FAILOVER);
        let now = Instant::now();
        let concrete = [snap.index_named("b").unwrap()];
        let mut attempts = Attempts::new(&snap, &concrete, 0, Limit::PerService);
        let a = attempts.next(now).unwrap();
        assert_eq!(a.endpoint.state.active(), 1);
        let state = Arc::clone(&a.endpoint.state);
        drop(a);
        assert_eq!(state.active(), 0);
    }
}
