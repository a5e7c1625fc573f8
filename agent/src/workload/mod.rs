//! Workload identity: who a client is, as the operator knows it. A proxied connection
//! knows its client's cgroup id; this turns it into a cgroup path (`cgroupfs`), reads the
//! path (`parse`: the kubelet's pod and container directories, systemd services) and
//! names the owner from the node's pods (`pods`, fed by the Kubernetes source):
//! `shop/deployment/web`, `systemd/nginx.service`. See docs/kubernetes.md, "Workload
//! identity".
//!
//! Identities are for metric labels and the connection table, so their cardinality is
//! bounded: workloads, never pods or pids (the pod is beside it, in [`Identity::pod`]).

mod cgroupfs;
mod parse;
mod pods;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

pub use cgroupfs::{CgroupFs, Found, HandleError};
pub use parse::{CgroupInfo, parse};
pub use pods::{Owner, PodInfo, Pods, workload_of};

/// The values of [`Workload::kind`].
pub mod kind {
    pub const DEPLOYMENT: &str = "deployment";
    pub const STATEFULSET: &str = "statefulset";
    pub const DAEMONSET: &str = "daemonset";
    pub const JOB: &str = "job";
    pub const CRONJOB: &str = "cronjob";
    pub const REPLICASET: &str = "replicaset";
    /// A bare pod (or a static pod's mirror).
    pub const POD: &str = "pod";
    /// A pod's controller of another kind (a custom resource): the name is `Kind/name`.
    pub const CONTROLLER: &str = "controller";
    /// A systemd `.service` unit.
    pub const SYSTEMD: &str = "systemd";
    /// Any other cgroup: the name is its path.
    pub const CGROUP: &str = "cgroup";
    pub const UNKNOWN: &str = "unknown";
}

/// A client as the operator names it. Bounded cardinality: workloads, never pods or pids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Workload {
    /// Kubernetes namespace; None off Kubernetes.
    pub namespace: Option<String>,
    /// deployment, statefulset, daemonset, job, cronjob, replicaset, pod (a bare pod),
    /// controller (another pod controller: name is `Kind/name`), systemd (a .service
    /// unit), cgroup (anything else: name is the cgroup path), unknown
    pub kind: &'static str,
    pub name: String,
}

impl Workload {
    /// `kind/name` (the `client_workload` metric label), e.g. `deployment/web`,
    /// `systemd/nginx.service`, `cgroup//a/b`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// `namespace/kind/name`, or `kind/name` without a namespace: how the CLI prints it.
    pub fn display(&self) -> String {
        self.to_string()
    }

    fn unknown(name: &str) -> Self {
        Self { namespace: None, kind: kind::UNKNOWN, name: name.to_owned() }
    }

    /// Workloads past the bound of route metrics (`stats::signals::MAX_WORKLOADS`).
    pub fn other() -> Self {
        Self { namespace: None, kind: "other", name: "other".to_owned() }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// The pod a client runs in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The container's name, when the cgroup names a container the pod's status lists.
    pub container: Option<String>,
}

/// Everything known about a client cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub workload: Arc<Workload>,
    pub pod: Option<PodRef>,
    /// The cgroup path below the cgroup2 mount (`/kubepods.slice/...`), if found.
    pub cgroup: Option<String>,
}

/// Cached identities at most; cgroups come and go with pods, so the cache is cleared
/// when full (a node has about a thousand cgroups: this is never reached in steady state).
const CACHE: usize = 16_384;

/// A cgroup path, found once, and what it says.
#[derive(Debug)]
struct CgroupPath {
    path: String,
    info: CgroupInfo,
}

#[derive(Debug)]
struct Entry {
    /// `None`: the id was looked for and not found.
    path: Option<Arc<CgroupPath>>,
    /// The identity and the pods' generation it was computed at (`None`: not yet, an
    /// entry a walk passed on the way).
    identity: Option<(u64, Arc<Identity>)>,
}

/// Client identities by cgroup id, shared by the proxy (which asks) and the Kubernetes
/// source (which feeds [`Workloads::pods`]).
#[derive(Debug)]
pub struct Workloads {
    cgroups: Option<CgroupFs>,
    pods: Pods,
    cache: RwLock<HashMap<u64, Entry>>,
    /// One walk at a time: a burst of new clients (at start) waits for the first walk,
    /// which names them all, instead of walking the tree once each.
    walking: Mutex<()>,
    /// The shared answers that name no cgroup.
    unknown: Arc<Identity>,
    unknown_pod: Arc<Workload>,
}

impl Workloads {
    /// cgroup_root: the cgroup2 mount (None: only ids are known, every client is `unknown`).
    pub fn new(cgroup_root: Option<PathBuf>) -> Arc<Self> {
        let unknown = Arc::new(Identity { workload: Arc::new(Workload::unknown("unknown")), pod: None, cgroup: None });
        Arc::new(Self {
            cgroups: cgroup_root.map(CgroupFs::new),
            pods: Pods::default(),
            cache: RwLock::default(),
            walking: Mutex::default(),
            unknown,
            unknown_pod: Arc::new(Workload::unknown("pod")),
        })
    }

    /// The client in cgroup `cgroup_id`. Called on the data path once per connection: a
    /// cache hit is a map lookup (no allocation beyond an Arc clone); a miss resolves the
    /// path by id (microseconds by handle; without CAP_DAC_READ_SEARCH a walk of the
    /// tree, milliseconds on a node, which names every other cgroup there at once).
    pub fn identify(&self, cgroup_id: u64) -> Arc<Identity> {
        let generation = self.pods.generation();
        let path = match self.cache.read().unwrap().get(&cgroup_id) {
            Some(Entry { identity: Some((g, identity)), .. }) if *g == generation => return Arc::clone(identity),
            Some(entry) => Some(entry.path.clone()),
            None => None,
        };
        let path = match path {
            Some(path) => path,
            None => self.find(cgroup_id),
        };
        let new = path.as_deref().map(|p| self.identity_of(p));
        let mut cache = self.cache.write().unwrap();
        // An answer equal to the last one keeps its Arc, so a pod change that does not
        // concern this cgroup changes nothing downstream.
        let old = cache.get(&cgroup_id).and_then(|e| e.identity.as_ref()).map(|(_, i)| i);
        let identity = match (new, old) {
            (None, _) => Arc::clone(&self.unknown),
            (Some(new), Some(old)) if **old == new => Arc::clone(old),
            (Some(new), _) => Arc::new(new),
        };
        if cache.len() >= CACHE && !cache.contains_key(&cgroup_id) {
            cache.clear();
        }
        cache.insert(cgroup_id, Entry { path, identity: Some((generation, Arc::clone(&identity))) });
        identity
    }

    /// The pods on this node, fed by the Kubernetes source.
    pub fn pods(&self) -> &Pods {
        &self.pods
    }

    /// The path of `id`, from the kernel: by handle, else by a walk that caches every
    /// cgroup it passes.
    fn find(&self, id: u64) -> Option<Arc<CgroupPath>> {
        let cgroups = self.cgroups.as_ref()?;
        let found = match cgroups.by_handle(id) {
            Some(found) => found,
            None => {
                let _walk = self.walking.lock().unwrap();
                // The walk just before this one may have passed it.
                if let Some(entry) = self.cache.read().unwrap().get(&id) {
                    return entry.path.clone();
                }
                let mut seen = Vec::new();
                let found = cgroups.walk(id, |i, p| seen.push((i, p.to_owned())));
                let mut cache = self.cache.write().unwrap();
                for (i, p) in seen {
                    if cache.len() >= CACHE {
                        break;
                    }
                    cache.entry(i).or_insert_with(|| Entry { path: Some(Arc::new(CgroupPath::of(p))), identity: None });
                }
                found
            }
        };
        match found {
            Found::Path(p) => Some(Arc::new(CgroupPath::of(p))),
            Found::Missing => None,
        }
    }

    /// Who is in the cgroup at `path`, with the pods known now.
    fn identity_of(&self, CgroupPath { path, info }: &CgroupPath) -> Identity {
        let cgroup = Some(path.clone());
        let (workload, pod) = match (&info.pod_uid, &info.unit) {
            (Some(uid), _) => match self.pods.get(uid) {
                Some(p) => {
                    let container = info.container_id.as_deref().and_then(|c| p.container(c)).map(str::to_owned);
                    let pod =
                        PodRef { namespace: p.namespace.clone(), name: p.name.clone(), uid: p.uid.clone(), container };
                    (Arc::clone(&p.workload), Some(pod))
                }
                // Not (yet) known: one bounded name for all such pods until they arrive.
                None => (Arc::clone(&self.unknown_pod), None),
            },
            (None, Some(unit)) => {
                (Arc::new(Workload { namespace: None, kind: kind::SYSTEMD, name: unit.clone() }), None)
            }
            (None, None) => (Arc::new(Workload { namespace: None, kind: kind::CGROUP, name: path.clone() }), None),
        };
        Identity { workload, pod, cgroup }
    }
}

impl CgroupPath {
    fn of(path: String) -> Self {
        Self { info: parse(&path), path }
    }
}

#[cfg(test)]
mod tests;
