//! The Pod watch: this node's pods (`spec.nodeName=<node>`) into
//! [`Workloads::pods`](crate::workload::Workloads::pods), for client identity. Nothing
//! here reaches the service view: a Pod the agent cannot read costs a name in the
//! connection table, never a route.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::watcher;
use tracing::debug;

use crate::workload::{Owner, PodInfo, Workloads, workload_of};

/// The Deployment controller's label: its ReplicaSets are named `<deployment>-<hash>`.
const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Why a Pod was left out.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    #[error("Pod without metadata.{0}")]
    Missing(&'static str),
}

/// The fields identity uses. A pod that finished (`Succeeded`, `Failed`) has no cgroups
/// left: `Ok(None)`, forgotten like a deleted one.
pub fn info_of(pod: &Pod) -> Result<Option<PodInfo>, Skipped> {
    let m = &pod.metadata;
    let uid = m.uid.as_deref().filter(|u| !u.is_empty()).ok_or(Skipped::Missing("uid"))?;
    let name = m.name.as_deref().ok_or(Skipped::Missing("name"))?;
    let namespace = m.namespace.as_deref().ok_or(Skipped::Missing("namespace"))?;
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let owner = m.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let hash = m.labels.as_ref().and_then(|l| l.get(TEMPLATE_HASH_LABEL)).map(String::as_str);
    let workload = workload_of(namespace, name, owner.map(|o| Owner { kind: &o.kind, name: &o.name }), hash);
    let statuses = status.into_iter().flat_map(|s| {
        let all = [&s.init_container_statuses, &s.container_statuses, &s.ephemeral_container_statuses];
        all.into_iter().flatten().flatten()
    });
    Ok(Some(PodInfo {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        workload: Arc::new(workload),
        containers: statuses.filter_map(container).collect(),
    }))
}

/// (runtime id, name) of a started container: `containerID` is `<runtime>://<id>`
/// (`containerd://`, `cri-o://`, `docker://`), as the cgroup directory has the id.
fn container(s: &ContainerStatus) -> Option<(String, String)> {
    let (_, id) = s.container_id.as_deref()?.split_once("://")?;
    (!id.is_empty()).then(|| (id.to_owned(), s.name.clone()))
}

/// The Pod watch's events onto the node's pods. A listing is converted as it arrives
/// (a node's pods are a few MiB as the API has them) and replaces the set at its end.
pub struct PodFeed {
    workloads: Arc<Workloads>,
    listing: Option<Vec<PodInfo>>,
}

impl PodFeed {
    pub fn new(workloads: Arc<Workloads>) -> Self {
        Self { workloads, listing: None }
    }

    pub fn handle(&mut self, event: watcher::Event<Pod>) {
        let pods = self.workloads.pods();
        match event {
            watcher::Event::Init => self.listing = Some(Vec::new()),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => match (read(&p), &mut self.listing) {
                (Some(Some(info)), Some(listing)) => listing.push(info),
                (Some(Some(info)), None) => pods.apply(info),
                (Some(None), None) => pods.delete(uid(&p)),
                // Finished or unreadable, in a listing: left out of the new set.
                (_, Some(_)) | (None, None) => {}
            },
            watcher::Event::Delete(p) => pods.delete(uid(&p)),
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                debug!(pods = listed.len(), "this node's pods listed");
                pods.replace_all(listed);
            }
        }
    }
}

/// [`info_of`], a skipped Pod logged (debug: pods are not the agent's to fix).
fn read(p: &Pod) -> Option<Option<PodInfo>> {
    info_of(p)
        .inspect_err(|e| {
            let name = p.metadata.name.as_deref().unwrap_or("?");
            debug!(pod = %name, problem = %e, "Pod skipped for client identity");
        })
        .ok()
}

fn uid(p: &Pod) -> &str {
    p.metadata.uid.as_deref().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web(phase: &str) -> Pod {
        pod(json!({
            "metadata": {"namespace": "shop", "name": "web-7d9c8f6b5-x2x4q", "uid": "u1",
                "labels": {"pod-template-hash": "7d9c8f6b5", "app": "web"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-the-controller", "uid": "o0"},
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c8f6b5", "uid": "o1", "controller": true}]},
            "spec": {"nodeName": "node0", "containers": [{"name": "app"}, {"name": "proxy"}]},
            "status": {"phase": phase,
                "initContainerStatuses": [{"name": "init", "containerID": "cri-o://i1", "image": "", "imageID": "", "ready": false, "restartCount": 0}],
                "containerStatuses": [
                    {"name": "app", "containerID": "containerd://c1", "image": "", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "proxy", "image": "", "imageID": "", "ready": false, "restartCount": 0}]}}))
    }

    #[test]
    fn a_pod_becomes_its_workload_and_container_names() {
        let info = info_of(&web("Running")).unwrap().unwrap();
        assert_eq!(info.workload.display(), "shop/deployment/web");
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str(), info.uid.as_str()),
            ("shop", "web-7d9c8f6b5-x2x4q", "u1")
        );
        // A container not started yet has no id.
        assert_eq!(info.containers, [("i1".to_owned(), "init".to_owned()), ("c1".to_owned(), "app".to_owned())]);
        assert_eq!(info_of(&web("Succeeded")), Ok(None), "finished: no cgroups left");
        let bare = pod(json!({"metadata": {"namespace": "x", "name": "debug", "uid": "u2"}}));
        assert_eq!(info_of(&bare).unwrap().unwrap().workload.label(), "pod/debug");
        let no_uid = pod(json!({"metadata": {"namespace": "x", "name": "debug"}}));
        assert_eq!(info_of(&no_uid), Err(Skipped::Missing("uid")));
    }

    #[test]
    fn watch_events_keep_the_nodes_pods() {
        let workloads = Workloads::new(None);
        let mut feed = PodFeed::new(Arc::clone(&workloads));
        let other = pod(json!({"metadata": {"namespace": "x", "name": "db-0", "uid": "u3",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "o", "controller": true}]}}));
        feed.handle(watcher::Event::Init);
        feed.handle(watcher::Event::InitApply(web("Running")));
        feed.handle(watcher::Event::InitApply(pod(json!({"metadata": {"name": "bad"}}))));
        assert!(workloads.pods().is_empty(), "nothing until the listing is complete");
        feed.handle(watcher::Event::InitDone);
        assert_eq!(workloads.pods().len(), 1);
        feed.handle(watcher::Event::Apply(other.clone()));
        assert_eq!(workloads.pods().get("u3").unwrap().workload.label(), "statefulset/db");
        feed.handle(watcher::Event::Apply(web("Failed")));
        assert!(workloads.pods().get("u1").is_none(), "a finished pod is forgotten");
        feed.handle(watcher::Event::Delete(other));
        assert!(workloads.pods().is_empty());
        // A relist replaces the whole set.
        feed.handle(watcher::Event::Apply(web("Running")));
        feed.handle(watcher::Event::Init);
        feed.handle(watcher::Event::InitDone);
        assert!(workloads.pods().is_empty(), "gone while the watch was down");
    }
}
