//! The admin HTTP API, on localhost only (default 127.0.0.1:4191, `agent.admin`):
//!
//! * `GET /live`, `GET /ready`: liveness and readiness (the server starts once the agent
//!   is ready).
//! * `GET /resolve?target=NAME|IP:PORT`: the resolution tree of a service, as JSON (what
//!   `switchyard resolve` prints).
//! * `GET /status`: how many changes were applied, and each source's last rejected
//!   change (cleared once that source sends a good one).
//! * `GET /conns[?service=&endpoint=&client=&after=&limit=]`: live connections (JSON),
//!   with who opened them (pid, command, cgroup, workload, pod and container), where they
//!   went and bytes so far, oldest first. `client` matches pid, command, part of the
//!   cgroup path, or the start of the workload or pod name (`shop/`).
//! * `GET /services[?prefix=&after=&limit=]`, `GET /services/<name>`: services by name,
//!   with endpoints, health, weights, locality and connection counts, and with session
//!   affinity its remembered clients and timeout (JSON). `prefix` filters by name
//!   (`shop/` for a namespace's).
//!
//!   Lists are paged, since a cluster has thousands of services: at most `limit` entries
//!   (default and maximum [`PAGE`]); when there are more, the `x-next-after` header holds
//!   the `after` value for the next page (the last name or connection id).
//! * `GET /stat[?by=service|workload|route|endpoint&service=&workload=&window=SECS]`:
//!   golden signals (requests, success rate, latency percentiles, connections, bytes)
//!   as rows, totals since start and rates over the window (default and at most 60 s).
//! * `GET /edges[?window=SECS]`: who talks to whom right now: client workload -> service
//!   and service -> endpoint edges with traffic in the window or connections open.
//! * `GET /tap[?service=&workload=&path=&limit=&seconds=]`: a live stream of requests
//!   (and opaque connections' connect and close) as JSON lines, chunked, from a
//!   `{"kind":"started"}` line on, until `limit` events or `seconds` (default 60, at most
//!   600) or the client goes away. Bounded and sampled (`stats::tap`).
//! * `GET /metrics`: Prometheus text format.
//! * `GET /config`: the effective configuration (file, catalog and cluster merged).
//! * `GET /log-level`, `PUT /log-level` (body: a tracing filter such as `debug` or
//!   `info,switchyard=debug`): read or change logging at run time.
//! * `GET /`: the dashboard, one self-contained page (no external assets).
//!
//! `agent.metrics`, when set, is a second listener with only `GET /metrics`, `/live` and
//! `/ready`, for a Prometheus off the node.
//!
//! Every request gets an answer (the service's error type is `Infallible`); lookups read
//! the latest snapshot and never wait on discovery.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    config::Config,
    redirect::KernelCounters,
    resolve,
    state::Snapshot,
    stats::{
        ConnView, Stats,
        metrics::DecisionLabels,
        signals::SAMPLE,
        stat::{self, By, Filter},
        tap::{Subscription, TapEvent},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin API: is another switchyard running? Stop it or set agent.admin")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for metrics (agent.metrics): is another program on that port?")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the agent's admin API at {addr}: is switchyard running there? (--admin to change)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talk HTTP to the admin API at {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// What the agent says about its sources, for `/status`.
#[derive(Debug, Default)]
pub struct Status(Mutex<StatusView>);

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StatusView {
    pub applied_changes: u64,
    pub last_applied_source: Option<String>,
    /// By source: the last change that was refused and why.
    pub rejected: BTreeMap<String, Rejection>,
    /// Pod coverage: mode, node addresses and the namespaces' paths.
    pub pods: Option<PodsStatus>,
    /// Kubernetes objects used only in part (a bad annotation, an address that is not
    /// one), by object (`Service shop/web`): what was left out and why.
    pub kubernetes_objects: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PodsStatus {
    pub mode: crate::config::PodsMode,
    /// Where pods reach the agent (`ip:port`).
    pub node_address: Vec<String>,
    pub reachable: usize,
    pub probing: usize,
    /// Namespaces served by the in-kernel fallback because their connects never reached
    /// the agent.
    pub blocked: Vec<crate::pods::BlockedView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejection {
    pub error: String,
    pub at_unix_ms: u128,
}

impl Status {
    pub fn applied(&self, source: &str) {
        let mut s = self.0.lock().unwrap();
        s.applied_changes += 1;
        s.last_applied_source = Some(source.to_owned());
        s.rejected.remove(source);
    }

    pub fn rejected(&self, source: &str, error: String) {
        let at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        self.0.lock().unwrap().rejected.insert(source.to_owned(), Rejection { error, at_unix_ms });
    }

    /// Problems of Kubernetes objects that changed: each object's list now (empty: none).
    pub fn kubernetes_objects(&self, changed: Vec<(String, Vec<String>)>) {
        let mut s = self.0.lock().unwrap();
        for (object, problems) in changed {
            if problems.is_empty() {
                s.kubernetes_objects.remove(&object);
            } else {
                s.kubernetes_objects.insert(object, problems);
            }
        }
    }

    pub fn pods(&self, pods: PodsStatus) {
        self.0.lock().unwrap().pods = Some(pods);
    }

    pub fn view(&self) -> StatusView {
        self.0.lock().unwrap().clone()
    }
}

/// Bind now (so a busy port fails start-up with a clear error), serve until `stop`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })
}

/// Changes the log filter; returns the filter now in force or why it was refused.
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// Everything the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The agent settings in force; `/config` adds the snapshot's services.
    pub config: watch::Receiver<Arc<crate::config::AgentConfig>>,
    pub status: Arc<Status>,
    pub stats: Arc<Stats>,
    /// The kernel programs' counters (none when the agent runs without them).
    pub kernel: Option<Arc<KernelCounters>>,
    pub capacity: Arc<crate::capacity::Capacity>,
    pub log: LogControl,
}

/// Bind the metrics listener (`agent.metrics`) with SO_REUSEPORT: an upgrading agent
/// binds it while the old one still serves (each answers for itself until the old one
/// exits), so it needs no hand-over.
pub fn bind_shared(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    let bind = || {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().map_err(|source| AdminError::BindMetrics { addr, source })
}

/// What a listener serves: the whole admin API, or only metrics and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    /// `GET /metrics`, `/live`, `/ready` (`agent.metrics`).
    Metrics,
}

/// Serve the admin API (and the metrics listener, if any) on a thread of its own, with
/// its own single-threaded runtime (as ztunnel runs its admin and metrics servers): a
/// scrape that renders thousands of connections or series then never takes a worker
/// thread from the data path.
pub fn spawn(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    state: AdminState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let metrics = metrics.map(TcpListener::into_std).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("switchyard-admin".into()).spawn(move || {
        runtime.block_on(async move {
            if let Some(m) = metrics {
                match TcpListener::from_std(m) {
                    Ok(m) => {
                        tokio::spawn(serve_scope(m, Scope::Metrics, state.clone(), stop.clone()));
                    }
                    Err(e) => tracing::error!(error = %e, "the metrics listener cannot be used"),
                }
            }
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, state, stop).await,
                Err(e) => tracing::error!(error = %e, "the admin API cannot use its listener"),
            }
        })
    })?;
    Ok(())
}

pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    serve_scope(listener, Scope::Admin, state, stop).await
}

async fn serve_scope(listener: TcpListener, scope: Scope, state: AdminState, stop: CancellationToken) {
    if scope == Scope::Admin {
        // Rates of `/stat` and `/edges` are taken over these samples.
        let edges = Arc::clone(&state.stats.metrics.edges);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE);
            loop {
                tick.tick().await;
                edges.sample(Instant::now());
            }
        });
    }
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, scope, &state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Entries per page of `/services` and `/conns`, by default and at most.
pub const PAGE: usize = 1000;

/// A paged list: the page, with the cursor of the next one when there is more.
fn page_response(v: &impl serde::Serialize, next: Option<String>) -> Response<Full<Bytes>> {
    let mut r = json_response(StatusCode::OK, v);
    if let Some(next) = next.and_then(|n| hyper::header::HeaderValue::from_str(&encode(&n).to_string()).ok()) {
        r.headers_mut().insert("x-next-after", next);
    }
    r
}

/// A query-string value, percent-encoded (the cursor a client sends back, the CLI's
/// filters).
pub fn encode(value: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
}

fn response(status: StatusCode, body: impl Into<Bytes>, kind: &str) -> Response<Full<Bytes>> {
    Response::builder().status(status).header("content-type", kind).body(Full::new(body.into())).unwrap()
}

fn json_response(status: StatusCode, v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    response(status, serde_json::to_vec(v).unwrap_or_default(), "application/json")
}

fn not_found(what: String) -> Response<Full<Bytes>> {
    json_response(StatusCode::NOT_FOUND, &json!({ "error": what }))
}

type AnyBody = UnsyncBoxBody<Bytes, Infallible>;

/// `/tap` streams; everything else is one document. The metrics listener answers only
/// metrics and health.
async fn route(req: Request<Incoming>, scope: Scope, state: &AdminState) -> Response<AnyBody> {
    if scope == Scope::Metrics && !matches!(req.uri().path(), "/metrics" | "/live" | "/ready") {
        let error = "this listener (agent.metrics) serves only /metrics, /live and /ready";
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": error })).map(|b| b.boxed_unsync());
    }
    if req.method() == hyper::Method::GET && req.uri().path() == "/tap" {
        let query = parse_query(req.uri().query().unwrap_or(""));
        return tap(state.stats.tap.subscribe(), &query);
    }
    answer(req, state).await.map(|b| b.boxed_unsync())
}

/// The window of `/stat` and `/edges`: `window=` seconds, 60 by default and at most.
fn window(q: &HashMap<String, String>) -> std::time::Duration {
    let secs = q.get("window").and_then(|w| w.parse::<f64>().ok()).filter(|w| w.is_finite()).unwrap_or(60.0);
    std::time::Duration::from_secs_f64(secs.clamp(1.0, 60.0))
}

/// What a tap keeps: a service (exact), a client workload (its `namespace/kind/name`,
/// `kind/name` or a prefix of either), a request path prefix.
fn tap_keeps(e: &TapEvent, q: &HashMap<String, String>) -> bool {
    let service = q.get("service").is_none_or(|s| *s == e.service);
    let workload = q.get("workload").is_none_or(|w| {
        e.client.workload.starts_with(w.as_str())
            || e.client.workload.split_once('/').is_some_and(|(_, rest)| rest.starts_with(w.as_str()))
    });
    let path = q.get("path").is_none_or(|p| e.request.as_ref().is_some_and(|r| r.path.starts_with(p.as_str())));
    service && workload && path
}

/// A tap's stream of JSON lines.
fn tap(sub: Subscription, q: &HashMap<String, String>) -> Response<AnyBody> {
    use tokio::sync::broadcast::error::RecvError;
    let limit: u64 = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(u64::MAX);
    let secs: u64 = q.get("seconds").and_then(|l| l.parse().ok()).unwrap_or(60).clamp(1, 600);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    let q = q.clone();
    let line = |v: &serde_json::Value| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{v}\n"))));
    let started = futures::stream::once(async move { line(&json!({"kind": "started"})) });
    let events = futures::stream::unfold((sub, 0u64), move |(mut sub, sent)| {
        let q = q.clone();
        async move {
            if sent >= limit {
                return None;
            }
            loop {
                let next = tokio::time::timeout_at(deadline, sub.rx.recv()).await.ok()?;
                match next {
                    Ok(e) if tap_keeps(&e, &q) => {
                        let v = serde_json::to_value(&*e).unwrap_or_default();
                        return Some((line(&v), (sub, sent + 1)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        return Some((line(&json!({"kind": "dropped", "count": n})), (sub, sent)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    use futures::StreamExt as _;
    let body = StreamBody::new(started.chain(events)).boxed_unsync();
    Response::builder().header("content-type", "application/x-ndjson").body(body).unwrap()
}

async fn answer(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let query = parse_query(req.uri().query().unwrap_or(""));
    let path = req.uri().path().to_owned();
    let snapshot = Arc::clone(&state.snapshot.borrow());
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/") => response(StatusCode::OK, DASHBOARD, "text/html; charset=utf-8"),
        ("GET", "/live") => response(StatusCode::OK, "live\n", "text/plain"),
        ("GET", "/ready") => response(StatusCode::OK, "ready\n", "text/plain"),
        ("GET", "/status") => {
            #[derive(serde::Serialize)]
            struct Full {
                #[serde(flatten)]
                sources: StatusView,
                capacity: crate::capacity::CapacityView,
            }
            json_response(StatusCode::OK, &Full { sources: state.status.view(), capacity: state.capacity.view() })
        }
        ("GET", "/config") => {
            let agent = (**state.config.borrow()).clone();
            json_response(
                StatusCode::OK,
                &Config { agent, services: snapshot.services().map(|(_, s)| s.full_config()).collect() },
            )
        }
        ("GET", "/metrics") => {
            if let Some(Ok(counters)) = state.kernel.as_ref().map(|k| k.read()) {
                for (decision, n) in counters {
                    let labels = DecisionLabels { decision: decision.into() };
                    state.stats.metrics.kernel.get_or_create(&labels).set(n as i64);
                }
            }
            state.capacity.export(&state.stats.metrics);
            response(StatusCode::OK, state.stats.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        }
        ("GET", "/stat") => {
            let by = match query.get("by").map(|b| (b, By::parse(b))) {
                None => By::Service,
                Some((_, Some(by))) => by,
                Some((b, None)) => {
                    let error = format!("`by={b}` is not one of service, workload, route, endpoint");
                    return json_response(StatusCode::BAD_REQUEST, &json!({ "error": error }));
                }
            };
            let filter = Filter { service: query.get("service").cloned(), workload: query.get("workload").cloned() };
            let rows = stat::rows(&state.stats.metrics.edges, by, &filter, window(&query), Instant::now());
            json_response(StatusCode::OK, &rows)
        }
        ("GET", "/edges") => {
            json_response(StatusCode::OK, &stat::graph(&state.stats.metrics.edges, window(&query), Instant::now()))
        }
        ("GET", "/conns") => {
            let limit = limit(&query);
            let after: u64 = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
            let mut conns = state.stats.conns.list().into_iter().filter(|c| c.id > after && conn_matches(c, &query));
            let page: Vec<ConnView> = conns.by_ref().take(limit).collect();
            let next = conns.next().and(page.last()).map(|c| c.id.to_string());
            page_response(&page, next)
        }
        ("GET", "/services") => {
            let prefix = query.get("prefix").map_or("", String::as_str);
            let after = query.get("after").map(String::as_str);
            let (page, next) = resolve::services(&snapshot, Instant::now(), after, prefix, limit(&query));
            page_response(&page, next)
        }
        ("GET", p) if p.starts_with("/services/") => {
            let name = percent_encoding::percent_decode_str(&p["/services/".len()..]).decode_utf8_lossy().into_owned();
            match resolve::service(&snapshot, &name, Instant::now()) {
                Some(s) => json_response(StatusCode::OK, &s),
                None => not_found(format!("no service is named `{name}`")),
            }
        }
        ("GET", "/resolve") => {
            let Some(target) = query.get("target") else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "give ?target=SERVICE-NAME or ?target=IP:PORT"}),
                );
            };
            match resolve::tree(&snapshot, target, Instant::now()) {
                Some(tree) => json_response(StatusCode::OK, &tree),
                None => not_found(format!("no service is named `{target}` or has it as an address")),
            }
        }
        ("GET", "/log-level") => match (state.log)(None) {
            Ok(current) => response(StatusCode::OK, current + "\n", "text/plain"),
            Err(e) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "error": e })),
        },
        ("PUT" | "POST", "/log-level") => {
            let body = match req.into_body().collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                Err(e) => return json_response(StatusCode::BAD_REQUEST, &json!({ "error": e.to_string() })),
            };
            match (state.log)(Some(&body)) {
                Ok(now) => response(StatusCode::OK, now + "\n", "text/plain"),
                Err(e) => json_response(StatusCode::BAD_REQUEST, &json!({ "error": e })),
            }
        }
        (_, other) => not_found(format!("no such admin path `{other}`")),
    }
}

/// A query string as key -> value, values percent-decoded (the inverse of [`encode`]);
/// a pair without `=` is ignored and the last of a repeated key wins. Its own function
/// so that it can be fuzzed (fuzz/fuzz_targets/admin_query.rs).
pub fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()))
        .collect()
}

/// Entries a paged list returns: `limit=` clamped to 1..=[`PAGE`], [`PAGE`] by default.
pub fn limit(q: &HashMap<String, String>) -> usize {
    q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(PAGE).clamp(1, PAGE)
}

/// `/conns` filters: exact service or endpoint; client matches pid, command, cgroup,
/// workload or pod.
fn conn_matches(c: &ConnView, q: &HashMap<String, String>) -> bool {
    let service_ok = q.get("service").is_none_or(|s| c.service.as_deref() == Some(s.as_str()));
    let endpoint_ok = q.get("endpoint").is_none_or(|e| c.route.as_ref().is_some_and(|r| r.endpoint.to_string() == *e));
    let client_ok = q.get("client").is_none_or(|want| {
        c.client.as_ref().is_some_and(|cl| {
            cl.pid.to_string() == *want
                || cl.comm == *want
                || cl.cgroup.as_deref().is_some_and(|g| g.contains(want.as_str()))
                || cl.workload.starts_with(want.as_str())
                || cl.pod_name.as_deref().is_some_and(|p| p.starts_with(want.as_str()))
        })
    });
    service_ok && endpoint_ok && client_ok
}

/// The dashboard: one self-contained HTML page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// `GET path` from the admin API at `addr`: (status, body). For the CLI.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    get_page(addr, path).await.map(|(status, body, _)| (status, body))
}

/// [`get`], with the `x-next-after` cursor of a paged list.
pub async fn get_page(addr: SocketAddr, path: &str) -> Result<(u16, String, Option<String>), AdminError> {
    let res = send_get(addr, path).await?;
    let status = res.status().as_u16();
    let next = res.headers().get("x-next-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = res.into_body().collect().await.map_err(|source| AdminError::Http { addr, source })?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), next))
}

/// `GET path` from the admin API at `addr` as a stream of lines (`/tap`): `each` is called
/// with every line as it arrives, until it returns false or the stream ends. Returns the
/// status.
pub async fn get_lines(addr: SocketAddr, path: &str, mut each: impl FnMut(&str) -> bool) -> Result<u16, AdminError> {
    let res = send_get(addr, path).await?;
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|source| AdminError::Http { addr, source })?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if !each(String::from_utf8_lossy(&line[..i]).as_ref()) {
                return Ok(status);
            }
        }
    }
    if !pending.is_empty() {
        each(String::from_utf8_lossy(&pending).as_ref());
    }
    Ok(status)
}

/// One GET on a new connection to the admin API: the response, its body unread.
async fn send_get(addr: SocketAddr, path: &str) -> Result<Response<Incoming>, AdminError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| AdminError::Connect { addr, source })?;
    let http = |source| AdminError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).expect("valid request");
    sender.send_request(req).await.map_err(http)
}
