//! The composition root: start-up order, the running agent, reloads and shutdown.
//!
//! Start-up order is what makes the redirect safe: config is validated first (nothing
//! happens on a bad one), then the host is checked, then the listeners are bound, and only
//! then are the programs attached. So a connection is never redirected to a listener that
//! is not there. Shutdown reverses it: detach first (new connects go where they were
//! aimed), then stop accepting, then let open connections drain.
//!
//! After start-up, changes arrive from SIGHUP (re-read the config file) and from the
//! discovery sources. Each is merged with the rest and validated as a whole; a bad one is
//! rejected with its problems logged and the running state stays in force; a good one is
//! applied without dropping anything: endpoints that left get their drain time, state of
//! the others carries over.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use switchyard_common::{AgentV1, SockAddrV1};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin,
    balance::Tier,
    config::Config,
    discovery::{self, Sources, Update, dns::Dns},
    health,
    proxy::{Listeners, Proxy},
    redirect::{self, Redirect},
    state::{Departure, Snapshot},
    stats::Stats,
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
pub async fn run(path: &Path, log: admin::LogControl) -> anyhow::Result<()> {
    let main = Config::load(path)?;
    redirect::check_privileges()?;
    raise_fd_limit();
    let cgroup = redirect::attach_cgroup(main.agent.cgroup.as_deref())?;
    let mut signals = Signals::new()?;
    let listeners = Listeners::bind(main.agent.listen_port).await?;
    let admin_listener = match main.agent.admin {
        Some(addr) => Some(admin::bind(addr).await?),
        None => None,
    };

    // Sources: what they say at start-up is part of the first snapshot.
    let (updates, mut incoming) = mpsc::channel(256);
    let mut sources = Sources::default();
    let _catalog_watch = match &main.agent.catalog {
        Some(catalog) => {
            sources.catalog = discovery::catalog::load(catalog).context("load the catalog (agent.catalog)")?;
            Some(discovery::catalog::watch(catalog, updates.clone())?)
        }
        None => None,
    };
    if let Some(k8s) = &main.agent.kubernetes {
        let view = discovery::kubernetes::start(k8s, updates.clone(), Duration::from_secs(30))
            .await
            .context("watch the Kubernetes API (agent.kubernetes)")?;
        sources.cluster = view;
    }
    let dns = Dns::new(&main.agent.dns, updates.clone())?;
    let targets = discovery::dns_targets(&sources.merge(&main));
    sources.resolved = dns.resolve_all(&targets, Duration::from_secs(5)).await;
    let merged = validated(sources.merge(&main))
        .map_err(|p| anyhow::anyhow!("the catalog clashes with {}:\n{p}", path.display()))?;

    let agent = AgentV1 {
        listen_v4: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
        listen_v6: SockAddrV1::from(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))).addr,
        listen_port: main.agent.listen_port.to_be(),
        mark: main.agent.mark,
        netns_cookie: listeners.netns_cookie()?,
        ..Default::default()
    };
    let snapshot = Arc::new(Snapshot::build(&merged, &sources.resolved, None));
    arm_drain_deadlines(snapshot.departures_since(&Snapshot::default()));
    let (publish, latest) = watch::channel(Arc::clone(&snapshot));
    let (publish_config, effective) = watch::channel(Arc::new(merged.clone()));
    let (redirect, orig) =
        Redirect::start(&cgroup, agent, snapshot.service_addresses()).context("start the transparent redirect")?;
    let mark = main.agent.mark;
    let drain = Duration::from_secs(main.agent.drain_timeout_secs);
    let status = Arc::new(admin::Status::default());
    let stats = Stats::new(redirect::cgroup2_root().ok(), main.agent.stats);
    let kernel = redirect.counters();
    let mut running = Running {
        main,
        sources,
        publish,
        publish_config,
        redirect,
        checks: CancellationToken::new(),
        dns,
        mark,
        status: Arc::clone(&status),
    };
    let stop = CancellationToken::new();
    running.restart_background(&merged);

    if let Some(l) = admin_listener {
        let state = admin::AdminState {
            snapshot: latest.clone(),
            config: effective,
            status,
            stats: Arc::clone(&stats),
            kernel,
            log,
        };
        tokio::spawn(admin::serve(l, state, stop.clone()));
    }
    let proxy = Proxy::new(latest, orig, mark, Arc::clone(&stats));
    let tasks = TaskTracker::new();
    let mut accept_loops = vec![tokio::spawn(Arc::clone(&proxy).serve(listeners.v4, tasks.clone(), stop.clone()))];
    if let Some(v6) = listeners.v6 {
        accept_loops.push(tokio::spawn(Arc::clone(&proxy).serve(v6, tasks.clone(), stop.clone())));
    }
    info!(
        listen.port = running.main.agent.listen_port,
        cgroup = %cgroup.display(),
        services = snapshot.len(),
        "switchyard ready"
    );

    let signal = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                "SIGHUP" => running.reload_file(path),
                stop_signal => break stop_signal,
            },
            Some(update) = incoming.recv() => running.update(update),
        }
    };
    info!(signal, "shutting down");
    log_counters(&running.redirect);
    log_service_stats(&running.publish.borrow());
    running.checks.cancel();
    drop(running);
    stop.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tasks.close();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(open = tasks.len(), after = ?drain, "connections still open at the drain deadline; cutting them");
    }
    info!("stopped");
    Ok(())
}

/// Every proxied connection holds two sockets: lift the soft open-files limit to the
/// hard one (as nginx and Envoy do), so a busy node is not capped at a few hundred
/// connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the open-files limit"),
    }
}

/// The merged config if it is valid, else its problems as text.
fn validated(merged: Config) -> Result<Config, String> {
    let problems = merged.problems();
    if problems.is_empty() {
        Ok(merged.canonical())
    } else {
        Err(problems.iter().map(|p| format!("  {}: {}", p.field, p.message)).collect::<Vec<_>>().join("\n"))
    }
}

/// The agent's live state: the config and source contributions in force, and what acts on
/// them. Dropping it detaches the kernel programs (the `Redirect` inside).
struct Running {
    main: Config,
    sources: Sources,
    publish: watch::Sender<Arc<Snapshot>>,
    /// The effective (merged) configuration, for the admin API's `/config`.
    publish_config: watch::Sender<Arc<Config>>,
    redirect: Redirect,
    checks: CancellationToken,
    dns: Dns,
    mark: u32,
    status: Arc<admin::Status>,
}

impl Running {
    /// SIGHUP: re-read the main config file.
    fn reload_file(&mut self, path: &Path) {
        let mut new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => return self.reject("config file", format!("{:#}", anyhow::Error::from(e))),
        };
        if new.agent != self.main.agent {
            warn!(
                "agent settings (listen_port, cgroup, mark, zone, catalog, ...) only change on restart; reloading services"
            );
            new.agent = self.main.agent.clone();
        }
        if let Err(problems) = self.apply(new, self.sources.clone(), "config file") {
            self.reject("config file", format!("the result would be invalid:\n{problems}"));
        }
    }

    /// Log a rejected change and record it for `/status`; nothing else changes.
    fn reject(&self, source: &str, error: String) {
        error!(source, error = error.as_str(), "update rejected; still serving the last good state");
        self.status.rejected(source, error);
    }

    /// An update from a discovery source.
    fn update(&mut self, update: Update) {
        let source = update.source();
        let mut candidate = self.sources.clone();
        if let Err(e) = candidate.apply(update) {
            return self.reject(source, e);
        }
        if let Err(problems) = self.apply(self.main.clone(), candidate, source) {
            self.reject(source, format!("the result would be invalid:\n{problems}"));
        }
    }

    /// Make `main` + `sources` the running state if together they are valid.
    fn apply(&mut self, main: Config, sources: Sources, source: &str) -> Result<(), String> {
        let started = Instant::now();
        let merged = validated(sources.merge(&main))?;
        let prev = Arc::clone(&self.publish.borrow());
        let next = Arc::new(Snapshot::build(&merged, &sources.resolved, Some(&prev)));
        // Publish before the kernel learns new addresses, so the agent knows every service
        // it may be sent. (A removed address can, for a moment, still be redirected and is
        // then closed: the service is gone either way.)
        self.publish.send_replace(Arc::clone(&next));
        self.publish_config.send_replace(Arc::new(merged.clone()));
        if let Err(e) = self.redirect.sync_services(next.service_addresses()) {
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "could not update the kernel's service addresses");
        }
        arm_drain_deadlines(next.departures_since(&prev));
        self.main = main;
        self.sources = sources;
        self.restart_background(&merged);
        info!(source, services = next.len(), took_us = started.elapsed().as_micros() as u64, "configuration applied");
        self.status.applied(source);
        Ok(())
    }

    /// Health checks follow the snapshot; DNS refreshes follow the names in use.
    fn restart_background(&mut self, merged: &Config) {
        self.checks.cancel();
        self.checks = CancellationToken::new();
        health::spawn(&self.publish.borrow(), self.mark, &self.checks);
        self.dns.track(&discovery::dns_targets(merged), &self.sources.resolved);
    }
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
    match redirect.counters().read() {
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
