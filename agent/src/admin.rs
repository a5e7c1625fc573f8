//! The admin HTTP API, on localhost only (default 127.0.0.1:4191, `agent.admin`):
//!
//! * `GET /live`, `GET /ready`: liveness and readiness (the server starts once the agent
//!   is ready).
//! * `GET /resolve?target=NAME|IP:PORT`: the resolution tree of a service, as JSON (what
//!   `switchyard resolve` prints).
//! * `GET /status`: how many changes were applied, and each source's last rejected
//!   change (cleared once that source sends a good one).
//! * `GET /conns[?service=&endpoint=&client=&after=&limit=]`: live connections (JSON),
//!   with who opened them, where they went and bytes so far, oldest first. `client`
//!   matches pid, command or cgroup.
//! * `GET /services[?prefix=&after=&limit=]`, `GET /services/<name>`: services by name,
//!   with endpoints, health, weights, locality and connection counts (JSON). `prefix`
//!   filters by name (`shop/` for a namespace's).
//!
//!   Lists are paged, since a cluster has thousands of services: at most `limit` entries
//!   (default and maximum [`PAGE`]); when there are more, the `x-next-after` header holds
//!   the `after` value for the next page (the last name or connection id).
//! * `GET /metrics`: Prometheus text format.
//! * `GET /config`: the effective configuration (file, catalog and cluster merged).
//! * `GET /log-level`, `PUT /log-level` (body: a tracing filter such as `debug` or
//!   `info,switchyard=debug`): read or change logging at run time.
//! * `GET /`: the dashboard, one self-contained page (no external assets).
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

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
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
    stats::{ConnView, Stats, metrics::DecisionLabels},
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin API: is another switchyard running? Stop it or set agent.admin")]
    Bind {
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
    pub log: LogControl,
}

/// Serve the admin API on a thread of its own, with its own single-threaded runtime
/// (as ztunnel runs its admin and metrics servers): a scrape that renders thousands of
/// connections or series then never takes a worker thread from the data path.
pub fn spawn(listener: TcpListener, state: AdminState, stop: CancellationToken) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("switchyard-admin".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, state, stop).await,
                Err(e) => tracing::error!(error = %e, "the admin API cannot use its listener"),
            }
        })
    })?;
    Ok(())
}

pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
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
                async move { Ok::<_, Infallible>(answer(req, &state).await) }
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

async fn answer(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()))
        .collect();
    let path = req.uri().path().to_owned();
    let snapshot = Arc::clone(&state.snapshot.borrow());
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/") => response(StatusCode::OK, DASHBOARD, "text/html; charset=utf-8"),
        ("GET", "/live") => response(StatusCode::OK, "live\n", "text/plain"),
        ("GET", "/ready") => response(StatusCode::OK, "ready\n", "text/plain"),
        ("GET", "/status") => json_response(StatusCode::OK, &state.status.view()),
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
            response(StatusCode::OK, state.stats.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
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

fn limit(q: &HashMap<String, String>) -> usize {
    q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(PAGE).clamp(1, PAGE)
}

/// `/conns` filters: exact service or endpoint; client matches pid, command or cgroup.
fn conn_matches(c: &ConnView, q: &HashMap<String, String>) -> bool {
    let service_ok = q.get("service").is_none_or(|s| c.service.as_ref() == Some(s));
    let endpoint_ok = q.get("endpoint").is_none_or(|e| c.route.as_ref().is_some_and(|r| r.endpoint.to_string() == *e));
    let client_ok = q.get("client").is_none_or(|want| {
        c.client.as_ref().is_some_and(|cl| {
            cl.pid.to_string() == *want
                || cl.comm == *want
                || cl.cgroup.as_deref().is_some_and(|g| g.contains(want.as_str()))
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
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| AdminError::Connect { addr, source })?;
    let http = |source| AdminError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).expect("valid request");
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status().as_u16();
    let next = res.headers().get("x-next-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = res.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), next))
}
