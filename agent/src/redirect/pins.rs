//! The agent's directory in a BPF file system (`agent.bpffs_dir`): where the maps and the
//! cgroup links are pinned so they outlive the process, and removing all of it again.
//!
//! What pins buy (see docs/lifecycle.md): a killed agent leaves its programs attached and
//! its maps filled, so the in-kernel fallback keeps connections working; the next agent
//! finds the same maps (contents included) and swaps its programs into the same links.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use switchyard_common::{map, pin, prog};

use super::link;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot read /proc/mounts")]
    Mounts(#[source] io::Error),
    #[error(
        "{} (agent.bpffs_dir) is not inside a BPF file system (bpffs); switchyard pins its \
         programs and maps there so that they outlive the process. Mount one (mount -t bpf \
         bpf /sys/fs/bpf; in Kubernetes, a hostPath volume of the node's /sys/fs/bpf) or set \
         agent.bpffs_dir to a directory inside one{}",
        dir.display(),
        if mounts.is_empty() { String::from(" (none is mounted)") } else { format!(" (mounted: {})", mounts.join(", ")) }
    )]
    NotBpffs { dir: PathBuf, mounts: Vec<String> },
    #[error("create the pin directory {}", dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read the pin directory {}", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("open the pinned link {}", path.display())]
    OpenLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("detach the pinned link {}", path.display())]
    Detach {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove the pin {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} also holds {}, which switchyard did not create, so it was left in place; remove \
         those by hand, or use a directory of switchyard's own for agent.bpffs_dir",
        dir.display(),
        left.join(", ")
    )]
    Foreign { dir: PathBuf, left: Vec<String> },
}

/// The agent's pin directory, checked to lie in a bpffs and created if missing.
#[derive(Debug, Clone)]
pub struct PinDir {
    path: PathBuf,
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

impl PinDir {
    /// Check that `dir` is inside a mounted bpffs, and create it (mode 0700: the maps tell
    /// who connects where) if it does not exist.
    pub fn open(dir: &Path) -> Result<Self, PinError> {
        check_bpffs(dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PinError::Create { dir: dir.to_owned(), source })?;
        Ok(Self { path: dir.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Nothing pinned yet: no agent ran here since the last removal (a first install).
    pub fn is_empty(&self) -> bool {
        std::fs::read_dir(&self.path).map(|mut d| d.next().is_none()).unwrap_or(true)
    }

    /// Where the cgroup link of program `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.path.join(format!("{}{name}", pin::LINK_PREFIX))
    }

    /// Remove what an older switchyard pinned and this one does not use: links of
    /// programs it no longer has (detached, or their old programs would keep running) and
    /// maps of other names (other layouts). A previous agent still draining keeps using
    /// those maps through its own fds; only their names go. Called once this agent's
    /// programs are in place.
    pub fn remove_stale(&self) -> Result<Removed, PinError> {
        let mut removed = Removed::default();
        let entries =
            std::fs::read_dir(&self.path).map_err(|source| PinError::Read { dir: self.path.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| PinError::Read { dir: self.path.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let current = name.strip_prefix(pin::LINK_PREFIX).is_some_and(|p| prog::ALL.contains(&p))
                || map::ALL.contains(&name.as_str());
            if !current {
                remove_pin(&self.path, &name, &mut removed)?;
            }
        }
        Ok(removed)
    }
}

/// The cgroup id the kernel reports for `cgroup` (on cgroup v2, the directory's inode).
pub fn cgroup_id(cgroup: &Path) -> io::Result<u64> {
    std::fs::metadata(cgroup).map(|m| m.ino())
}

/// Detach every pinned link in `dir`, remove every pin of ours, then the directory. A
/// missing directory means there is nothing to remove. Links are force-detached, so this
/// works even while an agent still runs (it then proxies what it already accepted, and
/// catches nothing new).
pub fn uninstall(dir: &Path) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => return Err(PinError::Read { dir: dir.to_owned(), source }),
    };
    check_bpffs(dir)?;
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PinError::Read { dir: dir.to_owned(), source })?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    // Links first: once they are gone no program runs, and the maps go with their pins.
    names.sort_by_key(|n| !n.starts_with(pin::LINK_PREFIX));
    let mut foreign = Vec::new();
    for name in names {
        if !remove_pin(dir, &name, &mut removed)? {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        return Err(PinError::Foreign { dir: dir.to_owned(), left: foreign });
    }
    std::fs::remove_dir(dir).map_err(|source| PinError::Remove { path: dir.to_owned(), source })?;
    Ok(removed)
}

/// Remove pin `name` in `dir` if it is ours (a link is force-detached first); false if it
/// is not ours and was left alone.
fn remove_pin(dir: &Path, name: &str, removed: &mut Removed) -> Result<bool, PinError> {
    let path = dir.join(name);
    let remove =
        |path: &Path| std::fs::remove_file(path).map_err(|source| PinError::Remove { path: path.to_owned(), source });
    if is_our_link(name) {
        let fd = link::open_pinned(&path).map_err(|source| PinError::OpenLink { path: path.clone(), source })?;
        // ENOLINK: already detached (its cgroup was removed); the pin is all that is left.
        match link::detach(std::os::fd::AsFd::as_fd(&fd)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(source) => return Err(PinError::Detach { path, source }),
        }
        remove(&path)?;
        removed.links += 1;
        Ok(true)
    } else if name.starts_with(map::PREFIX) {
        remove(&path)?;
        removed.maps += 1;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// `link_sy_*`: a link pin of any switchyard version (older program names included).
fn is_our_link(name: &str) -> bool {
    name.strip_prefix(pin::LINK_PREFIX).is_some_and(|p| p.starts_with(prog::PREFIX))
}

/// Fails unless `dir` (or, if it does not exist yet, its nearest existing ancestor) lies
/// in a mounted bpffs.
fn check_bpffs(dir: &Path) -> Result<(), PinError> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(PinError::Mounts)?;
    let mounts = bpffs_mounts(&text);
    // Resolve symlinks the way the kernel will, on the part of the path that exists.
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let real = existing.canonicalize().unwrap_or_else(|_| existing.to_owned());
    if mounts.iter().any(|m| real.starts_with(m)) {
        Ok(())
    } else {
        Err(PinError::NotBpffs {
            dir: dir.to_owned(),
            mounts: mounts.iter().map(|m| m.display().to_string()).collect(),
        })
    }
}

fn bpffs_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "bpf").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bpffs_mounts() {
        let text = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,nosuid 0 0\nnone /tmp/my\\040pins bpf rw 0 0\n";
        assert_eq!(bpffs_mounts(text), [PathBuf::from("/sys/fs/bpf"), PathBuf::from("/tmp/my pins")]);
        assert!(bpffs_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n").is_empty());
    }

    #[test]
    fn recognises_link_pins_of_any_version() {
        assert!(is_our_link("link_sy_connect4"));
        assert!(is_our_link("link_sy_connect9"));
        assert!(!is_our_link("link_cilium_sock4"));
        assert!(!is_our_link("sy_connect4"));
    }
}
