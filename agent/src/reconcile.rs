//! The reconciler: everything that changes after start-up goes through here. Changes
//! arrive from SIGHUP (re-read the config file) and the discovery sources; each is merged
//! with the rest and validated as a whole; a bad one is rejected with its problems logged
//! and recorded for `/status`, and the running state stays in force; a good one becomes a
//! new snapshot, published without dropping anything (endpoints that left get their drain
//! time, state of the others carries over). On a timer it keeps the kernel in step with
//! endpoint health (the fallback's endpoint sets) and pod namespaces, and sweeps idle
//! upstream HTTP connections.
//!
//! It owns every background task (`tasks::Background`): health checks (replaced with
//! each snapshot), drain deadlines, and the discovery watchers started before it; they
//! stop when it shuts down.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    admin,
    config::{Config, ConfigError, PodsMode},
    discovery::{self, Sources, Update, dns::Dns},
    health,
    pods::{self, PodPaths},
    proxy::http::Http,
    redirect::{self, OrigDstTable, Redirect},
    state::{Departure, Snapshot},
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
    /// The effective (merged) configuration, for the admin API's `/config`.
    pub publish_config: watch::Sender<Arc<Config>>,
    pub kernel: Option<Attached>,
    pub dns: Dns,
    pub mark: u32,
    pub status: Arc<admin::Status>,
    pub stats: Arc<Stats>,
    pub http: Arc<Http>,
    pub background: Background,
    /// The health checks of the snapshot in force.
    pub checks: Background,
    pub last_sweep: Instant,
}

impl Reconciler {
    /// Start what follows the first snapshot: its health checks, DNS refreshes, drain
    /// deadlines, and the kernel's view of pods.
    pub fn start(&mut self, merged: &Config) {
        self.restart_background(merged);
        self.arm_drain_deadlines(self.publish.borrow().departures_since(&Snapshot::default()));
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
        let mut candidate = self.sources.clone();
        if let Err(e) = candidate.apply(update) {
            return self.reject(source, Rejected::Source(e));
        }
        if let Err(e) = self.apply(self.main.clone(), candidate, source) {
            self.reject(source, e);
        }
    }

    /// Log a rejected change and record it for `/status`; nothing else changes.
    fn reject(&self, source: &str, error: Rejected) {
        // With its sources, on one line, as the agent's other error lines read.
        let error = format!("{:#}", anyhow::Error::from(error));
        error!(source, error = error.as_str(), "update rejected; still serving the last good state");
        self.status.rejected(source, error);
    }

    /// Make `main` + `sources` the running state if together they are valid.
    fn apply(&mut self, main: Config, sources: Sources, source: &str) -> Result<(), Rejected> {
        let started = Instant::now();
        let merged = validated(sources.merge(&main)).map_err(Rejected::Invalid)?;
        let prev = Arc::clone(&self.publish.borrow());
        let next = Arc::new(Snapshot::build(&merged, &sources.resolved, Some(&prev)));
        // Publish before the kernel learns new addresses, so the agent knows every service
        // it may be sent. (A removed address can, for a moment, still be redirected and is
        // then closed: the service is gone either way.)
        self.publish.send_replace(Arc::clone(&next));
        self.publish_config.send_replace(Arc::new(merged.clone()));
        if let Some(k) = &mut self.kernel
            && let Err(e) = k.redirect.sync_services(next.service_addresses())
        {
            let e = anyhow::Error::from(e);
            error!(error = format!("{e:#}"), "could not update the kernel's service addresses");
        }
        self.sync_backends();
        self.arm_drain_deadlines(next.departures_since(&prev));
        self.main = main;
        self.sources = sources;
        self.restart_background(&merged);
        info!(source, services = next.len(), took_us = started.elapsed().as_micros() as u64, "configuration applied");
        self.status.applied(source);
        Ok(())
    }

    /// The periodic work: the kernel's endpoint tables and pod namespaces, idle upstream
    /// HTTP connections.
    pub fn tick(&mut self) {
        self.sync_backends();
        self.sync_pods();
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.http.sweep(&self.publish.borrow());
            self.last_sweep = Instant::now();
        }
    }

    /// Keep the kernel's endpoint tables (`mode: kernel` services, and the fallback) at
    /// the endpoints' health, weights and locality of now.
    fn sync_backends(&mut self) {
        let Some(k) = &mut self.kernel else { return };
        let backends = self.publish.borrow().kernel_tables(Instant::now());
        if let Err(e) = k.redirect.sync_backends(&backends) {
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

    /// Health checks follow the snapshot; DNS refreshes follow the names in use.
    fn restart_background(&mut self, merged: &Config) {
        self.checks.stop();
        self.checks = self.background.child();
        health::spawn(&self.publish.borrow(), self.mark, &self.checks);
        self.dns.track(&discovery::dns_targets(merged), &self.sources.resolved);
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
