//! The files a configuration reads besides itself (secrets, keys, certificates, CA bundles), so
//! that a change to any of them can trigger a reload.
//!
//! Secret files are read deep inside deserialisation, where serde passes no context; loading is
//! synchronous, so a thread-local list (as [`super::env`] does for variables) collects them.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

thread_local! {
    static READ: RefCell<Option<Vec<PathBuf>>> = const { RefCell::new(None) };
}

/// Notes that the configuration being parsed read `path`.
pub(super) fn record(path: impl AsRef<Path>) {
    READ.with(|r| {
        if let Some(list) = r.borrow_mut().as_mut() {
            list.push(path.as_ref().to_path_buf());
        }
    });
}

/// Runs `body` and returns what it returned with every path [`record`]ed meanwhile.
pub(super) fn collect<R>(body: impl FnOnce() -> R) -> (R, Vec<PathBuf>) {
    struct Reset(Option<Vec<PathBuf>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            READ.with(|r| *r.borrow_mut() = self.0.take());
        }
    }
    // A nested collect (never expected) keeps the outer list intact.
    let outer = READ.with(|r| r.borrow_mut().replace(Vec::new()));
    let reset = Reset(outer);
    let out = body();
    let read = READ.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(reset);
    (out, read)
}
