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
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use switchyard_common::{AgentV2, SockAddrV1};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin,
    balance::Tier,
    config::{Config, PodsMode},
    discovery::{self, Sources, Update, dns::Dns},
    handover::{self, Offer},
    health, nodeaddr,
    pods::{self, PodPaths},
    proxy::{Inherited, Listeners, Proxy},
    redirect::{self, OrigDstTable, PinDir, Redirect},
    state::{Departure, Snapshot},
    stats::{Stats, metrics::NetnsLabels},
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
    let addresses = nodeaddr::remove_ours().context("remove the node addresses from lo")?;
    let addresses = match addresses.as_slice() {
        [] => String::new(),
        some => format!("; removed node address(es) {} from lo", join(some)),
    };
    Ok(if removed == redirect::Removed::default() {
        format!("nothing of switchyard's is pinned in {}{addresses}", dir.display())
    } else {
        format!(
            "detached {} programs and removed {} pinned maps and {}{addresses} (nothing of switchyard's is left in the kernel)",
            removed.links,
            removed.maps,
            dir.display()
        )
    })
}

fn join(addrs: &[IpAddr]) -> String {
    addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
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
    // Pods reach the agent at the node addresses: put them on lo before listening there.
    // With pods not redirected, addresses an earlier run added go (an address from an
    // earlier node_address stays until uninstall: a predecessor may still listen on it).
    let mut node_addrs = node_addresses(&main);
    let mut added = Added(Vec::new());
    if node_addrs.is_empty() {
        nodeaddr::remove_ours().context("remove the node addresses from lo (agent.pods is not redirect)")?;
    }
    for ip in node_addrs.clone() {
        match nodeaddr::add(&[ip]) {
            Ok(new) => added.0.extend(new),
            // A node with IPv6 turned off refuses the address: pods there have no IPv6
            // services to reach, and those they dial take the fallback.
            Err(e) if ip.is_ipv6() => {
                warn!(error = %anyhow::Error::from(e), address = %ip, "no IPv6 node address; pods' IPv6 service connects take the in-kernel fallback");
                node_addrs.retain(|a| *a != ip);
            }
            Err(e) => return Err(anyhow::Error::from(e).context("put the node address on lo (agent.node_address)")),
        }
    }
    if !added.0.is_empty() {
        info!(addresses = %join(&added.0), "node addresses added to lo");
    }
    let (inherited, admin_inherited, predecessor) = match handover::take_over(&main.agent.handover_socket)? {
        Some(inherited) => {
            info!(socket = %main.agent.handover_socket.display(), "took over the running agent's listeners");
            (inherited.listeners, inherited.admin, Some(inherited.predecessor))
        }
        None => (Inherited::default(), None, None),
    };
    let listeners = Listeners::bind(main.agent.listen_port, &node_addrs, inherited).await?;
    let admin_listener = admin_listener(main.agent.admin, admin_inherited).await?;

    let word = |ip: Option<Ipv4Addr>| ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
    let words = |ip: IpAddr| SockAddrV1::from(SocketAddr::new(ip, 0)).addr;
    let pods_on = main.agent.pods == PodsMode::Redirect;
    let agent = AgentV2 {
        listen_v4: word(Some(Ipv4Addr::LOCALHOST)),
        listen_v6: words(Ipv6Addr::LOCALHOST.into()),
        node_v4: word(main.agent.node_v4().filter(|_| pods_on)),
        node_v6: node_addrs.iter().find(|ip| ip.is_ipv6()).map_or([0; 4], |ip| words(*ip)),
        listen_port: main.agent.listen_port.to_be(),
        pods: main.agent.pods.kernel(),
        mark: main.agent.mark,
        cgroup_level: cgroup_level(&cgroup),
        netns_cookie: listeners.netns_cookie()?,
        ..Default::default()
    };
    let snapshot = Arc::new(Snapshot::build(&merged, &sources.resolved, None));
    arm_drain_deadlines(snapshot.departures_since(&Snapshot::default()));
    let (publish, latest) = watch::channel(Arc::clone(&snapshot));
    let (publish_config, effective) = watch::channel(Arc::new(merged.clone()));
    let slots = listeners.slots();
    let slots: Vec<(u32, std::os::fd::BorrowedFd<'_>)> = slots.iter().map(|(s, l)| (*s, l.as_fd())).collect();
    let (redirect, orig) = Redirect::start(
        &cgroup,
        &pins,
        agent,
        &slots,
        snapshot.service_addresses(),
        &snapshot.fallback_backends(Instant::now()),
    )
    .context("start the transparent redirect")?;
    let mark = main.agent.mark;
    let drain = Duration::from_secs(main.agent.drain_timeout_secs);
    let status = Arc::new(admin::Status::default());
    let stats = Stats::new(redirect::cgroup2_root().ok(), main.agent.stats);
    let kernel = redirect.counters();
    let pods = PodsReconcile {
        paths: PodPaths::new(main.agent.blocked_retry),
        orig: Arc::clone(&orig),
        mode: main.agent.pods,
        exclude: main.agent.exclude_cgroups.clone(),
        node_address: node_addrs.iter().map(|ip| SocketAddr::new(*ip, main.agent.listen_port).to_string()).collect(),
        stats: Arc::clone(&stats),
    };
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
        pods,
    };
    let stop = CancellationToken::new();
    running.restart_background(&merged);
    running.sync_pods();

    let offer_listeners = listeners.dup().context("duplicate the listeners for a future hand-over")?;
    let admin_fd = match &admin_listener {
        Some(l) => Some(l.as_fd().try_clone_to_owned().context("duplicate the admin listener")?),
        None => None,
    };
    let offer = Offer { listeners: offer_listeners, admin: admin_fd };
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
    let accept_loops: Vec<_> = [Some(listeners.v4), listeners.v6, listeners.node_v4, listeners.node_v6]
        .into_iter()
        .flatten()
        .map(|l| tokio::spawn(Arc::clone(&proxy).serve(l, tasks.clone(), stop.clone())))
        .collect();
    // We accept on the sockets now: the previous agent may stop accepting. Only then do
    // we replace its hand-over socket with ours.
    if let Some(predecessor) = predecessor
        && let Err(e) = predecessor.ready()
    {
        // It went away after handing over: nothing to stop, we serve either way.
        warn!(error = %anyhow::Error::from(e), "could not tell the previous agent we are ready");
    }
    let mut handed_over = tokio::spawn(handover::serve(handover::bind(&running.main.agent.handover_socket)?, offer));
    added.keep();
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
            _ = backends_tick.tick() => {
                running.sync_backends();
                running.sync_pods();
            }
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
            let addresses = nodeaddr::remove_ours().context("remove the node addresses from lo on shutdown")?;
            info!(
                programs = removed.links,
                maps = removed.maps,
                pins = %pins.path().display(),
                node_addresses = %join(&addresses),
                "uninstalled"
            );
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
    pods: PodsReconcile,
}

/// What the agent keeps to follow pod namespaces and exclusions between ticks.
struct PodsReconcile {
    paths: PodPaths,
    orig: Arc<OrigDstTable>,
    mode: PodsMode,
    exclude: Vec<PathBuf>,
    node_address: Vec<String>,
    stats: Arc<Stats>,
}

/// Node addresses this start put on lo: removed again if it fails before the agent is
/// ready (a failed first start leaves nothing behind, as with the pins).
struct Added(Vec<IpAddr>);

impl Added {
    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Added {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        if let Err(e) = nodeaddr::remove(&self.0) {
            warn!(error = %anyhow::Error::from(e), "could not remove the node addresses the failed start added");
        }
    }
}

/// The node addresses to put on lo and listen on: only while pods are redirected.
fn node_addresses(config: &Config) -> Vec<IpAddr> {
    if config.agent.pods == PodsMode::Redirect { config.agent.node_address.clone() } else { Vec::new() }
}

/// The cgroup v2 level of `cgroup` (the root is 0), where the kernel's exclusion walk starts.
fn cgroup_level(cgroup: &Path) -> u32 {
    let root = redirect::cgroup2_root().unwrap_or_default();
    cgroup.strip_prefix(&root).map(|rel| rel.components().count() as u32).unwrap_or(0)
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

    /// Follow pod namespaces (block those whose connects never arrive, probe them again
    /// later), publish what is known of them, and keep the exclusions in step with the
    /// cgroups that exist now (a pod's cgroup appears when it starts).
    fn sync_pods(&mut self) {
        let p = &mut self.pods;
        let maps = self.redirect.pods();
        let excluded: HashSet<u64> = p.exclude.iter().filter_map(|path| redirect::cgroup_id(path).ok()).collect();
        if let Err(e) = maps.sync_excluded(&excluded) {
            error!(error = format!("{:#}", anyhow::Error::from(e)), "could not update the excluded cgroups");
        }
        let now = redirect::monotonic_ns();
        let namespaces = maps.namespaces();
        let stuck = maps.stuck_namespaces(now, pods::WINDOW.as_nanos() as u64);
        for action in p.paths.tick(now, &namespaces, &stuck) {
            let done = match action {
                pods::Action::Block(netns) => maps.block(netns, now),
                pods::Action::Reprobe(netns) => maps.forget(netns),
                pods::Action::Recovered(_) => Ok(()),
            };
            if let Err(e) = done {
                error!(error = format!("{:#}", anyhow::Error::from(e)), "could not update a pod namespace's path");
                continue;
            }
            p.paths.applied(action, now);
            if !matches!(action, pods::Action::Recovered(_)) {
                // The next connection accepted from it must confirm it again.
                p.orig.forget(action.netns());
            }
            match action {
                pods::Action::Block(netns) => warn!(
                    netns,
                    node_address = %p.node_address.join(", "),
                    retry_in = ?p.paths.retry_in(netns, now).unwrap_or_default(),
                    "connections from this pod network namespace are not reaching the agent (a NetworkPolicy, an \
                     ipvlan/macvlan pod or a firewall dropping them?); serving it by the in-kernel fallback"
                ),
                pods::Action::Reprobe(netns) => info!(netns, "probing a blocked pod network namespace again"),
                pods::Action::Recovered(netns) => {
                    info!(netns, "a blocked pod network namespace reaches the agent again")
                }
            }
        }
        let counts = p.paths.counts();
        let gauge = |state| p.stats.metrics.pod_netns.get_or_create(&NetnsLabels { state });
        gauge("reachable").set(counts.reachable as i64);
        gauge("probing").set(counts.probing as i64);
        gauge("blocked").set(counts.blocked as i64);
        self.status.pods(admin::PodsStatus {
            mode: p.mode,
            node_address: p.node_address.clone(),
            reachable: counts.reachable,
            probing: counts.probing,
            blocked: p.paths.blocked(now),
        });
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
