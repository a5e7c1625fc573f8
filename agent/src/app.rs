//! The composition root: start-up order, the running agent, and shutdown.
//!
//! Start-up order is what makes the redirect safe: config is validated first (nothing
//! happens on a bad one), then the host is checked, then the listeners are bound, and only
//! then are the programs attached. So a connection is never redirected to a listener that
//! is not there. Shutdown reverses it: detach first (new connects go where they were
//! aimed), then stop accepting, then let open connections drain.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use switchyard_common::{AgentV1, SockAddrV1};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::Config,
    proxy::{Listeners, Proxy},
    redirect::{self, Redirect},
    state::Snapshot,
};

/// `switchyard check`: parse and validate, and say what the config holds.
pub fn check(path: &Path) -> anyhow::Result<String> {
    let config = Config::load(path)?;
    let addresses: usize = config.services.iter().map(|s| s.addresses.len()).sum();
    let endpoints: usize = config.services.iter().map(|s| s.endpoints.len()).sum();
    Ok(format!(
        "{}: ok ({} services, {addresses} service addresses, {endpoints} endpoints)",
        path.display(),
        config.services.len()
    ))
}

/// `switchyard run`: run the agent until SIGINT or SIGTERM.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    redirect::check_privileges()?;
    let cgroup = redirect::attach_cgroup(config.agent.cgroup.as_deref())?;

    let listeners = Listeners::bind(config.agent.listen_port).await?;
    let agent = AgentV1 {
        listen_v4: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
        listen_v6: SockAddrV1::from(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).addr,
        listen_port: config.agent.listen_port.to_be(),
        mark: config.agent.mark,
        netns_cookie: listeners.netns_cookie()?,
        ..Default::default()
    };
    let state = Arc::new(Snapshot::from_config(&config));
    let (redirect, orig) =
        Redirect::start(&cgroup, agent, state.service_addresses()).context("start the transparent redirect")?;

    let proxy = Proxy::new(Arc::clone(&state), orig, config.agent.mark);
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut accept_loops = vec![tokio::spawn(Arc::clone(&proxy).serve(listeners.v4, tasks.clone(), stop.clone()))];
    if let Some(v6) = listeners.v6 {
        accept_loops.push(tokio::spawn(Arc::clone(&proxy).serve(v6, tasks.clone(), stop.clone())));
    }
    info!(
        listen.port = config.agent.listen_port,
        cgroup = %cgroup.display(),
        services = state.len(),
        "switchyard ready"
    );

    let signal = wait_for_signal().await?;
    info!(signal, "shutting down");
    log_counters(&redirect);
    drop(redirect);
    stop.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tasks.close();
    let drain = Duration::from_secs(config.agent.drain_timeout_secs);
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(open = tasks.len(), after = ?drain, "connections still open at the drain deadline; cutting them");
    }
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn log_counters(redirect: &Redirect) {
    match redirect.counters() {
        Ok(counters) => {
            let text: Vec<String> = counters.iter().map(|(name, n)| format!("{name}={n}")).collect();
            info!(counters = %text.join(" "), tracked_sockets = redirect.tracked_sockets(), "kernel counters");
        }
        Err(e) => warn!(error = %e, "cannot read kernel counters"),
    }
}
