//! Opening the upstream side of an opaque connection (or an upgrade): the attempt engine
//! picks, this connects with the agent's mark, and on refusal, unreachability or timeout
//! the engine offers another endpoint, within each concrete service's attempt count and
//! deadline. The client sees one connect that worked, or a reset once nothing did.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt},
};
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use super::attempt::{Attempt, Attempts, Limit};
use crate::{
    balance::{ActiveGuard, Endpoint, Tier},
    state::{Service, Snapshot},
    stats::{Metrics, metrics::EndpointHandles},
};

/// A connected upstream, owning what it needs for the connection's life: its service
/// (not the snapshot it came from, so a long connection pins one service, not every
/// service of an old snapshot) and the guard that counts it against its endpoint.
pub struct Upstream {
    pub stream: TcpStream,
    /// The concrete service connected to (the dialled one, or where its route led).
    pub service: Arc<Service>,
    /// The endpoint's index in the service.
    pub index: usize,
    pub tier: Tier,
    /// Attempts it took, this one included.
    pub attempts: u32,
    pub connect_latency: Duration,
    pub guard: ActiveGuard,
}

impl Upstream {
    fn new(stream: TcpStream, attempt: Attempt<'_>, connect_latency: Duration) -> Self {
        Self {
            stream,
            service: Arc::clone(attempt.service),
            index: attempt.index,
            tier: attempt.tier,
            attempts: attempt.number,
            connect_latency,
            guard: attempt.guard,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.service.balancer.endpoints()[self.index]
    }

    pub fn handles(&self) -> EndpointHandles<'_> {
        self.service.endpoint_metrics(self.index)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the agent is short of resources ({what}); no endpoint was charged")]
    Local {
        what: &'static str,
        #[source]
        source: io::Error,
    },
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
pub async fn connect(
    snapshot: &Snapshot,
    concrete: &[usize],
    key: u64,
    mark: u32,
    metrics: &Metrics,
) -> Result<Upstream, ConnectError> {
    let start = Instant::now();
    let mut attempts = Attempts::new(snapshot, concrete, key, Limit::PerService);
    let mut last = None;
    while let Ok(attempt) = attempts.next(Instant::now()) {
        let t0 = Instant::now();
        match connect_marked(attempt.endpoint.addr, mark, attempt.connect_timeout(t0)).await {
            Ok(stream) => {
                let latency = t0.elapsed();
                attempt.connected(metrics, latency);
                return Ok(Upstream::new(stream, attempt, latency));
            }
            Err(e) => {
                debug!(attempt = attempt.number, service = %attempt.service.name, endpoint = %attempt.endpoint.addr, error = %e, "upstream connect failed");
                if let Some(what) = attempt.connect_failed(metrics, &e) {
                    return Err(ConnectError::Local { what: what.name(), source: e });
                }
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
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket::socket(family, SockType::Stream, flags, None)?;
    if mark != 0 {
        socket::setsockopt(&fd, sockopt::Mark, &mark)?;
    }
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    tokio::time::timeout(timeout, established(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))?
}

/// Waits for a non-blocking connect to end. tokio's `TcpSocket::connect` reads the
/// socket's error (`getsockopt(SO_ERROR)`) after every connect, a system call per
/// upstream connection; the readiness event already tells: a connect that failed
/// raises EPOLLERR (the kernel sets the socket's error as it closes it), one that worked
/// only EPOLLOUT, since a socket still in SYN_SENT is not writable. So the error is read
/// only when there is one.
async fn established(stream: TcpStream) -> io::Result<TcpStream> {
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the socket closed as it connected")));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connect_that_works_gives_a_connected_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect_marked(addr, 0, Duration::from_secs(5)).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert_eq!(stream.local_addr().unwrap(), peer);
        drop(accepted);
    }

    #[tokio::test]
    async fn a_refused_connect_says_so() {
        // A port that was just listened on and is closed now: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let error = connect_marked(addr, 0, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }

    #[tokio::test]
    async fn a_refused_ipv6_connect_says_so() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            assert!(std::env::var_os("CI").is_none(), "no IPv6 loopback under CI");
            return;
        };
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = connect_marked(addr, 0, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }
}
