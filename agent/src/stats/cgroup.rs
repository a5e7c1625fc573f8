//! cgroup id -> path. The kernel records a client's cgroup id (the cgroup directory's
//! inode number); operators want the path (`/kubepods/.../pod<uid>/<container>`), which
//! names the pod. Found by walking the cgroup2 tree once per unknown id, then cached.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Bound on directories visited per lookup, so a huge tree cannot stall the caller.
const MAX_VISIT: usize = 20_000;

#[derive(Debug)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    cache: Mutex<HashMap<u64, Option<String>>>,
}

impl CgroupPaths {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self { root, cache: Mutex::new(HashMap::new()) }
    }

    /// The path below the cgroup2 root (`/` for the root itself), if found.
    pub fn path(&self, id: u64) -> Option<String> {
        if let Some(hit) = self.cache.lock().unwrap().get(&id) {
            return hit.clone();
        }
        let root = self.root.as_deref()?;
        let found = find(root, id).map(|p| format!("/{}", p.strip_prefix(root).unwrap_or(&p).display()));
        let mut cache = self.cache.lock().unwrap();
        // Keep the cache bounded: cgroups come and go with pods.
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(id, found.clone());
        found
    }
}

fn find(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_owned()];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > MAX_VISIT {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_directory_by_inode_and_caches_misses() {
        let dir = tempfile_dir();
        let child = dir.join("a/b");
        std::fs::create_dir_all(&child).unwrap();
        let ino = std::fs::metadata(&child).unwrap().ino();
        let paths = CgroupPaths::new(Some(dir.clone()));
        assert_eq!(paths.path(ino).as_deref(), Some("/a/b"));
        assert_eq!(paths.path(u64::MAX), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sy-cgpath-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
