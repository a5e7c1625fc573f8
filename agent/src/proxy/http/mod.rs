//! HTTP-aware proxying: a connection detected (or configured) as HTTP/1.1 or HTTP/2 is
//! served by hyper, and each request picks its own endpoint with the service's balancer,
//! over pooled upstream connections (`pool`). Failed attempts go to another endpoint
//! within the retry policy and budget (`budget`), with bodies replayed (`body`);
//! upgrades (WebSocket, CONNECT) become byte tunnels. Requests and responses are not
//! modified beyond hop-by-hop headers (`headers`). See docs/http.md.

use std::{
    collections::HashMap,
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
use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::{
    body::{Meter, Replay, ReqBody, RespBody},
    budget::Budget,
    headers::{dtab_target, is_idempotent, is_upgrade, retryable, strip_hop_by_hop},
    pool::Pool,
};
pub use self::{pool::Version, rewind::Rewind as Prefixed};
use super::upstream::{self, pick, report};
use crate::{
    balance::{ActiveGuard, Endpoint},
    config::RetryConfig,
    state::{Service, Snapshot},
    stats::{
        Stats,
        conns::Conn,
        metrics::{BytesLabels, Direction, RequestLabels, RetryLabels, ServiceLabels},
    },
};

mod body;
mod budget;
mod headers;
mod pool;
mod rewind;

/// What every HTTP connection shares: upstream connections and retry budgets.
pub struct Http {
    pool: Pool,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
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

struct Tunnel {
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    _guard: ActiveGuard,
}

/// How long a gRPC response's first frame is awaited to see whether it is an error
/// status to retry; a stream whose first message takes longer passes on unread.
const GRPC_STATUS_WAIT: Duration = Duration::from_millis(100);

/// How often idle upstream connections are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl Http {
    pub fn new(mark: u32, stats: Arc<Stats>, state: watch::Receiver<Arc<Snapshot>>) -> Arc<Self> {
        let http = Arc::new(Self { pool: Pool::default(), budgets: Mutex::default(), mark, stats });
        let weak = Arc::downgrade(&http);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(http) = weak.upgrade() else { return };
                // The shortest idle timeout any service asks for bounds them all.
                let idle = state.borrow().services().iter().map(|s| s.config.http.pool_idle_timeout).min();
                http.pool.sweep(idle.unwrap_or(Duration::from_secs(90)));
            }
        });
        http
    }

    /// The retry budget of `service`, kept across requests and reloads.
    fn budget(&self, service: &str, policy: &RetryConfig, now: Instant) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap();
        // Looked up by &str first: this runs for every request, and the common case
        // (known service, unchanged policy) then allocates nothing.
        if let Some(b) = budgets.get(service)
            && b.same_policy(policy.budget_ratio, policy.budget_min_per_second, policy.budget_window)
        {
            return Arc::clone(b);
        }
        let b = Arc::new(Budget::new(policy.budget_ratio, policy.budget_min_per_second, policy.budget_window, now));
        budgets.insert(service.to_owned(), Arc::clone(&b));
        b
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
        let Some(service) = snapshot.service_named(&self.service) else {
            return local(StatusCode::SERVICE_UNAVAILABLE, "service_removed", grpc);
        };
        if let Some(c) = &self.conn {
            c.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let upgrade = self.version == Version::Http1 && is_upgrade(&req);
        strip_hop_by_hop(req.headers_mut(), upgrade);
        let (resp, endpoint) = if upgrade {
            self.upgrade(req, &snapshot, service).await
        } else {
            let target = self.route_override(&req, &snapshot, service);
            self.forward(req, &snapshot, service, target, grpc).await
        };
        let metrics = &self.http.stats.metrics;
        metrics
            .requests
            .get_or_create(&RequestLabels {
                service: service.name.clone(),
                endpoint: endpoint.map(|a| a.to_string()).unwrap_or_default(),
                status: resp.status().as_u16(),
            })
            .inc();
        resp
    }

    /// The service named by an allowed `l5d-dtab` override, else the dialled one.
    fn route_override<'a>(&self, req: &Request<Incoming>, snapshot: &'a Snapshot, service: &'a Service) -> &'a Service {
        let allowed = &service.config.http.allow_override;
        if allowed.is_empty() {
            return service;
        }
        match dtab_target(req.headers(), &service.name) {
            Some(t) if allowed.iter().any(|a| a == t) => snapshot.service_named(t).unwrap_or(service),
            Some(t) => {
                debug!(service = %service.name, target = t, "l5d-dtab names a service not in http.allow_override; ignored");
                service
            }
            None => service,
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
        target: &Service,
        grpc: bool,
    ) -> (Response<RespBody>, Option<SocketAddr>) {
        let policy = &dialled.config.http;
        let retry = &policy.retry;
        let metrics = &self.http.stats.metrics;
        let start = Instant::now();
        let deadline = policy.request_timeout.map(|t| start + t);
        let budget = self.http.budget(&dialled.name, retry, start);
        budget.deposit(start);
        let (parts, incoming) = req.into_parts();
        let idempotent = is_idempotent(&parts.method);
        let replay = Replay::new(retry.max_body);
        let mut incoming = Some(incoming);
        // A request an upstream connection gave back unsent (it had closed).
        let mut unsent: Option<ReqBody> = None;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last: Option<(Response<RespBody>, Option<SocketAddr>)> = None;
        let retried = |reason: &str| {
            metrics.retries.get_or_create(&RetryLabels { service: dialled.name.clone(), reason: reason.into() }).inc()
        };
        for attempt in 1..=retry.attempts {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                last = Some((local(StatusCode::GATEWAY_TIMEOUT, "request_timeout", grpc), None));
                break;
            }
            if attempt > 1 {
                if unsent.is_none() && incoming.is_none() && !replay.can_replay() {
                    break;
                }
                if !budget.withdraw(now) {
                    metrics.budget_exhausted.get_or_create(&ServiceLabels { service: dialled.name.clone() }).inc();
                    debug!(service = %dialled.name, "retry budget spent; not retrying");
                    break;
                }
            }
            let candidates = snapshot.concrete_for(target, now);
            let Some((svc, ep)) =
                candidates.iter().find_map(|s| pick(s, self.key, &tried, now).map(|p| (*s, p.endpoint)))
            else {
                break;
            };
            tried.push(ep.addr);
            let guard = ep.state.begin();
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            let attempt_timeout = match (policy.attempt_timeout, remaining) {
                (Some(a), Some(r)) => Some(a.min(r)),
                (a, r) => a.or(r),
            };
            let t0 = Instant::now();
            let connect_timeout = svc.config.connect.timeout.min(attempt_timeout.unwrap_or(Duration::MAX));
            let mut lent = match self
                .http
                .pool
                .lend(ep.addr, self.version, self.http.mark, connect_timeout, policy.pool_idle_timeout)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    debug!(attempt, endpoint = %ep.addr, error = %e, "upstream HTTP connection failed");
                    self.failed(svc, ep);
                    last = Some((local(StatusCode::BAD_GATEWAY, "connect_failed", grpc), None));
                    retried("connect");
                    continue;
                }
            };
            let body = match (unsent.take(), incoming.take()) {
                (Some(b), _) => b,
                (None, Some(inc)) => ReqBody::first(inc, replay.clone(), self.meter(svc, ep.addr, Direction::Out)),
                (None, None) => replay.replay().expect("checked replayable above"),
            };
            let send = lent.send(rebuild(&parts, body));
            let sent = match attempt_timeout {
                Some(t) => tokio::time::timeout(t.saturating_sub(t0.elapsed()), send).await.ok(),
                None => Some(send.await),
            };
            match sent {
                None => {
                    lent.discard();
                    self.failed(svc, ep);
                    debug!(attempt, endpoint = %ep.addr, "no response headers in time");
                    let timed_out = local(StatusCode::GATEWAY_TIMEOUT, "response_timeout", grpc);
                    last = Some((timed_out, Some(ep.addr)));
                    if !idempotent {
                        break;
                    }
                    retried("timeout");
                }
                Some(Err(mut e)) => {
                    let never_sent = e.take_message();
                    debug!(attempt, endpoint = %ep.addr, error = %e.error(), unsent = never_sent.is_some(), "upstream request failed");
                    lent.discard();
                    last = Some((local(StatusCode::BAD_GATEWAY, "upstream_error", grpc), Some(ep.addr)));
                    if let Some(req) = never_sent {
                        // A pooled connection the server had closed: not the endpoint's
                        // fault, and safe for any method.
                        unsent = Some(req.into_body());
                        retried("closed");
                        continue;
                    }
                    self.failed(svc, ep);
                    if !idempotent {
                        break;
                    }
                    retried("error");
                }
                Some(Ok(resp)) => {
                    let latency = t0.elapsed();
                    self.http.pool.give_back(lent);
                    let (mut rparts, rbody) = resp.into_parts();
                    // Each hop speaks its own version: an HTTP/1.0 answer from the endpoint
                    // must not turn the client's keep-alive HTTP/1.1 connection into 1.0.
                    rparts.version = parts.version;
                    let meter = self.meter(svc, ep.addr, Direction::In);
                    let mut resp = Response::from_parts(rparts, RespBody::upstream(rbody, meter, Some(guard)));
                    let mut retry_it = retryable(resp.status(), resp.headers(), retry);
                    let may_retry = attempt < retry.attempts && replay.can_replay();
                    if grpc && !retry_it && may_retry {
                        // gRPC errors mostly come as trailers right after the headers.
                        let trailers = resp.body_mut().peek_trailers(GRPC_STATUS_WAIT).await;
                        retry_it = trailers.is_some_and(|t| retryable(StatusCode::OK, t, retry));
                    }
                    if resp.status().is_server_error() || retry_it {
                        self.failed(svc, ep);
                    } else {
                        report(svc, ep, ep.state.on_connect_ok(latency, Instant::now()), metrics);
                    }
                    if retry_it && may_retry {
                        debug!(attempt, endpoint = %ep.addr, status = %resp.status(), "retryable response");
                        last = Some((resp, Some(ep.addr)));
                        retried("status");
                        continue;
                    }
                    metrics
                        .request_latency
                        .get_or_create(&ServiceLabels { service: dialled.name.clone() })
                        .observe(start.elapsed().as_secs_f64());
                    return (resp, Some(ep.addr));
                }
            }
        }
        last.unwrap_or_else(|| (local(StatusCode::SERVICE_UNAVAILABLE, "no_endpoint", grpc), None))
    }

    /// 5xx, a timeout or a broken connection: counts towards ejecting the endpoint.
    fn failed(&self, svc: &Service, ep: &Endpoint) {
        let change = ep.state.on_connect_failed(Instant::now(), svc.balancer.accrual());
        report(svc, ep, change, &self.http.stats.metrics);
    }

    fn meter(&self, svc: &Service, endpoint: SocketAddr, direction: Direction) -> Option<Meter> {
        let conn = self.conn.as_ref()?;
        let labels = BytesLabels { service: svc.name.clone(), endpoint: endpoint.to_string(), direction };
        Some(Meter {
            conn: Arc::clone(conn),
            outbound: direction == Direction::Out,
            metric: self.http.stats.metrics.bytes.get_or_create(&labels).clone(),
        })
    }

    /// An upgrade or CONNECT: a dedicated upstream connection (never pooled: it becomes a
    /// tunnel), connected like an opaque TCP connection (with its connect retries).
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        snapshot: &Snapshot,
        service: &Service,
    ) -> (Response<RespBody>, Option<SocketAddr>) {
        let downstream = hyper::upgrade::on(&mut req);
        let metrics = &self.http.stats.metrics;
        let candidates = snapshot.concrete_for(service, Instant::now());
        let up = match upstream::connect(&candidates, self.key, self.http.mark, metrics).await {
            Ok(up) => up,
            Err(e) => {
                debug!(error = %e, "no endpoint for the upgrade");
                return (local(StatusCode::BAD_GATEWAY, "connect_failed", false), None);
            }
        };
        let addr = up.endpoint.addr;
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(up.stream)).await {
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
            *self.tunnel.lock().unwrap() = Some(Tunnel { downstream, upstream, _guard: up.guard });
            let (parts, body) = resp.into_parts();
            return (Response::from_parts(parts, RespBody::upstream(body, None, None)), Some(addr));
        }
        let (parts, body) = resp.into_parts();
        (Response::from_parts(parts, RespBody::upstream(body, None, Some(up.guard))), Some(addr))
    }

    /// Copy bytes both ways between the two upgraded connections until both close.
    async fn run_tunnel(&self, t: Tunnel) {
        let (down, up) = match tokio::try_join!(t.downstream, t.upstream) {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((out, inb)) => {
                if let Some(c) = &self.conn {
                    c.bytes_out.fetch_add(out, std::sync::atomic::Ordering::Relaxed);
                    c.bytes_in.fetch_add(inb, std::sync::atomic::Ordering::Relaxed);
                }
                debug!(bytes.out = out, bytes.in = inb, "tunnel closed");
            }
            Err(e) => debug!(error = %e, "tunnel ended with an error"),
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
