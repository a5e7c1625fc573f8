//! The Kubernetes source, for the DaemonSet deployment: Services (ClusterIP and ports
//! become service addresses), EndpointSlices (serving / terminating endpoints with zone and
//! node) and this Node (its zone and region labels); and, for client identity only, this
//! node's Pods (`pods`, into [`Workloads`]).
//!
//! List+watch is kube-runtime's `watcher`: it lists, then watches from the list's
//! resourceVersion with bookmarks, relists when the server answers 410 Gone, and backs off
//! on errors. The source keeps the objects it needs (as records of the fields it reads) and,
//! like kube-proxy's partial syncs, recomputes only the Services an event touched: each
//! batch of events becomes one [`ClusterDelta`] of the switchyard services that changed,
//! so a rollout in a cluster of thousands of Services costs what it changes. The mapping
//! of one Service is a pure function, tested below.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _, stream};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Update;
use crate::{
    config::{
        EndpointConfig, KubernetesConfig, Origin, Place, PlaceOf, Protocol, ServiceConfig, ServiceMode,
        SessionAffinity, Target,
    },
    tasks::Background,
    workload::Workloads,
};

mod annotations;
mod pods;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Events handled in one batch at most, so a relist of a huge cluster still yields.
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("read kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("find Kubernetes credentials (in-cluster service account, $KUBECONFIG or ~/.kube/config)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// What the cluster says, whole: services, and this node's zone and region.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub services: Vec<ServiceConfig>,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// Objects (or parts) that could not be used, and why: logged, never fatal.
    pub problems: Vec<String>,
}

/// What changed in the cluster since the last delta.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterDelta {
    /// Services new or changed, whole.
    pub upsert: Vec<ServiceConfig>,
    /// Names of services gone.
    pub remove: Vec<String>,
    /// The node's zone and region, when they changed (or on the first delta).
    pub locality: Option<(Option<String>, Option<String>)>,
    /// Services whose problems changed (`Service ns/name`), with their problems now
    /// (none: cleared), for `/status`.
    pub problems: Vec<(String, Vec<String>)>,
}

impl ClusterDelta {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty() && self.locality.is_none() && self.problems.is_empty()
    }
}

async fn client(cfg: &KubernetesConfig) -> Result<Client, KubeError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.clone(), source })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// One watch event of any of the four kinds.
enum Event {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    Pod(Box<watcher::Event<Pod>>),
}

/// What a watch event means once listings are buffered: a listing (between `Init` and
/// `InitDone`) replaces the whole set at its end, so objects gone meanwhile are noticed.
/// Objects are trimmed (`trim`) as they come: a listing of 10,000 Services and their
/// slices held as API objects until its end took 30 MB more at its peak, and the heap it
/// left behind stayed fragmented (20 MB more when ready).
enum Step<T> {
    Apply(T),
    Delete(T),
    Listed(Vec<T>),
}

fn step<K, T>(
    listing: &mut Option<Vec<T>>,
    e: watcher::Event<K>,
    trim: impl FnOnce(K) -> Option<T>,
) -> Option<Step<T>> {
    match e {
        watcher::Event::Init => {
            *listing = Some(Vec::new());
            None
        }
        watcher::Event::Apply(k) | watcher::Event::InitApply(k) => {
            let t = trim(k)?;
            match listing {
                Some(l) => {
                    l.push(t);
                    None
                }
                None => Some(Step::Apply(t)),
            }
        }
        watcher::Event::Delete(k) => Some(Step::Delete(trim(k)?)),
        watcher::Event::InitDone => Some(Step::Listed(listing.take().unwrap_or_default())),
    }
}

/// Start watching. Returns once the first full listing of Services, EndpointSlices and
/// the Node is in (or `sync_limit` passed, with a warning), with everything known at that
/// point as one delta; later changes arrive as [`Update::Cluster`]. This node's Pods go
/// to `workloads` as they come.
pub async fn start(
    cfg: &KubernetesConfig,
    updates: mpsc::Sender<Update>,
    sync_limit: Duration,
    background: &Background,
    workloads: Arc<Workloads>,
) -> Result<ClusterDelta, KubeError> {
    let client = client(cfg).await?;
    let node_name = cfg.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok());
    // No node name: selectors matching nothing, so locality stays unset and no pod is
    // this node's.
    let node = node_name.as_deref().unwrap_or("switchyard-unknown-node");
    let node_watch = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let pod_watch = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let wc = || watcher::Config::default();
    // Errors are logged; the watcher backs off and relists by itself.
    let mut events = stream::select_all([
        watcher(Api::<Service>::all(client.clone()), wc())
            .default_backoff()
            .map(|e| e.map(|e| Event::Service(Box::new(e))))
            .boxed(),
        watcher(Api::<EndpointSlice>::all(client.clone()), wc())
            .default_backoff()
            .map(|e| e.map(|e| Event::Slice(Box::new(e))))
            .boxed(),
        watcher(Api::<Node>::all(client.clone()), node_watch)
            .default_backoff()
            .map(|e| e.map(|e| Event::Node(Box::new(e))))
            .boxed(),
        watcher(Api::<Pod>::all(client), pod_watch)
            .default_backoff()
            .map(|e| e.map(|e| Event::Pod(Box::new(e))))
            .boxed(),
    ]);
    let mut cluster = Cluster { node_name, pods: Some(pods::PodFeed::new(workloads)), ..Cluster::default() };
    // Pods are not waited for: they only name clients, and a client first seen before
    // its pod is named again once the pod arrives (the pods' generation), while services
    // wait on nothing they do not need. Their events are handled here all the same.
    let synced = async {
        while cluster.synced.len() < 3 {
            match events.next().await {
                Some(Ok(e)) => cluster.handle(e),
                Some(Err(e)) => watch_error(&e),
                None => break,
            }
        }
    };
    if tokio::time::timeout(sync_limit, synced).await.is_err() {
        warn!(after = ?sync_limit, "Kubernetes API not synced yet; starting with what is known, updates will follow");
    }
    let first = cluster.delta();
    info!(
        services = first.upsert.len(),
        zone = ?first.locality.as_ref().and_then(|l| l.0.as_ref()),
        "Kubernetes view synced"
    );
    background.spawn(run(events, cluster, updates));
    Ok(first)
}

/// A watch failed (the watcher retries with back-off): logged with its whole chain of
/// causes, since the outermost says only "client error" where the cause is an untrusted
/// certificate or a revoked token.
fn watch_error(e: &watcher::Error) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    warn!(error = %text, "Kubernetes watch error; retrying with back-off");
}

async fn run(
    mut events: impl futures::Stream<Item = Result<Event, watcher::Error>> + Unpin,
    mut cluster: Cluster,
    updates: mpsc::Sender<Update>,
) {
    while let Some(first) = events.next().await {
        // Take every event already waiting, then act once on all of them.
        let mut next = Some(first);
        let mut n = 0;
        while let Some(e) = next.take() {
            match e {
                Ok(e) => cluster.handle(e),
                Err(e) => watch_error(&e),
            }
            n += 1;
            if n < BATCH {
                next = events.next().now_or_never().flatten();
            }
        }
        let delta = cluster.delta();
        if delta.is_empty() {
            continue;
        }
        debug!(events = n, upsert = delta.upsert.len(), remove = delta.remove.len(), "Kubernetes view changed");
        if updates.send(Update::Cluster(delta)).await.is_err() {
            return;
        }
    }
}

/// A Service's key: namespace and name.
type Key = (String, String);

/// The objects the source follows, trimmed, and what it last said about each Service.
#[derive(Default)]
struct Cluster {
    services: HashMap<Key, ServiceRecord>,
    /// EndpointSlices by the Service they belong to (namespace, service-name label),
    /// then by slice name.
    /// (A Service has one slice, or a few: a list, not a map, whose smallest node would
    /// be ten times the size.)
    slices: HashMap<Key, Vec<(String, Slice)>>,
    /// Which Service each slice (namespace, slice name) was filed under.
    slice_owner: HashMap<Key, Key>,
    node: Option<Node>,
    /// Where this node's Pods go (`None` in tests of the service view).
    pods: Option<pods::PodFeed>,
    /// This node's name, for `internalTrafficPolicy: Local`.
    node_name: Option<String>,
    /// Listings in progress (between `Init` and `InitDone`), per kind.
    relist: Relist,
    /// Kinds listed at least once.
    synced: BTreeSet<&'static str>,
    /// Services an event touched since the last delta.
    dirty: BTreeSet<Key>,
    /// Per Service: the names of the switchyard services last reported (an unchanged one
    /// reported again is recognised by the snapshot, which keeps it as it is), and the
    /// problems last logged.
    sent: HashMap<Key, Vec<String>>,
    problems: HashMap<Key, Vec<String>>,
    locality: Option<(Option<String>, Option<String>)>,
    strings: Interner,
}

/// A Service as the mapping reads it (the API's object is a few KiB; this, a few dozen
/// bytes and its strings).
#[derive(Debug, Clone, PartialEq)]
struct ServiceRecord {
    namespace: String,
    name: String,
    /// `clusterIPs`, then `clusterIP` (older servers set only that).
    cluster_ips: Vec<String>,
    ports: Vec<ServicePortRecord>,
    /// Ours only (`switchyard.io/...`).
    annotations: BTreeMap<String, String>,
    /// `internalTrafficPolicy: Local`: this node's endpoints only.
    node_local: bool,
    /// `trafficDistribution: PreferClose` (or `PreferSameZone`): same-zone endpoints first.
    prefer_close: bool,
    /// `publishNotReadyAddresses`: endpoints are used ready or not.
    publish_not_ready: bool,
    /// `sessionAffinity: ClientIP`: its `timeoutSeconds` (default 10800).
    affinity_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
struct ServicePortRecord {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

impl ServiceRecord {
    fn of(s: &Service) -> Option<Self> {
        let m = &s.metadata;
        let spec = s.spec.as_ref()?;
        Some(Self {
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            cluster_ips: spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()).cloned().collect(),
            ports: spec
                .ports
                .iter()
                .flatten()
                .map(|p| ServicePortRecord {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            annotations: m
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| k.starts_with(annotations::PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            prefer_close: matches!(spec.traffic_distribution.as_deref(), Some("PreferClose" | "PreferSameZone")),
            publish_not_ready: spec.publish_not_ready_addresses == Some(true),
            affinity_secs: (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                let config = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
                config.and_then(|c| c.timeout_seconds).and_then(|t| u32::try_from(t).ok()).unwrap_or(10800)
            }),
        })
    }
}

/// An EndpointSlice as the mapping reads it: a cluster holds 100,000 endpoints, and the
/// API's objects are several times this size.
#[derive(Debug, Clone, PartialEq)]
struct Slice {
    /// (port name, port number)
    ports: Vec<(String, Option<i32>)>,
    endpoints: Vec<SliceEndpoint>,
    /// What could not be used, for the log.
    problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct SliceEndpoint {
    addresses: SmallVec<[std::net::IpAddr; 1]>,
    /// EndpointSlice conditions: ready (unknown counts as ready), serving (ready,
    /// unless said otherwise) and terminating.
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Zone, node and `hints.forZones` (comma-joined), interned.
    place: Option<Arc<Place>>,
}

impl Slice {
    fn of(s: &EndpointSlice, strings: &mut Interner) -> Self {
        let name =
            format!("{}/{}", s.metadata.namespace.as_deref().unwrap_or("?"), s.metadata.name.as_deref().unwrap_or("?"));
        let mut problems = Vec::new();
        let endpoints = s
            .endpoints
            .iter()
            .map(|ep| {
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let addresses = ep
                    .addresses
                    .iter()
                    .filter_map(|a| match a.parse() {
                        Ok(ip) => Some(ip),
                        Err(_) => {
                            problems.push(format!("EndpointSlice {name}: address `{a}` is not an IP address"));
                            None
                        }
                    })
                    .collect();
                let zones = ep.hints.as_ref().and_then(|h| h.for_zones.as_ref());
                let hints: Vec<&str> = zones.into_iter().flatten().map(|z| z.name.as_str()).collect();
                let place = Place {
                    zone: ep.zone.as_deref().map(|z| strings.get(z)),
                    region: None,
                    node: ep.node_name.as_deref().map(|n| strings.get(n)),
                    hints: (!hints.is_empty()).then(|| strings.get(&hints.join(","))),
                };
                SliceEndpoint {
                    addresses,
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    place: strings.place(place),
                }
            })
            .collect();
        let ports = s.ports.iter().flatten().map(|p| (p.name.clone().unwrap_or_default(), p.port)).collect();
        Self { ports, endpoints, problems }
    }

    /// The target port of the Service port called `name` (`""`: unnamed).
    fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|(n, _)| n == name).and_then(|(_, p)| u16::try_from((*p)?).ok())
    }
}

/// One shared copy of each zone and node name, and of each place made of them: 100,000
/// endpoints name a few zones and a few thousand nodes. (It keeps every name and place it
/// saw; there are about as many as nodes.)
#[derive(Default)]
struct Interner {
    names: std::collections::HashSet<Arc<str>>,
    places: std::collections::HashSet<Arc<Place>>,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.names.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = s.into();
        self.names.insert(Arc::clone(&a));
        a
    }

    /// The shared copy of `place` (`None` when it says nothing).
    fn place(&mut self, place: Place) -> Option<Arc<Place>> {
        if let Some(p) = self.places.get(&place) {
            return Some(Arc::clone(p));
        }
        let p = place.some()?;
        self.places.insert(Arc::clone(&p));
        Some(p)
    }
}

#[derive(Default)]
struct Relist {
    services: Option<Vec<ListedService>>,
    slices: Option<Vec<ListedSlice>>,
    nodes: Option<Vec<Node>>,
}

/// A Service trimmed: its key, and its record (`None`: one the mapping cannot read).
struct ListedService {
    key: Key,
    record: Option<ServiceRecord>,
}

impl ListedService {
    fn of(s: Service) -> Option<Self> {
        Some(Self { key: key_of(&s)?, record: ServiceRecord::of(&s) })
    }
}

/// An EndpointSlice trimmed: its key (namespace, slice name), the Service it belongs to
/// (`None`: none, or no longer), and its record.
struct ListedSlice {
    id: Key,
    owner: Option<Key>,
    slice: Slice,
}

impl ListedSlice {
    fn of(s: EndpointSlice, strings: &mut Interner) -> Option<Self> {
        let id = key_of(&s)?;
        let owner =
            s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(|o| (id.0.clone(), o.clone()));
        Some(Self { slice: Slice::of(&s, strings), id, owner })
    }
}

impl Cluster {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Service(e) => match step(&mut self.relist.services, *e, ListedService::of) {
                Some(Step::Apply(s)) => self.apply_service(s),
                Some(Step::Delete(s)) => {
                    self.services.remove(&s.key);
                    self.dirty.insert(s.key);
                }
                Some(Step::Listed(listed)) => {
                    let keep: BTreeSet<&Key> = listed.iter().map(|s| &s.key).collect();
                    let gone: Vec<Key> = self.services.keys().filter(|k| !keep.contains(k)).cloned().collect();
                    for key in gone {
                        self.services.remove(&key);
                        self.dirty.insert(key);
                    }
                    listed.into_iter().for_each(|s| self.apply_service(s));
                    self.synced.insert("services");
                }
                None => {}
            },
            Event::Slice(e) => match step(&mut self.relist.slices, *e, |s| ListedSlice::of(s, &mut self.strings)) {
                Some(Step::Apply(s)) => self.apply_slice(s),
                Some(Step::Delete(s)) => self.remove_slice(&s.id),
                Some(Step::Listed(listed)) => {
                    let keep: BTreeSet<&Key> = listed.iter().map(|s| &s.id).collect();
                    let gone: Vec<Key> = self.slice_owner.keys().filter(|k| !keep.contains(k)).cloned().collect();
                    for id in gone {
                        self.remove_slice(&id);
                    }
                    listed.into_iter().for_each(|s| self.apply_slice(s));
                    self.synced.insert("endpointslices");
                }
                None => {}
            },
            Event::Node(e) => match step(&mut self.relist.nodes, *e, Some) {
                Some(Step::Apply(n)) => self.node = Some(n),
                Some(Step::Delete(_)) => self.node = None,
                Some(Step::Listed(listed)) => {
                    self.node = listed.into_iter().next();
                    self.synced.insert("nodes");
                }
                None => {}
            },
            Event::Pod(e) => {
                if let Some(pods) = &mut self.pods {
                    pods.handle(*e);
                }
            }
        }
    }

    fn apply_service(&mut self, s: ListedService) {
        let ListedService { key, record } = s;
        let Some(record) = record else {
            self.dirty.insert(key.clone());
            self.services.remove(&key);
            return;
        };
        if self.services.get(&key) != Some(&record) {
            self.services.insert(key.clone(), record);
            self.dirty.insert(key);
        }
    }

    fn apply_slice(&mut self, listed: ListedSlice) {
        let ListedSlice { id, owner, slice: s } = listed;
        let Some(owner) = owner else {
            // Not a Service's slice (or no longer): forget it.
            return self.remove_slice(&id);
        };
        if self.slice_owner.get(&id) != Some(&owner) {
            self.remove_slice(&id);
        }
        let slices = self.slices.entry(owner.clone()).or_default();
        // Exactly what it holds: a Service has one slice or a few, and the 4 a growing Vec
        // starts with cost 3 MB at 10,000 Services.
        slices.reserve_exact(1);
        // Kept in name order, so the first listing of an endpoint in two slices does not
        // depend on which slice arrived first.
        match slices.binary_search_by(|(n, _)| n.as_str().cmp(&id.1)) {
            Ok(i) if slices[i].1 == s => {}
            Ok(i) => {
                slices[i].1 = s;
                self.dirty.insert(owner.clone());
            }
            Err(i) => {
                slices.insert(i, (id.1.clone(), s));
                self.dirty.insert(owner.clone());
            }
        }
        self.slice_owner.insert(id, owner);
    }

    fn remove_slice(&mut self, id: &Key) {
        let Some(owner) = self.slice_owner.remove(id) else { return };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.retain(|(n, _)| *n != id.1);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// The changes since the last call: each touched Service mapped again and compared
    /// with what was reported for it.
    fn delta(&mut self) -> ClusterDelta {
        let mut delta = ClusterDelta::default();
        for key in std::mem::take(&mut self.dirty) {
            let (now, problems) = match self.services.get(&key) {
                Some(svc) => {
                    let slices: Vec<&Slice> = self.slices.get(&key).into_iter().flatten().map(|(_, s)| s).collect();
                    services_of(svc, &slices, self.node_name.as_deref())
                }
                None => (Vec::new(), Vec::new()),
            };
            let last = self.problems.remove(&key).unwrap_or_default();
            let object = format!("Service {}/{}", key.0, key.1);
            for p in problems.iter().filter(|p| !last.contains(p)) {
                // One line per problem as it appears, naming the object (what a
                // Kubernetes Event would say); `/status` lists them while they last.
                warn!(object = %object, problem = %p, "Kubernetes object not used as given");
            }
            if problems != last {
                delta.problems.push((object, problems.clone()));
            }
            if !problems.is_empty() {
                self.problems.insert(key.clone(), problems);
            }
            let before = self.sent.remove(&key).unwrap_or_default();
            delta.remove.extend(before.into_iter().filter(|n| !now.iter().any(|s| s.name == *n)));
            if !now.is_empty() {
                self.sent.insert(key, now.iter().map(|s| s.name.clone()).collect());
            }
            delta.upsert.extend(now);
        }
        let locality = locality_of(self.node.as_ref());
        if self.locality.as_ref() != Some(&locality) {
            self.locality = Some(locality.clone());
            delta.locality = Some(locality);
        }
        delta
    }
}

fn key_of<K: kube::Resource>(o: &K) -> Option<Key> {
    let m = o.meta();
    Some((m.namespace.clone()?, m.name.clone()?))
}

fn locality_of(node: Option<&Node>) -> (Option<String>, Option<String>) {
    let label = |key: &str| node.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(key)).cloned();
    (label(ZONE_LABEL), label(REGION_LABEL))
}

/// The service set the cluster describes, whole. Pure; what [`Cluster::delta`] computes
/// piecewise.
pub fn view_of(services: &[Service], slices: &[EndpointSlice], node: Option<&Node>) -> ClusterView {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for svc in services {
        let mut strings = Interner::default();
        let own: Vec<Slice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace == svc.metadata.namespace
                    && s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == svc.metadata.name.as_ref()
            })
            .map(|s| Slice::of(s, &mut strings))
            .collect();
        let Some(record) = ServiceRecord::of(svc) else { continue };
        let node_name = node.and_then(|n| n.metadata.name.as_deref());
        let (mut s, mut p) = services_of(&record, &own.iter().collect::<Vec<_>>(), node_name);
        out.append(&mut s);
        problems.append(&mut p);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    problems.sort();
    problems.dedup();
    let (zone, region) = locality_of(node);
    ClusterView { services: out, zone, region, problems }
}

/// The switchyard services of one Service, given its EndpointSlices and this node's
/// name, and the problems met on the way. Pure.
///
/// One switchyard service per (Service, TCP port, address family), named
/// `namespace/name:port-name` (the port number when unnamed; `@ipv6` or `@ipv4` after it
/// for a dual-stack Service's second family), with the ClusterIPs of that family on that
/// port as addresses, and the Service's semantics as kube-proxy gives them:
/// - endpoints from the Service's EndpointSlices, on the slice port of the same name
///   (so a named target port may differ per slice): ready ones take connections,
///   terminating ones drain, and only when none is ready do the serving terminating ones
///   take new connections (kube-proxy's terminating fallback); `publishNotReadyAddresses`
///   uses them ready or not;
/// - `internalTrafficPolicy: Local`: this node's endpoints only, none if it has none;
/// - locality only with topology hints on every endpoint, or `trafficDistribution:
///   PreferClose` (zones), else every endpoint alike;
/// - `sessionAffinity: ClientIP`: each client keeps its endpoint until
///   `timeoutSeconds` pass without a connection from it;
/// - a port's `appProtocol` sets its protocol (see [`app_protocol`]);
/// - `switchyard.io/*` annotations set the policy (see `annotations`).
///
/// Headless and ExternalName services have no ClusterIP and are skipped.
fn services_of(svc: &ServiceRecord, own_slices: &[&Slice], node: Option<&str>) -> (Vec<ServiceConfig>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems: Vec<String> = own_slices.iter().flat_map(|s| s.problems.iter().cloned()).collect();
    let (ns, name) = (&svc.namespace, &svc.name);
    let object = format!("Service {ns}/{name}");
    let mut ips = std::collections::BTreeSet::new();
    for ip in &svc.cluster_ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ips.insert(ip);
            }
            Err(_) if ip.is_empty() || ip == "None" => {}
            Err(_) => problems.push(format!("{object}: clusterIP `{ip}` is not an IP address")),
        }
    }
    if ips.is_empty() {
        return (out, problems);
    }
    // What every port shares: the defaults, then the Service's annotations.
    let mut policy = ServiceConfig { origin: Origin::Kubernetes, ..ServiceConfig::named("") };
    let applied = annotations::apply(&svc.annotations, &mut policy, &object);
    problems.extend(applied.problems);
    if let Some(secs) = svc.affinity_secs {
        // The API server allows 1 to 86400 s; anything else is the default, said so.
        let timeout = Duration::from_secs(secs.into());
        policy.session_affinity = Some(if (1..=SessionAffinity::MAX_TIMEOUT.as_secs()).contains(&secs.into()) {
            SessionAffinity { timeout }
        } else {
            problems.push(format!(
                "{object}: sessionAffinityConfig.clientIP.timeoutSeconds {secs} is not from 1 to 86400; 10800 is used"
            ));
            SessionAffinity::default()
        });
    }
    if svc.node_local && node.is_none() {
        problems.push(format!(
            "{object}: internalTrafficPolicy is Local but this node's name is unknown \
             (agent.kubernetes.node_name or $NODE_NAME): no endpoint is used"
        ));
    }
    // One switchyard service per family of a dual-stack Service, as kube-proxy runs one
    // proxier per family: the IPv6 ClusterIP leads to IPv6 endpoints only. The first
    // ClusterIP's family keeps the plain name; the other's gets `@ipv6` (or `@ipv4`).
    let primary_v4 =
        svc.cluster_ips.iter().find_map(|ip| ip.parse::<std::net::IpAddr>().ok()).is_some_and(|ip| ip.is_ipv4());
    let families: Vec<bool> =
        [primary_v4, !primary_v4].into_iter().filter(|&v4| ips.iter().any(|ip| ip.is_ipv4() == v4)).collect();
    for port in &svc.ports {
        if port.protocol != "TCP" {
            continue;
        }
        let Ok(service_port) = u16::try_from(port.port) else { continue };
        let base =
            format!("{ns}/{name}:{}", if port.name.is_empty() { service_port.to_string() } else { port.name.clone() });
        for (i, &v4) in families.iter().enumerate() {
            let (endpoints, hinted) = port_endpoints(svc, own_slices, &port.name, node, v4);
            let mut config = ServiceConfig {
                name: match (i, v4) {
                    (0, _) => base.clone(),
                    (_, true) => format!("{base}@ipv4"),
                    (_, false) => format!("{base}@ipv6"),
                },
                addresses: ips
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .map(|ip| SocketAddr::new(*ip, service_port))
                    .collect(),
                endpoints,
                ..policy.clone()
            };
            if !applied.set.contains(&"locality") {
                config.locality.enabled = !svc.node_local && (hinted || svc.prefer_close);
            }
            // Per port, so more precise than the protocol annotation; the kernel does not
            // look at requests, so kernel mode keeps its own.
            if let Some(protocol) = port.app_protocol.as_deref().and_then(app_protocol)
                && config.mode == ServiceMode::Proxy
            {
                config.protocol = protocol;
            }
            out.push(config);
        }
    }
    problems.sort();
    problems.dedup();
    (out, problems)
}

/// The endpoints of one Service port in one address family (`v4`), and whether they
/// all carry topology hints (else their hints are dropped: kube-proxy ignores partial
/// hints). Ready endpoints take connections; serving terminating ones drain, unless none
/// is ready, when they take new connections (kube-proxy's terminating fallback).
fn port_endpoints(
    svc: &ServiceRecord,
    own_slices: &[&Slice],
    port_name: &str,
    node: Option<&str>,
    v4: bool,
) -> (Vec<EndpointConfig>, bool) {
    let mut endpoints: BTreeMap<SocketAddr, EndpointConfig> = BTreeMap::new();
    let mut any_ready = false;
    for slice in own_slices {
        let Some(target_port) = slice.port(port_name) else { continue };
        for ep in &slice.endpoints {
            let ready = svc.publish_not_ready || (ep.ready && !ep.terminating);
            if !(ready || ep.serving) || (svc.node_local && (node.is_none() || ep.place.node() != node)) {
                continue;
            }
            for ip in ep.addresses.iter().filter(|ip| ip.is_ipv4() == v4) {
                any_ready |= ready;
                let addr = SocketAddr::new(*ip, target_port);
                endpoints.entry(addr).or_insert_with(|| EndpointConfig {
                    terminating: !ready,
                    place: ep.place.clone(),
                    ..EndpointConfig::new(Target::Addr(addr))
                });
            }
        }
    }
    if !any_ready {
        endpoints.values_mut().for_each(|e| e.terminating = false);
    }
    let hinted = !endpoints.is_empty() && endpoints.values().all(|e| e.place.hints().is_some());
    if !hinted {
        // A copy of the place without hints per endpoint: only while some but not all
        // endpoints carry hints, which EndpointSlice controllers pass through briefly.
        for e in endpoints.values_mut().filter(|e| e.place.hints().is_some()) {
            e.place = e.place.take().and_then(|p| Place { hints: None, ..(*p).clone() }.some());
        }
    }
    (endpoints.into_values().collect(), hinted)
}

/// What a port's `appProtocol` says it speaks, where that tells the agent something:
/// IANA service names, Kubernetes' own (`kubernetes.io/h2c`, `kubernetes.io/ws`,
/// `kubernetes.io/wss`) and the names Istio users give (`http2`, `grpc`, `tcp`, `tls`).
/// TLS is opaque to the agent (it never terminates it): `tcp`, with no detection wait.
/// Anything else leaves detection on.
fn app_protocol(value: &str) -> Option<Protocol> {
    match value.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" => Some(Protocol::Http1),
        "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" => Some(Protocol::Http2),
        "tcp" | "https" | "tls" | "h2" | "kubernetes.io/wss" => Some(Protocol::Tcp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn services_and_slices_map_to_switchyard_services() {
        let services = [
            svc(json!({"metadata": {"namespace": "shop", "name": "web"},
                "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd96::20"],
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                   {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            svc(
                json!({"metadata": {"namespace": "shop", "name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
        ];
        let slices = [
            slice(
                json!({"metadata": {"namespace": "shop", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "zone": "a", "nodeName": "n1"},
                    {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.1.0.7"], "conditions": {"ready": false, "serving": false}}
                ]}),
            ),
            slice(
                json!({"metadata": {"namespace": "other", "name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 1}], "endpoints": [{"addresses": ["10.9.9.9"]}]}),
            ),
        ];
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1",
            "labels": {"topology.kubernetes.io/zone": "a", "topology.kubernetes.io/region": "r"}}}))
        .unwrap();
        let v = view_of(&services, &slices, Some(&node));
        assert_eq!((v.zone.as_deref(), v.region.as_deref()), (Some("a"), Some("r")));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let names: Vec<&str> = v.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["shop/web:http", "shop/web:http@ipv6"],
            "UDP port, headless service and other namespaces are skipped"
        );
        let web = &v.services[0];
        assert_eq!(web.addresses, ["10.96.0.20:80".parse().unwrap()]);
        assert_eq!(v.services[1].addresses, ["[fd96::20]:80".parse().unwrap()]);
        assert!(v.services[1].endpoints.is_empty(), "no IPv6 endpoint");
        let eps: Vec<(String, bool, Option<&str>)> =
            web.endpoints.iter().map(|e| (e.target.to_string(), e.terminating, e.place.zone())).collect();
        assert_eq!(eps, [("10.1.0.5:8080".into(), false, Some("a")), ("10.1.0.6:8080".into(), true, None)]);
    }

    #[test]
    fn bad_objects_are_named_and_skipped() {
        let services = [
            svc(json!({"metadata": {"namespace": "x", "name": "bad"},
                "spec": {"clusterIP": "999.1.1.1", "ports": [{"port": 80}]}})),
            svc(json!({"metadata": {"namespace": "x", "name": "odd", "annotations": {"switchyard.io/mode": "fast"}},
                "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}})),
        ];
        let v = view_of(&services, &[], None);
        assert_eq!(v.services.len(), 1);
        assert_eq!(v.services[0].mode, ServiceMode::Proxy, "a bad mode falls back to the default");
        assert_eq!(
            v.problems,
            [
                "Service x/bad: clusterIP `999.1.1.1` is not an IP address",
                "Service x/odd: annotation switchyard.io/mode: unknown variant `fast`, expected `proxy` or `kernel`; \
                 the default is used"
            ]
        );
    }

    /// The one switchyard service of `spec` (on port 80, with `slices`), as node `n1` sees it.
    fn one(spec: serde_json::Value, slices: &[serde_json::Value]) -> ServiceConfig {
        let mut spec = spec;
        spec["clusterIP"] = json!("10.96.0.30");
        if spec.get("ports").is_none() {
            spec["ports"] = json!([{"name": "http", "port": 80}]);
        }
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "web"}, "spec": spec}))];
        let slices: Vec<EndpointSlice> = slices
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.clone();
                s["metadata"] = json!({"namespace": "x", "name": format!("web-{i}"),
                    "labels": {"kubernetes.io/service-name": "web"}});
                s.as_object_mut().unwrap().entry("ports").or_insert(json!([{"name": "http", "port": 8080}]));
                slice(s)
            })
            .collect();
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
        let v = view_of(&services, &slices, Some(&node));
        assert_eq!(v.services.len(), 1, "{v:?}");
        v.services.into_iter().next().unwrap()
    }

    fn endpoint(ip: &str, conditions: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
        let mut e = json!({"addresses": [ip], "conditions": conditions});
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        e
    }

    /// (endpoint, terminating) in address order.
    fn eps(s: &ServiceConfig) -> Vec<(String, bool)> {
        s.endpoints.iter().map(|e| (e.target.to_string(), e.terminating)).collect()
    }

    #[test]
    fn endpoint_conditions_follow_kube_proxy() {
        let ready = json!({"ready": true});
        let draining = json!({"ready": false, "serving": true, "terminating": true});
        let gone = json!({"ready": false, "serving": false, "terminating": true});
        let unready = json!({"ready": false, "serving": false});
        let list = |conds: &[&serde_json::Value]| {
            let e: Vec<_> = conds
                .iter()
                .enumerate()
                .map(|(i, c)| endpoint(&format!("10.1.0.{i}"), (*c).clone(), json!({})))
                .collect();
            json!({"addressType": "IPv4", "endpoints": e})
        };
        // Ready ones serve, serving terminating ones drain, the rest are left out.
        let s = one(json!({}), &[list(&[&ready, &draining, &gone, &unready])]);
        assert_eq!(eps(&s), [("10.1.0.0:8080".into(), false), ("10.1.0.1:8080".into(), true)]);
        // None ready: the serving terminating ones take new connections (the fallback).
        let s = one(json!({}), &[list(&[&draining, &gone, &unready])]);
        assert_eq!(eps(&s), [("10.1.0.0:8080".into(), false)]);
        // publishNotReadyAddresses: ready or not; terminating still drains.
        let s = one(json!({"publishNotReadyAddresses": true}), &[list(&[&ready, &unready, &gone])]);
        assert_eq!(
            eps(&s),
            [("10.1.0.0:8080".into(), false), ("10.1.0.1:8080".into(), false), ("10.1.0.2:8080".into(), false)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let slice = json!({"addressType": "IPv4", "endpoints": [
            endpoint("10.1.0.1", json!({"ready": true}), json!({"nodeName": "n1"})),
            endpoint("10.1.0.2", json!({"ready": true}), json!({"nodeName": "n2"})),
        ]});
        let s = one(json!({"internalTrafficPolicy": "Local"}), std::slice::from_ref(&slice));
        assert_eq!(eps(&s), [("10.1.0.1:8080".into(), false)]);
        assert!(!s.locality.enabled);
        assert_eq!(one(json!({"internalTrafficPolicy": "Cluster"}), std::slice::from_ref(&slice)).endpoints.len(), 2);
        // Only other nodes' endpoints: none at all (kube-proxy drops such connections).
        let elsewhere =
            json!({"addressType": "IPv4", "endpoints": [endpoint("10.1.0.2", json!({}), json!({"nodeName": "n2"}))]});
        assert!(one(json!({"internalTrafficPolicy": "Local"}), &[elsewhere]).endpoints.is_empty());
        // No node name: nothing is this node's, and that is said.
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "web"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "http", "port": 80}], "internalTrafficPolicy": "Local"}}))];
        let v = view_of(&services, &[], None);
        assert!(
            v.problems[0].contains("internalTrafficPolicy is Local but this node's name is unknown"),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn endpoints_in_one_place_share_it() {
        let at = |ip: &str, node: &str| endpoint(ip, json!({"ready": true}), json!({"zone": "a", "nodeName": node}));
        let first = json!({"addressType": "IPv4", "endpoints": [at("10.1.0.1", "n1"), at("10.1.0.2", "n2")]});
        let second = json!({"addressType": "IPv4", "endpoints": [at("10.1.0.3", "n1")]});
        let s = one(json!({}), &[first, second]);
        let place = |i: usize| s.endpoints[i].place.as_ref().expect("a zone and a node");
        assert_eq!((place(0).zone.as_deref(), place(0).node.as_deref()), (Some("a"), Some("n1")));
        assert!(Arc::ptr_eq(place(0), place(2)), "one copy for zone a, node n1, across slices");
        assert!(!Arc::ptr_eq(place(0), place(1)), "another node, another place");
        assert!(Arc::ptr_eq(place(0).zone.as_ref().unwrap(), place(1).zone.as_ref().unwrap()), "one copy of each name");
    }

    #[test]
    fn zones_count_only_with_hints_on_every_endpoint_or_prefer_close() {
        let hinted = |ip: &str, zone: &str, hint: Option<&str>| {
            let extra = match hint {
                Some(h) => json!({"zone": zone, "hints": {"forZones": [{"name": h}]}}),
                None => json!({"zone": zone}),
            };
            endpoint(ip, json!({"ready": true}), extra)
        };
        let all = json!({"addressType": "IPv4", "endpoints": [hinted("10.1.0.1", "a", Some("a")), hinted("10.1.0.2", "b", Some("a"))]});
        let s = one(json!({}), &[all]);
        assert!(s.locality.enabled, "every endpoint hinted: topology-aware");
        assert_eq!(s.endpoints.iter().map(|e| e.place.hints()).collect::<Vec<_>>(), [Some("a"), Some("a")]);
        let partial = json!({"addressType": "IPv4", "endpoints": [hinted("10.1.0.1", "a", Some("a")), hinted("10.1.0.2", "b", None)]});
        let s = one(json!({}), std::slice::from_ref(&partial));
        assert!(
            !s.locality.enabled && s.endpoints.iter().all(|e| e.place.hints().is_none()),
            "partial hints are ignored"
        );
        let zones: Vec<_> = s.endpoints.iter().map(|e| e.place.zone()).collect();
        assert_eq!(zones, [Some("a"), Some("b")], "the zones stay");
        let s = one(json!({"trafficDistribution": "PreferClose"}), &[partial]);
        assert!(s.locality.enabled, "PreferClose: by zone");
        let s = one(json!({}), &[]);
        assert!(!s.locality.enabled, "no hints, no PreferClose: spread like kube-proxy");
    }

    #[test]
    fn app_protocol_sets_each_ports_protocol_and_families_and_target_ports_follow_each_slice() {
        let spec = json!({"ports": [
            {"name": "web", "port": 80, "appProtocol": "http"},
            {"name": "grpc", "port": 9000, "appProtocol": "kubernetes.io/h2c"},
            {"name": "tls", "port": 443, "appProtocol": "https"},
            {"name": "odd", "port": 7000, "appProtocol": "example.com/custom"}]});
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "web"},
            "spec": {"clusterIPs": ["10.96.0.30", "fd96::30"], "ports": spec["ports"]}}))];
        // The same named port is 8080 in one slice and 8081 in the other (pods of two
        // versions), and the slices are one per address family.
        let slices = [
            slice(
                json!({"metadata": {"namespace": "x", "name": "v4", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "web", "port": 8080}, {"name": "grpc", "port": 9090}],
                "endpoints": [{"addresses": ["10.1.0.1"]}]}),
            ),
            slice(
                json!({"metadata": {"namespace": "x", "name": "v6", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv6", "ports": [{"name": "web", "port": 8081}],
                "endpoints": [{"addresses": ["fd10::1"]}]}),
            ),
        ];
        let v = view_of(&services, &slices, None);
        let by_name = |n: &str| v.services.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("{n}: {v:?}"));
        // Dual-stack: one service per family, each with its own endpoints, as kube-proxy
        // keeps the families apart.
        let (web, web6) = (by_name("x/web:web"), by_name("x/web:web@ipv6"));
        assert_eq!((web.protocol, web6.protocol), (Protocol::Http1, Protocol::Http1));
        assert_eq!(web.addresses, ["10.96.0.30:80".parse().unwrap()]);
        assert_eq!(web6.addresses, ["[fd96::30]:80".parse().unwrap()]);
        assert_eq!(eps(web), [("10.1.0.1:8080".into(), false)]);
        assert_eq!(eps(web6), [("[fd10::1]:8081".into(), false)]);
        assert_eq!(by_name("x/web:grpc").protocol, Protocol::Http2);
        assert_eq!(eps(by_name("x/web:grpc")), [("10.1.0.1:9090".into(), false)]);
        assert_eq!(by_name("x/web:tls").protocol, Protocol::Tcp, "TLS is opaque: no detection wait");
        assert_eq!(by_name("x/web:odd").protocol, Protocol::Auto, "unknown: detected");
    }

    #[test]
    fn annotations_set_the_policy_and_app_protocol_is_kept_out_of_kernel_mode() {
        let s = one(
            json!({"ports": [{"name": "http", "port": 80, "appProtocol": "http"}]}),
            &[json!({"addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}]})],
        );
        assert_eq!(s.protocol, Protocol::Http1);
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "web", "annotations": {
                "switchyard.io/mode": "kernel", "switchyard.io/balance": "least-connections",
                "switchyard.io/locality": "{enabled: true}", "other.io/x": "y"}},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "http", "port": 80, "appProtocol": "http"}]}}))];
        let v = view_of(&services, &[], None);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let s = &v.services[0];
        assert_eq!(
            (s.mode, s.protocol, s.balance),
            (ServiceMode::Kernel, Protocol::Auto, crate::config::BalanceKind::LeastConnections)
        );
        assert!(s.locality.enabled, "the annotation's choice, not the default for a Service without hints");
    }

    #[test]
    fn session_affinity_client_ip_keeps_its_timeout() {
        let s = one(
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
            &[],
        );
        assert_eq!(s.session_affinity.map(|a| a.timeout), Some(Duration::from_secs(60)));
        let s = one(json!({"sessionAffinity": "ClientIP"}), &[]);
        assert_eq!(s.session_affinity.map(|a| a.timeout), Some(Duration::from_secs(10800)), "Kubernetes' default");
        assert_eq!(one(json!({"sessionAffinity": "None"}), &[]).session_affinity, None);
    }

    #[test]
    fn the_mode_annotation_picks_the_kernel_path() {
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "fast",
            "annotations": {"switchyard.io/mode": "kernel"}},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 6379}]}}))];
        assert_eq!(view_of(&services, &[], None).services[0].mode, ServiceMode::Kernel);
    }

    /// A Service `web{i}` on 10.96.0.i:80 and its slice with endpoints `hosts` on 8080.
    fn objects(i: u8, hosts: &[u8]) -> (Service, EndpointSlice) {
        let svc = svc(
            json!({"metadata": {"namespace": "ns", "name": format!("web{i}"), "managedFields": [{"manager": "x"}]},
            "spec": {"clusterIP": format!("10.96.0.{i}"), "ports": [{"name": "http", "port": 80}]}}),
        );
        let eps: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| {
                json!({"addresses": [format!("10.1.{i}.{h}")],
            "targetRef": {"kind": "Pod", "name": format!("web-{h}")}, "zone": "a"})
            })
            .collect();
        let sl = slice(json!({"metadata": {"namespace": "ns", "name": format!("web{i}-x"),
            "labels": {"kubernetes.io/service-name": format!("web{i}")}},
            "ports": [{"name": "http", "port": 8080}], "endpoints": eps}));
        (svc, sl)
    }

    /// Deltas folded into the services they describe.
    fn fold(into: &mut BTreeMap<String, ServiceConfig>, d: ClusterDelta) {
        for n in d.remove {
            assert!(into.remove(&n).is_some(), "{n} removed but never added");
        }
        for s in d.upsert {
            into.insert(s.name.clone(), s);
        }
    }

    #[test]
    fn deltas_follow_events_and_touch_only_what_changed() {
        let mut c = Cluster::default();
        let ev = |e| Event::Service(Box::new(e));
        let sl = |e| Event::Slice(Box::new(e));
        let mut have = BTreeMap::new();
        // The first listing: three Services, two with slices.
        c.handle(ev(watcher::Event::Init));
        c.handle(sl(watcher::Event::Init));
        for i in 1..=3 {
            let (s, l) = objects(i, &[1, 2]);
            c.handle(ev(watcher::Event::InitApply(s)));
            if i < 3 {
                c.handle(sl(watcher::Event::InitApply(l)));
            }
        }
        assert!(c.delta().upsert.is_empty(), "nothing until the listing is complete");
        c.handle(ev(watcher::Event::InitDone));
        c.handle(sl(watcher::Event::InitDone));
        let first = c.delta();
        assert_eq!(first.upsert.len(), 3);
        fold(&mut have, first);

        // One slice changes: one service, with its new endpoint.
        c.handle(sl(watcher::Event::Apply(objects(2, &[1, 2, 3]).1)));
        let d = c.delta();
        assert_eq!(d.upsert.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["ns/web2:http"]);
        assert_eq!(d.upsert[0].endpoints.len(), 3);
        fold(&mut have, d);
        // The same object again (a resync): nothing.
        c.handle(sl(watcher::Event::Apply(objects(2, &[1, 2, 3]).1)));
        assert!(c.delta().is_empty());

        // A Service deleted; then a relist that no longer has web1's slice and adds web4.
        c.handle(ev(watcher::Event::Delete(objects(3, &[]).0)));
        fold(&mut have, c.delta());
        c.handle(sl(watcher::Event::Init));
        c.handle(ev(watcher::Event::Init));
        for i in [1, 2, 4] {
            c.handle(ev(watcher::Event::InitApply(objects(i, &[]).0)));
        }
        c.handle(sl(watcher::Event::InitApply(objects(2, &[1, 2, 3]).1)));
        c.handle(sl(watcher::Event::InitApply(objects(4, &[7]).1)));
        c.handle(ev(watcher::Event::InitDone));
        c.handle(sl(watcher::Event::InitDone));
        let d = c.delta();
        let mut touched: Vec<&str> =
            d.upsert.iter().map(|s| s.name.as_str()).chain(d.remove.iter().map(String::as_str)).collect();
        touched.sort();
        assert_eq!(touched, ["ns/web1:http", "ns/web4:http"], "web2 is unchanged by the relist");
        fold(&mut have, d);

        // What the deltas added up to is the whole view computed from the objects.
        let services: Vec<Service> = [1, 2, 4].map(|i| objects(i, &[]).0).into();
        let slices = [objects(2, &[1, 2, 3]).1, objects(4, &[7]).1];
        let whole = view_of(&services, &slices, None);
        assert_eq!(have.into_values().collect::<Vec<_>>(), whole.services);
    }
}
