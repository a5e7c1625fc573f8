//! The pods on this node, as identity needs them: who owns each (its workload) and the
//! names of its containers by runtime id. Fed by the Kubernetes source's Pod watch; read
//! by [`super::Workloads::identify`] when a cgroup names a pod.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{Workload, kind};

/// One pod: only what identity shows (a node's pods as the API has them are tens of KiB
/// each; this, a few hundred bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub workload: Arc<Workload>,
    /// (container id, container name), init and ephemeral containers included. A pod has
    /// a few: a list, not a map.
    pub containers: Vec<(String, String)>,
}

impl PodInfo {
    /// The name of the container with runtime id `id`.
    pub fn container(&self, id: &str) -> Option<&str> {
        self.containers.iter().find(|(i, _)| i == id).map(|(_, n)| n.as_str())
    }
}

/// A pod's controller, as its `metadata.ownerReferences` entry with `controller: true`
/// names it.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub kind: &'a str,
    pub name: &'a str,
}

/// The workload a pod belongs to.
///
/// * a ReplicaSet named `<deployment>-<pod-template-hash>`, the pod's
///   `pod-template-hash` label being that suffix: the Deployment (the naming is the
///   Deployment controller's; no ReplicaSet watch needed, so no RBAC for one);
/// * any other ReplicaSet, a StatefulSet, DaemonSet or Job: itself (a CronJob's Job
///   stays a job: the CronJob is not visible from the pod, and is not guessed);
/// * a Node (a static pod's mirror) or no controller: the pod itself;
/// * another controller (a custom resource): `controller`, named `<Kind>/<name>`.
pub fn workload_of(namespace: &str, pod: &str, owner: Option<Owner<'_>>, template_hash: Option<&str>) -> Workload {
    let (kind, name) = match owner {
        Some(Owner { kind: "ReplicaSet", name }) => {
            let deployment = template_hash
                .filter(|h| !h.is_empty())
                .and_then(|h| name.strip_suffix(h))
                .and_then(|d| d.strip_suffix('-'))
                .filter(|d| !d.is_empty());
            match deployment {
                Some(d) => (kind::DEPLOYMENT, d.to_owned()),
                None => (kind::REPLICASET, name.to_owned()),
            }
        }
        Some(Owner { kind: "StatefulSet", name }) => (kind::STATEFULSET, name.to_owned()),
        Some(Owner { kind: "DaemonSet", name }) => (kind::DAEMONSET, name.to_owned()),
        Some(Owner { kind: "Job", name }) => (kind::JOB, name.to_owned()),
        None | Some(Owner { kind: "Node", .. }) => (kind::POD, pod.to_owned()),
        Some(Owner { kind: other, name }) => (kind::CONTROLLER, format!("{other}/{name}")),
    };
    Workload { namespace: Some(namespace.to_owned()), kind, name }
}

/// This node's pods by uid, and a generation that moves on every change, so identities
/// computed before a pod arrived (or changed) are computed again.
#[derive(Debug, Default)]
pub struct Pods {
    by_uid: RwLock<HashMap<String, Arc<PodInfo>>>,
    generation: AtomicU64,
}

impl Pods {
    /// Add or replace a pod (a watch's ADDED or MODIFIED).
    pub fn apply(&self, pod: PodInfo) {
        let mut pods = self.by_uid.write().unwrap();
        // Most pod updates are status changes identity does not show: no new generation.
        if pods.get(&pod.uid).is_some_and(|p| **p == pod) {
            return;
        }
        pods.insert(pod.uid.clone(), Arc::new(pod));
        self.bump();
    }

    /// Forget a pod (deleted, or finished).
    pub fn delete(&self, uid: &str) {
        if self.by_uid.write().unwrap().remove(uid).is_some() {
            self.bump();
        }
    }

    /// The whole set, from a listing (pods gone meanwhile are forgotten).
    pub fn replace_all(&self, pods: impl IntoIterator<Item = PodInfo>) {
        let new: HashMap<String, Arc<PodInfo>> = pods.into_iter().map(|p| (p.uid.clone(), Arc::new(p))).collect();
        let mut old = self.by_uid.write().unwrap();
        let same = old.len() == new.len() && new.iter().all(|(uid, p)| old.get(uid).is_some_and(|o| o == p));
        if !same {
            *old = new;
            self.bump();
        }
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.by_uid.read().unwrap().get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_uid.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves on with every change to the set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(kind: &str, name: &str, hash: Option<&str>) -> String {
        workload_of("shop", "web-7d9c8-x2x4q", Some(Owner { kind, name }), hash).label()
    }

    #[test]
    fn owners_name_the_workload() {
        assert_eq!(owned("ReplicaSet", "web-7d9c8f6b5", Some("7d9c8f6b5")), "deployment/web");
        assert_eq!(owned("ReplicaSet", "api-v2-7d9c8f6b5", Some("7d9c8f6b5")), "deployment/api-v2");
        // The hash does not match the suffix, or there is none: a ReplicaSet of its own.
        assert_eq!(owned("ReplicaSet", "web-7d9c8f6b5", Some("1234")), "replicaset/web-7d9c8f6b5");
        assert_eq!(owned("ReplicaSet", "web-7d9c8f6b5", None), "replicaset/web-7d9c8f6b5");
        assert_eq!(owned("ReplicaSet", "web", Some("")), "replicaset/web");
        assert_eq!(owned("ReplicaSet", "-abc", Some("abc")), "replicaset/-abc");
        assert_eq!(owned("ReplicaSet", "webabc", Some("abc")), "replicaset/webabc", "the suffix follows a dash");
        assert_eq!(owned("StatefulSet", "db", None), "statefulset/db");
        assert_eq!(owned("DaemonSet", "agent", None), "daemonset/agent");
        // A CronJob's Job: the CronJob is not invented from the name.
        assert_eq!(owned("Job", "backup-28391234", None), "job/backup-28391234");
        assert_eq!(owned("Node", "node-1", None), "pod/web-7d9c8-x2x4q", "a static pod's mirror");
        assert_eq!(owned("Rollout", "web", None), "controller/Rollout/web");
        let bare = workload_of("shop", "debug", None, None);
        assert_eq!((bare.display(), bare.label()), ("shop/pod/debug".to_owned(), "pod/debug".to_owned()));
    }

    fn pod(uid: &str, containers: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: format!("web-{uid}"),
            uid: uid.into(),
            workload: Arc::new(workload_of("shop", "web", None, None)),
            containers: containers.iter().map(|(i, n)| ((*i).into(), (*n).into())).collect(),
        }
    }

    #[test]
    fn the_generation_moves_only_on_changes() {
        let pods = Pods::default();
        let g0 = pods.generation();
        pods.apply(pod("a", &[]));
        let g1 = pods.generation();
        assert!(g1 > g0);
        pods.apply(pod("a", &[]));
        assert_eq!(pods.generation(), g1, "the same pod again (a status update)");
        pods.apply(pod("a", &[("c1", "app")]));
        let g2 = pods.generation();
        assert!(g2 > g1, "a container started");
        assert_eq!(pods.get("a").unwrap().container("c1"), Some("app"));
        pods.replace_all([pod("a", &[("c1", "app")])]);
        assert_eq!(pods.generation(), g2, "a relist that changes nothing");
        pods.replace_all([pod("b", &[])]);
        assert!(pods.generation() > g2 && pods.get("a").is_none() && pods.len() == 1);
        let g3 = pods.generation();
        pods.delete("nope");
        assert_eq!(pods.generation(), g3);
        pods.delete("b");
        assert!(pods.generation() > g3 && pods.is_empty());
    }
}
