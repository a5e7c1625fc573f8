//! The Kubernetes source, for the DaemonSet deployment: Services (ClusterIP and ports
//! become service addresses), EndpointSlices (serving / terminating endpoints with zone and
//! node) and this Node (its zone and region labels).
//!
//! List+watch is kube-runtime's `watcher`: it lists, then watches from the list's
//! resourceVersion with bookmarks, relists when the server answers 410 Gone, and backs off
//! on errors. Reflector stores hold the current objects; after every change (coalesced
//! briefly, since one rollout touches many slices) the whole service set is recomputed
//! from the stores and sent as one update. The mapping is a pure function, tested below.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use futures::{StreamExt as _, stream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Update;
use crate::{
    config::{EndpointConfig, KubernetesConfig, Origin, ServiceConfig, ServiceMode, Target},
    tasks::Background,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Annotation on a Service choosing who handles its connections: `proxy` (default) or
/// `kernel` (see `ServiceMode`), the way Cilium reads `service.cilium.io/*` annotations.
const MODE_ANNOTATION: &str = "switchyard.io/mode";
/// Coalesce bursts of watch events into one update.
const COALESCE: Duration = Duration::from_millis(20);

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

/// What the cluster says: services, and this node's zone and region.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub services: Vec<ServiceConfig>,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// Objects (or parts) that could not be used, and why: logged, never fatal.
    pub problems: Vec<String>,
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

/// Start watching. Returns once the first full listing of every kind is in (or
/// `sync_limit` passed, with a warning), with the view at that point; later views arrive as
/// [`Update::Kubernetes`].
pub async fn start(
    cfg: &KubernetesConfig,
    updates: mpsc::Sender<Update>,
    sync_limit: Duration,
    background: &Background,
) -> Result<ClusterView, KubeError> {
    let client = client(cfg).await?;
    let node_name = cfg.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok());
    let (services, svc_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let node_watch = match &node_name {
        Some(n) => watcher::Config::default().fields(&format!("metadata.name={n}")),
        // No node name: a selector matching nothing, so locality stays unset.
        None => watcher::Config::default().fields("metadata.name=switchyard-unknown-node"),
    };
    let wc = || watcher::Config::default();
    // Each stream yields () per event; errors are logged (the watcher backs off and
    // relists by itself).
    let events = stream::select_all([
        watcher(Api::<Service>::all(client.clone()), wc()).default_backoff().reflect(svc_writer).map(touched).boxed(),
        watcher(Api::<EndpointSlice>::all(client.clone()), wc())
            .default_backoff()
            .reflect(slice_writer)
            .map(touched)
            .boxed(),
        watcher(Api::<Node>::all(client), node_watch).default_backoff().reflect(node_writer).map(touched).boxed(),
    ]);
    let view = {
        let (services, slices, nodes) = (services.clone(), slices.clone(), nodes.clone());
        move || {
            let svc: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
            let sl: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
            let node = nodes.state().first().map(|n| (**n).clone());
            view_of(&svc, &sl, node.as_ref())
        }
    };
    background.spawn(run(events, view.clone(), updates));
    let synced = async {
        let _ = services.wait_until_ready().await;
        let _ = slices.wait_until_ready().await;
        let _ = nodes.wait_until_ready().await;
    };
    if tokio::time::timeout(sync_limit, synced).await.is_err() {
        warn!(after = ?sync_limit, "Kubernetes API not synced yet; starting with what is known, updates will follow");
    }
    let first = view();
    for p in &first.problems {
        warn!(problem = %p, "Kubernetes object skipped");
    }
    info!(services = first.services.len(), zone = ?first.zone, "Kubernetes view synced");
    Ok(first)
}

fn touched<T>(r: Result<T, watcher::Error>) {
    if let Err(e) = r {
        warn!(error = %e, "Kubernetes watch error; retrying with back-off");
    }
}

async fn run(
    mut events: impl futures::Stream<Item = ()> + Unpin,
    view: impl Fn() -> ClusterView,
    updates: mpsc::Sender<Update>,
) {
    let mut last = None;
    while events.next().await.is_some() {
        // Coalesce: keep draining while events keep coming.
        while let Ok(Some(())) = tokio::time::timeout(COALESCE, events.next()).await {}
        let now = view();
        if last.as_ref() == Some(&now) {
            continue;
        }
        debug!(services = now.services.len(), "Kubernetes view changed");
        for p in now.problems.iter().filter(|p| !last.as_ref().is_some_and(|l: &ClusterView| l.problems.contains(p))) {
            warn!(problem = %p, "Kubernetes object skipped");
        }
        last = Some(now.clone());
        if updates.send(Update::Kubernetes(now)).await.is_err() {
            return;
        }
    }
}

/// The service set the cluster describes. Pure.
///
/// One switchyard service per (Service, TCP port), named `namespace/name:port-name` (the
/// port number when unnamed), with every ClusterIP on that port as addresses. Endpoints
/// come from the Service's EndpointSlices, on the slice port of the same name: serving
/// ones are used, terminating ones drain (no new connections), others are left out.
/// Headless and ExternalName services have no ClusterIP and are skipped.
pub fn view_of(services: &[Service], slices: &[EndpointSlice], node: Option<&Node>) -> ClusterView {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for svc in services {
        let (Some(ns), Some(name), Some(spec)) = (&svc.metadata.namespace, &svc.metadata.name, &svc.spec) else {
            continue;
        };
        let mut ips = std::collections::BTreeSet::new();
        for ip in spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()) {
            match ip.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    ips.insert(ip);
                }
                Err(_) if ip.is_empty() || ip == "None" => {}
                Err(_) => problems.push(format!("Service {ns}/{name}: clusterIP `{ip}` is not an IP address")),
            }
        }
        if ips.is_empty() {
            continue;
        }
        let mode = match svc.metadata.annotations.as_ref().and_then(|a| a.get(MODE_ANNOTATION)).map(String::as_str) {
            None | Some("proxy") => ServiceMode::Proxy,
            Some("kernel") => ServiceMode::Kernel,
            Some(other) => {
                problems.push(format!(
                    "Service {ns}/{name}: annotation {MODE_ANNOTATION} is `{other}`, not `proxy` or `kernel`; \
                     proxied meanwhile"
                ));
                ServiceMode::Proxy
            }
        };
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_ref() == Some(ns)
                    && s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(name)
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let port_name = port.name.clone().unwrap_or_default();
            let Ok(service_port) = u16::try_from(port.port) else { continue };
            let mut endpoints: BTreeMap<SocketAddr, EndpointConfig> = BTreeMap::new();
            for slice in &own_slices {
                let Some(target_port) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let c = ep.conditions.as_ref();
                    let ready = c.and_then(|c| c.ready).unwrap_or(true);
                    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                    if !serving {
                        continue;
                    }
                    let slice_name = slice.metadata.name.as_deref().unwrap_or("?");
                    let parsed = ep.addresses.iter().filter_map(|a| match a.parse::<std::net::IpAddr>() {
                        Ok(ip) => Some(ip),
                        Err(_) => {
                            problems
                                .push(format!("EndpointSlice {ns}/{slice_name}: address `{a}` is not an IP address"));
                            None
                        }
                    });
                    for ip in parsed.collect::<Vec<_>>() {
                        let addr = SocketAddr::new(ip, target_port);
                        endpoints.entry(addr).or_insert_with(|| EndpointConfig {
                            zone: ep.zone.clone(),
                            node: ep.node_name.clone(),
                            terminating,
                            ..EndpointConfig::new(Target::Addr(addr))
                        });
                    }
                }
            }
            let port_label = if port_name.is_empty() { service_port.to_string() } else { port_name };
            out.push(ServiceConfig {
                name: format!("{ns}/{name}:{port_label}"),
                addresses: ips.iter().map(|ip| SocketAddr::new(*ip, service_port)).collect(),
                endpoints: endpoints.into_values().collect(),
                origin: Origin::Kubernetes,
                mode,
                ..ServiceConfig::named("")
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let label = |key: &str| node.and_then(|n| n.metadata.labels.as_ref()).and_then(|l| l.get(key)).cloned();
    problems.sort();
    problems.dedup();
    ClusterView { services: out, zone: label(ZONE_LABEL), region: label(REGION_LABEL), problems }
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
        assert_eq!(v.services.len(), 1, "UDP port, headless service and other namespaces are skipped");
        let web = &v.services[0];
        assert_eq!(web.name, "shop/web:http");
        assert_eq!(web.addresses, ["10.96.0.20:80".parse().unwrap(), "[fd96::20]:80".parse().unwrap()]);
        let eps: Vec<(String, bool, Option<&str>)> =
            web.endpoints.iter().map(|e| (e.target.to_string(), e.terminating, e.zone.as_deref())).collect();
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
                "Service x/odd: annotation switchyard.io/mode is `fast`, not `proxy` or `kernel`; proxied meanwhile"
            ]
        );
    }

    #[test]
    fn the_mode_annotation_picks_the_kernel_path() {
        let services = [svc(json!({"metadata": {"namespace": "x", "name": "fast",
            "annotations": {"switchyard.io/mode": "kernel"}},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 6379}]}}))];
        assert_eq!(view_of(&services, &[], None).services[0].mode, ServiceMode::Kernel);
    }
}
