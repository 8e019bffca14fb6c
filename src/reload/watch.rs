//! Reload when a file changes: the configuration file and every file it names (secrets, keys,
//! certificates, CA bundles).
//!
//! Directories are watched, not files: Kubernetes updates a mounted ConfigMap or Secret by
//! writing a new `..2026_…` directory and renaming the `..data` symlink over the old one, so the
//! file's own path never sees an event, only its directory does. Each burst of events
//! (debounced) leads to a look at the files' contents, and only a real change reloads, exactly
//! as SIGHUP does; unrelated files in the same directory do nothing.
//!
//! inotify reports opens and reads too, and that look opens every file: the events that cannot
//! change a file's contents are dropped before they wake anything, or the look would wake itself
//! forever. So are events on other regular files of those directories (a log file kept beside
//! the configuration is written on every line). `notify` is used without a debouncer crate because `notify-debouncer-mini` drops the
//! event kind this needs; the debounce is a sleep.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::Control;

/// How long after an event the files are compared: the events within it are one change (an
/// editor's save or the kubelet's swap is several events within milliseconds).
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches the files of `control`'s configuration until the returned task is aborted.
/// `None` when the instance was not started from a file or watching is off.
pub fn spawn(control: Arc<Control>) -> Option<tokio::task::JoinHandle<()>> {
    let path = control.path()?.to_path_buf();
    if !control.config().is_some_and(|c| c.watch) {
        return None;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let relevant = Arc::new(std::sync::RwLock::new(Relevant::default()));
    let seen_by_watcher = relevant.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        // An error (the event queue overflowed, say) may hide a change: look.
        let wake = event.as_ref().map_or(true, |e| {
            may_change_contents(&e.kind) && seen_by_watcher.read().map_or(true, |r| r.may_concern(&e.paths))
        });
        if wake {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let mut files = watched_files(&path, &control);
        let mut dirs = BTreeSet::new();
        rewatch(&mut watcher, &mut dirs, &files);
        set(&relevant, &files);
        let mut seen = fingerprint(&files);
        tracing::info!(files = files.len(), "watching the configuration files for changes");
        while rx.recv().await.is_some() {
            // The rest of the burst arrives meanwhile. A fixed wait, not one for quiet, so a
            // file written nonstop in the same directory cannot postpone a reload forever.
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            if fingerprint(&files) == seen {
                continue;
            }
            tracing::info!("a configuration file changed: reloading");
            if let Err(e) = control.reload_file().await {
                tracing::error!(error = %e, "reload failed; the previous configuration stays in force");
            }
            // The new configuration may name other files.
            files = watched_files(&path, &control);
            rewatch(&mut watcher, &mut dirs, &files);
            set(&relevant, &files);
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
fn rewatch(watcher: &mut RecommendedWatcher, dirs: &mut BTreeSet<PathBuf>, files: &[PathBuf]) {
    let mut wanted = BTreeSet::new();
    for file in files {
        let absolute = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        wanted.extend(absolute.parent().map(Path::to_path_buf));
        if let Ok(real) = std::fs::canonicalize(file) {
            wanted.extend(real.parent().map(Path::to_path_buf));
        }
    }
    for gone in dirs.difference(&wanted) {
        let _ = watcher.unwatch(gone);
    }
    for dir in wanted.difference(dirs) {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this directory; changes in it need SIGHUP");
        }
    }
    *dirs = wanted;
}

/// The watched files, as written and as resolved.
#[derive(Default)]
struct Relevant(BTreeSet<PathBuf>);

impl Relevant {
    fn new(files: &[PathBuf]) -> Self {
        let mut paths = BTreeSet::new();
        for file in files {
            paths.insert(std::path::absolute(file).unwrap_or_else(|_| file.clone()));
            paths.extend(std::fs::canonicalize(file));
        }
        Relevant(paths)
    }

    /// Whether an event on `paths` may change a watched file. Only a regular file that is none
    /// of them certainly cannot; a symlink (`..data`), a directory (`..2026_…`), a path that is
    /// gone, or an event without paths may.
    fn may_concern(&self, paths: &[PathBuf]) -> bool {
        paths.is_empty()
            || paths.iter().any(|p| {
                self.0.contains(p) || std::fs::symlink_metadata(p).map_or(true, |m| !m.file_type().is_file())
            })
    }
}

fn set(relevant: &std::sync::RwLock<Relevant>, files: &[PathBuf]) {
    let new = Relevant::new(files);
    if let Ok(mut r) = relevant.write() {
        *r = new;
    }
}

/// Whether an event of this kind can mean new contents. Opening, reading and closing a file
/// without writing cannot; everything else can (a write, a rename over it, a delete, a change of
/// permissions that makes it unreadable, an unknown kind).
fn may_change_contents(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// A digest of every file's contents (a missing or unreadable file counts as its own state), so
/// events that change nothing do not reload.
fn fingerprint(files: &[PathBuf]) -> Vec<u8> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for file in files {
        // A FIFO would block the read, and with it the thread that answers /healthz.
        if std::fs::metadata(file).is_ok_and(|m| !m.is_file()) {
            digest.update(b"not a regular file");
            continue;
        }
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

#[cfg(test)]
mod tests {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};

    use super::{Relevant, may_change_contents};

    #[test]
    fn other_regular_files_in_the_directory_do_not_concern_the_watch() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "x").unwrap_or_else(|e| panic!("{e}"));
            p
        };
        let (config, log, data) = (write("config.yaml"), write("tokengate.log"), dir.path().join("..data"));
        std::os::unix::fs::symlink(dir.path(), &data).unwrap_or_else(|e| panic!("{e}"));
        let relevant = Relevant::new(std::slice::from_ref(&config));
        assert!(relevant.may_concern(std::slice::from_ref(&config)));
        assert!(!relevant.may_concern(std::slice::from_ref(&log)), "a log file beside it");
        assert!(relevant.may_concern(&[log.clone(), config]), "a rename of another file over it");
        assert!(relevant.may_concern(&[data]), "the kubelet's symlink swap");
        assert!(relevant.may_concern(&[dir.path().join("gone")]), "a file that was removed");
        assert!(relevant.may_concern(&[]));
    }

    #[test]
    fn only_reads_and_opens_are_ignored() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!may_change_contents(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Create(CreateKind::Any),
            EventKind::Remove(RemoveKind::Any),
            EventKind::Other,
            EventKind::Any,
        ] {
            assert!(may_change_contents(&kind), "{kind:?}");
        }
    }
}
