//! HTTP-aware proxying: a connection detected (or configured) as HTTP/1.1 or HTTP/2 is
//! served by hyper, and each request picks its own endpoint with the service's balancer,
//! over pooled upstream connections (`pool`). Failed attempts go to another endpoint
//! within the retry policy and budget (`budget`), with bodies replayed (`body`);
//! upgrades (WebSocket, CONNECT) become byte tunnels. Requests and responses are not
//! modified beyond hop-by-hop headers (`headers`). See docs/http.md.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    http::request::Parts,
    server::conn::{http1 as server1, http2 as server2},
    service::service_fn,
    upgrade::OnUpgrade,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::{
    body::{Replay, ReqBody, RespBody, Upstream},
    headers::{dtab_target, is_upgrade, retryable, strip_hop_by_hop},
    idle::{InFlight, Tracked},
    observe::{Observed, Record},
    pool::{Lent, Pool, PoolError, SendError},
    retry::{Failure, Retry},
};
pub use self::{pool::Version, rewind::Rewind as Prefixed};
use super::{
    attempt::{Attempt, Attempts, Limit, Spent},
    counted::{Counted, Tally},
    linger::Lingering,
    outcome::Outcome,
    tcp::{Meters, relay},
    upstream,
};
use crate::{
    balance::ActiveGuard,
    config::HttpLimits,
    state::{Service, Snapshot},
    stats::{
        Stats,
        conns::Conn,
        metrics::Direction,
        signals::Signals,
        tap::{self, TapClient, TapEvent, TapRequest},
    },
};

mod body;
pub(crate) mod h1;
pub(crate) mod headers;
mod idle;
mod observe;
mod pool;
mod retry;
mod rewind;

/// What every HTTP connection shares: the upstream connections, and how clients are
/// served (with the agent's `http_limits`).
pub struct Http {
    pool: Pool,
    mark: u32,
    stats: Arc<Stats>,
    h1: server1::Builder,
    h2: server2::Builder<TokioExecutor>,
    idle_timeout: Option<Duration>,
    /// How long a connection the agent stops waits for its first request (`drain`).
    first_request_grace: Option<Duration>,
}

/// One client connection.
struct Downstream {
    http: Arc<Http>,
    state: watch::Receiver<Arc<Snapshot>>,
    /// The service the client dialled.
    service: Arc<str>,
    /// Affinity key (the client's cgroup) for ring-hash balancing.
    key: u64,
    version: Version,
    conn: Option<Arc<Conn>>,
    /// An accepted upgrade, run once hyper hands the connection over.
    tunnel: Mutex<Option<Tunnel>>,
    /// The agent stopping: every HTTP/1 answer after it says `Connection: close`.
    stop: CancellationToken,
}

/// An upgrade the endpoint accepted: both sides' upgraded connections, the endpoint's
/// in-flight guard, and its byte counters (owned: the tunnel outlives the request's
/// snapshot).
struct Tunnel {
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    bytes: [Counter; 2],
    endpoint: Arc<Signals>,
    _guard: ActiveGuard,
}

/// The endpoint that gave a response (its own or one the agent made for it), with its
/// golden-signal edge: the one its upstream connection counts bytes on, held by the
/// attempt, so a request is counted without looking it up again.
struct Answerer {
    addr: SocketAddr,
    edge: Arc<Signals>,
}

impl Answerer {
    fn of(attempt: &Attempt<'_>, metrics: &crate::stats::Metrics) -> Self {
        Self { addr: attempt.endpoint.addr, edge: Arc::clone(attempt.handles().signals(metrics)) }
    }
}

/// What one attempt at an endpoint came to.
enum Exchange {
    /// Response headers, and how long they took.
    Answered(Response<Upstream>, Duration),
    /// No response: how the attempt failed (the caller makes the answer).
    Failed(Failure),
    /// A pooled connection had closed; the request comes back unsent.
    Unsent(ReqBody),
}

/// How long a gRPC response's first frame is awaited to see whether it is an error
/// status to retry; a stream whose first message takes longer passes on unread.
const GRPC_STATUS_WAIT: Duration = Duration::from_millis(100);

impl Http {
    pub fn new(mark: u32, stats: Arc<Stats>, limits: &HttpLimits) -> Arc<Self> {
        let mut h1 = server1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes as usize);
        let mut h2 = server2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.max_pending_reset_streams);
        Arc::new(Self {
            pool: Pool::default(),
            mark,
            stats,
            h1,
            h2,
            idle_timeout: limits.idle_timeout,
            first_request_grace: limits.header_read_timeout,
        })
    }

    /// Close upstream connections idle longer than the shortest `pool_idle_timeout` any
    /// service asks for (the reconciler calls this now and then).
    pub fn sweep(&self, snapshot: &Snapshot) {
        let idle = snapshot.pool_idle_timeout();
        self.pool.sweep(idle.unwrap_or(Duration::from_secs(90)));
    }

    /// Serve one client connection until it closes (or `stop` fires: then finish the
    /// requests in flight and close, with GOAWAY on HTTP/2).
    #[allow(clippy::too_many_arguments)]
    pub async fn serve(
        self: Arc<Self>,
        io: Prefixed<TcpStream>,
        version: Version,
        state: watch::Receiver<Arc<Snapshot>>,
        service: Arc<str>,
        key: u64,
        conn: Option<Arc<Conn>>,
        stop: CancellationToken,
    ) -> Result<(), hyper::Error> {
        let stopping = stop.clone();
        let down = Arc::new(Downstream {
            http: self,
            state,
            service,
            key,
            version,
            conn,
            tunnel: Mutex::default(),
            stop: stopping,
        });
        let flight = InFlight::new();
        let (d, f) = (Arc::clone(&down), flight.clone());
        let svc = service_fn(move |req| {
            let (d, active) = (Arc::clone(&d), f.begin());
            async move { Ok::<_, Infallible>(d.request(req).await.map(|body| Tracked::new(body, active))) }
        });
        let tally = down.conn.as_ref().map(Tally::client);
        let io = TokioIo::new(Lingering::new(Counted::new(io, tally)));
        // What ends the connection gracefully: the agent stopping (true), or `idle_timeout`
        // with no request in flight (false).
        let close = async {
            match down.http.idle_timeout {
                Some(t) => tokio::select! { _ = stop.cancelled() => true, _ = flight.idle_for(t) => false },
                None => {
                    stop.cancelled().await;
                    true
                }
            }
        };
        let first_request = down.http.first_request_grace;
        match version {
            Version::Http1 => {
                let conn = down.http.h1.serve_connection(io, svc).with_upgrades();
                drain(conn, close, &flight, first_request, |c| c.graceful_shutdown()).await?;
            }
            Version::Http2 => {
                let conn = down.http.h2.serve_connection(io, svc);
                drain(conn, close, &flight, first_request, |c| c.graceful_shutdown()).await?;
            }
        }
        let tunnel = down.tunnel.lock().unwrap().take();
        if let Some(t) = tunnel {
            down.run_tunnel(t).await;
        }
        Ok(())
    }
}

/// Serve `conn` to its end, or until `close` fires (with whether the agent is stopping),
/// then end it gracefully (`shutdown`: HTTP/1.1 after the response in flight, HTTP/2
/// with GOAWAY).
///
/// A connection the agent stops before its first request waits for that request first,
/// up to `first_request` (`header_read_timeout`; the drain timeout bounds it too): its
/// client connected to send one, detection may already hold it, and hyper closes a
/// connection that has begun no request (HTTP/1 idle, HTTP/2 still reading the preface)
/// at once, losing it unanswered. That was an upgrade's race: a connection the outgoing
/// agent accepted just before it stopped accepting. A connection that has served requests
/// closes at once when idle: its next request may cross the close, which HTTP/1.1
/// clients retry (RFC 9112 section 9.3.1), as they must for any server.
async fn drain<C, F>(
    conn: C,
    close: impl Future<Output = bool>,
    flight: &InFlight,
    first_request: Option<Duration>,
    shutdown: F,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
    F: FnOnce(Pin<&mut C>),
{
    tokio::pin!(conn);
    // Biased: the connection is polled first, so a request already waiting in the socket
    // is read (and so in flight, answered) before a close that fired meanwhile.
    let stopping = tokio::select! {
        biased;
        r = conn.as_mut() => return r,
        stopping = close => stopping,
    };
    if stopping && !flight.begun() {
        let first = async {
            match first_request {
                Some(t) => drop(tokio::time::timeout(t, flight.first_request()).await),
                None => flight.first_request().await,
            }
        };
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            () = first => {}
        }
    }
    shutdown(conn.as_mut());
    conn.await
}

impl Downstream {
    async fn request(&self, mut req: Request<Incoming>) -> Response<Observed<RespBody>> {
        let snapshot = Arc::clone(&self.state.borrow());
        let grpc = is_grpc(&req);
        // Per request, the newest state: endpoints that came or went since the
        // connection opened count.
        let Some(index) = snapshot.index_named(&self.service) else {
            return local(StatusCode::SERVICE_UNAVAILABLE, "service_removed", grpc).map(|b| Observed::new(b, None));
        };
        let service = snapshot.service(index);
        let started = Instant::now();
        let tap =
            self.conn.as_ref().filter(|_| self.http.stats.tap.active()).map(|c| tap_event(c, &req, &service.name));
        if let Some(c) = &self.conn {
            c.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let upgrade = self.version == Version::Http1 && is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let (resp, endpoint) = if upgrade {
            self.upgrade(req, &snapshot, index).await
        } else {
            let target = self.route_override(&req, &snapshot, index);
            self.forward(req, &snapshot, service, target, grpc, started).await
        };
        let stats = &self.http.stats;
        let (endpoint, edge) = endpoint.map(|a| (a.addr, a.edge)).unzip();
        service.metrics.answered(&stats.metrics, endpoint, resp.status().as_u16());
        let record = self.conn.as_ref().map(|c| Record {
            route: c.route_edge().cloned(),
            endpoint: edge,
            latency: started.elapsed(),
            status: resp.status().as_u16(),
            grpc_status: observe::grpc_status(resp.headers()),
            tap: tap.map(|mut t| {
                t.endpoint = endpoint;
                t.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                Box::new((Arc::clone(&stats.tap), t))
            }),
        });
        let mut resp = resp.map(|b| Observed::new(b, record));
        if self.version == Version::Http1
            && self.stop.is_cancelled()
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            // The connection's last answer says so. hyper's graceful shutdown (`drain`)
            // adds this only when it comes before the answer's head is written, and an
            // answer from a fast endpoint can be written within the poll that read the
            // request, before `drain` gets to call it.
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The service named by an allowed `l5d-dtab` override, else the dialled one.
    fn route_override(&self, req: &Request<Incoming>, snapshot: &Snapshot, dialled: usize) -> usize {
        let service = snapshot.service(dialled);
        let allowed = &service.config.http.allow_override;
        if allowed.is_empty() {
            return dialled;
        }
        match dtab_target(req.headers(), &service.name) {
            Some(t) if allowed.iter().any(|a| a == t) => snapshot.index_named(t).unwrap_or(dialled),
            Some(t) => {
                debug!(service = %service.name, target = t, "l5d-dtab names a service not in http.allow_override; ignored");
                dialled
            }
            None => dialled,
        }
    }

    /// Send a request (arrived at `start`) to endpoints of `target` until one answers
    /// acceptably, the attempts or the budget run out, or the request timeout passes.
    /// Returns the response and the endpoint that gave it.
    async fn forward(
        &self,
        req: Request<Incoming>,
        snapshot: &Snapshot,
        dialled: &Service,
        target: usize,
        grpc: bool,
        start: Instant,
    ) -> (Response<RespBody>, Option<Answerer>) {
        let policy = &dialled.config.http;
        let metrics = &self.http.stats.metrics;
        let deadline = policy.request_timeout.map(|t| start + t);
        dialled.budget.deposit(start);
        let (parts, incoming) = req.into_parts();
        let retry = Retry::new(&policy.retry, &parts.method);
        let replay = Replay::of(&incoming, policy.retry.max_body);
        let mut body = Bodies { incoming: Some(incoming), unsent: None, replay };
        let concrete = snapshot.concrete(target, start);
        let limit = Limit::Total { attempts: retry.attempts(), deadline };
        let mut attempts = Attempts::new(snapshot, &concrete, self.key, limit);
        let mut last: Option<(Response<RespBody>, Option<Answerer>)> = None;
        // Why the next attempt is a retry; counted once it is really made.
        let mut retrying = None;
        loop {
            // The first attempt goes at once: no second clock read.
            let now = if attempts.made() == 0 { start } else { Instant::now() };
            // No attempt left: stop before the budget check, which would spend a retry
            // (and count it as refused or made) that never happens.
            if attempts.made() >= retry.attempts() {
                break;
            }
            if attempts.made() > 0 && !retry.may_send_again(dialled, body.sendable(), metrics, now) {
                break;
            }
            let attempt = match attempts.next(now) {
                Ok(a) => a,
                Err(Spent::Deadline) => {
                    last = Some((local(StatusCode::GATEWAY_TIMEOUT, "request_timeout", grpc), None));
                    break;
                }
                Err(Spent::Attempts | Spent::NoEndpoint) => break,
            };
            // `http_retries` counts attempts retried on another endpoint: one the budget
            // refused is `http_retry_budget_exhausted` instead, not both.
            if let Some(reason) = retrying.take() {
                dialled.metrics.retried(metrics, reason);
            }
            let addr = attempt.endpoint.addr;
            let attempt_timeout = match (policy.attempt_timeout, deadline.map(|d| d.saturating_duration_since(now))) {
                (Some(a), Some(r)) => Some(a.min(r)),
                (a, r) => a.or(r),
            };
            let exchange = self.exchange(&attempt, &parts, &mut body, now, attempt_timeout, policy.pool_idle_timeout);
            let failure = match exchange.await {
                Exchange::Unsent(unsent) => {
                    // Not the endpoint's fault, and safe for any method.
                    body.unsent = Some(unsent);
                    last = Some((
                        local(StatusCode::BAD_GATEWAY, "upstream_error", grpc),
                        Some(Answerer::of(&attempt, metrics)),
                    ));
                    Failure::Closed
                }
                Exchange::Failed(failure) => {
                    let (status, reason, answered) = match failure {
                        Failure::Connect => (StatusCode::BAD_GATEWAY, "connect_failed", false),
                        Failure::Local => (StatusCode::SERVICE_UNAVAILABLE, "agent_overloaded", false),
                        Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "response_timeout", true),
                        _ => (StatusCode::BAD_GATEWAY, "upstream_error", true),
                    };
                    let by = answered.then(|| Answerer::of(&attempt, metrics));
                    last = Some((local(status, reason, grpc), by));
                    failure
                }
                Exchange::Answered(resp, latency) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    // Each hop speaks its own version: an HTTP/1.0 answer from the endpoint
                    // must not turn the client's keep-alive HTTP/1.1 connection into 1.0.
                    // And its own connection: the endpoint's `Connection: close` or
                    // framing is not the client's (RFC 9110 section 7.6.1).
                    rparts.version = parts.version;
                    strip_hop_by_hop(&mut rparts.headers, false);
                    let may_retry = attempts.made() < retry.attempts() && body.replay.can_replay();
                    let mut resp = Response::from_parts(rparts, RespBody::upstream(rbody, None));
                    let mut retry_it = retryable(resp.status(), resp.headers(), &policy.retry);
                    if grpc && !retry_it && may_retry {
                        // gRPC errors mostly come as trailers right after the headers.
                        let trailers = resp.body_mut().peek_trailers(GRPC_STATUS_WAIT).await;
                        retry_it = trailers.is_some_and(|t| retryable(StatusCode::OK, t, &policy.retry));
                    }
                    attempt.responded(metrics, !(resp.status().is_server_error() || retry_it), latency);
                    if !(retry_it && may_retry) {
                        dialled.metrics.request_latency(metrics).observe(start.elapsed().as_secs_f64());
                        let by = Some(Answerer::of(&attempt, metrics));
                        // The endpoint counts the response as load until its body ends.
                        resp.body_mut().hold(attempt.guard);
                        return (resp, by);
                    }
                    debug!(attempt = attempt.number, endpoint = %addr, status = %resp.status(), "retryable response");
                    last = Some((resp, Some(Answerer::of(&attempt, metrics))));
                    Failure::Status
                }
            };
            match retry.after(failure) {
                Some(reason) => retrying = Some(reason),
                None => break,
            }
        }
        last.unwrap_or_else(|| (local(StatusCode::SERVICE_UNAVAILABLE, "no_endpoint", grpc), None))
    }

    /// One attempt, begun at `t0`: an upstream connection from the pool (a new connect is
    /// reported to the attempt like any other), the request sent, the response headers
    /// awaited. `timeout` bounds it all; `idle` is the dialled service's pool idle
    /// timeout. Every failure is fed back to the endpoint here; an answer is judged by
    /// the caller.
    async fn exchange(
        &self,
        attempt: &Attempt<'_>,
        parts: &Parts,
        body: &mut Bodies,
        t0: Instant,
        timeout: Option<Duration>,
        idle: Duration,
    ) -> Exchange {
        let metrics = &self.http.stats.metrics;
        let addr = attempt.endpoint.addr;
        // As an opaque connect would wait, and no longer than the attempt may take.
        let connect_timeout = attempt.connect_timeout(t0).min(timeout.unwrap_or(Duration::MAX));
        let pool = &self.http.pool;
        let tally = || self.tally(attempt);
        let lent: Lent = match pool.lend(addr, self.version, self.http.mark, connect_timeout, idle, tally).await {
            Ok(l) => l,
            Err(e) => {
                debug!(attempt = attempt.number, endpoint = %addr, error = %e, "upstream HTTP connection failed");
                return Exchange::Failed(match &e {
                    PoolError::Connect { source, .. } => match attempt.connect_failed(metrics, source) {
                        Some(_) => Failure::Local,
                        None => Failure::Connect,
                    },
                    PoolError::Handshake { .. } => {
                        attempt.responded(metrics, false, Duration::ZERO);
                        Failure::Connect
                    }
                });
            }
        };
        if let Some(time) = lent.connected_in {
            attempt.connected(metrics, time);
        }
        let send = lent.send(parts, body.next());
        let sent = match timeout {
            Some(t) => tokio::time::timeout(t.saturating_sub(t0.elapsed()), send).await.ok(),
            None => Some(send.await),
        };
        // The connection goes with the request: an HTTP/1 one closes when it was not
        // answered, or comes back to the pool when the response's body ends.
        match sent {
            None => {
                debug!(attempt = attempt.number, endpoint = %addr, "no response headers in time");
                attempt.responded(metrics, false, Duration::ZERO);
                Exchange::Failed(Failure::Timeout)
            }
            Some(Err(SendError { unsent, error })) => {
                debug!(attempt = attempt.number, endpoint = %addr, error = %error, unsent = unsent.is_some(), "upstream request failed");
                match unsent {
                    Some(body) => Exchange::Unsent(body),
                    None => {
                        attempt.responded(metrics, false, Duration::ZERO);
                        Exchange::Failed(Failure::Broke)
                    }
                }
            }
            Some(Ok(resp)) => Exchange::Answered(resp, t0.elapsed()),
        }
    }

    /// Where an upstream connection opened for `attempt` counts its bytes.
    fn tally(&self, attempt: &Attempt<'_>) -> Option<Tally> {
        let metrics = &self.http.stats.metrics;
        self.conn.as_ref()?;
        let h = attempt.handles();
        Some(Tally::Endpoint {
            out: h.bytes(metrics, Direction::Out).clone(),
            inbound: h.bytes(metrics, Direction::In).clone(),
            signals: Arc::clone(h.signals(metrics)),
        })
    }

    /// An upgrade or CONNECT: a dedicated upstream connection (never pooled: it becomes a
    /// tunnel), connected like an opaque TCP connection (with its connect retries).
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        snapshot: &Snapshot,
        service: usize,
    ) -> (Response<RespBody>, Option<Answerer>) {
        let downstream = hyper::upgrade::on(&mut req);
        let metrics = &self.http.stats.metrics;
        let concrete = snapshot.concrete(service, Instant::now());
        let up = match upstream::connect(snapshot, &concrete, self.key, self.http.mark, metrics).await {
            Ok(up) => up,
            Err(e @ upstream::ConnectError::Local { .. }) => {
                debug!(error = %e, "no upstream connection for the upgrade");
                return (local(StatusCode::SERVICE_UNAVAILABLE, "agent_overloaded", false), None);
            }
            Err(e) => {
                debug!(error = %e, "no endpoint for the upgrade");
                return (local(StatusCode::BAD_GATEWAY, "connect_failed", false), None);
            }
        };
        let addr = up.endpoint().addr;
        let handles = up.handles();
        let bytes = [handles.bytes(metrics, Direction::Out).clone(), handles.bytes(metrics, Direction::In).clone()];
        let endpoint = Arc::clone(handles.signals(metrics));
        let tally = self.conn.as_ref().map(|_| Tally::Endpoint {
            out: bytes[0].clone(),
            inbound: bytes[1].clone(),
            signals: Arc::clone(&endpoint),
        });
        let by = || Answerer { addr, edge: Arc::clone(&endpoint) };
        let upstream::Upstream { stream, guard, .. } = up;
        let io = TokioIo::new(Counted::new(stream, tally));
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, endpoint = %addr, "upstream handshake failed");
                return (local(StatusCode::BAD_GATEWAY, "upstream_error", false), Some(by()));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream upgrade connection failed");
            }
        });
        let connect = req.method() == hyper::Method::CONNECT;
        let (parts, incoming) = req.into_parts();
        let replay = Replay::of(&incoming, 0);
        let body = ReqBody::first(incoming, replay);
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, endpoint = %addr, "upgrade request failed");
                return (local(StatusCode::BAD_GATEWAY, "upstream_error", false), Some(by()));
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success()) {
            let upstream = hyper::upgrade::on(&mut resp);
            let answerer = by();
            *self.tunnel.lock().unwrap() = Some(Tunnel { downstream, upstream, bytes, endpoint, _guard: guard });
            let (parts, body) = resp.into_parts();
            return (Response::from_parts(parts, RespBody::upstream(Upstream::Hyper(body), None)), Some(answerer));
        }
        let (parts, body) = resp.into_parts();
        (Response::from_parts(parts, RespBody::upstream(Upstream::Hyper(body), Some(guard))), Some(by()))
    }

    /// Copy bytes both ways between the two upgraded connections until both close, with
    /// the counted copy opaque TCP uses (bytes hyper had read ahead on either side go
    /// first). What hyper read and wrote went through the counting wrappers; from here on
    /// the relay counts, on the bare sockets.
    async fn run_tunnel(&self, t: Tunnel) -> Outcome {
        let (down, up) = match tokio::try_join!(t.downstream, t.upstream) {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return Outcome::Error;
            }
        };
        type Down = TokioIo<Lingering<Counted<Prefixed<TcpStream>>>>;
        let (Ok(down), Ok(up)) = (down.downcast::<Down>(), up.downcast::<TokioIo<Counted<TcpStream>>>()) else {
            debug!("an upgraded connection is not the socket it started as; closing the tunnel");
            return Outcome::Error;
        };
        // `unread`: what detection read that hyper never asked for, so never counted.
        let (unread, mut client) = down.io.into_inner().into_inner().into_inner().into_parts();
        let mut upstream = up.io.into_inner().into_inner();
        let [out, inbound] = &t.bytes;
        let ahead = async {
            for bytes in [&unread[..], &down.read_buf[..]] {
                upstream.write_all(bytes).await?;
                out.inc_by(bytes.len() as u64);
                t.endpoint.bytes_out.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            client.write_all(&up.read_buf).await?;
            std::io::Result::Ok(())
        };
        if let Err(e) = ahead.await {
            debug!(error = %e, "tunnel ended with an error");
            return Outcome::Error;
        }
        if let Some(c) = &self.conn {
            use std::sync::atomic::Ordering::Relaxed;
            let route = c.route_edge();
            c.bytes_out.fetch_add(unread.len() as u64, Relaxed);
            c.bytes_in.fetch_add(up.read_buf.len() as u64, Relaxed);
            if let Some(r) = route {
                r.bytes_out.fetch_add(unread.len() as u64, Relaxed);
                r.bytes_in.fetch_add(up.read_buf.len() as u64, Relaxed);
            }
        }
        let meters = self.conn.as_deref().map(|conn| Meters { conn, out, inbound, endpoint: Some(&t.endpoint) });
        relay(&client, &upstream, meters).await
    }
}

/// A request body over the attempts: the client's (streamed to the first attempt while a
/// copy is kept), one given back unsent, or the kept copy.
struct Bodies {
    incoming: Option<Incoming>,
    unsent: Option<ReqBody>,
    replay: Replay,
}

impl Bodies {
    /// Whether there is a body for another attempt.
    fn sendable(&self) -> bool {
        self.unsent.is_some() || self.incoming.is_some() || self.replay.can_replay()
    }

    fn next(&mut self) -> ReqBody {
        match (self.unsent.take(), self.incoming.take()) {
            (Some(b), _) => b,
            (None, Some(inc)) => ReqBody::first(inc, self.replay.clone()),
            (None, None) => self.replay.replay().expect("checked sendable before the attempt"),
        }
    }
}

/// A tap's view of a request, its answer filled in when it ends.
fn tap_event<B>(conn: &Conn, req: &Request<B>, service: &str) -> TapEvent {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
    TapEvent {
        kind: "request",
        at_unix_ms: tap::unix_ms(),
        client: TapClient::of(conn.client(), conn.peer),
        service: service.to_owned(),
        endpoint: None,
        request: Some(TapRequest {
            method: req.method().to_string(),
            authority: authority.unwrap_or_default().to_owned(),
            path: req.uri().path().to_owned(),
            status: 0,
            grpc_status: None,
            success: false,
        }),
        latency_ms: 0.0,
        bytes_out: None,
        bytes_in: None,
        outcome: None,
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A response the agent makes itself, marked with `switchyard-error: <reason>` (as
/// linkerd's `l5d-proxy-error`). gRPC clients get a trailers-only gRPC status instead of
/// an HTTP error they would report as a protocol failure.
fn local(status: StatusCode, reason: &'static str, grpc: bool) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::Local(None));
    resp.headers_mut().insert("switchyard-error", HeaderValue::from_static(reason));
    if grpc {
        // UNAVAILABLE, or DEADLINE_EXCEEDED for timeouts.
        let code = if status == StatusCode::GATEWAY_TIMEOUT { "4" } else { "14" };
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        resp.headers_mut().insert("grpc-status", HeaderValue::from_static(code));
        resp.headers_mut().insert("grpc-message", HeaderValue::from_static(reason));
    } else {
        *resp.status_mut() = status;
        *resp.body_mut() = RespBody::Local(Some(Bytes::from(format!("switchyard: {reason}\n"))));
    }
    resp
}
