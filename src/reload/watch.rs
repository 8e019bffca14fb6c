//! Reload when a file changes: the configuration file and every file it names (secrets, keys,
//! certificates, CA bundles).
//!
//! Directories are watched, not files: Kubernetes updates a mounted ConfigMap or Secret by
//! writing a new `..2026_…` directory and renaming the `..data` symlink over the old one, so the
//! file's own path never sees an event, only its directory does. Each burst of events
//! (debounced) leads to a look at the files' contents, and only a real change reloads, exactly
//! as SIGHUP does; tokengate's own reads and unrelated files in the same directory do nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};

use super::Control;

/// Events closer together than this are one change: an editor's save or the kubelet's swap is
/// several events within milliseconds.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches the files of `control`'s configuration until the returned task is aborted.
/// `None` when the instance was not started from a file or watching is off.
pub fn spawn(control: Arc<Control>) -> Option<tokio::task::JoinHandle<()>> {
    let path = control.path()?.to_path_buf();
    if !control.config().is_some_and(|c| c.watch) {
        return None;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
        let _ = tx.send(result.is_ok());
    });
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let mut files = watched_files(&path, &control);
        let mut dirs = BTreeSet::new();
        rewatch(&mut debouncer, &mut dirs, &files);
        let mut seen = fingerprint(&files);
        tracing::info!(files = files.len(), "watching the configuration files for changes");
        while rx.recv().await.is_some() {
            if fingerprint(&files) == seen {
                continue;
            }
            tracing::info!("a configuration file changed: reloading");
            if let Err(e) = control.reload_file().await {
                tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
            }
            // The new configuration may name other files.
            files = watched_files(&path, &control);
            rewatch(&mut debouncer, &mut dirs, &files);
            seen = fingerprint(&files);
        }
    }))
}

/// The configuration file and the files the configuration in force names.
fn watched_files(path: &Path, control: &Control) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    files.extend(control.config().map(|c| c.files).unwrap_or_default());
    files
}

/// Watches the directory of every file, and of where it points when it is a symlink (a mounted
/// secret's `..data/key`), adding and dropping directories as the list changes.
fn rewatch(debouncer: &mut Debouncer<RecommendedWatcher>, dirs: &mut BTreeSet<PathBuf>, files: &[PathBuf]) {
    let mut wanted = BTreeSet::new();
    for file in files {
        let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        wanted.extend(absolute.parent().map(Path::to_path_buf));
        if let Ok(real) = std::fs::canonicalize(file) {
            wanted.extend(real.parent().map(Path::to_path_buf));
        }
    }
    for gone in dirs.difference(&wanted) {
        let _ = debouncer.watcher().unwatch(gone);
    }
    for dir in wanted.difference(dirs) {
        if let Err(e) = debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this directory; changes in it need SIGHUP");
        }
    }
    *dirs = wanted;
}

/// A digest of every file's contents (a missing or unreadable file counts as its own state), so
/// events that change nothing do not reload.
fn fingerprint(files: &[PathBuf]) -> Vec<u8> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for file in files {
        match std::fs::read(file) {
            Ok(bytes) => {
                digest.update(&(bytes.len() as u64).to_be_bytes());
                digest.update(&bytes);
            }
            Err(e) => digest.update(format!("unreadable: {:?}", e.kind()).as_bytes()),
        }
    }
    digest.finish().as_ref().to_vec()
}
