//! The catalog file source (linkerd 1's `fs` namer): a YAML file with a `services:` list
//! in the main config's format, watched with inotify. Editors save in different ways
//! (write in place, truncate and write, write a temporary file and rename it over), so the
//! directory is watched, not the file, and every event touching the file's name triggers
//! a re-read after a short settling delay. A file that does not parse or validate is
//! reported as an error and changes nothing.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::debug;

use super::Update;
use crate::{
    config::{Config, ConfigError, Origin, ServiceConfig},
    tasks::Background,
};

/// Wait after the last event before reading: a truncate-then-write save is two events,
/// and reading between them would see an empty file.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    services: Vec<ServiceConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("watch the catalog's directory {}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Read and validate the catalog: its services, marked as coming from it.
pub fn load(path: &Path) -> Result<Vec<ServiceConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, path)
}

/// [`load`] on text already read; `path` is only used in error messages. Apart from the
/// file system so that the parser can be fuzzed (fuzz/fuzz_targets/catalog.rs).
pub fn parse(text: &str, path: &Path) -> Result<Vec<ServiceConfig>, ConfigError> {
    let file: CatalogFile =
        serde_yaml_ng::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
    let mut services = file.services;
    for s in &mut services {
        s.origin = Origin::Catalog;
    }
    // Validated on its own first, so problems name catalog fields; the merged whole is
    // validated again by the caller (cross-source clashes).
    let alone = Config { services, ..Default::default() };
    let problems = alone.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { path: path.to_owned(), problems });
    }
    Ok(alone.canonical().services)
}

/// Watch `path`; send an [`Update::Catalog`] after every change. The returned watcher
/// must be kept: dropping it stops the watch.
pub fn watch(
    path: &Path,
    updates: mpsc::Sender<Update>,
    background: &Background,
) -> Result<notify::RecommendedWatcher, CatalogError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    let name = path.file_name().map(ToOwned::to_owned);
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            let _ = tx.send(());
        }
    })
    .map_err(|source| CatalogError::Watch { dir: dir.clone(), source })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|source| CatalogError::Watch { dir, source })?;

    let path = path.to_owned();
    background.spawn(async move {
        while rx.recv().await.is_some() {
            // Settle: swallow the burst of events one save makes.
            loop {
                match tokio::time::timeout(SETTLE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            // An empty file is a save in progress (truncated, not yet written: on a busy
            // node the two can be further apart than the settle time), not "no services",
            // which is written `services: []`. The write that follows brings an event.
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                debug!(path = %path.display(), "catalog is empty: a save in progress; waiting for its next change");
                continue;
            }
            debug!(path = %path.display(), "catalog changed");
            let update = load(&path).map_err(|e| format!("{:#}", anyhow::Error::from(e)));
            if updates.send(Update::Catalog(update)).await.is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}
