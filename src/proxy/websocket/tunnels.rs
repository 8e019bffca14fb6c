//! The tunnels open on one downstream connection. The connection counts them as requests in
//! flight (it is never idle, nor evicted, while one is open), keeps its slot until they have
//! closed, and tells them when the listener drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};
use tokio::time::{Duration, Instant};

/// One connection's tunnels; cloned into each request's handler.
#[derive(Clone)]
pub struct ConnTunnels(Arc<Shared>);

struct Shared {
    open: AtomicUsize,
    ended: Notify,
    drain: watch::Sender<bool>,
    epoch: Instant,
    // When the last tunnel closed, in nanoseconds since `epoch` plus one; 0 before any did.
    last_end: AtomicU64,
}

impl Default for ConnTunnels {
    fn default() -> Self {
        ConnTunnels(Arc::new(Shared {
            open: AtomicUsize::new(0),
            ended: Notify::new(),
            drain: watch::Sender::new(false),
            epoch: Instant::now(),
            last_end: AtomicU64::new(0),
        }))
    }
}

impl ConnTunnels {
    /// Counts a tunnel as open until the hold is dropped.
    pub fn hold(&self) -> Hold {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        Hold(self.clone())
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// When the last tunnel closed, if one did.
    pub fn last_end(&self) -> Option<Instant> {
        match self.0.last_end.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.0.epoch + Duration::from_nanos(n - 1)),
        }
    }

    /// Asks every tunnel of the connection to close (the listener is draining).
    pub fn drain(&self) {
        self.0.drain.send_replace(true);
    }

    /// Becomes true when the connection drains.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.0.drain.subscribe()
    }

    /// Waits until no tunnel is open.
    pub async fn closed(&self) {
        loop {
            let ended = std::pin::pin!(self.0.ended.notified());
            let mut ended = ended;
            // Registered before the count is read, so an end in between is not missed.
            ended.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// An open tunnel's place in its connection's count.
pub struct Hold(ConnTunnels);

impl Hold {
    /// Becomes true when the connection drains.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.0.draining()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let shared = &self.0.0;
        let since = u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        shared.last_end.store(since + 1, Ordering::Relaxed);
        shared.open.fetch_sub(1, Ordering::Relaxed);
        shared.ended.notify_waiters();
    }
}
