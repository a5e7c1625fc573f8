//! Identities from cgroup ids: over a temp dir standing in for the cgroup2 mount (walked),
//! and over the real mount (by handle).

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::*;

const UID: &str = "5f3c6a9e-1b2d-4c3e-9f00-0123456789ab";
const CID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// Directories made for a test, removed bottom-up (rmdir alone: cgroup directories hold
/// kernel files that cannot be deleted one by one).
struct Tree {
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Tree {
    fn new(root: PathBuf) -> Self {
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        Self { root, dirs: Vec::new() }
    }

    /// Make `rel` (and its parents) below the root; its id.
    fn dir(&mut self, rel: &str) -> u64 {
        let mut path = self.root.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                self.dirs.push(path.clone());
            }
        }
        std::fs::metadata(&path).unwrap().ino()
    }

    fn remove(&mut self, rel: &str) {
        let path = self.root.join(rel.trim_start_matches('/'));
        std::fs::remove_dir(&path).unwrap();
        self.dirs.retain(|d| *d != path);
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn temp_tree(test: &str) -> Tree {
    Tree::new(std::env::temp_dir().join(format!("sy-workload-{test}-{}", std::process::id())))
}

fn web_pod(containers: &[(&str, &str)]) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: "web-7d9c8f6b5-x2x4q".into(),
        uid: UID.into(),
        workload: Arc::new(workload_of(
            "shop",
            "web-7d9c8f6b5-x2x4q",
            Some(Owner { kind: "ReplicaSet", name: "web-7d9c8f6b5" }),
            Some("7d9c8f6b5"),
        )),
        containers: containers.iter().map(|(i, n)| ((*i).into(), (*n).into())).collect(),
    }
}

#[test]
fn identities_follow_the_path_and_pods_arriving_later() {
    let mut tree = temp_tree("identify");
    let container = tree.dir(&format!("/kubepods/burstable/pod{UID}/{CID}"));
    let sandbox = tree.dir(&format!("/kubepods/burstable/pod{UID}/{}", "ab".repeat(32)));
    let nginx = tree.dir("/system.slice/nginx.service");
    let session = tree.dir("/user.slice/user-0.slice/session-1.scope");
    let w = Workloads::new(Some(tree.root.clone()));

    // The pod is not known yet: bounded, and no pod reference.
    let before = w.identify(container);
    assert_eq!(before.workload.label(), "unknown/pod");
    assert_eq!(before.pod, None);
    assert_eq!(before.cgroup, Some(format!("/kubepods/burstable/pod{UID}/{CID}")));
    assert!(Arc::ptr_eq(&before, &w.identify(container)), "a hit is the cached Arc");

    // It arrives: the next lookup sees it, from the cached path.
    w.pods().apply(web_pod(&[(CID, "app")]));
    let after = w.identify(container);
    assert_eq!(after.workload.display(), "shop/deployment/web");
    let pod = after.pod.as_ref().unwrap();
    assert_eq!(
        (pod.name.as_str(), pod.uid.as_str(), pod.container.as_deref()),
        ("web-7d9c8f6b5-x2x4q", UID, Some("app"))
    );
    assert_eq!(w.identify(sandbox).pod.as_ref().unwrap().container, None, "the sandbox is no listed container");
    assert_eq!(w.identify(sandbox).workload, after.workload);

    // Another pod's change leaves this identity as it was (the same Arc).
    let mut other = web_pod(&[]);
    other.uid = "00000000-0000-0000-0000-000000000000".into();
    w.pods().apply(other);
    assert!(Arc::ptr_eq(&after, &w.identify(container)));
    // The pod goes: back to the bounded unknown.
    w.pods().delete(UID);
    assert_eq!(w.identify(container).workload.label(), "unknown/pod");

    assert_eq!(w.identify(nginx).workload.display(), "systemd/nginx.service");
    let s = w.identify(session);
    assert_eq!(s.workload.label(), "cgroup//user.slice/user-0.slice/session-1.scope");
    assert_eq!(s.workload.namespace, None);
    let missing = w.identify(u64::MAX);
    assert_eq!((missing.workload.label(), missing.cgroup.as_deref()), ("unknown/unknown".to_owned(), None));
}

#[test]
fn one_walk_names_every_cgroup_it_passed() {
    let mut tree = temp_tree("walk");
    let a = tree.dir("/system.slice/a.service");
    let b = tree.dir("/system.slice/b.service");
    let w = Workloads::new(Some(tree.root.clone()));
    assert_eq!(w.identify(a).workload.label(), "systemd/a.service");
    // Gone from the tree: only the first walk can have named it.
    tree.remove("/system.slice/b.service");
    assert_eq!(w.identify(b).workload.label(), "systemd/b.service");
    assert_eq!(w.identify(std::fs::metadata(&tree.root).unwrap().ino()).cgroup.as_deref(), Some("/"));
}

#[test]
fn without_a_cgroup_root_every_client_is_unknown() {
    let w = Workloads::new(None);
    let i = w.identify(12345);
    assert_eq!((i.workload.display(), i.pod.clone(), i.cgroup.clone()), ("unknown/unknown".to_owned(), None, None));
}

/// Root for the real cgroup2 mount: a loud skip without it, except under CI=true.
fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (a cgroup of its own), and CI=true forbids skipping it");
    }
    eprintln!("\n*** SKIPPED {test}: needs root (a cgroup of its own under the cgroup2 mount) ***\n");
    false
}

#[test]
fn on_the_real_cgroup2_mount_ids_are_opened_by_handle() {
    if !require_root("on_the_real_cgroup2_mount_ids_are_opened_by_handle") {
        return;
    }
    let mount = crate::redirect::cgroup2_root().expect("a cgroup2 mount in /proc/mounts");
    let top = format!("switchyard-unit-{}", std::process::id());
    let mut tree = Tree::new(mount.join(&top));
    let rel = format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope", UID.replace('-', "_"));
    let id = tree.dir(&rel);
    let want = format!("/{top}{rel}");

    let fs = CgroupFs::new(mount.clone());
    assert!(fs.uses_handles(), "{} is cgroup2: handles are tried", mount.display());
    // Root here holds CAP_DAC_READ_SEARCH; the DaemonSet does not, and walks.
    assert_eq!(fs.by_handle(id), Some(Found::Path(want.clone())));
    assert_eq!(fs.walk(id, |_, _| {}), Found::Path(want.clone()), "the walk agrees");

    let w = Workloads::new(Some(mount));
    w.pods().apply(web_pod(&[(CID, "app")]));
    let i = w.identify(id);
    assert_eq!((i.workload.display(), i.cgroup.as_deref()), ("shop/deployment/web".to_owned(), Some(want.as_str())));

    // Gone: the kernel says so (ESTALE), no walk needed to find nothing.
    tree.remove(&rel);
    assert_eq!(fs.by_handle(id), Some(Found::Missing));
    assert!(fs.uses_handles());
    drop(tree);
    assert!(!Path::new(&format!("{}/{top}", fs.root().display())).exists());
}
