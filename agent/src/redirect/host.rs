//! What the host must offer before we load anything: a cgroup v2 hierarchy and the
//! capabilities to load and attach BPF programs. Checked up front so the user gets a
//! sentence naming what is missing instead of an EPERM from deep inside the loader.

use std::path::{Path, PathBuf};

/// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "no cgroup v2 (cgroup2) file system is mounted (looked in /proc/mounts); switchyard \
         attaches its programs to a cgroup v2 directory: mount one (mount -t cgroup2 none \
         /sys/fs/cgroup) or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error("cannot read {path}")]
    Proc {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cgroup {} (agent.cgroup) is not a directory of a cgroup v2 file system; cgroup2 is \
         mounted at {}",
        path.display(),
        root.display()
    )]
    NotCgroup2 { path: PathBuf, root: PathBuf },
    #[error(
        "switchyard needs root, or the capabilities CAP_BPF and CAP_PERFMON (or \
         CAP_SYS_ADMIN) and CAP_NET_ADMIN, to load and attach its eBPF programs and mark \
         its sockets; this process is missing {missing}"
    )]
    Privileges { missing: String },
}

/// Mount point of the cgroup v2 hierarchy, from /proc/mounts. On a hybrid host this is
/// not /sys/fs/cgroup but, for example, /sys/fs/cgroup/unified.
pub fn cgroup2_root() -> Result<PathBuf, HostError> {
    let path = "/proc/mounts";
    let mounts = std::fs::read_to_string(path).map_err(|source| HostError::Proc { path, source })?;
    cgroup2_root_in(&mounts).ok_or(HostError::NoCgroup2)
}

fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces in paths as \040.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// The cgroup to attach to: the configured one, which must lie inside the cgroup2 mount,
/// or the cgroup2 root.
pub fn attach_cgroup(configured: Option<&Path>) -> Result<PathBuf, HostError> {
    let root = cgroup2_root()?;
    match configured {
        None => Ok(root),
        Some(path) if path.starts_with(&root) && path.join("cgroup.procs").is_file() => Ok(path.to_owned()),
        Some(path) => Err(HostError::NotCgroup2 { path: path.to_owned(), root }),
    }
}

/// Fails unless the effective capability set allows loading, attaching and SO_MARK.
pub fn check_privileges() -> Result<(), HostError> {
    let path = "/proc/self/status";
    let status = std::fs::read_to_string(path).map_err(|source| HostError::Proc { path, source })?;
    let missing = missing_caps(&status);
    if missing.is_empty() { Ok(()) } else { Err(HostError::Privileges { missing: missing.join(", ") }) }
}

fn missing_caps(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    // Without CAP_PERFMON (or CAP_SYS_ADMIN) the verifier applies its Spectre v1 checks
    // and rejects sy_connect4 with a log that names no capability: say so up front.
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_root_in("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_root_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }

    #[test]
    fn capability_check_reads_cap_eff() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(missing_caps(root).is_empty());
        let nobody = "CapEff:\t0000000000000000\n";
        assert_eq!(missing_caps(nobody), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        let bpf_and_net = format!("CapEff:\t{:016x}\n", (1u64 << 39) | (1u64 << 12));
        assert_eq!(missing_caps(&bpf_and_net), ["CAP_PERFMON"]);
        let sys_admin_and_net = format!("CapEff:\t{:016x}\n", (1u64 << 21) | (1u64 << 12));
        assert!(missing_caps(&sys_admin_and_net).is_empty());
    }
}
