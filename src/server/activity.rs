//! What the watchdog and the slot registry know about one downstream connection: requests in
//! flight, idleness, the request head being read, eviction and tunnels.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::proxy::websocket::ConnTunnels;

/// What the watchdog and the slot registry know about one connection.
pub(super) struct Activity {
    /// When it was accepted; eviction picks the oldest idle connection.
    pub(super) accepted: Instant,
    /// Requests whose response body has not been sent completely.
    pub(super) active: AtomicUsize,
    /// When a request last started or finished, in nanoseconds since `accepted`: with none in
    /// flight, the connection has been idle since then.
    pub(super) last_change: AtomicU64,
    /// HTTP/1: when the first byte of a request head came with no request in flight, in
    /// nanoseconds since `accepted` plus one; 0 while none is coming.
    pub(super) head_started: AtomicU64,
    /// The connection speaks HTTP/1 (its first bytes were not the HTTP/2 preface).
    pub(super) http1: AtomicBool,
    /// Response bodies that produced data hyper has not yet asked them to follow with more:
    /// their client is not taking what was sent (socket full, or HTTP/2 window closed).
    pub(super) undelivered: AtomicUsize,
    /// Times hyper asked a response body for more data; progress for the send timeout.
    pub(super) taken: AtomicU64,
    /// The first request head (or HTTP/2 preface and SETTINGS frame) has arrived.
    pub(super) earned: AtomicBool,
    /// Set when eviction picked this connection.
    pub(super) evicting: AtomicBool,
    pub(super) evict: Notify,
    /// Upgraded requests (WebSocket) relaying: in flight until they close, and the connection
    /// keeps its slot until then.
    pub(super) tunnels: ConnTunnels,
}

impl Activity {
    /// Requests whose response has not been sent completely, and open tunnels.
    pub(super) fn in_flight(&self) -> usize {
        self.active.load(Ordering::Relaxed) + self.tunnels.open()
    }

    pub(super) fn new() -> Self {
        Activity {
            accepted: Instant::now(),
            active: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            http1: AtomicBool::new(false),
            undelivered: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            earned: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
            tunnels: ConnTunnels::default(),
        }
    }

    pub(super) fn start_request(&self) {
        self.earned.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.last_change.store(self.nanos(), Ordering::Relaxed);
    }

    pub(super) fn end_request(&self) {
        self.last_change.store(self.nanos(), Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn nanos(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Since when the connection has had no request in flight; `None` while one is.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight() != 0 {
            return None;
        }
        let request = self.accepted + Duration::from_nanos(self.last_change.load(Ordering::Relaxed));
        Some(self.tunnels.last_end().map_or(request, |tunnel| tunnel.max(request)))
    }

    /// HTTP/1 bytes arrived: with no request in flight they begin a request head, whose
    /// `header_read_timeout` starts now (the wait for it was `idle_timeout`'s).
    pub(super) fn bytes_read(&self) {
        if self.http1.load(Ordering::Relaxed)
            && self.in_flight() == 0
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.nanos().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Since when a request head has been arriving, if one is.
    pub(super) fn head_since(&self) -> Option<Instant> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.accepted + Duration::from_nanos(n - 1)),
        }
    }
}
