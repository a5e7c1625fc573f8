//! The composition root: start-up order, the running agent, reloads and shutdown.
//!
//! Start-up order is what makes the redirect safe: config is validated first (nothing
//! happens on a bad one), then the host is checked (cgroup v2, capabilities, bpffs), then
//! the discovery sources' first answers are awaited, then the listeners are bound (or
//! taken over from the running agent, see `handover`), and only then are the programs
//! attached or swapped in and the accept loops started. The programs themselves also check
//! that the listener exists before redirecting to it, and otherwise pick an endpoint in
//! the kernel, so a connection is never sent to a listener that is not there.
//!
//! Two ways to stop (docs/lifecycle.md). SIGTERM/SIGINT with no successor: uninstall
//! first (detach, remove the pins: new connects go where they were aimed), then stop
//! accepting, then let open connections drain. After a hand-over: stop accepting and
//! drain, leaving programs and pins to the successor. A killed agent leaves both in
//! place, and the kernel serves connects without it until the next one starts.
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
    handover::{self, Offer},
    health,
    proxy::{Listeners, Proxy},
    redirect::{self, PinDir, Redirect},
    state::{Departure, Snapshot},
    stats::Stats,
};

/// How often the in-kernel fallback's endpoint sets follow endpoint health (ejections and
/// active checks change it between config updates).
const BACKENDS_SYNC: Duration = Duration::from_millis(500);

/// `switchyard uninstall`: detach the programs and remove every pin in the directory
/// named by `--bpffs-dir`, else by the config file, else the default.
pub fn uninstall(config: Option<&Path>, bpffs_dir: Option<&Path>) -> anyhow::Result<String> {
    let dir = match (bpffs_dir, config) {
        (Some(dir), _) => dir.to_owned(),
        (None, Some(path)) => Config::load(path)?.agent.bpffs_dir,
        (None, None) => crate::config::AgentConfig::default().bpffs_dir,
    };
    let removed = redirect::uninstall(&dir)?;
    Ok(if removed == redirect::Removed::default() {
        format!("nothing of switchyard's is pinned in {}", dir.display())
    } else {
        format!(
            "detached {} programs and removed {} pinned maps and {} (nothing of switchyard's is left in the kernel)",
            removed.links,
            removed.maps,
            dir.display()
        )
    })
}

/// Why the main loop ended.
enum Stop {
    Signal(&'static str),
    /// A successor took the listeners (its pid, when known).
    HandedOver(Option<i32>),
}

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
    let pins = PinDir::open(&main.agent.bpffs_dir)?;
    handover::prepare(&main.agent.handover_socket)?;
    let mut signals = Signals::new()?;
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

    // The running agent's listeners if one hands them over (an upgrade), else our own.
    // Only now, with the first snapshot ready: a listener that exists is one the programs
    // redirect to, and until we accept, connections would wait in its backlog; before it
    // exists, the kernel's fallback serves them (after a kill -9), or the old agent does.
    let (listeners, admin_listener, predecessor) = match handover::take_over(&main.agent.handover_socket)? {
        Some(inherited) => {
            let listeners = Listeners::adopt(main.agent.listen_port, inherited.v4, inherited.v6)?;
            let admin = admin_listener(main.agent.admin, inherited.admin).await?;
            info!(socket = %main.agent.handover_socket.display(), "took over the running agent's listeners");
            (listeners, admin, Some(inherited.predecessor))
        }
        None => (Listeners::bind(main.agent.listen_port).await?, admin_listener(main.agent.admin, None).await?, None),
    };

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
    let (redirect, orig) = Redirect::start(
        &cgroup,
        &pins,
        agent,
        snapshot.service_addresses(),
        &snapshot.fallback_backends(Instant::now()),
    )
    .context("start the transparent redirect")?;
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

    let (v4, v6) = listeners.dup().context("duplicate the listeners for a future hand-over")?;
    let admin_fd = match &admin_listener {
        Some(l) => Some(std::os::fd::AsFd::as_fd(l).try_clone_to_owned().context("duplicate the admin listener")?),
        None => None,
    };
    let offer = Offer { v4, v6, admin: admin_fd };
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
    // We accept on the sockets now: the previous agent may stop accepting. Only then do
    // we replace its hand-over socket with ours.
    if let Some(predecessor) = predecessor
        && let Err(e) = predecessor.ready()
    {
        // It went away after handing over: nothing to stop, we serve either way.
        warn!(error = %anyhow::Error::from(e), "could not tell the previous agent we are ready");
    }
    let mut handed_over = tokio::spawn(handover::serve(handover::bind(&running.main.agent.handover_socket)?, offer));
    info!(
        listen.port = running.main.agent.listen_port,
        cgroup = %cgroup.display(),
        pins = %pins.path().display(),
        services = snapshot.len(),
        "switchyard ready"
    );

    let mut backends_tick = tokio::time::interval(BACKENDS_SYNC);
    backends_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                "SIGHUP" => running.reload_file(path),
                stop_signal => break Stop::Signal(stop_signal),
            },
            Some(update) = incoming.recv() => running.update(update),
            _ = backends_tick.tick() => running.sync_backends(),
            successor = &mut handed_over => break Stop::HandedOver(successor.ok().flatten()),
        }
    };
    log_counters(&running.redirect);
    log_service_stats(&running.publish.borrow());
    running.checks.cancel();
    match reason {
        Stop::Signal(signal) => {
            info!(signal, "shutting down with no successor: detaching redirect programs and removing the pins");
            handed_over.abort();
            let removed = redirect::uninstall(pins.path()).context("uninstall on shutdown")?;
            info!(programs = removed.links, maps = removed.maps, pins = %pins.path().display(), "uninstalled");
            let _ = std::fs::remove_file(&running.main.agent.handover_socket);
        }
        Stop::HandedOver(successor) => {
            info!(successor.pid = successor, "handed over to a new agent; draining, programs and pins stay");
        }
    }
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

/// The admin listener: the one handed over if it is on the configured address, else a
/// new one (none when the admin API is off).
async fn admin_listener(
    addr: Option<SocketAddr>,
    inherited: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    if let Some(fd) = inherited {
        let std = std::net::TcpListener::from(fd);
        if std.local_addr().ok() == Some(addr) {
            std.set_nonblocking(true).context("use the handed-over admin listener")?;
            return Ok(Some(tokio::net::TcpListener::from_std(std).context("use the handed-over admin listener")?));
        }
    }
    Ok(Some(admin::bind(addr).await?))
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
/// them. Dropping it leaves the kernel programs attached (they are pinned).
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
        self.sync_backends();
        arm_drain_deadlines(next.departures_since(&prev));
        self.main = main;
        self.sources = sources;
        self.restart_background(&merged);
        info!(source, services = next.len(), took_us = started.elapsed().as_micros() as u64, "configuration applied");
        self.status.applied(source);
        Ok(())
    }

    /// Keep the in-kernel fallback's endpoint sets at the healthy endpoints of now.
    fn sync_backends(&mut self) {
        let backends = self.publish.borrow().fallback_backends(Instant::now());
        if let Err(e) = self.redirect.sync_backends(&backends) {
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "could not update the kernel's fallback endpoints");
        }
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
