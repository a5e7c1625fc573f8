//! Opening the upstream side of an opaque connection (or an upgrade): the attempt engine
//! picks, this connects with the agent's mark, and on refusal, unreachability or timeout
//! the engine offers another endpoint, within each concrete service's attempt count and
//! deadline. The client sees one connect that worked, or a reset once nothing did.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};
use tracing::debug;

use super::attempt::{Attempt, Attempts, Limit};
use crate::{state::Snapshot, stats::Metrics};

/// A connected upstream and the attempt that made it (which counts the connection
/// against its endpoint until dropped).
pub struct Upstream<'s> {
    pub stream: TcpStream,
    pub attempt: Attempt<'s>,
    pub connect_latency: Duration,
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
/// `concrete` (snapshot indices, in failover order) that has one reachable.
pub async fn connect<'s>(
    snapshot: &'s Snapshot,
    concrete: &'s [usize],
    key: u64,
    mark: u32,
    metrics: &Metrics,
) -> Result<Upstream<'s>, ConnectError> {
    let start = Instant::now();
    let mut attempts = Attempts::new(snapshot, concrete, key, Limit::PerService);
    let mut last = None;
    while let Ok(attempt) = attempts.next(Instant::now()) {
        let t0 = Instant::now();
        match connect_marked(attempt.endpoint.addr, mark, attempt.connect_timeout(t0)).await {
            Ok(stream) => {
                let latency = t0.elapsed();
                attempt.connected(metrics, latency);
                return Ok(Upstream { stream, attempt, connect_latency: latency });
            }
            Err(e) => {
                debug!(attempt = attempt.number, service = %attempt.service.name, endpoint = %attempt.endpoint.addr, error = %e, "upstream connect failed");
                attempt.connect_failed(metrics, &e);
                last = Some((attempt.endpoint.addr, e));
            }
        }
    }
    match last {
        None => Err(ConnectError::NoEndpoint),
        Some((endpoint, last)) => {
            Err(ConnectError::Exhausted { attempts: attempts.made(), endpoint, elapsed: start.elapsed(), last })
        }
    }
}

/// A TCP connect carrying the agent's mark, so the connect programs let it pass, with a
/// timeout. Also used by the active health checks and the HTTP pool. Mark 0 is no mark:
/// an agent built without the kernel side (`app::Kernel::None`, the in-process tests)
/// has no programs to get past, and setting a mark needs CAP_NET_ADMIN.
pub async fn connect_marked(addr: SocketAddr, mark: u32, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if mark != 0 {
        setsockopt(&socket.as_fd(), sockopt::Mark, &mark).map_err(io::Error::from)?;
    }
    tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))?
}
