//! The reconciler: everything that changes after start-up goes through here. Changes
//! arrive from SIGHUP (re-read the config file) and the discovery sources. The file and
//! the catalog are merged with the rest and validated as a whole; the cluster's changes
//! (thousands of services, a few changing at a time) are checked service by service
//! against the running state (`state::checked`). A bad change is rejected with its
//! problems logged and recorded for `/status`, and the running state stays in force; a
//! good one becomes a new snapshot that shares every unchanged service with the last,
//! published without dropping anything (endpoints that left get their drain time, state
//! of the others carries over). Only what changed is followed up: the kernel's entries of
//! the addresses involved, the health checks of the services involved.
//!
//! On a timer it keeps the kernel's endpoint tables in step with endpoint health (only
//! where it changed), follows pod namespaces, and sweeps idle upstream HTTP connections.
//!
//! It owns every background task (`tasks::Background`): health checks (a group per
//! service), drain deadlines, and the discovery watchers started before it; they stop
//! when it shuts down.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    admin, balance,
    config::{AgentConfig, Config, ConfigError, Origin, PodsMode, ServiceConfig},
    discovery::{self, Sources, Update, dns::Dns, kubernetes::ClusterDelta},
    health,
    pods::{self, PodPaths},
    proxy::http::Http,
    redirect::{self, OrigDstTable, Redirect},
    state::{
        Change, Departure, Snapshot,
        checked::{self, Held},
    },
    stats::{Stats, metrics::NetnsLabels},
    tasks::Background,
};

/// How often idle upstream HTTP connections are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A discovery source's update that cannot be used on its own (a catalog that does
    /// not parse, ...).
    #[error("{0}")]
    Source(String),
    #[error("the result would be invalid:\n{0}")]
    Invalid(Problems),
}

/// Validation problems of a merged config, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Problems(pub String);

/// The merged config if it is valid, else its problems.
pub fn validated(merged: Config) -> Result<Config, Problems> {
    let problems = merged.problems();
    if problems.is_empty() {
        Ok(merged.canonical())
    } else {
        Err(Problems(problems.iter().map(|p| format!("  {}: {}", p.field, p.message)).collect::<Vec<_>>().join("\n")))
    }
}

/// The kernel side the reconciler keeps in step (absent when the agent runs without it).
pub struct Attached {
    pub redirect: Redirect,
    pub pods: PodsReconcile,
}

/// What the agent keeps to follow pod namespaces and exclusions between ticks.
pub struct PodsReconcile {
    pub paths: PodPaths,
    pub orig: Arc<OrigDstTable>,
    pub mode: PodsMode,
    pub exclude: Vec<PathBuf>,
    pub node_address: Vec<String>,
}

/// The agent's live state: the config and source contributions in force, and what acts on
/// them. Dropping it leaves the kernel programs attached (they are pinned).
pub struct Reconciler {
    pub main: Config,
    pub sources: Sources,
    pub publish: watch::Sender<Arc<Snapshot>>,
    /// The agent settings in force (with the Node's locality), for the admin API's
    /// `/config`, which adds the snapshot's services.
    pub publish_agent: watch::Sender<Arc<AgentConfig>>,
    pub kernel: Option<Attached>,
    pub dns: Dns,
    pub mark: u32,
    pub status: Arc<admin::Status>,
    pub stats: Arc<Stats>,
    pub http: Arc<Http>,
    pub background: Background,
    /// Health checks, one task group per service (by slot) that has them.
    pub checks: HashMap<usize, Background>,
    pub last_sweep: Instant,
    /// Cluster changes held back (they clashed with the rest), by service name: tried
    /// again with every later change, since what they clashed with may have gone.
    pub held: BTreeMap<String, Held>,
    pub tables: Tables,
}

/// What the kernel's endpoint tables were last computed from, to recompute only those of
/// services whose endpoints' availability changed.
#[derive(Debug, Default)]
pub struct Tables {
    /// `balance::availability_epoch()` when endpoints were last looked at.
    epoch: u64,
    /// Some endpoint was not plainly healthy then: look again on every tick, since an
    /// ejection runs out with the clock alone.
    timed: bool,
    /// Per service slot, its balancer's availability digest.
    digests: HashMap<usize, u64>,
}

impl Reconciler {
    /// Start what follows the first snapshot: its health checks, DNS refreshes, drain
    /// deadlines, and the kernel's view of pods.
    pub fn start(&mut self) {
        self.tables.epoch = balance::availability_epoch();
        let snapshot = Arc::clone(&self.publish.borrow());
        let changes = snapshot.all_new();
        self.follow(&snapshot, &changes);
        self.track_dns();
        self.tick();
    }

    /// SIGHUP: re-read the main config file.
    pub fn reload_file(&mut self, path: &Path) {
        let mut new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => return self.reject("config file", Rejected::Config(e)),
        };
        if new.agent != self.main.agent {
            warn!(
                "agent settings (listen_port, cgroup, mark, zone, catalog, ...) only change on restart; reloading services"
            );
            new.agent = self.main.agent.clone();
        }
        if let Err(e) = self.apply(new, self.sources.clone(), "config file") {
            self.reject("config file", e);
        }
    }

    /// An update from a discovery source.
    pub fn update(&mut self, update: Update) {
        let source = update.source();
        match update {
            Update::Catalog(Err(e)) => self.reject(source, Rejected::Source(e)),
            Update::Catalog(Ok(services)) => {
                let candidate = Sources { catalog: services, ..self.sources.clone() };
                if let Err(e) = self.apply(self.main.clone(), candidate, source) {
                    self.reject(source, e);
                }
            }
            Update::Dns { target, answer } => {
                // Only the services that name it change; their configs were checked.
                self.sources.resolved.insert(target.clone(), answer);
                let upsert: Vec<ServiceConfig> =
                    self.named_services().filter(|s| s.endpoints.iter().any(|e| e.target == target)).cloned().collect();
                self.change(&upsert, &[], source, Instant::now());
            }
            Update::Cluster(delta) => self.cluster(delta),
        }
    }

    /// The services of the main file and the catalog (the cluster's are in the snapshot).
    fn named_services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.main.services.iter().chain(&self.sources.catalog)
    }

    /// Changes from the cluster, checked service by service against the running state.
    fn cluster(&mut self, delta: ClusterDelta) {
        let started = Instant::now();
        let ClusterDelta { upsert, remove, locality, problems } = delta;
        self.status.kubernetes_objects(problems);
        // Held-back changes first: the new ones supersede them.
        let held = std::mem::take(&mut self.held);
        // Reported already: a change held for the same reasons is not reported again.
        let before: HashMap<String, String> = held.iter().map(|(n, h)| (n.clone(), h.problems.clone())).collect();
        let mut wanted: BTreeMap<String, Option<ServiceConfig>> =
            held.into_iter().map(|(n, h)| (n, h.change)).collect();
        wanted.extend(remove.into_iter().map(|n| (n, None)));
        wanted.extend(upsert.into_iter().map(|s| (s.name.clone(), Some(s))));
        let snapshot = Arc::clone(&self.publish.borrow());
        let checked = checked::check(&snapshot, &self.main.agent, wanted.into_iter().collect());
        for held in checked.held {
            if before.get(&held.name) != Some(&held.problems) {
                self.reject("kubernetes", Rejected::Invalid(Problems(held.problems.clone())));
            }
            self.held.insert(held.name.clone(), held);
        }
        self.change(&checked.upsert, &checked.remove, "kubernetes", started);
        self.held_status();
        if let Some((zone, region)) = locality
            && (zone.as_ref(), region.as_ref()) != (self.sources.zone.as_ref(), self.sources.region.as_ref())
        {
            // Every endpoint's tier is relative to the node's zone: all services change.
            let candidate = Sources { zone, region, ..self.sources.clone() };
            if let Err(e) = self.apply(self.main.clone(), candidate, "kubernetes") {
                self.reject("kubernetes", e);
            }
        }
    }

    /// Report the cluster's services held back when the first snapshot was made (later
    /// ones are reported as they come).
    pub fn report_held(&self) {
        for h in self.held.values() {
            self.reject("kubernetes", Rejected::Invalid(Problems(h.problems.clone())));
        }
        self.held_status();
    }

    /// Held changes stay in `/status` while held, whatever else applied since.
    fn held_status(&self) {
        if !self.held.is_empty() {
            let all: Vec<&str> = self.held.values().map(|h| h.problems.as_str()).collect();
            self.status.rejected("kubernetes", format!("held back, the result would be invalid:\n{}", all.join("\n")));
        }
    }

    /// Log a rejected change and record it for `/status`; nothing else changes.
    fn reject(&self, source: &str, error: Rejected) {
        // With its sources, on one line, as the agent's other error lines read.
        let error = format!("{:#}", anyhow::Error::from(error));
        error!(source, error = error.as_str(), "update rejected; still serving the last good state");
        self.status.rejected(source, error);
    }

    /// Make `main` + `sources` (+ the cluster's services in force) the running state if
    /// together they are valid.
    fn apply(&mut self, main: Config, sources: Sources, source: &str) -> Result<(), Rejected> {
        let started = Instant::now();
        let prev = Arc::clone(&self.publish.borrow());
        let cluster =
            prev.services().filter(|(_, s)| s.config.origin == Origin::Kubernetes).map(|(_, s)| s.full_config());
        let merged = validated(sources.merge(&main, cluster)).map_err(Rejected::Invalid)?;
        let (next, changes) = prev.rebuilt(&merged, &sources.resolved);
        self.main = main;
        self.sources = sources;
        self.publish_agent.send_if_modified(|a| {
            let changed = **a != merged.agent;
            if changed {
                *a = Arc::new(merged.agent.clone());
            }
            changed
        });
        self.install(next, &changes, source, started);
        self.track_dns();
        crate::memory::trim_heap();
        // What a held-back change clashed with may be gone now.
        if !self.held.is_empty() {
            self.cluster(ClusterDelta::default());
        }
        Ok(())
    }

    /// Apply checked service changes to the running snapshot.
    fn change(&mut self, upsert: &[ServiceConfig], remove: &[String], source: &str, started: Instant) {
        if upsert.is_empty() && remove.is_empty() {
            return;
        }
        let prev = Arc::clone(&self.publish.borrow());
        let (next, changes) = prev.changed(upsert, remove, &self.sources.resolved);
        // Services sent again unchanged (a relist, a resync) change nothing.
        if !changes.is_empty() {
            self.install(next, &changes, source, started);
        }
    }

    /// Publish `next` and bring what follows the services in step with `changes`: the
    /// kernel's entries for the addresses involved, drain deadlines, health checks.
    fn install(&mut self, next: Snapshot, changes: &[Change], source: &str, started: Instant) {
        let next = Arc::new(next);
        // Publish before the kernel learns new addresses, so the agent knows every service
        // it may be sent. (A removed address can, for a moment, still be redirected and is
        // then closed: the service is gone either way.)
        self.publish.send_replace(Arc::clone(&next));
        if let Some(k) = &mut self.kernel {
            let entries = next.kernel_entries(next.touched_addresses(changes), Instant::now());
            if let Err(e) = k.redirect.update_addresses(&entries) {
                let e = anyhow::Error::from(e);
                error!(error = format!("{e:#}"), "could not update the kernel's service addresses");
            }
        }
        self.follow(&next, changes);
        info!(
            source,
            services = next.len(),
            changed = changes.len(),
            took_us = started.elapsed().as_micros() as u64,
            "configuration applied"
        );
        self.status.applied(source);
    }

    /// Drain deadlines, health checks and table digests of the services `changes` touched.
    fn follow(&mut self, snapshot: &Snapshot, changes: &[Change]) {
        self.arm_drain_deadlines(snapshot.departures(changes));
        let now = Instant::now();
        for c in changes {
            if let Some(group) = self.checks.remove(&c.slot) {
                group.stop();
            }
            self.tables.digests.remove(&c.slot);
            if c.gone {
                continue;
            }
            let svc = snapshot.service(c.slot);
            // Its tables were just written from the availability of now.
            let (digest, timed) = svc.balancer.availability_digest(now);
            self.tables.digests.insert(c.slot, digest);
            self.tables.timed |= timed;
            if svc.config.health_check.is_some() {
                let group = self.background.child();
                health::spawn(svc, self.mark, &self.stats, &group);
                self.checks.insert(c.slot, group);
            }
        }
    }

    /// DNS refreshes follow the names the file's and the catalog's services use.
    fn track_dns(&mut self) {
        let targets = discovery::dns_targets(self.named_services());
        self.dns.track(&targets, &self.sources.resolved);
    }

    /// The periodic work: the kernel's endpoint tables and pod namespaces, idle upstream
    /// HTTP connections.
    pub fn tick(&mut self) {
        self.sync_tables();
        self.sync_pods();
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.http.sweep(&self.publish.borrow());
            self.last_sweep = Instant::now();
        }
    }

    /// Keep the kernel's endpoint tables (`mode: kernel` services, and the fallback) at
    /// the endpoints' health of now: only after some endpoint's availability changed (or
    /// may have, with the clock), and only for the services it changed in (and those
    /// that route to services, whose tables follow their targets).
    fn sync_tables(&mut self) {
        let Some(k) = &mut self.kernel else { return };
        let epoch = balance::availability_epoch();
        if epoch == self.tables.epoch && !self.tables.timed {
            return;
        }
        self.tables.epoch = epoch;
        let snapshot = Arc::clone(&self.publish.borrow());
        let now = Instant::now();
        let mut timed = false;
        let mut changed = HashSet::new();
        for (slot, svc) in snapshot.services() {
            let (digest, t) = svc.balancer.availability_digest(now);
            timed |= t;
            if self.tables.digests.insert(slot, digest) != Some(digest) {
                changed.insert(slot);
            }
        }
        self.tables.timed = timed;
        if changed.is_empty() {
            return;
        }
        let addrs = changed
            .iter()
            .copied()
            .chain(snapshot.routing())
            .flat_map(|i| snapshot.service(i).config.addresses.iter().copied())
            .collect::<std::collections::BTreeSet<_>>();
        let entries = snapshot.kernel_entries(addrs, now);
        debug!(services = changed.len(), addresses = entries.len(), "endpoint availability changed");
        if let Err(e) = k.redirect.update_addresses(&entries) {
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "could not update the kernel's endpoint tables");
        }
    }

    /// Follow pod namespaces (block those whose connects never arrive, probe them again
    /// later), publish what is known of them, and keep the exclusions in step with the
    /// cgroups that exist now (a pod's cgroup appears when it starts).
    fn sync_pods(&mut self) {
        let Some(Attached { redirect: r, pods: p }) = &mut self.kernel else { return };
        let maps = r.pods();
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
        let gauge = |state| self.stats.metrics.pod_netns.get_or_create(&NetnsLabels { state });
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

    /// Endpoints that left service keep their connections until their drain deadline.
    fn arm_drain_deadlines(&self, departures: Vec<Departure>) {
        for d in departures {
            info!(service = %d.service, endpoint = %d.addr, drain = ?d.drain_timeout, "endpoint left service; draining");
            self.background.spawn(async move {
                tokio::time::sleep(d.drain_timeout).await;
                d.state.cut_if_still_draining(d.generation);
            });
        }
    }

    /// Stop every background task (waiting briefly for them to end); the kernel side is
    /// left as it is (the caller uninstalls or hands over).
    pub async fn shutdown(&self) {
        if !self.background.shutdown(Duration::from_secs(2)).await {
            warn!(tasks = self.background.len(), "background tasks still running after shutdown");
        }
    }
}
