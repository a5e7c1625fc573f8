//! Upstream HTTP connections, kept per endpoint and reused across requests and client
//! connections: HTTP/2 connections are shared (one multiplexed connection per endpoint,
//! hyper's, with its task), HTTP/1.1 ones (`h1`) are lent to one request at a time and
//! come back when its response body has been read. Connections carry the agent's mark
//! like every upstream socket, and are closed after `idle` without use.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{Request, Response, client::conn::http2, http::request::Parts};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::AbortHandle;
use tracing::debug;

use super::{
    body::{BoxError, ReqBody, Upstream},
    h1,
};
use crate::proxy::{
    counted::{Counted, Tally},
    upstream::{ConnectTime, connect_marked},
};

/// The HTTP version spoken to an endpoint: the client's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// A connection lent out for one request. Dropping it unused closes an HTTP/1 one.
pub struct Lent {
    /// How long the connect took, when this connection was opened for the request (an
    /// idle one taken from the pool: `None`).
    pub connected_in: Option<ConnectTime>,
    sender: Sender,
    home: Home,
}

enum Sender {
    /// Driven by the request that holds it (`h1`).
    H1(Box<h1::Conn>),
    /// Driven by a task of its own, shared by every request to the endpoint.
    H2 { sender: http2::SendRequest<ReqBody>, task: AbortHandle },
}

struct Idle {
    sender: Sender,
    since: Instant,
}

type Idles = Mutex<HashMap<(SocketAddr, Version), Vec<Idle>>>;

#[derive(Default)]
pub struct Pool {
    idle: Arc<Idles>,
}

/// Where an HTTP/1 connection goes back to when its response has been read.
pub struct Home {
    idle: Arc<Idles>,
    addr: SocketAddr,
}

/// HTTP/1 connections kept per endpoint; more are closed when they come back.
const MAX_IDLE_H1: usize = 64;

impl Pool {
    /// A connection to `addr` ready for a request: an idle one, or a new one.
    pub async fn lend(
        &self,
        addr: SocketAddr,
        version: Version,
        mark: u32,
        connect_timeout: Duration,
        idle_timeout: Duration,
        tally: impl FnOnce() -> Option<Tally>,
    ) -> Result<Lent, PoolError> {
        let home = Home { idle: Arc::clone(&self.idle), addr };
        if let Some(sender) = self.take_idle(addr, version, idle_timeout) {
            return Ok(Lent { connected_in: None, sender, home });
        }
        let t0 = Instant::now();
        let stream =
            connect_marked(addr, mark, connect_timeout).await.map_err(|source| PoolError::Connect { addr, source })?;
        let connected_in = Some(ConnectTime::measure(&stream, t0));
        let _ = stream.set_nodelay(true);
        // Counted into the endpoint of the request that opened it (an endpoint shared by
        // two services counts there for both).
        let sender = match version {
            Version::Http1 => Sender::H1(h1::Conn::new(stream, tally())),
            Version::Http2 => {
                let io = TokioIo::new(Counted::new(stream, tally()));
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|source| PoolError::Handshake { addr, source })?;
                let task = tokio::spawn(drive(conn, addr)).abort_handle();
                // Shared from the start: later requests multiplex onto it.
                let shared = Sender::H2 { sender: sender.clone(), task: task.clone() };
                self.put(addr, version, Idle { sender: shared, since: Instant::now() });
                Sender::H2 { sender, task }
            }
        };
        Ok(Lent { connected_in, sender, home })
    }

    fn take_idle(&self, addr: SocketAddr, version: Version, idle_timeout: Duration) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap();
        let conns = idle.get_mut(&(addr, version))?;
        let now = Instant::now();
        match version {
            // HTTP/2: share the connection, keep it in the pool.
            Version::Http2 => {
                prune(conns, now, idle_timeout);
                conns.iter_mut().find(|c| c.sender.is_ready()).map(|c| {
                    c.since = now;
                    let Sender::H2 { sender, task } = &c.sender else { unreachable!("h2 pool holds h2 senders") };
                    Sender::H2 { sender: sender.clone(), task: task.clone() }
                })
            }
            // HTTP/1: one request at a time, on the connection used last (the others wait
            // for `sweep` to look at them).
            Version::Http1 => {
                while let Some(c) = conns.pop() {
                    if !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout {
                        return Some(c.sender);
                    }
                }
                None
            }
        }
    }

    fn put(&self, addr: SocketAddr, version: Version, idle: Idle) {
        self.idle.lock().unwrap().entry((addr, version)).or_default().push(idle);
    }

    /// Close connections idle for longer than `idle_timeout` (run now and then, so
    /// connections to endpoints nobody asks for any more go away too).
    pub fn sweep(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        for conns in idle.values_mut() {
            prune(conns, now, idle_timeout);
        }
        idle.retain(|_, c| !c.is_empty());
    }
}

#[cfg(test)]
impl Pool {
    /// Where an HTTP/1 connection to `addr` would come back to.
    pub fn home(&self, addr: SocketAddr) -> Home {
        Home { idle: Arc::clone(&self.idle), addr }
    }

    /// The HTTP/1 connection to `addr` that came back last.
    pub fn take_h1(&self, addr: SocketAddr) -> Option<Box<h1::Conn>> {
        match self.idle.lock().unwrap().get_mut(&(addr, Version::Http1))?.pop()?.sender {
            Sender::H1(c) => Some(c),
            Sender::H2 { .. } => None,
        }
    }

    /// How many HTTP/1 connections to `addr` are idle in the pool.
    pub fn idle_h1(&self, addr: SocketAddr) -> usize {
        self.idle.lock().unwrap().get(&(addr, Version::Http1)).map_or(0, Vec::len)
    }
}

impl Home {
    /// Keep an HTTP/1 connection whose response ended, for the next request.
    pub fn put(self, mut conn: Box<h1::Conn>) {
        if !conn.idle() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        let conns = idle.entry((self.addr, Version::Http1)).or_default();
        if conns.len() < MAX_IDLE_H1 {
            conns.push(Idle { sender: Sender::H1(conn), since: Instant::now() });
        }
    }
}

impl Lent {
    /// Send a request (`parts` are read, and copied only for hyper's HTTP/2 client) and
    /// await the response head. A request that was never written (the connection had
    /// closed) comes back in the error, body unread, to go elsewhere.
    pub async fn send(self, parts: &Parts, body: ReqBody) -> Result<Response<Upstream>, SendError> {
        match self.sender {
            Sender::H1(conn) => match conn.send(parts, body, self.home).await {
                Ok(resp) => Ok(resp.map(Upstream::H1)),
                Err(h1::SendError::Unsent(body, e)) => Err(SendError { unsent: Some(body), error: e.into() }),
                Err(h1::SendError::Failed(e)) => Err(SendError { unsent: None, error: e.into() }),
            },
            Sender::H2 { mut sender, .. } => match sender.try_send_request(rebuild(parts, body)).await {
                Ok(resp) => Ok(resp.map(Upstream::Hyper)),
                Err(mut e) => {
                    let unsent = e.take_message().map(Request::into_body);
                    Err(SendError { unsent, error: e.into_error().into() })
                }
            },
        }
    }
}

/// The same request again, for another attempt (extensions, which hyper does not send,
/// are not carried).
fn rebuild(parts: &Parts, body: ReqBody) -> Request<ReqBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// A request that got no response head: why, and its body if it was never sent.
pub struct SendError {
    pub unsent: Option<ReqBody>,
    pub error: BoxError,
}

impl Sender {
    /// Whether the endpoint closed it (for HTTP/1 without a system call, mostly).
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(c) => c.is_closed(),
            Sender::H2 { sender, .. } => sender.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(_) => true,
            Sender::H2 { sender, .. } => sender.is_ready(),
        }
    }

    fn close(&self) {
        if let Sender::H2 { task, .. } = self {
            task.abort();
        }
    }
}

/// Drop (and close) connections the server closed or that sat idle for `idle_timeout`.
fn prune(conns: &mut Vec<Idle>, now: Instant, idle_timeout: Duration) {
    conns.retain(|c| {
        let keep = !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout;
        if !keep {
            c.sender.close();
        }
        keep
    });
}

async fn drive<F: std::future::Future<Output = Result<(), hyper::Error>>>(conn: F, addr: SocketAddr) {
    if let Err(e) = conn.await {
        debug!(endpoint = %addr, error = %e, "upstream HTTP connection ended with an error");
    }
}
