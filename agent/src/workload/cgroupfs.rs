//! cgroup id -> path. The kernel gives a client's cgroup as an id (the cgroup2
//! directory's inode number, which kernfs also accepts as a file handle); operators know
//! cgroups by path.
//!
//! The fast way is systemd's `cg_cgroupid_open`: `open_by_handle_at` on the cgroup2
//! mount with the id as a kernfs handle, then readlink of the fd: O(1). It needs
//! CAP_DAC_READ_SEARCH, which the deployed DaemonSet does not grant (it lets a process
//! open any file by handle, the capability container escapes ask for), so the fallback
//! matters: a walk of the tree, bounded, which reports every directory it passes so that
//! one walk names every cgroup that existed at the time (the caller caches them).

use std::{
    ffi::c_int,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{DirEntryExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use tracing::debug;

/// Directories visited per walk at most, so a huge tree cannot stall the caller. A node
/// of 110 pods has about a thousand cgroups.
const MAX_VISIT: usize = 20_000;

/// `FILEID_KERNFS` (include/linux/exportfs.h): a kernfs node id as a file handle.
const FILEID_KERNFS: c_int = 0xfe;

/// Why the fast lookup did not answer; the walk does instead.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("open cgroup {id} by handle on {}", root.display())]
    Open {
        id: u64,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read the path of cgroup {id} from /proc/self/fd")]
    Readlink {
        id: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {id} is at {}, outside {}", path.display(), root.display())]
    Outside { id: u64, path: PathBuf, root: PathBuf },
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The path below the mount (`/` for the root cgroup).
    Path(String),
    /// No such cgroup (gone since, or past the walk's bound).
    Missing,
}

/// The cgroup2 hierarchy, for looking ids up.
#[derive(Debug)]
pub struct CgroupFs {
    root: PathBuf,
    /// The mount, opened, when it is a cgroup2 mount (handles mean nothing elsewhere: a
    /// temp dir in the tests is walked).
    mount: Option<OwnedFd>,
    /// Cleared when the kernel refuses handles for good (no CAP_DAC_READ_SEARCH, or a
    /// kernel without kernfs handles): no syscall per lookup that is bound to fail.
    handles: AtomicBool,
}

impl CgroupFs {
    pub fn new(root: PathBuf) -> Self {
        let mount = open_cgroup2(&root);
        let handles = AtomicBool::new(mount.is_some());
        Self { root, mount, handles }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether lookups still try `open_by_handle_at` first.
    pub fn uses_handles(&self) -> bool {
        self.handles.load(Ordering::Relaxed)
    }

    /// By handle if the kernel lets us, else `None` (then [`CgroupFs::walk`]).
    pub fn by_handle(&self, id: u64) -> Option<Found> {
        let mount = self.mount.as_ref().filter(|_| self.uses_handles())?;
        match self.open_by_handle(mount, id) {
            Ok(found) => Some(found),
            Err(e) => {
                let errno = match &e {
                    HandleError::Open { source, .. } => source.raw_os_error(),
                    _ => None,
                };
                // EPERM: no CAP_DAC_READ_SEARCH; EOPNOTSUPP/EINVAL: no kernfs handles.
                if matches!(errno, Some(libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL)) {
                    self.handles.store(false, Ordering::Relaxed);
                    debug!(error = %e, "cgroup ids by handle unavailable; walking the cgroup tree instead");
                } else {
                    debug!(error = %e, "cgroup id by handle failed; walking the cgroup tree");
                }
                None
            }
        }
    }

    fn open_by_handle(&self, mount: &OwnedFd, id: u64) -> Result<Found, HandleError> {
        /// `struct file_handle` with its 8 bytes of `f_handle`: the id, native endian.
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: libc::c_uint,
            handle_type: c_int,
            id: u64,
        }
        let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
        // SAFETY: `handle` is a `file_handle` header followed by `handle_bytes` bytes, as
        // the call reads it; the mount fd is open for as long as `self`.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let source = std::io::Error::last_os_error();
            // ESTALE: kernfs has no node of that id, the cgroup is gone.
            if source.raw_os_error() == Some(libc::ESTALE) {
                return Ok(Found::Missing);
            }
            return Err(HandleError::Open { id, root: self.root.clone(), source });
        }
        // SAFETY: a new fd, owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|source| HandleError::Readlink { id, source })?;
        // Removed between open and readlink: d_path marks it.
        if path.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
            return Ok(Found::Missing);
        }
        match path.strip_prefix(&self.root) {
            Ok(rest) => Ok(Found::Path(below_root(rest))),
            Err(_) => Err(HandleError::Outside { id, path, root: self.root.clone() }),
        }
    }

    /// Walk the tree for `id`, telling `seen` every (id, path) passed on the way (a
    /// directory's inode number from readdir, without a stat: on cgroup2 it is the id).
    /// Visits the whole tree up to the bound, so the caller can remember all of it.
    pub fn walk(&self, id: u64, mut seen: impl FnMut(u64, &str)) -> Found {
        let mut found = Found::Missing;
        match std::fs::metadata(&self.root) {
            Ok(m) if m.ino() == id => found = Found::Path("/".to_owned()),
            Ok(m) => seen(m.ino(), "/"),
            Err(_) => return Found::Missing,
        }
        let mut stack = vec![self.root.clone()];
        let mut visited = 0;
        while let Some(dir) = stack.pop() {
            visited += 1;
            if visited > MAX_VISIT {
                debug!(root = %self.root.display(), "cgroup tree walk stopped at {MAX_VISIT} directories");
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.filter_map(Result::ok) {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path();
                let below = below_root(path.strip_prefix(&self.root).unwrap_or(&path));
                if e.ino() == id {
                    found = Found::Path(below.clone());
                }
                seen(e.ino(), &below);
                stack.push(path);
            }
        }
        found
    }
}

/// `rest` (relative to the mount) as the cgroup path: `/a/b`, `/` for the root.
fn below_root(rest: &Path) -> String {
    format!("/{}", rest.display())
}

/// The mount opened, if it is cgroup2.
fn open_cgroup2(root: &Path) -> Option<OwnedFd> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    let fd = nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    let fs = nix::sys::statfs::fstatfs(&fd).ok()?;
    (fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).then_some(fd)
}
