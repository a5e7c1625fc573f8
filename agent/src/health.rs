//! Active health checks: for each service that asks for them, probe every endpoint on an
//! interval (a TCP connect, or an HTTP GET that must answer with the expected status) and
//! feed the results to the endpoint's rise/fall verdict. Checks connect with the agent's
//! mark, like proxied connections, so they are never redirected.
//!
//! One task per (service, endpoint), in a task group per service that the reconciler
//! replaces when that service changes: the verdicts live in the endpoints' shared state,
//! so restarting the tasks loses nothing, and a change elsewhere touches none of them.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::{
    balance::EndpointState,
    capacity::{self, Shortage},
    config::HealthCheckConfig,
    proxy::upstream::connect_marked,
    state::Service,
    stats::Stats,
    tasks::Background,
};

/// Start checks for every endpoint of `svc` if it has a `health_check`, as tasks of
/// `group`; all of them stop when the group is stopped.
pub fn spawn(svc: &Service, mark: u32, stats: &Arc<Stats>, group: &Background) {
    if let Some(check) = &svc.config.health_check {
        for ep in svc.balancer.endpoints().iter().filter(|e| !e.terminating) {
            let task = Probe {
                service: svc.name.to_string(),
                addr: ep.addr,
                state: Arc::clone(&ep.state),
                check: check.clone(),
                mark,
                stats: Arc::clone(stats),
            };
            group.spawn(task.run());
        }
    }
}

struct Probe {
    service: String,
    addr: SocketAddr,
    state: Arc<EndpointState>,
    check: HealthCheckConfig,
    mark: u32,
    stats: Arc<Stats>,
}

/// Why a check did not pass.
enum Missed {
    /// The endpoint failed it.
    Failed(String),
    /// The agent could not even open the connection (see `capacity`): no verdict either
    /// way, or a node short of descriptors would take every healthy endpoint out.
    Local(Shortage),
}

impl Probe {
    async fn run(self) {
        // Start at a random point of the interval so checks of many endpoints spread out.
        let mut wait = self.check.interval.mul_f64(fastrand::f64());
        loop {
            tokio::time::sleep(wait).await;
            wait = self.check.interval;
            let result = tokio::time::timeout(self.check.timeout, self.once()).await;
            let ok = match result {
                Ok(Ok(())) => true,
                Ok(Err(Missed::Local(what))) => {
                    capacity::shortage(&self.stats.metrics, "health_check", what);
                    continue;
                }
                Ok(Err(Missed::Failed(e))) => {
                    debug!(service = %self.service, endpoint = %self.addr, error = %e, "health check failed");
                    false
                }
                Err(_) => false,
            };
            match self.state.on_check(ok, self.check.rise, self.check.fall) {
                Some(true) => info!(service = %self.service, endpoint = %self.addr, "health checks pass again"),
                Some(false) => {
                    warn!(service = %self.service, endpoint = %self.addr, "health checks fail: endpoint out")
                }
                None => {}
            }
        }
    }

    async fn once(&self) -> Result<(), Missed> {
        let conn =
            connect_marked(self.addr, self.mark, self.check.timeout).await.map_err(|e| match Shortage::of(&e) {
                Some(what) => Missed::Local(what),
                None => Missed::Failed(e.to_string()),
            })?;
        self.http(conn).await.map_err(Missed::Failed)
    }

    /// The HTTP part of a check, if it has one, on `conn`.
    async fn http(&self, conn: tokio::net::TcpStream) -> Result<(), String> {
        let Some((path, status)) = self.check.http() else { return Ok(()) };
        let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(driver);
        let request = Request::get(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::USER_AGENT, "switchyard-health")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{path} is not a request path: {e}"))?;
        // Only the status counts; the body is dropped with the connection.
        let got = sender.send_request(request).await.map_err(|e| format!("GET {path}: {e}"))?.status();
        if got.as_u16() == status { Ok(()) } else { Err(format!("{path} answered {got}, expected {status}")) }
    }
}
