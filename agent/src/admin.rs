//! The admin HTTP API, on localhost only (default 127.0.0.1:4191, `agent.admin`):
//!
//! * `GET /live`, `GET /ready`: liveness and readiness (the server starts once the agent
//!   is ready).
//! * `GET /resolve?target=NAME|IP:PORT`: the resolution tree of a service, as JSON (what
//!   `switchyard resolve` prints).
//! * `GET /status`: how many changes were applied, and each source's last rejected
//!   change (cleared once that source sends a good one).
//!
//! Every request gets an answer (the service's error type is `Infallible`); lookups read
//! the latest snapshot and never wait on discovery.

use std::{
    collections::BTreeMap,
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

use crate::{resolve, state::Snapshot};

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

    pub fn view(&self) -> StatusView {
        self.0.lock().unwrap().clone()
    }
}

/// Bind now (so a busy port fails start-up with a clear error), serve until `stop`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })
}

pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    status: Arc<Status>,
    stop: CancellationToken,
) {
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
        let (state, status) = (state.clone(), Arc::clone(&status));
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let snapshot = Arc::clone(&state.borrow());
                let status = status.view();
                async move { Ok::<_, Infallible>(answer(&req, &snapshot, &status)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn answer(req: &Request<Incoming>, snapshot: &Snapshot, status: &StatusView) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, kind: &str| {
        Response::builder().status(status).header("content-type", kind).body(Full::new(Bytes::from(body))).unwrap()
    };
    let json_body = |status: StatusCode, v: serde_json::Value| text(status, v.to_string(), "application/json");
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into(), "text/plain"),
        "/ready" => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/status" => json_body(StatusCode::OK, serde_json::to_value(status).unwrap_or_default()),
        "/resolve" => {
            let target = req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("target="));
            let Some(target) = target.map(|t| percent_encoding::percent_decode_str(t).decode_utf8_lossy().into_owned())
            else {
                return json_body(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "give ?target=SERVICE-NAME or ?target=IP:PORT"}),
                );
            };
            match resolve::tree(snapshot, &target, Instant::now()) {
                Some(tree) => json_body(StatusCode::OK, serde_json::to_value(tree).unwrap_or_default()),
                None => json_body(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no service is named `{target}` or has it as an address")}),
                ),
            }
        }
        other => json_body(StatusCode::NOT_FOUND, json!({"error": format!("no such admin path `{other}`")})),
    }
}

/// `GET path` from the admin API at `addr`: (status, body). For the CLI.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| AdminError::Connect { addr, source })?;
    let http = |source| AdminError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    tokio::spawn(conn);
    let req = Request::get(path).header("host", addr.to_string()).body(Empty::<Bytes>::new()).expect("valid request");
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
