//! Active health checks: for each service that asks for them, probe every endpoint on an
//! interval (a TCP connect, or an HTTP GET that must answer with the expected status) and
//! feed the results to the endpoint's rise/fall verdict. Checks connect with the agent's
//! mark, like proxied connections, so they are never redirected.
//!
//! One task per (service, endpoint). A new snapshot replaces the whole set: the verdicts
//! live in the endpoints' shared state, so restarting the tasks loses nothing.

use std::{net::SocketAddr, sync::Arc};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{balance::EndpointState, config::HealthCheckConfig, proxy::upstream::connect_marked, state::Snapshot};

/// Start checks for every endpoint of every service with a `health_check`; all of them
/// stop when `stop` is cancelled.
pub fn spawn(snapshot: &Snapshot, mark: u32, stop: &CancellationToken) {
    for svc in snapshot.services() {
        let Some(check) = &svc.config.health_check else { continue };
        for ep in svc.balancer.endpoints().iter().filter(|e| !e.terminating) {
            let task = Probe {
                service: svc.name.clone(),
                addr: ep.addr,
                state: Arc::clone(&ep.state),
                check: check.clone(),
                mark,
            };
            tokio::spawn(task.run(stop.clone()));
        }
    }
}

struct Probe {
    service: String,
    addr: SocketAddr,
    state: Arc<EndpointState>,
    check: HealthCheckConfig,
    mark: u32,
}

impl Probe {
    async fn run(self, stop: CancellationToken) {
        // Start at a random point of the interval so checks of many endpoints spread out.
        let mut wait = self.check.interval.mul_f64(fastrand::f64());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = self.check.interval;
            let result = tokio::time::timeout(self.check.timeout, self.once()).await;
            let ok = matches!(result, Ok(Ok(())));
            if let Ok(Err(e)) = &result {
                debug!(service = %self.service, endpoint = %self.addr, error = %e, "health check failed");
            }
            match self.state.on_check(ok, self.check.rise, self.check.fall) {
                Some(true) => info!(service = %self.service, endpoint = %self.addr, "health checks pass again"),
                Some(false) => {
                    warn!(service = %self.service, endpoint = %self.addr, "health checks fail: endpoint out")
                }
                None => {}
            }
        }
    }

    async fn once(&self) -> Result<(), String> {
        let mut conn = connect_marked(self.addr, self.mark, self.check.timeout).await.map_err(|e| e.to_string())?;
        let Some((path, status)) = self.check.http() else { return Ok(()) };
        // Only the status line is read. A hand-written request is enough for a probe;
        // the HTTP-aware proxy brings hyper, which this can then use.
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: switchyard-health\r\nConnection: close\r\n\r\n",
            self.addr
        );
        conn.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 128];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = conn.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        match status_code(&head) {
            Some(got) if got == status => Ok(()),
            Some(got) => Err(format!("{path} answered {got}, expected {status}")),
            None => Err(format!("{path} did not answer with an HTTP status line")),
        }
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn status_code(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status_code;

    #[test]
    fn reads_the_status_line() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
