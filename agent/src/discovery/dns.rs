//! DNS names in endpoint lists: `host:port` (A and AAAA) and `{ srv: name }` (SRV, whose
//! targets are resolved in turn). One task per name re-resolves it when its TTL runs out
//! (clamped to `agent.dns.min_ttl..max_ttl`) and sends an update when the answer changed.
//!
//! Failures never remove endpoints: a timeout, SERVFAIL, NXDOMAIN or an empty answer
//! keeps the last good answer in force (logged) and is retried with back-off. To drop a
//! name's endpoints, remove the name from the config.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Update;
use crate::{
    config::{DnsConfig, Target},
    state::Resolved,
    tasks::Background,
};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("read the host's DNS configuration (/etc/resolv.conf); set agent.dns.servers instead")]
    SystemConfig(#[source] hickory_resolver::ResolveError),
}

/// One answer: addresses (with SRV weights) and when to ask again.
type Answer = (Vec<(SocketAddr, u32)>, Instant);

/// Resolves names and keeps one re-resolving task per name.
pub struct Dns {
    resolver: TokioResolver,
    config: DnsConfig,
    tasks: HashMap<Target, Background>,
    updates: mpsc::Sender<Update>,
    /// Where the refresh tasks run (one child group per name).
    background: Background,
}

impl Dns {
    pub fn new(config: &DnsConfig, updates: mpsc::Sender<Update>, background: Background) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        // We ask again exactly when an answer expires; a cache would only hide changes.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?
        } else {
            let mut group = NameServerConfigGroup::new();
            for s in &config.servers {
                group.merge(NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            )
        };
        let resolver = builder.with_options(opts).build();
        Ok(Self { resolver, config: config.clone(), tasks: HashMap::new(), updates, background })
    }

    /// Resolve every name once, concurrently, waiting at most `limit`: the answers the
    /// agent starts with. Names that fail are left out (their task keeps trying).
    pub async fn resolve_all(&self, targets: &BTreeSet<Target>, limit: Duration) -> Resolved {
        let mut lookups = tokio::task::JoinSet::new();
        for t in targets {
            let (resolver, t) = (self.resolver.clone(), t.clone());
            lookups.spawn(async move {
                let answer = lookup(&resolver, &t).await;
                (t, answer)
            });
        }
        let mut out = Resolved::new();
        let _ = tokio::time::timeout(limit, async {
            while let Some(Ok((t, answer))) = lookups.join_next().await {
                match answer {
                    Ok((a, _)) => {
                        out.insert(t, a);
                    }
                    Err(e) => warn!(name = %t, error = %e, "DNS lookup failed at start-up; will retry"),
                }
            }
        })
        .await;
        out
    }

    /// Keep exactly `targets` re-resolving. `known` holds the answers already in force,
    /// so a task only reports changes.
    pub fn track(&mut self, targets: &BTreeSet<Target>, known: &Resolved) {
        self.tasks.retain(|t, stop| {
            let keep = targets.contains(t);
            if !keep {
                stop.stop();
            }
            keep
        });
        for t in targets {
            if self.tasks.contains_key(t) {
                continue;
            }
            let group = self.background.child();
            self.tasks.insert(t.clone(), group.clone());
            let task = Refresh {
                resolver: self.resolver.clone(),
                target: t.clone(),
                last: known.get(t).cloned().unwrap_or_default(),
                config: self.config.clone(),
                updates: self.updates.clone(),
            };
            group.spawn(task.run());
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.tasks.values().for_each(Background::stop);
    }
}

struct Refresh {
    resolver: TokioResolver,
    target: Target,
    last: Vec<(SocketAddr, u32)>,
    config: DnsConfig,
    updates: mpsc::Sender<Update>,
}

impl Refresh {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let wait = match lookup(&self.resolver, &self.target).await {
                Ok((answer, valid_until)) => {
                    failures = 0;
                    if answer != self.last {
                        info!(name = %self.target, addresses = answer.len(), "DNS answer changed");
                        self.last = answer.clone();
                        let update = Update::Dns { target: self.target.clone(), answer };
                        if self.updates.send(update).await.is_err() {
                            return;
                        }
                    }
                    valid_until.saturating_duration_since(Instant::now())
                }
                Err(e) => {
                    failures += 1;
                    warn!(name = %self.target, error = %e, "DNS lookup failed; keeping the last answer");
                    self.config.min_ttl.saturating_mul(1 << failures.min(5))
                }
            };
            let wait = wait.clamp(self.config.min_ttl, self.config.max_ttl);
            debug!(name = %self.target, next_in = ?wait, "DNS refresh scheduled");
            tokio::time::sleep(wait).await;
        }
    }
}

/// One lookup of a name: a non-empty answer, or why there is none.
async fn lookup(resolver: &TokioResolver, target: &Target) -> Result<Answer, String> {
    let (answer, valid_until) = match target {
        Target::Addr(a) => return Ok((vec![(*a, 1)], Instant::now() + Duration::from_secs(3600))),
        Target::Host { name, port } => {
            let ips = resolver.lookup_ip(fqdn(name)).await.map_err(|e| e.to_string())?;
            let mut addrs: Vec<(SocketAddr, u32)> = ips.iter().map(|ip| (SocketAddr::new(ip, *port), 1)).collect();
            addrs.sort();
            (addrs, ips.valid_until())
        }
        Target::Srv(name) => {
            let srv = resolver.srv_lookup(fqdn(name)).await.map_err(|e| e.to_string())?;
            // Only the best (lowest) priority is used; higher numbers are backups in
            // SRV's own terms, which failover between endpoint sets covers better.
            let best = srv.iter().map(|r| r.priority()).min();
            let mut valid_until = srv.as_lookup().valid_until();
            let mut addrs = Vec::new();
            for r in srv.iter().filter(|r| Some(r.priority()) == best) {
                let ips = resolver.lookup_ip(r.target().clone()).await.map_err(|e| e.to_string())?;
                valid_until = valid_until.min(ips.valid_until());
                addrs
                    .extend(ips.iter().map(|ip: IpAddr| (SocketAddr::new(ip, r.port()), u32::from(r.weight()).max(1))));
            }
            addrs.sort();
            (addrs, valid_until)
        }
    };
    if answer.is_empty() {
        return Err("the answer has no addresses".into());
    }
    Ok((answer, valid_until))
}

/// Names in config are absolute: no search-domain guessing.
fn fqdn(name: &str) -> String {
    format!("{name}.")
}
