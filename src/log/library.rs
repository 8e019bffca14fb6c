//! Rate limit for lines from libraries. h2, hyper, rustls and notify log from deep inside what a
//! peer drives: h2 warns on every unsolicited PING ACK, rustls on every unrecognised SNI, notify
//! traces every inotify event (a log file in a watched directory feeds itself). tokengate cannot
//! change those lines, so it admits one a second from each place in their code and counts the rest.
//!
//! Places are told apart by target, file, line and level; for lines that come through the `log`
//! crate (rustls, notify) those are the record's own, not the bridge's single callsite.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::Context;

use super::{LogLimit, RATE_LIMITED};

/// How often the held-back count is reported.
pub(super) const SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// More places than any set of libraries logs from; past it, new places share one limit.
const MAX_PLACES: usize = 4096;

/// Lines held back since the last summary, and the target of the latest.
static HELD: Mutex<(u64, String)> = Mutex::new((0, String::new()));

/// The layer that admits or holds back each library event.
#[derive(Default)]
pub(super) struct Limit {
    places: Mutex<HashMap<u64, LogLimit>>,
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Limit {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if is_own(meta.target()) {
            // tokengate's own request-caused lines carry their own limits (LogLimit).
            return true;
        }
        let key = place(meta.target(), meta.file(), meta.line(), meta.level());
        let admitted = {
            let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
            let key = if places.len() >= MAX_PLACES && !places.contains_key(&key) { 0 } else { key };
            places.entry(key).or_default().admit().is_some()
        };
        if !admitted {
            RATE_LIMITED.fetch_add(1, Ordering::Relaxed);
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            held.0 += 1;
            if held.1 != meta.target() {
                held.1 = meta.target().to_owned();
            }
        }
        admitted
    }
}

/// Lines held back since the last call, with the target of the latest; `None` when none were.
pub(super) fn take_held() -> Option<(u64, String)> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    (held.0 > 0).then(|| (std::mem::take(&mut held.0), std::mem::take(&mut held.1)))
}

fn is_own(target: &str) -> bool {
    target == "tokengate" || target.starts_with("tokengate::")
}

fn place(target: &str, file: Option<&str>, line: Option<u32>, level: &tracing::Level) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (target, file, line, level.as_str()).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_targets_are_told_from_libraries() {
        assert!(is_own("tokengate"));
        assert!(is_own("tokengate::proxy"));
        assert!(!is_own("tokengate_fork"));
        assert!(!is_own("h2::proto::connection"));
        assert!(!is_own("rustls::server::hs"));
    }

    #[test]
    fn places_differ_by_line_and_level() {
        let a = place("h2", Some("a.rs"), Some(1), &tracing::Level::WARN);
        assert_eq!(a, place("h2", Some("a.rs"), Some(1), &tracing::Level::WARN));
        assert_ne!(a, place("h2", Some("a.rs"), Some(2), &tracing::Level::WARN));
        assert_ne!(a, place("h2", Some("a.rs"), Some(1), &tracing::Level::DEBUG));
        assert_ne!(a, place("rustls", Some("a.rs"), Some(1), &tracing::Level::WARN));
    }
}
