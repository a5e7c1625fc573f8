//! The outbound proxy: accept redirected connections, find where the client meant to go
//! (`origin`), decide what to try (the snapshot's plan), open the upstream side
//! (`upstream` over the `attempt` engine: pick, connect with the mark, retry elsewhere)
//! and copy bytes both ways (`copy`: no buffer held while idle) until close, or until the
//! endpoint's drain deadline. Each connection task returns one `outcome`.
//!
//! One tokio task and one tracing span per connection. Per-connection errors end in that
//! task with a debug log; only accept errors back off (mini-redis `server.rs`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, debug_span, field, warn};

use bytes::BytesMut;

use self::{
    detect::{Detected, detect},
    outcome::Outcome,
    upstream::{ConnectError, Upstream},
};
use crate::{
    capacity::{self, Capacity, Permit, Shortage},
    config::HttpLimits,
    origin::Origins,
    state::{Mode, Plan, Snapshot},
    stats::{
        ConnHandle, Stats,
        conns::{Route, Via},
    },
};

pub mod attempt;
mod copy;
mod counted;
pub(crate) mod detect;
pub mod http;
mod linger;
pub mod outcome;
mod tcp;
pub mod upstream;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr}: is another switchyard (or anything else) using port {}? \
         Stop it or set agent.listen_port",
        addr.port()
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("read the network namespace cookie of the listener (SO_NETNS_COOKIE needs Linux 5.14+)")]
    NetnsCookie(#[source] io::Error),
    #[error(
        "the previous agent handed over a listener on {got} where this one wants {want} \
         (agent.listen_port is {}); a hand-over keeps agent.listen_port and agent.node_address: \
         stop the previous agent first to change them",
        want.port()
    )]
    InheritedPort { got: String, want: SocketAddr },
    #[error("use a listener handed over by the previous agent")]
    Inherit(#[source] io::Error),
}

/// The outbound listeners: 127.0.0.1 always, [::1] where the host has IPv6, and the node
/// addresses where pods are redirected (see `nodeaddr`).
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
    pub node_v4: Option<TcpListener>,
    pub node_v6: Option<TcpListener>,
}

/// Listening sockets handed over by the previous agent, by role.
#[derive(Default)]
pub struct Inherited {
    pub v4: Option<OwnedFd>,
    pub v6: Option<OwnedFd>,
    pub node_v4: Option<OwnedFd>,
    pub node_v6: Option<OwnedFd>,
}

impl Listeners {
    /// Bind what is wanted: the loopback listeners on `port`, and one on each node
    /// address. A listener in `inherited` whose address matches is used instead of a new
    /// one (an upgrade: the same sockets, so there is no moment in which connects to the
    /// port are refused); one that does not match is refused.
    pub async fn bind(port: u16, node: &[IpAddr], mut inherited: Inherited) -> Result<Self, ProxyError> {
        let v4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), inherited.v4).await?;
        let v6 = match listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port), inherited.v6).await {
            Ok(l) => Some(l),
            // A host with IPv6 disabled has no ::1; it has no IPv6 services to reach either.
            Err(ProxyError::Bind { source, .. }) if source.kind() == io::ErrorKind::AddrNotAvailable => {
                warn!("no IPv6 loopback address on this host; IPv6 service addresses will not be proxied");
                None
            }
            Err(e) => return Err(e),
        };
        let mut node_v4 = None;
        let mut node_v6 = None;
        for &ip in node {
            let (slot, fd) = match ip {
                IpAddr::V4(_) => (&mut node_v4, inherited.node_v4.take()),
                IpAddr::V6(_) => (&mut node_v6, inherited.node_v6.take()),
            };
            *slot = Some(listen(SocketAddr::new(ip, port), fd).await?);
        }
        Ok(Self { v4, v6, node_v4, node_v6 })
    }

    /// Every listener with its `SY_LISTENERS` slot.
    pub fn slots(&self) -> Vec<(u32, &TcpListener)> {
        use switchyard_common::listener;
        [
            (listener::LOOPBACK_V4, Some(&self.v4)),
            (listener::LOOPBACK_V6, self.v6.as_ref()),
            (listener::NODE_V4, self.node_v4.as_ref()),
            (listener::NODE_V6, self.node_v6.as_ref()),
        ]
        .into_iter()
        .filter_map(|(slot, l)| Some((slot, l?)))
        .collect()
    }

    /// The addresses the listeners are bound to.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        [Some(&self.v4), self.v6.as_ref(), self.node_v4.as_ref(), self.node_v6.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Duplicates of the listening sockets with their `SY_LISTENERS` slots.
    pub fn dup_slots(&self) -> io::Result<Vec<(u32, OwnedFd)>> {
        self.slots().into_iter().map(|(slot, l)| Ok((slot, l.as_fd().try_clone_to_owned()?))).collect()
    }

    /// Duplicates of the listening sockets, to hand to a successor while these accept.
    pub fn dup(&self) -> io::Result<Inherited> {
        let dup = |l: Option<&TcpListener>| l.map(|l| l.as_fd().try_clone_to_owned()).transpose();
        Ok(Inherited {
            v4: dup(Some(&self.v4))?,
            v6: dup(self.v6.as_ref())?,
            node_v4: dup(self.node_v4.as_ref())?,
            node_v6: dup(self.node_v6.as_ref())?,
        })
    }

    /// Cookie of the network namespace the listeners live in. Connects from this
    /// namespace go to the loopback listeners; from any other, to the node addresses.
    pub fn netns_cookie(&self) -> Result<u64, ProxyError> {
        // SO_NETNS_COOKIE from asm-generic/socket.h (Linux 5.14+); libc does not export it
        // for every target.
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and length for a u64 option.
        let rc = unsafe {
            libc::getsockopt(
                self.v4.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc == 0 { Ok(cookie) } else { Err(ProxyError::NetnsCookie(io::Error::last_os_error())) }
    }
}

/// A listener on `addr`: the inherited socket if there is one (it must be on `addr`),
/// else a new one.
///
/// TCP_NODELAY is set on the listener: accepted sockets inherit it, which saves a
/// system call per connection (requests and responses are relayed as they come, so
/// Nagle would only delay them).
async fn listen(addr: SocketAddr, inherited: Option<OwnedFd>) -> Result<TcpListener, ProxyError> {
    let Some(fd) = inherited else {
        let bind = || -> io::Result<TcpListener> {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.set_reuseaddr(true)?;
            socket.set_nodelay(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        };
        return bind().map_err(|source| ProxyError::Bind { addr, source });
    };
    let std = std::net::TcpListener::from(fd);
    let local = std.local_addr().map_err(ProxyError::Inherit)?;
    if local != addr {
        return Err(ProxyError::InheritedPort { got: local.to_string(), want: addr });
    }
    std.set_nonblocking(true).map_err(ProxyError::Inherit)?;
    // A predecessor of an older version may not have set it.
    setsockopt(&std, sockopt::TcpNoDelay, &true).map_err(|e| ProxyError::Inherit(e.into()))?;
    TcpListener::from_std(std).map_err(ProxyError::Inherit)
}

/// Everything a connection task needs, shared by all of them.
pub struct Proxy {
    state: watch::Receiver<Arc<Snapshot>>,
    origins: Arc<dyn Origins>,
    mark: u32,
    stats: Arc<Stats>,
    http: Arc<http::Http>,
    capacity: Arc<Capacity>,
}

impl Proxy {
    /// `origins`: where accepted connections were going (the kernel's map, or a fixed
    /// table in tests); `mark`: the SO_MARK of upstream sockets (0: none); every accepted
    /// connection is counted against `capacity`; HTTP clients are held to `limits`.
    pub fn new(
        state: watch::Receiver<Arc<Snapshot>>,
        origins: Arc<dyn Origins>,
        mark: u32,
        stats: Arc<Stats>,
        capacity: Arc<Capacity>,
        limits: &HttpLimits,
    ) -> Arc<Self> {
        let http = http::Http::new(mark, Arc::clone(&stats), limits);
        Arc::new(Self { state, origins, mark, stats, http, capacity })
    }

    /// The HTTP side's shared state (its pool is swept by the reconciler).
    pub fn http(&self) -> &Arc<http::Http> {
        &self.http
    }

    /// Accept until `stop` fires; each connection runs as a task on `tasks`, so the
    /// caller can wait for them to drain.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tasks: TaskTracker, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((client, peer)) => {
                    backoff = Duration::from_millis(10);
                    let permit = self.capacity.admit();
                    let id = self.stats.conns.next_id();
                    let span = debug_span!(
                        "outbound",
                        conn.id = id,
                        client.addr = %peer,
                        client.pid = field::Empty,
                        client.comm = field::Empty,
                        orig.dst = field::Empty,
                        service = field::Empty,
                        protocol = field::Empty,
                        endpoint = field::Empty,
                    );
                    tasks.spawn(Arc::clone(&self).handle(client, peer, id, stop.clone(), permit).instrument(span));
                }
                Err(e) => {
                    // Out of fds or memory: wait and retry rather than spin or exit.
                    match Shortage::of(&e) {
                        Some(what) => capacity::shortage(&self.stats.metrics, "accept", what),
                        None => warn!(error = %e, retry_in = ?backoff, "accept failed"),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        id: u64,
        stop: CancellationToken,
        _permit: Permit,
    ) {
        let conn = self.stats.conns.open(id, peer, Via::Agent);
        // Decide and connect, then relay: only what the relay needs lives on in the
        // task of an opaque connection (most of an idle connection's memory is this
        // future). The decide phase is boxed, freed once it is over: it is the larger
        // of the two, and the task is as large as its largest phase.
        let outcome = match Box::pin(self.decide(client, peer, &conn, stop)).await {
            Next::Done(outcome) => outcome,
            Next::Relay(relay) => tcp::proxy(&self, relay, &conn).await,
        };
        outcome::finish(&conn, &self.stats.metrics, outcome);
    }

    /// One connection up to its relay phase: find the origin, plan, detect, connect (or
    /// serve it as HTTP to the end).
    async fn decide(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        conn: &ConnHandle,
        stop: CancellationToken,
    ) -> Next {
        let span = tracing::Span::current();
        let Some(origin) = self.origins.lookup(peer) else {
            debug!("no original destination recorded for this client (not redirected?); closing");
            return Next::Done(Outcome::NotRedirected);
        };
        span.record("orig.dst", field::display(origin.dst));
        span.record("client.pid", origin.pid);
        span.record("client.comm", origin.comm.as_str());
        // The plan is made on the newest snapshot; HTTP requests each read the newest one
        // again, an opaque connection keeps its service for its life.
        let snapshot = Arc::clone(&self.state.borrow());
        let plan = snapshot.plan(origin.dst, origin.cgroup_id, std::time::Instant::now());
        conn.client(&origin);
        let Some(plan) = plan else {
            debug!("original destination is not a known service; closing");
            return Next::Done(Outcome::UnknownService);
        };
        let service = snapshot.service(plan.service);
        span.record("service", &*service.name);
        conn.service(&service.name);
        // TCP_NODELAY came with the socket, from the listener.
        let mut prefix = BytesMut::new();
        let (detected, opened) = match plan.mode {
            Mode::Opaque => (Detected::Opaque, None),
            Mode::Http1 => (Detected::Http1, None),
            Mode::Http2 => (Detected::Http2, None),
            // Boxed, like the HTTP path below: a connection task's future is as large as its
            // largest state, and an idle opaque connection should not carry these.
            Mode::Detect => match Box::pin(self.sniff(&mut client, &mut prefix, &snapshot, &plan)).await {
                Sniffed::Spoke(detected, opened) => (detected, opened),
                Sniffed::Unreachable(e) => {
                    conn.protocol(Detected::Opaque.name(), None, false);
                    return Next::Done(self.unreachable(&client, &e));
                }
            },
        };
        span.record("protocol", detected.name());
        let version = match detected {
            Detected::Http1 => Some(http::Version::Http1),
            Detected::Http2 => Some(http::Version::Http2),
            _ => None,
        };
        let sni = match &detected {
            Detected::Tls { sni } => sni.clone(),
            _ => None,
        };
        conn.protocol(detected.name(), sni, version.is_some());
        if detected == Detected::Closed {
            debug!("client closed before sending anything");
            return Next::Done(Outcome::ClientClosed);
        }
        if let Some(version) = version {
            // An upstream connection opened while the client was slow to speak is not
            // needed: requests pick their own.
            drop(opened);
            let name = service.name.clone();
            let key = plan.key;
            drop(snapshot);
            let shared = self.stats.enabled.then(|| conn.shared());
            let io = http::Prefixed::new(prefix, client);
            let state = self.state.clone();
            let serve = Box::pin(Arc::clone(&self.http).serve(io, version, state, name, key, shared, stop));
            return Next::Done(match serve.await {
                Ok(()) => Outcome::Closed,
                Err(e) => {
                    debug!(error = %e, "HTTP connection ended with an error");
                    Outcome::Error
                }
            });
        }
        let mut upstream = match opened {
            Some(up) => *up,
            // Boxed too: the connect (attempts, timers, the socket's connect) would be this
            // task's largest state, and an idle connection's task is as large as that.
            None => {
                let connect = upstream::connect(&snapshot, &plan.concrete, plan.key, self.mark, &self.stats.metrics);
                match Box::pin(connect).await {
                    Ok(up) => up,
                    Err(e) => return Next::Done(self.unreachable(&client, &e)),
                }
            }
        };
        span.record("endpoint", field::display(upstream.endpoint().addr));
        debug!(
            concrete = %upstream.service.name,
            attempts = upstream.attempts,
            locality = upstream.tier.name(),
            connect_us = upstream.connect_latency.as_micros() as u64,
            "connected"
        );
        conn.connected(Route {
            service: service.name.clone(),
            concrete: upstream.service.name.clone(),
            endpoint: upstream.endpoint().addr,
            locality: upstream.tier.name(),
            attempts: upstream.attempts,
            connect_us: upstream.connect_latency.as_micros() as u64,
        });
        let _ = upstream.stream.set_nodelay(true);
        if let Err(outcome) = tcp::send_first(self, &mut upstream, &prefix, conn).await {
            return Next::Done(outcome);
        }
        Next::Relay(Box::new(Relay { client, upstream }))
    }

    /// Nothing could be reached: reset the client so it sees the failure at once.
    fn unreachable(&self, client: &TcpStream, e: &ConnectError) -> Outcome {
        debug!(error = %e, "no endpoint could be reached; resetting client");
        reset(client);
        match e {
            ConnectError::Local { .. } => Outcome::LocalError,
            _ => Outcome::NoEndpoint,
        }
    }

    /// Detect the client's protocol without stalling a server that speaks first: most
    /// clients speak at once; one silent for `SPECULATE_AFTER` gets its upstream
    /// connection opened, and whichever side sends first decides.
    async fn sniff(&self, client: &mut TcpStream, prefix: &mut BytesMut, snapshot: &Snapshot, plan: &Plan) -> Sniffed {
        let deadline = tokio::time::Instant::now() + snapshot.detect.timeout;
        if let Ok(d) = tokio::time::timeout(SPECULATE_AFTER, detect(client, prefix, deadline)).await {
            return Sniffed::Spoke(d, None);
        }
        let connect = upstream::connect(snapshot, &plan.concrete, plan.key, self.mark, &self.stats.metrics);
        tokio::pin!(connect);
        let up = tokio::select! {
            // The client spoke while the connect was in flight: it is abandoned.
            d = detect(client, prefix, deadline) => return Sniffed::Spoke(d, None),
            up = &mut connect => up,
        };
        let up = match up {
            Ok(up) => Box::new(up),
            Err(e) => return Sniffed::Unreachable(e),
        };
        let client_first = tokio::select! {
            d = detect(client, prefix, deadline) => Some(d),
            _ = up.stream.readable() => None,
        };
        let detected = client_first.unwrap_or_else(|| {
            debug!("server spoke first: opaque");
            Detected::Opaque
        });
        Sniffed::Spoke(detected, Some(up))
    }
}

/// Where a connection goes after `decide`.
enum Next {
    /// Served (HTTP) or refused: how it ended.
    Done(Outcome),
    /// Opaque: relay bytes. (Boxed: see `tcp::proxy`.)
    Relay(Box<Relay>),
}

/// What the relay phase of an opaque connection needs, and nothing more (what detection
/// read was sent upstream before).
pub(super) struct Relay {
    pub client: TcpStream,
    pub upstream: Upstream,
}

/// What detection found out.
enum Sniffed {
    /// The protocol, and the upstream connection opened while waiting, if one was.
    Spoke(Detected, Option<Box<Upstream>>),
    /// The client stayed silent and no endpoint could be reached.
    Unreachable(ConnectError),
}

/// How long a silent client may take to speak before the upstream connection is opened
/// to see whether the server speaks first. Clients that speak first (HTTP, TLS, redis)
/// write as soon as their connect returns.
const SPECULATE_AFTER: Duration = Duration::from_millis(10);

/// Close with RST so the client sees the failure at once instead of a clean EOF.
fn reset(client: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let _ = setsockopt(&client.as_fd(), sockopt::Linger, &linger);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "the relay relies on it instead of a setsockopt per connection");
        // And a taken-over listener gets it too.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let taken = listen(addr, Some(OwnedFd::from(plain))).await.unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        assert!(taken.accept().await.unwrap().0.nodelay().unwrap());
    }
}
