//! The composition root: start-up order, the running agent, reloads and shutdown.
//!
//! Start-up order is what makes the redirect safe: config is validated first (nothing
//! happens on a bad one), then the host is checked, then the listeners are bound, and only
//! then are the programs attached. So a connection is never redirected to a listener that
//! is not there. Shutdown reverses it: detach first (new connects go where they were
//! aimed), then stop accepting, then let open connections drain.
//!
//! SIGHUP re-reads the config file. A bad file is rejected with its problems logged and
//! the running config stays in force; a good one is applied without dropping anything:
//! endpoints that left get their drain time, state of the others carries over.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use switchyard_common::{AgentV1, SockAddrV1};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    balance::Tier,
    config::Config,
    health,
    proxy::{Listeners, Proxy},
    redirect::{self, Redirect},
    state::{Departure, Snapshot},
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
    let mut config = Config::load(path)?;
    redirect::check_privileges()?;
    let cgroup = redirect::attach_cgroup(config.agent.cgroup.as_deref())?;
    let mut signals = Signals::new()?;

    let listeners = Listeners::bind(config.agent.listen_port).await?;
    let agent = AgentV1 {
        listen_v4: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
        listen_v6: SockAddrV1::from(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).addr,
        listen_port: config.agent.listen_port.to_be(),
        mark: config.agent.mark,
        netns_cookie: listeners.netns_cookie()?,
        ..Default::default()
    };
    let snapshot = Arc::new(Snapshot::build(&config, None));
    arm_drain_deadlines(snapshot.departures_since(&Snapshot::default()));
    let (publish, latest) = watch::channel(Arc::clone(&snapshot));
    let (mut redirect, orig) =
        Redirect::start(&cgroup, agent, snapshot.service_addresses()).context("start the transparent redirect")?;
    let mark = config.agent.mark;
    let mut checks = CancellationToken::new();
    health::spawn(&snapshot, mark, &checks);

    let proxy = Proxy::new(latest, orig, mark);
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut accept_loops = vec![tokio::spawn(Arc::clone(&proxy).serve(listeners.v4, tasks.clone(), stop.clone()))];
    if let Some(v6) = listeners.v6 {
        accept_loops.push(tokio::spawn(Arc::clone(&proxy).serve(v6, tasks.clone(), stop.clone())));
    }
    info!(
        listen.port = config.agent.listen_port,
        cgroup = %cgroup.display(),
        services = snapshot.len(),
        "switchyard ready"
    );

    let signal = loop {
        match signals.next().await {
            "SIGHUP" => {
                if let Some(applied) = reload(path, &config, &publish, &mut redirect) {
                    checks.cancel();
                    checks = CancellationToken::new();
                    health::spawn(&publish.borrow(), mark, &checks);
                    config = applied;
                }
            }
            stop_signal => break stop_signal,
        }
    };
    info!(signal, "shutting down");
    log_counters(&redirect);
    log_service_stats(&publish.borrow());
    drop(redirect);
    checks.cancel();
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

/// Apply the config file again. Returns the config now in force, or None when the file
/// was rejected (the running config stays).
fn reload(
    path: &Path,
    running: &Config,
    publish: &watch::Sender<Arc<Snapshot>>,
    redirect: &mut Redirect,
) -> Option<Config> {
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "config reload rejected; still serving the last good config");
            return None;
        }
    };
    if new.agent != running.agent {
        warn!("agent settings (listen_port, cgroup, mark, zone, ...) only change on restart; reloading services");
        new.agent = running.agent.clone();
    }
    let prev = Arc::clone(&publish.borrow());
    let next = Arc::new(Snapshot::build(&new, Some(&prev)));
    // Publish before the kernel learns new addresses, so the agent knows every service it
    // may be sent. (A removed address can, for a moment, still be redirected and is then
    // closed: the service is gone either way.)
    publish.send_replace(Arc::clone(&next));
    if let Err(e) = redirect.sync_services(next.service_addresses()) {
        let e = anyhow::Error::from(e);
        error!(error = format!("{e:#}"), "could not update the kernel's service addresses");
    }
    arm_drain_deadlines(next.departures_since(&prev));
    info!(services = next.len(), "config reloaded");
    Some(new)
}

/// Endpoints that left service keep their connections until their drain deadline.
fn arm_drain_deadlines(departures: Vec<Departure>) {
    for d in departures {
        info!(service = %d.service, endpoint = %d.addr, drain = ?d.drain_timeout, "endpoint left service; draining");
        tokio::spawn(async move {
            tokio::time::sleep(d.drain_timeout).await;
            d.state.cut_if_still_draining(d.generation);
        });
    }
}

/// SIGTERM, SIGINT and SIGHUP, installed once.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let install = |kind, name| signal(kind).with_context(|| format!("install {name} handler"));
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
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

fn log_service_stats(snapshot: &Snapshot) {
    use std::sync::atomic::Ordering::Relaxed;
    for svc in snapshot.services() {
        let s = &svc.balancer.stats;
        let tier = |t: Tier| s.by_tier[t as usize].load(Relaxed);
        info!(
            service = %svc.name,
            picks.local = tier(Tier::Local),
            picks.region = tier(Tier::Region),
            picks.remote = tier(Tier::Remote),
            picks.panic = s.panics.load(Relaxed),
            "service stats"
        );
    }
}
