//! Opening the upstream side of a connection: pick an endpoint, connect with the agent's
//! mark, and on refusal, unreachability or timeout try another endpoint, within the
//! service's attempt count and total deadline. The client sees one connect that worked,
//! or a reset once nothing did. Every outcome feeds the endpoint's health and latency.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    balance::{ActiveGuard, Change, Endpoint, Pick, Tier},
    state::Service,
    stats::{
        Metrics,
        metrics::{FailureLabels, ServiceLabels},
    },
};

/// A connected upstream and what it took.
pub struct Upstream<'a> {
    pub stream: TcpStream,
    /// The concrete service connected to (the dialled one, or where its route led).
    pub service: &'a Service,
    pub endpoint: &'a Endpoint,
    pub tier: Tier,
    pub attempts: u32,
    pub connect_latency: Duration,
    /// Counts this connection against the endpoint until dropped.
    pub guard: ActiveGuard,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("service has no endpoint to try (all terminating)")]
    NoEndpoint,
    #[error("{attempts} connect attempt(s) failed within {elapsed:?}; last to {endpoint}")]
    Exhausted {
        attempts: u32,
        endpoint: SocketAddr,
        elapsed: Duration,
        #[source]
        last: io::Error,
    },
}

/// Connect a client (identified by `key` for affinity) to an endpoint of the first of
/// `candidates` (concrete services, in failover order) that has one reachable.
pub async fn connect<'a>(
    candidates: &[&'a Service],
    key: u64,
    mark: u32,
    metrics: &Metrics,
) -> Result<Upstream<'a>, ConnectError> {
    let mut last = ConnectError::NoEndpoint;
    for (i, service) in candidates.iter().enumerate() {
        match connect_one(service, key, mark, metrics).await {
            Ok(up) => return Ok(up),
            Err(e) => {
                if i + 1 < candidates.len() {
                    debug!(service = %service.name, error = %e, "no endpoint reachable here; failing over to the next branch");
                }
                last = e;
            }
        }
    }
    Err(last)
}

/// Connect to one of `service`'s endpoints, retrying others.
async fn connect_one<'a>(
    service: &'a Service,
    key: u64,
    mark: u32,
    metrics: &Metrics,
) -> Result<Upstream<'a>, ConnectError> {
    let cfg = &service.config.connect;
    let start = Instant::now();
    let deadline = start + cfg.deadline;
    let mut tried = Vec::with_capacity(cfg.attempts as usize);
    let mut last = None;
    for attempt in 1..=cfg.attempts {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let Some(pick) = pick(service, key, &tried, now) else { break };
        let ep = pick.endpoint;
        tried.push(ep.addr);
        let guard = ep.state.begin();
        let t0 = Instant::now();
        match connect_marked(ep.addr, mark, cfg.timeout.min(deadline - now)).await {
            Ok(stream) => {
                let latency = t0.elapsed();
                report(service, ep, ep.state.on_connect_ok(latency, Instant::now()), metrics);
                let labels = ServiceLabels { service: service.name.clone() };
                metrics.connect_latency.get_or_create(&labels).observe(latency.as_secs_f64());
                return Ok(Upstream {
                    stream,
                    service,
                    endpoint: ep,
                    tier: pick.tier,
                    attempts: attempt,
                    connect_latency: latency,
                    guard,
                });
            }
            Err(e) => {
                debug!(attempt, endpoint = %ep.addr, error = %e, "upstream connect failed");
                let labels = FailureLabels {
                    service: service.name.clone(),
                    endpoint: ep.addr.to_string(),
                    reason: failure_reason(&e).into(),
                };
                metrics.connect_failures.get_or_create(&labels).inc();
                report(service, ep, ep.state.on_connect_failed(Instant::now(), service.balancer.accrual()), metrics);
                last = Some((ep.addr, e));
            }
        }
    }
    match last {
        None => Err(ConnectError::NoEndpoint),
        Some((endpoint, last)) => {
            Err(ConnectError::Exhausted { attempts: tried.len() as u32, endpoint, elapsed: start.elapsed(), last })
        }
    }
}

/// Why a connect failed, as a bounded metric label.
/// Pick an endpoint of `service` other than `tried`, logging entry to and exit from
/// panic mode.
pub(crate) fn pick<'a>(service: &'a Service, key: u64, tried: &[SocketAddr], now: Instant) -> Option<Pick<'a>> {
    let pick = service.balancer.pick(key, tried, now)?;
    if pick.panic_changed {
        if pick.panic {
            warn!(service = %service.name, "most endpoints are unhealthy: ignoring health (panic mode)");
        } else {
            info!(service = %service.name, "enough endpoints healthy again: leaving panic mode");
        }
    }
    Some(pick)
}

pub(crate) fn failure_reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => "unreachable",
        _ => "other",
    }
}

pub(crate) fn report(service: &Service, ep: &Endpoint, change: Change, metrics: &Metrics) {
    match change {
        Change::None => {}
        Change::Ejected(backoff) => {
            metrics.ejections.get_or_create(&Metrics::endpoint(&service.name, ep.addr)).inc();
            warn!(
                service = %service.name,
                endpoint = %ep.addr,
                back_off = ?backoff,
                "ejecting endpoint after connect failures"
            )
        }
        Change::Returned => info!(service = %service.name, endpoint = %ep.addr, "endpoint back in service"),
    }
}

/// A TCP connect carrying the agent's mark, so the connect programs let it pass, with a
/// timeout. Also used by the active health checks.
pub async fn connect_marked(addr: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    setsockopt(&socket.as_fd(), sockopt::Mark, &mark).map_err(io::Error::from)?;
    tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))?
}
