//! Upstream HTTP connections, kept per endpoint and reused across requests and client
//! connections: HTTP/2 connections are shared (one multiplexed connection per endpoint),
//! HTTP/1.1 ones are lent to one request at a time. Connections carry the agent's mark
//! like every upstream socket, and are closed after `idle` without use.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::AbortHandle;
use tracing::debug;

use super::body::ReqBody;
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

/// A connection lent out for one request. Dropping it without [`Pool::give_back`]
/// (a timed-out or failed request) closes the connection.
pub struct Lent {
    /// How long the connect took, when this connection was opened for the request (an
    /// idle one taken from the pool: `None`).
    pub connected_in: Option<ConnectTime>,
    sender: Sender,
    addr: SocketAddr,
    /// The connection's task: aborted when the connection is not given back, so a hung
    /// endpoint does not keep a half-used HTTP/1 connection open.
    task: AbortHandle,
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

struct Idle {
    sender: Sender,
    task: AbortHandle,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<(SocketAddr, Version), Vec<Idle>>>,
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
        if let Some(lent) = self.take_idle(addr, version, idle_timeout) {
            return Ok(lent);
        }
        let t0 = Instant::now();
        let stream =
            connect_marked(addr, mark, connect_timeout).await.map_err(|source| PoolError::Connect { addr, source })?;
        let connected_in = Some(ConnectTime::measure(&stream, t0));
        let _ = stream.set_nodelay(true);
        // Counted into the endpoint of the request that opened it (an endpoint shared by
        // two services counts there for both).
        let io = TokioIo::new(Counted::new(stream, tally()));
        let handshake = |source| PoolError::Handshake { addr, source };
        let (sender, task) = match version {
            Version::Http1 => {
                let (sender, conn) = http1::handshake(io).await.map_err(handshake)?;
                (Sender::H1(sender), tokio::spawn(drive(conn, addr)).abort_handle())
            }
            Version::Http2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.map_err(handshake)?;
                (Sender::H2(sender), tokio::spawn(drive(conn, addr)).abort_handle())
            }
        };
        if let Sender::H2(s) = &sender {
            // Shared from the start: later requests multiplex onto it.
            self.put(addr, version, Idle { sender: Sender::H2(s.clone()), task: task.clone(), since: Instant::now() });
        }
        Ok(Lent { connected_in, sender, addr, task })
    }

    fn take_idle(&self, addr: SocketAddr, version: Version, idle_timeout: Duration) -> Option<Lent> {
        let mut idle = self.idle.lock().unwrap();
        let conns = idle.get_mut(&(addr, version))?;
        let now = Instant::now();
        prune(conns, now, idle_timeout);
        match version {
            // HTTP/2: share the connection, keep it in the pool.
            Version::Http2 => conns.iter_mut().find(|c| c.sender.is_ready()).map(|c| {
                c.since = now;
                let Sender::H2(s) = &c.sender else { unreachable!("h2 pool holds h2 senders") };
                Lent { connected_in: None, sender: Sender::H2(s.clone()), addr, task: c.task.clone() }
            }),
            // HTTP/1: one request at a time; a connection still streaming its last response
            // is not ready and stays where it is.
            Version::Http1 => {
                let i = conns.iter().position(|c| c.sender.is_ready())?;
                let c = conns.swap_remove(i);
                Some(Lent { connected_in: None, sender: c.sender, addr, task: c.task })
            }
        }
    }

    /// Return an HTTP/1 connection once its response headers are in; HTTP/2 ones are
    /// shared and were never taken out.
    pub fn give_back(&self, lent: Lent) {
        if let Sender::H1(_) = lent.sender {
            let mut idle = self.idle.lock().unwrap();
            let conns = idle.entry((lent.addr, Version::Http1)).or_default();
            if conns.len() < MAX_IDLE_H1 {
                conns.push(Idle { sender: lent.sender, task: lent.task, since: Instant::now() });
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

impl Lent {
    /// Send a request. A request that was never written (the connection had closed) comes
    /// back in the error, body unread, to go elsewhere.
    pub async fn send(&mut self, req: Request<ReqBody>) -> Result<Response<Incoming>, TrySendError<Request<ReqBody>>> {
        match &mut self.sender {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }

    /// Abort the connection (for HTTP/2, only this lender's view of it: the shared
    /// connection stays, the request's stream is reset when its future is dropped).
    pub fn discard(self) {
        if let Sender::H1(_) = self.sender {
            self.task.abort();
        }
    }
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }
}

/// Drop (and close) connections the server closed or that sat idle for `idle_timeout`.
fn prune(conns: &mut Vec<Idle>, now: Instant, idle_timeout: Duration) {
    conns.retain(|c| {
        let keep = !c.sender.is_closed() && now.duration_since(c.since) < idle_timeout;
        if !keep {
            c.task.abort();
        }
        keep
    });
}

async fn drive<F: std::future::Future<Output = Result<(), hyper::Error>>>(conn: F, addr: SocketAddr) {
    if let Err(e) = conn.await {
        debug!(endpoint = %addr, error = %e, "upstream HTTP connection ended with an error");
    }
}
