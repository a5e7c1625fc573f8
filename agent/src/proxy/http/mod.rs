//! HTTP-aware proxying: a connection detected (or configured) as HTTP/1.1 or HTTP/2 is
//! served by hyper, and each request picks its own endpoint with the service's balancer,
//! over pooled upstream connections (`pool`). Failed attempts go to another endpoint
//! within the retry policy and budget (`budget`), with bodies replayed (`body`);
//! upgrades (WebSocket, CONNECT) become byte tunnels. Requests and responses are not
//! modified beyond hop-by-hop headers (`headers`). See docs/http.md.

use std::{
    convert::Infallible,
    net::SocketAddr,
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
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::{
    body::{Meter, Replay, ReqBody, RespBody},
    headers::{dtab_target, is_upgrade, retryable, strip_hop_by_hop},
    pool::{Lent, Pool, PoolError},
    retry::{Failure, Retry},
};
pub use self::{pool::Version, rewind::Rewind as Prefixed};
use super::{
    attempt::{Attempt, Attempts, Limit, Spent},
    outcome::Outcome,
    tcp::{Meters, relay},
    upstream,
};
use crate::{
    balance::ActiveGuard,
    state::{Service, Snapshot},
    stats::{Stats, conns::Conn, metrics::Direction},
};

mod body;
mod headers;
mod pool;
mod retry;
mod rewind;

/// What every HTTP connection shares: the upstream connections.
pub struct Http {
    pool: Pool,
    mark: u32,
    stats: Arc<Stats>,
}

/// One client connection.
struct Downstream {
    http: Arc<Http>,
    state: watch::Receiver<Arc<Snapshot>>,
    /// The service the client dialled.
    service: String,
    /// Affinity key (the client's cgroup) for ring-hash balancing.
    key: u64,
    version: Version,
    conn: Option<Arc<Conn>>,
    /// An accepted upgrade, run once hyper hands the connection over.
    tunnel: Mutex<Option<Tunnel>>,
}

/// An upgrade the endpoint accepted: both sides' upgraded connections, the endpoint's
/// in-flight guard, and its byte counters (owned: the tunnel outlives the request's
/// snapshot).
struct Tunnel {
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    bytes: [Counter; 2],
    _guard: ActiveGuard,
}

/// What one attempt at an endpoint came to.
enum Exchange {
    /// Response headers, and how long they took.
    Answered(Response<Incoming>, Duration),
    /// No response: how the attempt failed (the caller makes the answer).
    Failed(Failure),
    /// A pooled connection had closed; the request comes back unsent.
    Unsent(ReqBody),
}

/// How long a gRPC response's first frame is awaited to see whether it is an error
/// status to retry; a stream whose first message takes longer passes on unread.
const GRPC_STATUS_WAIT: Duration = Duration::from_millis(100);

impl Http {
    pub fn new(mark: u32, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(Self { pool: Pool::default(), mark, stats })
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
        service: String,
        key: u64,
        conn: Option<Arc<Conn>>,
        stop: CancellationToken,
    ) -> Result<(), hyper::Error> {
        let down = Arc::new(Downstream { http: self, state, service, key, version, conn, tunnel: Mutex::default() });
        let d = Arc::clone(&down);
        let svc = service_fn(move |req| {
            let d = Arc::clone(&d);
            async move { Ok::<_, Infallible>(d.request(req).await) }
        });
        let io = TokioIo::new(io);
        match version {
            Version::Http1 => {
                let conn = server1::Builder::new().serve_connection(io, svc).with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r?,
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await?
                    }
                }
            }
            Version::Http2 => {
                let conn = server2::Builder::new(TokioExecutor::new()).serve_connection(io, svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r?,
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await?
                    }
                }
            }
        }
        let tunnel = down.tunnel.lock().unwrap().take();
        if let Some(t) = tunnel {
            down.run_tunnel(t).await;
        }
        Ok(())
    }
}

impl Downstream {
    async fn request(&self, mut req: Request<Incoming>) -> Response<RespBody> {
        let snapshot = Arc::clone(&self.state.borrow());
        let grpc = is_grpc(&req);
        // Per request, the newest state: endpoints that came or went since the
        // connection opened count.
        let Some(index) = snapshot.index_named(&self.service) else {
            return local(StatusCode::SERVICE_UNAVAILABLE, "service_removed", grpc);
        };
        let service = snapshot.service(index);
        if let Some(c) = &self.conn {
            c.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let upgrade = self.version == Version::Http1 && is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let (resp, endpoint) = if upgrade {
            self.upgrade(req, &snapshot, index).await
        } else {
            let target = self.route_override(&req, &snapshot, index);
            self.forward(req, &snapshot, service, target, grpc).await
        };
        service.metrics.answered(&self.http.stats.metrics, endpoint, resp.status().as_u16());
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

    /// Send a request to endpoints of `target` until one answers acceptably, the
    /// attempts or the budget run out, or the request timeout passes. Returns the
    /// response and the endpoint that gave it.
    async fn forward(
        &self,
        req: Request<Incoming>,
        snapshot: &Snapshot,
        dialled: &Service,
        target: usize,
        grpc: bool,
    ) -> (Response<RespBody>, Option<SocketAddr>) {
        let policy = &dialled.config.http;
        let metrics = &self.http.stats.metrics;
        let start = Instant::now();
        let deadline = policy.request_timeout.map(|t| start + t);
        dialled.budget.deposit(start);
        let (parts, incoming) = req.into_parts();
        let retry = Retry::new(&policy.retry, &parts.method);
        let mut body = Bodies { incoming: Some(incoming), unsent: None, replay: Replay::new(policy.retry.max_body) };
        let concrete = snapshot.concrete(target, start);
        let limit = Limit::Total { attempts: retry.attempts(), deadline };
        let mut attempts = Attempts::new(snapshot, &concrete, self.key, limit);
        let mut last: Option<(Response<RespBody>, Option<SocketAddr>)> = None;
        loop {
            let now = Instant::now();
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
            let addr = attempt.endpoint.addr;
            let attempt_timeout = match (policy.attempt_timeout, deadline.map(|d| d.saturating_duration_since(now))) {
                (Some(a), Some(r)) => Some(a.min(r)),
                (a, r) => a.or(r),
            };
            let exchange = self.exchange(&attempt, &parts, &mut body, attempt_timeout, policy.pool_idle_timeout);
            let failure = match exchange.await {
                Exchange::Unsent(unsent) => {
                    // Not the endpoint's fault, and safe for any method.
                    body.unsent = Some(unsent);
                    last = Some((local(StatusCode::BAD_GATEWAY, "upstream_error", grpc), Some(addr)));
                    Failure::Closed
                }
                Exchange::Failed(failure) => {
                    let (status, reason, endpoint) = match failure {
                        Failure::Connect => (StatusCode::BAD_GATEWAY, "connect_failed", None),
                        Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "response_timeout", Some(addr)),
                        _ => (StatusCode::BAD_GATEWAY, "upstream_error", Some(addr)),
                    };
                    last = Some((local(status, reason, grpc), endpoint));
                    failure
                }
                Exchange::Answered(resp, latency) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    // Each hop speaks its own version: an HTTP/1.0 answer from the endpoint
                    // must not turn the client's keep-alive HTTP/1.1 connection into 1.0.
                    rparts.version = parts.version;
                    let meter = self.meter(&attempt, Direction::In);
                    let may_retry = attempts.made() < retry.attempts() && body.replay.can_replay();
                    let mut resp = Response::from_parts(rparts, RespBody::upstream(rbody, meter, None));
                    let mut retry_it = retryable(resp.status(), resp.headers(), &policy.retry);
                    if grpc && !retry_it && may_retry {
                        // gRPC errors mostly come as trailers right after the headers.
                        let trailers = resp.body_mut().peek_trailers(GRPC_STATUS_WAIT).await;
                        retry_it = trailers.is_some_and(|t| retryable(StatusCode::OK, t, &policy.retry));
                    }
                    attempt.responded(metrics, !(resp.status().is_server_error() || retry_it), latency);
                    if !(retry_it && may_retry) {
                        dialled.metrics.request_latency(metrics).observe(start.elapsed().as_secs_f64());
                        // The endpoint counts the response as load until its body ends.
                        resp.body_mut().hold(attempt.guard);
                        return (resp, Some(addr));
                    }
                    debug!(attempt = attempt.number, endpoint = %addr, status = %resp.status(), "retryable response");
                    last = Some((resp, Some(addr)));
                    Failure::Status
                }
            };
            match retry.after(failure) {
                Some(reason) => dialled.metrics.retried(metrics, reason),
                None => break,
            }
        }
        last.unwrap_or_else(|| (local(StatusCode::SERVICE_UNAVAILABLE, "no_endpoint", grpc), None))
    }

    /// One attempt: an upstream connection from the pool (a new connect is reported to
    /// the attempt like any other), the request sent, the response headers awaited.
    /// `timeout` bounds it all; `idle` is the dialled service's pool idle timeout. Every
    /// failure is fed back to the endpoint here; an answer is judged by the caller.
    async fn exchange(
        &self,
        attempt: &Attempt<'_>,
        parts: &Parts,
        body: &mut Bodies,
        timeout: Option<Duration>,
        idle: Duration,
    ) -> Exchange {
        let metrics = &self.http.stats.metrics;
        let addr = attempt.endpoint.addr;
        let t0 = Instant::now();
        // As an opaque connect would wait, and no longer than the attempt may take.
        let connect_timeout = attempt.connect_timeout(t0).min(timeout.unwrap_or(Duration::MAX));
        let pool = &self.http.pool;
        let mut lent: Lent = match pool.lend(addr, self.version, self.http.mark, connect_timeout, idle).await {
            Ok(l) => l,
            Err(e) => {
                debug!(attempt = attempt.number, endpoint = %addr, error = %e, "upstream HTTP connection failed");
                match &e {
                    PoolError::Connect { source, .. } => attempt.connect_failed(metrics, source),
                    PoolError::Handshake { .. } => attempt.responded(metrics, false, Duration::ZERO),
                }
                return Exchange::Failed(Failure::Connect);
            }
        };
        if let Some(latency) = lent.connected_in {
            attempt.connected(metrics, latency);
        }
        let req = rebuild(parts, body.next(self.meter(attempt, Direction::Out)));
        let send = lent.send(req);
        let sent = match timeout {
            Some(t) => tokio::time::timeout(t.saturating_sub(t0.elapsed()), send).await.ok(),
            None => Some(send.await),
        };
        match sent {
            None => {
                lent.discard();
                debug!(attempt = attempt.number, endpoint = %addr, "no response headers in time");
                attempt.responded(metrics, false, Duration::ZERO);
                Exchange::Failed(Failure::Timeout)
            }
            Some(Err(mut e)) => {
                let never_sent = e.take_message();
                debug!(attempt = attempt.number, endpoint = %addr, error = %e.error(), unsent = never_sent.is_some(), "upstream request failed");
                lent.discard();
                match never_sent {
                    Some(req) => Exchange::Unsent(req.into_body()),
                    None => {
                        attempt.responded(metrics, false, Duration::ZERO);
                        Exchange::Failed(Failure::Broke)
                    }
                }
            }
            Some(Ok(resp)) => {
                pool.give_back(lent);
                Exchange::Answered(resp, t0.elapsed())
            }
        }
    }

    fn meter(&self, attempt: &Attempt<'_>, direction: Direction) -> Option<Meter> {
        let conn = self.conn.as_ref()?;
        Some(Meter {
            conn: Arc::clone(conn),
            outbound: direction == Direction::Out,
            metric: attempt.handles().bytes(&self.http.stats.metrics, direction).clone(),
        })
    }

    /// An upgrade or CONNECT: a dedicated upstream connection (never pooled: it becomes a
    /// tunnel), connected like an opaque TCP connection (with its connect retries).
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        snapshot: &Snapshot,
        service: usize,
    ) -> (Response<RespBody>, Option<SocketAddr>) {
        let downstream = hyper::upgrade::on(&mut req);
        let metrics = &self.http.stats.metrics;
        let concrete = snapshot.concrete(service, Instant::now());
        let up = match upstream::connect(snapshot, &concrete, self.key, self.http.mark, metrics).await {
            Ok(up) => up,
            Err(e) => {
                debug!(error = %e, "no endpoint for the upgrade");
                return (local(StatusCode::BAD_GATEWAY, "connect_failed", false), None);
            }
        };
        let addr = up.endpoint().addr;
        let handles = up.handles();
        let bytes = [handles.bytes(metrics, Direction::Out).clone(), handles.bytes(metrics, Direction::In).clone()];
        let upstream::Upstream { stream, guard, .. } = up;
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, endpoint = %addr, "upstream handshake failed");
                return (local(StatusCode::BAD_GATEWAY, "upstream_error", false), Some(addr));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream upgrade connection failed");
            }
        });
        let connect = req.method() == hyper::Method::CONNECT;
        let (parts, incoming) = req.into_parts();
        let body = ReqBody::first(incoming, Replay::new(0), None);
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, endpoint = %addr, "upgrade request failed");
                return (local(StatusCode::BAD_GATEWAY, "upstream_error", false), Some(addr));
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success()) {
            let upstream = hyper::upgrade::on(&mut resp);
            *self.tunnel.lock().unwrap() = Some(Tunnel { downstream, upstream, bytes, _guard: guard });
            let (parts, body) = resp.into_parts();
            return (Response::from_parts(parts, RespBody::upstream(body, None, None)), Some(addr));
        }
        let (parts, body) = resp.into_parts();
        (Response::from_parts(parts, RespBody::upstream(body, None, Some(guard))), Some(addr))
    }

    /// Copy bytes both ways between the two upgraded connections until both close, with
    /// the counted copy opaque TCP uses (bytes hyper had read ahead on either side go
    /// first).
    async fn run_tunnel(&self, t: Tunnel) -> Outcome {
        let (down, up) = match tokio::try_join!(t.downstream, t.upstream) {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return Outcome::Error;
            }
        };
        let (Ok(down), Ok(up)) = (down.downcast::<TokioIo<Prefixed<TcpStream>>>(), up.downcast::<TokioIo<TcpStream>>())
        else {
            debug!("an upgraded connection is not the socket it started as; closing the tunnel");
            return Outcome::Error;
        };
        let (unread, mut client) = down.io.into_inner().into_parts();
        let mut upstream = up.io.into_inner();
        let [out, inbound] = &t.bytes;
        let ahead = async {
            for bytes in [&unread[..], &down.read_buf[..]] {
                upstream.write_all(bytes).await?;
                out.inc_by(bytes.len() as u64);
            }
            client.write_all(&up.read_buf).await?;
            inbound.inc_by(up.read_buf.len() as u64);
            std::io::Result::Ok(())
        };
        if let Err(e) = ahead.await {
            debug!(error = %e, "tunnel ended with an error");
            return Outcome::Error;
        }
        if let Some(c) = &self.conn {
            use std::sync::atomic::Ordering::Relaxed;
            c.bytes_out.fetch_add((unread.len() + down.read_buf.len()) as u64, Relaxed);
            c.bytes_in.fetch_add(up.read_buf.len() as u64, Relaxed);
        }
        let meters = self.conn.as_deref().map(|conn| Meters { conn, out, inbound });
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

    fn next(&mut self, meter: Option<Meter>) -> ReqBody {
        match (self.unsent.take(), self.incoming.take()) {
            (Some(b), _) => b,
            (None, Some(inc)) => ReqBody::first(inc, self.replay.clone(), meter),
            (None, None) => self.replay.replay().expect("checked sendable before the attempt"),
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
