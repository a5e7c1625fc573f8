//! The composition root: start-up order, the running agent and shutdown. `build` binds
//! and wires everything and returns what it bound ([`Bound`]); `Bound::wait` waits for the
//! end (as istio/ztunnel's `app.rs` does). After start-up, changes go through the
//! `reconcile` module.
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
//! Without the kernel side ([`Kernel::None`]) the same agent runs unprivileged on
//! ephemeral loopback ports, with original destinations from a fixed table: the
//! in-process tests.

use std::{
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
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    admin,
    balance::Tier,
    capacity::Capacity,
    config::{Config, PodsMode},
    discovery::{self, Sources, dns::Dns},
    handover::{self, Offer, Predecessor},
    nodeaddr,
    origin::Origins,
    pods::PodPaths,
    proxy::{Inherited, Listeners, Proxy},
    reconcile::{self, PodsReconcile, Reconciler, validated},
    redirect::{self, PinDir, Redirect},
    state::{Snapshot, checked},
    stats::Stats,
    tasks::Background,
    workload,
};

/// How often the reconciler ticks: the kernel's endpoint tables follow endpoint health
/// (ejections and active checks change it between config updates), pod namespaces are
/// followed.
const TICK: Duration = Duration::from_millis(500);

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
    /// [`Bound::shutdown`].
    Requested,
    /// A successor took the listeners (its pid, when known).
    HandedOver(Option<i32>),
}

/// How the agent meets the kernel.
pub enum Kernel {
    /// Check privileges, attach (or take over) the programs and pin them: production.
    Attach,
    /// No programs, pins, node addresses or hand-over: connections arrive by dialling the
    /// proxy listeners (bound on ephemeral loopback ports), and their original
    /// destinations come from `origins`. What the in-process tests run, without root.
    None(Arc<dyn Origins>),
}

/// A started agent: what it bound, and its main task (reloads, ticks, shutdown).
pub struct Bound {
    /// The proxy listeners' addresses.
    pub proxy: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    requested: CancellationToken,
    main: JoinHandle<anyhow::Result<()>>,
}

impl Bound {
    /// Stop as on SIGTERM: uninstall (with the kernel side), stop accepting, drain.
    pub fn shutdown(&self) {
        self.requested.cancel();
    }

    /// Wait until the agent has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.main.await.context("the agent's main task panicked")?
    }
}

/// `switchyard run`: run the agent until SIGINT or SIGTERM.
pub async fn run(path: &Path, log: admin::LogControl) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    build(config, Some(path.to_owned()), Kernel::Attach, log).await?.wait().await
}

/// The host as start-up found it.
enum Host {
    /// Privileges, cgroup v2 and the bpffs checked; the cgroup to attach to.
    Checked {
        cgroup: PathBuf,
        pins: PinDir,
    },
    Unattached(Arc<dyn Origins>),
}

/// What start-up made of the kernel side.
struct Plane {
    listeners: Listeners,
    admin: Option<tokio::net::TcpListener>,
    origins: Arc<dyn Origins>,
    kernel: Option<reconcile::Attached>,
    lifecycle: Option<Lifecycle>,
}

/// With the kernel side: what the rest of start-up and the end need.
struct Lifecycle {
    cgroup: PathBuf,
    pins: PinDir,
    predecessor: Option<Predecessor>,
    added: Added,
}

/// Start an agent: validate, check the host, take the sources' first answers, bind (or
/// take over) the listeners, attach, start accepting. Returns once it serves; its main
/// task then follows SIGHUP (when `path` is the config file it came from) and the
/// sources, until SIGTERM/SIGINT (with a `path`), a hand-over, or [`Bound::shutdown`].
pub async fn build(
    main: Config,
    path: Option<PathBuf>,
    kernel: Kernel,
    log: admin::LogControl,
) -> anyhow::Result<Bound> {
    raise_fd_limit();
    // The host is checked before anything else happens.
    let host = match kernel {
        Kernel::Attach => {
            redirect::check_privileges()?;
            let cgroup = redirect::attach_cgroup(main.agent.cgroup.as_deref())?;
            let pins = PinDir::open(&main.agent.bpffs_dir)?;
            handover::prepare(&main.agent.handover_socket)?;
            Host::Checked { cgroup, pins }
        }
        Kernel::None(origins) => Host::Unattached(origins),
    };
    let signals = path.is_some().then(Signals::new).transpose()?;
    let background = Background::default();
    // Sources: what they say at start-up is part of the first snapshot.
    let (updates, incoming) = mpsc::channel(256);
    let mut sources = Sources::default();
    let catalog_watch = match &main.agent.catalog {
        Some(catalog) => {
            sources.catalog = discovery::catalog::load(catalog).context("load the catalog (agent.catalog)")?;
            Some(discovery::catalog::watch(catalog, updates.clone(), &background)?)
        }
        None => None,
    };
    // Client identities: the Kubernetes source feeds it this node's pods; the proxy asks
    // it who a connection's client is.
    let workloads = workload::Workloads::new(redirect::cgroup2_root().ok());
    let cluster = match &main.agent.kubernetes {
        Some(k8s) => {
            let pods = Arc::clone(&workloads);
            let first = discovery::kubernetes::start(k8s, updates.clone(), k8s.sync_timeout, &background, pods)
                .await
                .context("watch the Kubernetes API (agent.kubernetes)")?;
            (sources.zone, sources.region) = first.locality.clone().unwrap_or_default();
            Some(first)
        }
        None => None,
    };
    let dns = Dns::new(&main.agent.dns, updates.clone(), background.clone())?;
    let targets = discovery::dns_targets(main.services.iter().chain(&sources.catalog));
    sources.resolved = dns.resolve_all(&targets, Duration::from_secs(5)).await;
    let origin = path.as_deref().map_or_else(|| "the config".to_owned(), |p| p.display().to_string());
    let merged =
        validated(sources.merge(&main, [])).map_err(|p| anyhow::anyhow!("the catalog clashes with {origin}:\n{p}"))?;
    let mut snapshot = Snapshot::build(&merged, &sources.resolved, None);
    // The cluster's services join service by service, as its later changes do: one that
    // clashes with the file is held back and reported, the rest are served from the start.
    let mut held = std::collections::BTreeMap::new();
    let status = Arc::new(admin::Status::default());
    if let Some(first) = cluster {
        status.kubernetes_objects(first.problems);
        let wanted = first.upsert.into_iter().map(|s| (s.name.clone(), Some(s))).collect();
        let checked = checked::check(&snapshot, &merged.agent, wanted);
        snapshot = snapshot.changed(&checked.upsert, &[], &sources.resolved).0;
        held.extend(checked.held.into_iter().map(|h| (h.name.clone(), h)));
    }
    let snapshot = Arc::new(snapshot);

    let plane = match host {
        Host::Checked { cgroup, pins } => attach(&main, cgroup, pins, &snapshot).await?,
        Host::Unattached(origins) => Plane {
            listeners: Listeners::bind(0, &[], Inherited::default()).await?,
            admin: admin_listener(main.agent.admin, None).await?,
            origins,
            kernel: None,
            lifecycle: None,
        },
    };
    let (publish, latest) = watch::channel(Arc::clone(&snapshot));
    let (publish_agent, effective) = watch::channel(Arc::new(merged.agent.clone()));
    let stats = Stats::new(Arc::clone(&workloads), main.agent.stats);
    // Mark 0 is no mark: without programs there is nothing to get past.
    let mark = if plane.kernel.is_some() { main.agent.mark } else { 0 };
    // Everything the agent holds at rest is open now: what is left of the open-files
    // limit is for connections.
    let (capacity, saturation) = Capacity::new(Capacity::limit_for(main.agent.max_connections), &stats.metrics);
    let proxy = Proxy::new(
        latest.clone(),
        plane.origins,
        mark,
        Arc::clone(&stats),
        Arc::clone(&capacity),
        &main.agent.http_limits,
    );
    let mut reconciler = Reconciler {
        main,
        sources,
        publish,
        publish_agent,
        kernel: plane.kernel,
        dns,
        mark,
        status: Arc::clone(&status),
        stats: Arc::clone(&stats),
        http: Arc::clone(proxy.http()),
        background,
        checks: Default::default(),
        last_sweep: Instant::now(),
        held,
        tables: Default::default(),
    };
    reconciler.start();
    reconciler.report_held();
    if let Some(k) = &mut reconciler.kernel {
        let events = k.redirect.events().context("follow the kernel's connection events")?;
        if let Some(events) = events {
            let direct = crate::direct::Direct::new(events, latest.clone(), Arc::clone(&stats));
            reconciler.background.spawn(direct.run());
        }
    }

    let stop = CancellationToken::new();
    let offer = match &plane.lifecycle {
        Some(_) => Some(Offer {
            listeners: plane.listeners.dup().context("duplicate the listeners for a future hand-over")?,
            admin: match &plane.admin {
                Some(l) => Some(l.as_fd().try_clone_to_owned().context("duplicate the admin listener")?),
                None => None,
            },
        }),
        None => None,
    };
    let admin_addr = match plane.admin {
        Some(l) => {
            let addr = l.local_addr().context("the admin listener's address")?;
            let kernel = reconciler.kernel.as_ref().map(|k| k.redirect.counters());
            let capacity = Arc::clone(&capacity);
            let state = admin::AdminState { snapshot: latest, config: effective, status, stats, kernel, capacity, log };
            let metrics = reconciler.main.agent.metrics.map(admin::bind_shared).transpose()?;
            admin::spawn(l, metrics, state, stop.clone()).context("start the admin API's thread")?;
            Some(addr)
        }
        None => None,
    };
    let tasks = TaskTracker::new();
    let proxy_addrs = plane.listeners.addresses();
    // To take the listeners out of the kernel's map and back while saturated.
    let listening = match &reconciler.kernel {
        Some(_) => plane.listeners.dup_slots().context("duplicate the listeners")?,
        None => Vec::new(),
    };
    let l = plane.listeners;
    let accept_loops: Vec<_> = [Some(l.v4), l.v6, l.node_v4, l.node_v6]
        .into_iter()
        .flatten()
        .map(|l| tokio::spawn(Arc::clone(&proxy).serve(l, tasks.clone(), stop.clone())))
        .collect();
    // We accept on the sockets now: the previous agent may stop accepting. Only then do
    // we replace its hand-over socket with ours.
    let mut handed_over = None;
    let mut lifecycle = plane.lifecycle;
    if let (Some(life), Some(offer)) = (lifecycle.as_mut(), offer) {
        if let Some(predecessor) = life.predecessor.take()
            && let Err(e) = predecessor.ready()
        {
            // It went away after handing over: nothing to stop, we serve either way.
            warn!(error = %anyhow::Error::from(e), "could not tell the previous agent we are ready");
        }
        let socket = handover::bind(&reconciler.main.agent.handover_socket)?;
        handed_over = Some(tokio::spawn(handover::serve(socket, offer)));
    }
    if let Some(life) = &mut lifecycle {
        // Serving: the node addresses stay until uninstall.
        life.added.keep();
    }
    info!(
        listen = %proxy_addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        cgroup = lifecycle.as_ref().map(|l| l.cgroup.display().to_string()),
        pins = lifecycle.as_ref().map(|l| l.pins.path().display().to_string()),
        services = snapshot.len(),
        max_connections = capacity.limit(),
        version = handover::VERSION,
        "switchyard ready"
    );
    drop(snapshot);
    if lifecycle.is_some() {
        match crate::memory::release_startup() {
            Ok(bytes) => tracing::debug!(code_paged_out = bytes, "start-up memory released"),
            Err(e) => tracing::debug!(error = %e, "could not release start-up memory"),
        }
    }

    let requested = CancellationToken::new();
    let running = Running {
        reconciler,
        signals,
        incoming,
        path,
        handed_over,
        requested: requested.clone(),
        lifecycle,
        _catalog_watch: catalog_watch,
        stop,
        accept_loops,
        tasks,
        saturation,
        listening,
        capacity,
    };
    let main = tokio::spawn(running.run());
    Ok(Bound { proxy: proxy_addrs, admin: admin_addr, requested, main })
}

/// The running agent after start-up: the main loop and the way down.
struct Running {
    reconciler: Reconciler,
    signals: Option<Signals>,
    incoming: mpsc::Receiver<discovery::Update>,
    /// The config file SIGHUP re-reads.
    path: Option<PathBuf>,
    handed_over: Option<JoinHandle<Option<i32>>>,
    requested: CancellationToken,
    lifecycle: Option<Lifecycle>,
    /// Kept for the agent's life: dropping the watcher ends the catalog watch.
    _catalog_watch: Option<notify::RecommendedWatcher>,
    /// Stops the accept loops (and the admin API).
    stop: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
    /// The connection tasks, drained at the end.
    tasks: TaskTracker,
    /// Whether the agent is saturated (`capacity`), and its listeners by `SY_LISTENERS`
    /// slot (none without the kernel side), taken out of the map while it is.
    saturation: watch::Receiver<bool>,
    listening: Vec<(u32, std::os::fd::OwnedFd)>,
    capacity: Arc<Capacity>,
}

impl Running {
    /// Follow signals, source updates and the tick until a stop, then go down: uninstall
    /// (with no successor) or leave programs and pins (after a hand-over), stop accepting,
    /// drain.
    async fn run(mut self) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reconciler = &mut self.reconciler;
        let reason = loop {
            tokio::select! {
                signal = next_signal(&mut self.signals) => match signal {
                    "SIGHUP" => if let Some(path) = &self.path { reconciler.reload_file(path) },
                    stop_signal => break Stop::Signal(stop_signal),
                },
                Some(update) = self.incoming.recv() => reconciler.update(update),
                _ = tick.tick() => reconciler.tick(),
                Ok(()) = self.saturation.changed() => {
                    let saturated = *self.saturation.borrow_and_update();
                    step_aside(reconciler, &self.capacity, saturated, &self.listening);
                }
                successor = handed_over_by(&mut self.handed_over) => break Stop::HandedOver(successor),
                _ = self.requested.cancelled() => break Stop::Requested,
            }
        };
        if let Some(k) = &reconciler.kernel {
            log_counters(&k.redirect);
        }
        log_service_stats(&reconciler.publish.borrow());
        reconciler.shutdown().await;
        match (reason, &self.lifecycle) {
            (Stop::HandedOver(successor), _) => {
                info!(successor.pid = successor, "handed over to a new agent; draining, programs and pins stay");
            }
            (Stop::Signal(_) | Stop::Requested, None) => info!("shutting down"),
            (stop, Some(life)) => {
                let why = match stop {
                    Stop::Signal(signal) => signal,
                    _ => "shutdown requested",
                };
                info!(why, "shutting down with no successor: detaching redirect programs and removing the pins");
                if let Some(h) = &self.handed_over {
                    h.abort();
                }
                let removed = redirect::uninstall(life.pins.path()).context("uninstall on shutdown")?;
                let addresses = nodeaddr::remove_ours().context("remove the node addresses from lo on shutdown")?;
                info!(
                    programs = removed.links,
                    maps = removed.maps,
                    pins = %life.pins.path().display(),
                    node_addresses = %join(&addresses),
                    "uninstalled"
                );
                let _ = std::fs::remove_file(&reconciler.main.agent.handover_socket);
            }
        }
        let drain = Duration::from_secs(reconciler.main.agent.drain_timeout_secs);
        // Dropping the reconciler leaves the programs attached (they are pinned).
        drop(self.reconciler);
        self.stop.cancel();
        for l in self.accept_loops {
            let _ = l.await;
        }
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait()).await.is_err() {
            warn!(open = self.tasks.len(), after = ?drain, "connections still open at the drain deadline; cutting them");
        }
        info!("stopped");
        Ok(())
    }
}

/// The kernel side of start-up: node addresses on lo, the listeners (taken over from a
/// running agent if one hands them over), the programs loaded and attached.
async fn attach(main: &Config, cgroup: PathBuf, pins: PinDir, snapshot: &Snapshot) -> anyhow::Result<Plane> {
    // Pods reach the agent at the node addresses: put them on lo before listening there.
    // With pods not redirected, addresses an earlier run added go (an address from an
    // earlier node_address stays until uninstall: a predecessor may still listen on it).
    let mut node_addrs = node_addresses(main);
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
            info!(
                socket = %main.agent.handover_socket.display(),
                predecessor.version = inherited.version.as_deref().unwrap_or("unknown (protocol 1)"),
                version = handover::VERSION,
                "took over the running agent's listeners"
            );
            (inherited.listeners, inherited.admin, Some(inherited.predecessor))
        }
        None => (Inherited::default(), None, None),
    };
    let listeners = Listeners::bind(main.agent.listen_port, &node_addrs, inherited).await?;
    let admin = admin_listener(main.agent.admin, admin_inherited).await?;

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
    let slots = listeners.slots();
    let slots: Vec<(u32, std::os::fd::BorrowedFd<'_>)> = slots.iter().map(|(s, l)| (*s, l.as_fd())).collect();
    let (redirect, orig) = Redirect::start(
        &cgroup,
        &pins,
        agent,
        &slots,
        snapshot.service_addresses(),
        &snapshot.kernel_tables(Instant::now()),
    )
    .context("start the transparent redirect")?;
    drop(slots);
    let pods = PodsReconcile {
        paths: PodPaths::new(main.agent.blocked_retry),
        orig: Arc::clone(&orig),
        mode: main.agent.pods,
        exclude: main.agent.exclude_cgroups.clone(),
        node_address: node_addrs.iter().map(|ip| SocketAddr::new(*ip, main.agent.listen_port).to_string()).collect(),
    };
    Ok(Plane {
        listeners,
        admin,
        origins: orig,
        kernel: Some(reconcile::Attached { redirect, pods }),
        lifecycle: Some(Lifecycle { cgroup, pins, predecessor, added }),
    })
}

/// The next stop or reload signal; never, for an agent without signal handlers.
async fn next_signal(signals: &mut Option<Signals>) -> &'static str {
    match signals {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// A successor's pid once the hand-over server has handed over; never without one.
async fn handed_over_by(server: &mut Option<JoinHandle<Option<i32>>>) -> Option<i32> {
    match server {
        Some(h) => {
            let successor = h.await.ok().flatten();
            *server = None;
            successor
        }
        None => std::future::pending().await,
    }
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

/// While saturated, the kernel sends new connections to endpoints itself: take the
/// listeners out of its map, and put them back once there is room. Logged once done, so
/// the log says what the kernel does from then on.
fn step_aside(
    reconciler: &mut Reconciler,
    capacity: &Capacity,
    saturated: bool,
    listening: &[(u32, std::os::fd::OwnedFd)],
) {
    let (max, resume) = (capacity.limit(), capacity.resume_at());
    let Some(k) = &mut reconciler.kernel else {
        if saturated {
            warn!(max_connections = max, "saturated, with no kernel side to send new connections to endpoints");
        }
        return;
    };
    let fds: Vec<_> = listening.iter().map(|(slot, fd)| (*slot, fd.as_fd())).collect();
    match k.redirect.step_aside(saturated, &fds) {
        Ok(()) if saturated => warn!(
            max_connections = max,
            "saturated: new connections go straight to endpoints in the kernel (no retries or HTTP routing) until at most {resume} are open"
        ),
        Ok(()) => info!(open = capacity.open(), max_connections = max, "room again: new connections come to the agent"),
        Err(e) => {
            let doing = if saturated { "take the listeners out of" } else { "put the listeners back into" };
            warn!(error = %anyhow::Error::from(e), "could not {doing} the kernel's map");
        }
    }
}

/// Node addresses this start put on lo: removed again if it fails before the agent is
/// ready (a failed first start leaves nothing behind, as with the pins).
struct Added(Vec<IpAddr>);

impl Added {
    fn keep(&mut self) {
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
    for (_, svc) in snapshot.services() {
        let s = &svc.balancer.stats;
        let tier = |t: Tier| s.by_tier[t as usize].load(Relaxed);
        // Only services that were used: a cluster has thousands that were not.
        if Tier::ALL.into_iter().all(|t| tier(t) == 0) {
            continue;
        }
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
