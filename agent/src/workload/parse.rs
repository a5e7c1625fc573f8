//! What a cgroup path says about the processes in it: the kubelet's pod and container
//! directories, or a systemd service. Pure: the layouts are the kubelet's and systemd's
//! naming conventions, nothing is looked up.
//!
//! The pod directory is searched for anywhere in the path, not only at the top: kind and
//! other nested setups (and the tests) run a kubelet tree below a cgroup of their own.

/// The parts of a cgroup path that name a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The pod's `metadata.uid`, with dashes (as the API has it).
    pub pod_uid: Option<String>,
    /// The container runtime's id (hex), as `status.containerStatuses[].containerID`
    /// has it after the `<runtime>://` scheme.
    pub container_id: Option<String>,
    /// The innermost systemd service (`nginx.service`), off Kubernetes.
    pub unit: Option<String>,
}

/// Read `path` (below the cgroup2 mount, `/`-separated).
///
/// * kubelet cgroupfs driver: `.../kubepods[/burstable|/besteffort]/pod<uid>/<container id>`
/// * kubelet systemd driver: `.../kubepods[-<qos>]-pod<uid, _ for ->.slice/
///   {cri-containerd,crio,docker}-<container id>.scope` (`crio-conmon-<id>.scope` is
///   CRI-O's monitor process, not a container)
/// * otherwise the innermost `*.service` with no `.scope` below it (a scope is a session
///   or a transient run, not the service it was started from).
pub fn parse(path: &str) -> CgroupInfo {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The innermost pod directory: a pod's containers are its direct children.
    if let Some(i) = parts.iter().rposition(|p| pod_uid(p).is_some()) {
        return CgroupInfo {
            pod_uid: pod_uid(parts[i]),
            container_id: parts.get(i + 1).and_then(|c| container_id(c)).map(str::to_owned),
            unit: None,
        };
    }
    let unit = match parts.iter().rposition(|p| p.ends_with(".service")) {
        Some(i) if !parts[i + 1..].iter().any(|p| p.ends_with(".scope")) => Some(parts[i].to_owned()),
        _ => None,
    };
    CgroupInfo { unit, ..CgroupInfo::default() }
}

/// The pod uid in a kubelet pod directory name: `pod<uid>` (cgroupfs driver) or
/// `kubepods[-<qos>]-pod<uid with _>.slice` (systemd driver, where `-` nests slices; a
/// kubelet with a cgroup root of its own, as kind's, prefixes it: `kubelet-kubepods-...`).
fn pod_uid(part: &str) -> Option<String> {
    if let Some(slice) = part.strip_suffix(".slice") {
        let mut segments = slice.split('-');
        let uid = segments.next_back()?.strip_prefix("pod")?;
        return (segments.any(|s| s == "kubepods") && is_uid(uid, b'_')).then(|| uid.replace('_', "-"));
    }
    let uid = part.strip_prefix("pod")?;
    is_uid(uid, b'-').then(|| uid.to_owned())
}

/// A pod uid, its dashes written as `sep`: a UUID (36 characters) or, for static pods,
/// the 32 hex digits of the manifest's hash. Anything else named `pod...` is not the
/// kubelet's.
fn is_uid(s: &str, sep: u8) -> bool {
    (s.len() == 32 || s.len() == 36) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == sep)
}

/// The container id in a container directory name: bare hex (cgroupfs driver), or a
/// runtime's prefix with `.scope` (systemd driver).
fn container_id(part: &str) -> Option<&str> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-"].iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f3c6a9e-1b2d-4c3e-9f00-0123456789ab";
    const UID_: &str = "5f3c6a9e_1b2d_4c3e_9f00_0123456789ab";
    const CID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn pod(container: Option<&str>) -> CgroupInfo {
        CgroupInfo { pod_uid: Some(UID.into()), container_id: container.map(Into::into), unit: None }
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        for qos in ["", "/burstable", "/besteffort"] {
            assert_eq!(parse(&format!("/kubepods{qos}/pod{UID}/{CID}")), pod(Some(CID)), "{qos}");
            assert_eq!(parse(&format!("/kubepods{qos}/pod{UID}")), pod(None), "the pod itself: {qos}");
        }
        // CRI-O with the cgroupfs driver names its container directories `crio-<id>`.
        assert_eq!(parse(&format!("/kubepods/burstable/pod{UID}/crio-{CID}")), pod(Some(CID)));
    }

    #[test]
    fn kubelet_systemd_driver() {
        let burstable = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        for runtime in ["cri-containerd", "crio", "docker"] {
            assert_eq!(parse(&format!("{burstable}/{runtime}-{CID}.scope")), pod(Some(CID)), "{runtime}");
        }
        let besteffort = format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice");
        assert_eq!(parse(&format!("{besteffort}/cri-containerd-{CID}.scope")), pod(Some(CID)));
        // Guaranteed QoS: the pod slice sits right under kubepods.slice.
        let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
        assert_eq!(parse(&format!("{guaranteed}/crio-{CID}.scope")), pod(Some(CID)));
        assert_eq!(parse(&format!("{burstable}/crio-conmon-{CID}.scope")), pod(None), "the monitor is no container");
        assert_eq!(parse(&burstable), pod(None));
    }

    #[test]
    fn the_pod_directory_may_be_anywhere() {
        let nested = format!("/switchyard-test-x/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(parse(&nested), pod(Some(CID)));
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse(&kind), pod(Some(CID)), "kind: the kubelet's cgroup root prefixes its slices");
        assert_eq!(parse(&format!("/system.slice/x-pod{UID_}.slice")), CgroupInfo::default(), "not under kubepods");
        let kind_cgroupfs = format!("/system.slice/docker-abc.scope/kubelet/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(parse(&kind_cgroupfs), pod(Some(CID)), "kind's node container, cgroupfs inside");
        // Static pods: the uid is the manifest's hash.
        let hash = "e7b8c7b0d2b1a7bde3a6f2d7f6a1e6b5";
        assert_eq!(parse(&format!("/kubepods/pod{hash}/{CID}")).pod_uid.as_deref(), Some(hash));
        // A process nesting cgroups inside its container still names its container.
        assert_eq!(parse(&format!("/kubepods/pod{UID}/{CID}/init.scope")), pod(Some(CID)));
    }

    #[test]
    fn off_kubernetes_the_innermost_service_is_the_unit() {
        let unit = |p: &str| parse(p).unit;
        assert_eq!(unit("/system.slice/nginx.service").as_deref(), Some("nginx.service"));
        assert_eq!(
            unit("/user.slice/user-0.slice/user@0.service/app.slice/foo.service").as_deref(),
            Some("foo.service")
        );
        assert_eq!(unit("/system.slice/getty.slice/getty@tty1.service").as_deref(), Some("getty@tty1.service"));
        // A service's own sub-cgroups (delegation) are still the service.
        assert_eq!(unit("/system.slice/containerd.service/worker").as_deref(), Some("containerd.service"));
        // Sessions and transient runs are scopes, not services.
        assert_eq!(unit("/user.slice/user-1000.slice/session-3.scope"), None);
        assert_eq!(unit("/user.slice/user-1000.slice/user@1000.service/app.slice/app-term-12.scope"), None);
        assert_eq!(unit("/system.slice/docker-abc.scope"), None);
        assert_eq!(parse("/"), CgroupInfo::default());
        assert_eq!(parse("/podman/x"), CgroupInfo::default(), "`pod...` that is no uid");
    }
}
