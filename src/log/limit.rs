//! Rate limits for the log lines that requests cause: a denied client, an unreachable upstream, an
//! upstream that rejects every token. Any client or upstream can repeat those as fast as the
//! network allows. Unlimited, a flood of denied requests or an upstream outage turns the operator
//! log into a second access log and crowds out every other line. Metrics still count every event.
//!
//! Hand-written rather than taken from `tracing-throttle`, which keys events by their field
//! values: those include the client's address, which the client chooses.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per this period from one [`LogLimit`].
pub const PERIOD: Duration = Duration::from_secs(1);

/// Admits one event per [`PERIOD`] (or the period it was made with) and counts the others, for
/// one kind of event in one place (one route, one provider), so one route's outage cannot hide
/// another route's. Also the gate for anything else done at most once a period.
#[derive(Debug)]
pub struct LogLimit {
    /// Milliseconds since [`epoch`] before which events are held back.
    next_ms: AtomicU64,
    held: AtomicU64,
    period_ms: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    /// A limit that admits the next event; `const`, for a `static` one.
    pub const fn new() -> Self {
        Self::every(PERIOD)
    }

    /// A limit of one event per `period`.
    pub const fn every(period: Duration) -> Self {
        let period_ms = period.as_millis();
        let period_ms = if period_ms > u64::MAX as u128 { u64::MAX } else { period_ms as u64 };
        LogLimit { next_ms: AtomicU64::new(0), held: AtomicU64::new(0), period_ms }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held back since the
    /// last one that was; `None` when it is held back.
    pub fn admit(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.admit_at(now)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let period = self.period_ms;
        // Of events racing on several workers, one wins the slot.
        if now_ms < next
            || self
                .next_ms
                .compare_exchange(next, now_ms.saturating_add(period), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// The process's own clock origin; the limits only compare times with each other.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_period_and_the_next_counts_the_rest() {
        let limit = LogLimit::default();
        assert_eq!(limit.admit_at(5), Some(0), "the first event is logged at once");
        for t in 6..1005 {
            assert_eq!(limit.admit_at(t), None, "at {t} ms");
        }
        assert_eq!(limit.admit_at(1005), Some(999));
        assert_eq!(limit.admit_at(1006), None);
        // After a quiet spell, the next event is logged at once.
        assert_eq!(limit.admit_at(60_000), Some(1));
        assert_eq!(limit.admit_at(60_001), None);
    }

    #[test]
    fn limits_are_independent() {
        let (a, b) = (LogLimit::default(), LogLimit::default());
        assert_eq!(a.admit_at(10), Some(0));
        assert_eq!(a.admit_at(11), None);
        assert_eq!(b.admit_at(12), Some(0));
    }

    #[test]
    fn racing_workers_log_one_line() {
        let limit = std::sync::Arc::new(LogLimit::default());
        let admitted: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let limit = limit.clone();
                    s.spawn(move || (0..1000).filter(|_| limit.admit_at(100).is_some()).count() as u64)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(admitted, 1);
        assert_eq!(limit.admit_at(2000), Some(3999));
    }
}
