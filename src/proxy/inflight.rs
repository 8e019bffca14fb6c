//! How many requests tokengate works on at once, across all listeners and workers.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests being worked on at once, across all listeners and workers.
pub struct InFlight {
    now: AtomicUsize,
}

impl InFlight {
    /// No request in flight.
    pub fn new() -> Self {
        InFlight { now: AtomicUsize::new(0) }
    }

    /// A place for one more request, or `None` at `max`.
    pub fn enter(&self, max: usize) -> Option<InFlightGuard<'_>> {
        let before = self.now.fetch_add(1, Ordering::Relaxed);
        let guard = InFlightGuard(self);
        (before < max).then_some(guard)
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a place in [`InFlight`] until dropped.
pub struct InFlightGuard<'a>(&'a InFlight);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}
