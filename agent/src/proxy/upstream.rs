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
    balance::{ActiveGuard, Endpoint, RTT_FLOOR, Tier},
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
                let time = ConnectTime::measure(&stream, t0);
                attempt.connected(metrics, time);
                return Ok(Upstream::new(stream, attempt, time.waited));
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

/// How long a connect took, in the two senses that differ on a busy node.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTime {
    /// From the connect call until the agent saw it done: what the client waited (the
    /// connect-latency histogram, `connect_us` in logs and `/conns`).
    pub waited: Duration,
    /// The endpoint's part, which feeds p2c's estimate (see [`ConnectTime::measure`]).
    pub endpoint: Duration,
}

impl ConnectTime {
    /// One figure for both: a connect the kernel timed (kernel mode's events), or one
    /// too quick for the agent's delay in it to matter.
    pub fn one(latency: Duration) -> Self {
        Self { waited: latency, endpoint: latency }
    }

    /// Times a connect that started at `since` and has just ended on `stream`.
    ///
    /// `waited` includes the agent's own delay: the handshake ends in the kernel, and the
    /// agent sees it when its task next runs, milliseconds later on a loaded node, which
    /// a peak-sensitive estimate takes at once (docs/balancing.md has the figures). So
    /// when `waited` is long enough for p2c to see (the estimate's floor), the kernel's
    /// handshake round trip (TCP_INFO) stands in for it, unless a SYN was resent: a
    /// dropped SYN (a full accept queue: an overloaded endpoint) is the endpoint's delay,
    /// and the round trip measured from the resent SYN would hide it. Below the floor
    /// nothing is asked: the fast path makes no extra system call.
    pub fn measure(stream: &TcpStream, since: Instant) -> Self {
        let waited = since.elapsed();
        if waited < RTT_FLOOR {
            return Self::one(waited);
        }
        let endpoint = match tcp_info(stream) {
            Ok(info) if info.tcpi_total_retrans == 0 => Duration::from_micros(info.tcpi_rtt.into()).min(waited),
            _ => waited,
        };
        Self { waited, endpoint }
    }
}

/// The kernel's TCP_INFO for `stream`. libc has the struct; nix has no option for it.
fn tcp_info(stream: &TcpStream) -> io::Result<libc::tcp_info> {
    // SAFETY: `tcp_info` is plain integers, so all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of `len` bytes that the kernel fills up to `len`.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    if rc == 0 { Ok(info) } else { Err(io::Error::last_os_error()) }
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
    async fn the_agents_own_delay_is_not_the_endpoints() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        let stream = connect_marked(listener.local_addr().unwrap(), 0, Duration::from_secs(5)).await.unwrap();
        // The agent busy elsewhere after the handshake ended.
        std::thread::sleep(Duration::from_millis(100));
        let time = ConnectTime::measure(&stream, t0);
        assert!(time.waited >= Duration::from_millis(100), "{time:?}");
        // Loopback's handshake takes microseconds; the bound leaves a loaded machine's
        // softirq delays room and still tells it from the wait.
        assert!(time.endpoint <= time.waited / 4, "{time:?}");
    }

    #[tokio::test]
    async fn a_resent_syn_is_the_endpoints_delay() {
        // A listener whose accept queue (backlog 0: one connection) is full drops the next
        // SYN, as an overloaded endpoint does; the client resends it after its 1 s RTO.
        let fd = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from("127.0.0.1:0".parse::<SocketAddr>().unwrap())).unwrap();
        socket::listen(&fd, socket::Backlog::new(0).unwrap()).unwrap();
        let listener = std::net::TcpListener::from(fd);
        let addr = listener.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        // Room for the connect below to go out before the queue is emptied.
        let accepter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let first = listener.accept().unwrap();
            let second = listener.accept().unwrap();
            (first, second)
        });
        let t0 = Instant::now();
        let stream = connect_marked(addr, 0, Duration::from_secs(5)).await.unwrap();
        let time = ConnectTime::measure(&stream, t0);
        assert!(time.waited >= Duration::from_millis(900), "the SYN was not dropped: {time:?}");
        assert_eq!(time.endpoint, time.waited);
        drop(accepter.join().unwrap());
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
