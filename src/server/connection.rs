//! The life of one downstream connection: a slot, a deadline to earn it, idleness, eviction under
//! pressure and draining on shutdown.
//!
//! Every connection must send its whole first request head (or, for HTTP/2, the preface and the
//! first SETTINGS frame) within `header_read_timeout` of accept. hyper's own header timer starts
//! only after hyper-util has detected the protocol, so a socket that sends nothing or a few bytes
//! would otherwise hold its slot until the idle timeout. After that, a connection is idle when it
//! has no request in flight (a request counts until its response body has been sent): bytes such as
//! HTTP/2 PINGs do not keep it alive.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use super::activity::Activity;
use crate::proxy::Body;
use crate::proxy::websocket::ConnTunnels;

/// What every listener serves: an infallible HTTP service (errors are responses).
pub(super) trait Handler:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<Body>,
        Error = Infallible,
    > + Send
    + 'static
{
}

impl<S> Handler for S where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Send
        + 'static
{
}

/// Per-listener connection settings.
#[derive(Clone)]
pub(super) struct Listener {
    /// How long in-flight requests may finish after shutdown starts.
    pub grace: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A response body the client takes nothing of for this long closes its connection.
    pub send_timeout: Duration,
    /// Time from accept until the first request head (or HTTP/2 preface and SETTINGS), TLS
    /// handshake included.
    pub first_request_timeout: Duration,
    /// Present for the TLS listener; read at each handshake, so a reload can swap it.
    pub tls: Option<crate::tls::ServerTls>,
    /// `tokengate_connections_closed_total{listener,reason}`.
    pub closed: prometheus::IntCounterVec,
    /// The listener label of that metric.
    pub name: &'static str,
    /// Where requests hyper answers on its own (unparsable heads) are logged; none for admin.
    pub access_log: Option<crate::access_log::AccessLog>,
}

/// Shutdown phases sent to connections.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSING: u8 = 2;

/// How often a connection waiting for a slot looks for an idle one to close.
const EVICTION_RETRY: Duration = Duration::from_millis(20);

/// A connection younger than this that has not sent a request yet is not closed for a newcomer:
/// its first request is usually in the socket already and only needs the task to run. Longer
/// would let a flood of silent sockets outpace eviction (nginx, which evicts such connections
/// oldest first, has no grace at all).
const NEWCOMER_GRACE: Duration = Duration::from_millis(50);

/// A listener's connection slots, shared by its worker threads, and the connections holding them.
pub(super) struct Slots {
    max: usize,
    free: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
}

impl Slots {
    pub(super) fn new(max: usize) -> Arc<Self> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Slots {
            max,
            free: Arc::new(Semaphore::new(max)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection. When none is free, the oldest connection with no request in
    /// flight is asked to close first (serve the living), then this waits for a slot.
    async fn take(self: &Arc<Self>) -> Option<Slot> {
        let permit = loop {
            match self.free.clone().try_acquire_owned() {
                Ok(p) => break p,
                Err(tokio::sync::TryAcquireError::Closed) => return None,
                Err(tokio::sync::TryAcquireError::NoPermits) => {}
            }
            self.evict_oldest_idle();
            // Busy connections become idle without telling anyone: look again shortly.
            if let Ok(p) = tokio::time::timeout(EVICTION_RETRY, self.free.clone().acquire_owned()).await {
                break p.ok()?;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, activity.clone());
        }
        Some(Slot { slots: self.clone(), id, activity, _permit: permit })
    }

    fn evict_oldest_idle(&self) {
        let Ok(live) = self.live.lock() else { return };
        let now = Instant::now();
        let oldest = live
            .values()
            .filter(|a| {
                a.in_flight() == 0
                    && !a.evicting.load(Ordering::Relaxed)
                    // A connection that has sent nothing yet may have its request on the way.
                    && (a.earned.load(Ordering::Relaxed) || now.duration_since(a.accepted) >= NEWCOMER_GRACE)
            })
            .min_by_key(|a| a.accepted);
        if let Some(a) = oldest {
            a.evicting.store(true, Ordering::Relaxed);
            a.evict.notify_one();
        }
    }

    /// Waits until every slot is free again (all connections closed), at most `grace`.
    async fn drained(&self, grace: Duration) -> bool {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.free.acquire_many(all)).await.is_ok()
    }
}

/// One connection's hold on a slot; released when the connection task ends.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut live) = self.slots.live.lock() {
            live.remove(&self.id);
        }
    }
}

/// Accepts connections on `listener` and serves each on its own task until shutdown.
pub(super) async fn serve<F, S>(
    listener: TcpListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: watch::Receiver<bool>,
    settings: Listener,
    slots: Arc<Slots>,
    make_service: F,
) where
    F: Fn(crate::proxy::Conn, &ConnTunnels) -> S + Clone + Send + 'static,
    S: Handler,
    S::Future: Send + 'static,
{
    let (phase, _) = watch::channel(RUNNING);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, usually: pause instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The slot is taken after accepting, so a worker with nobody to accept holds none that
        // another worker's client could use. At the limit this connection waits and the loop
        // accepts no more: further clients wait in the kernel's queue.
        let slot = tokio::select! {
            s = slots.take() => match s { Some(s) => s, None => break },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, phase, settings) = (builder.clone(), phase.subscribe(), settings.clone());
        let make_service = make_service.clone();
        let plain =
            crate::proxy::Conn { remote, secure: false, client_cert: false, forward: false, peer: None };
        // Two spawns rather than one task with a branch: a task is as large as its largest state,
        // and a TLS session must not make every plain connection's task larger.
        match settings.tls.clone() {
            None => {
                let service = make_service(plain, &slot.activity.tunnels);
                tokio::spawn(async move {
                    let peer = Peer { remote, alpn: None };
                    drive(&builder, stream, service, &slot.activity, &settings, phase, peer).await;
                    drop(slot);
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                let make_service = make_service.clone();
                tokio::spawn(async move {
                    let activity = slot.activity.clone();
                    let deadline = activity.accepted + settings.first_request_timeout;
                    let handshake = tokio::select! {
                        h = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => h,
                        () = activity.evict.notified() => return settings.count_closed(Some(Closed::Evicted)),
                    };
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return settings.count_closed(Some(Closed::FirstRequestTimeout));
                        }
                    };
                    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let peer = leaf.and_then(|c| crate::caller::PeerCert::from_der(c)).map(Arc::new);
                    let conn =
                        crate::proxy::Conn { client_cert: leaf.is_some(), secure: true, peer, ..plain };
                    // Exactly the protocol ALPN agreed (RFC 9113 sections 3.2 and 3.4), not the
                    // one the first bytes look like; without ALPN, either.
                    let alpn = match tls.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Some(Alpn::H2),
                        Some(b"http/1.1") => Some(Alpn::Http1),
                        _ => None,
                    };
                    let service = make_service(conn, &activity.tunnels);
                    let peer = Peer { remote, alpn };
                    drive(&builder, tls, service, &activity, &settings, phase, peer).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    let _ = phase.send(DRAINING);
    if !slots.drained(settings.grace).await {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
        let _ = phase.send(CLOSING);
    }
}

/// Why tokengate closed a connection itself.
#[derive(Debug, Clone, Copy)]
enum Closed {
    /// No complete first request head (or HTTP/2 preface and SETTINGS) in time.
    FirstRequestTimeout,
    /// A later HTTP/1 request head began but did not complete within `header_read_timeout`.
    HeadTimeout,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// Closed to make room for a new connection while all slots were taken.
    Evicted,
    /// The client took no response data for `send_timeout` (a slow reader holding an upstream
    /// connection).
    SendTimeout,
}

impl Listener {
    fn log_to(&self, remote: SocketAddr) -> Option<super::parse_error::LogTo> {
        let log = self.access_log.clone()?;
        Some(super::parse_error::LogTo { log, client: remote.ip() })
    }

    fn count_closed(&self, reason: Option<Closed>) {
        let Some(reason) = reason else { return };
        let label = match reason {
            Closed::FirstRequestTimeout => "first_request_timeout",
            Closed::HeadTimeout => "header_timeout",
            Closed::Idle => "idle",
            Closed::Evicted => "evicted",
            Closed::SendTimeout => "send_timeout",
        };
        self.closed.with_label_values(&[self.name, label]).inc();
    }
}

/// How long an HTTP/2 connection told to go away (GOAWAY) may take to finish its last streams.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// The protocol a TLS handshake agreed by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpn {
    Http1,
    H2,
}

/// Who is on the other end of a connection.
struct Peer {
    remote: SocketAddr,
    // Bytes of another protocol than this close the connection.
    alpn: Option<Alpn>,
}

/// Serves one connection (plain or after the TLS handshake) and counts why tokengate closed it,
/// if it did.
async fn drive<T, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: T,
    service: S,
    activity: &Arc<Activity>,
    settings: &Listener,
    phase: watch::Receiver<u8>,
    peer: Peer,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Handler,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(FirstFlight::new(
        super::parse_error::ErrorBodies::new(io, activity.clone(), settings.log_to(peer.remote)),
        activity.clone(),
        peer.alpn,
    ));
    let service = Tracked { inner: service, activity: activity.clone() };
    let closed = supervise(builder, io, service, activity, settings, phase.clone(), peer.remote).await;
    settings.count_closed(closed);
    // An HTTP/1 connection that switched protocols ends its HTTP part here and lives on as a
    // tunnel, which keeps the slot.
    tunnels_closed(&activity.tunnels, phase).await;
}

/// Waits until the connection's tunnels have closed, asking them to when the listener drains;
/// at the end of the shutdown grace they are left behind.
async fn tunnels_closed(tunnels: &ConnTunnels, mut phase: watch::Receiver<u8>) {
    loop {
        if *phase.borrow_and_update() >= DRAINING {
            tunnels.drain();
        }
        tokio::select! {
            () = tunnels.closed() => return,
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == CLOSING {
                    return;
                }
            }
        }
    }
}

/// Serves one connection until it ends, misses its first-request deadline, goes idle, is
/// evicted, stops taking response data, or shutdown closes it. Returns why tokengate closed it,
/// if it did.
async fn supervise<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: Tracked<S>,
    activity: &Activity,
    settings: &Listener,
    mut phase: watch::Receiver<u8>,
    remote: SocketAddr,
) -> Option<Closed>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Handler,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let first_deadline = activity.accepted + settings.first_request_timeout;
    // How often the watchdog looks. A deadline that starts between two looks (a request ended,
    // a head began) is seen at the next one, well before it is due, and then met exactly;
    // waking on every request instead would cost a task wake-up per request.
    let shortest = settings.send_timeout.min(settings.idle_timeout).min(settings.first_request_timeout);
    let check_every = (shortest / 4).max(Duration::from_millis(50));
    // Since when a response body has had data ready that the client did not take.
    let mut stalled: Option<(Instant, u64)> = None;
    let mut draining = false;
    // Set once tokengate has asked the connection to close (idle or evicted): it gets a short
    // grace to finish what is in flight and is then dropped.
    let mut closing: Option<(Closed, Instant)> = None;
    loop {
        if !draining && *phase.borrow() >= DRAINING {
            draining = true;
            conn.as_mut().graceful_shutdown();
            activity.tunnels.drain();
        }
        let earned = activity.earned.load(Ordering::Relaxed);
        let idle_at = activity.idle_since().map(|since| since + settings.idle_timeout);
        let head_at = activity.head_since().map(|since| since + settings.first_request_timeout);
        let wake_at = match closing {
            Some((_, until)) => until,
            // Looking again before the deadline too: once the head has come, the other checks
            // must not wait for it.
            None if !earned => first_deadline.min(Instant::now() + check_every),
            None => [idle_at, head_at].into_iter().flatten().fold(Instant::now() + check_every, Instant::min),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return closing.map(|(why, _)| why);
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == CLOSING {
                    return None;
                }
            }
            () = activity.evict.notified(), if closing.is_none() => {
                tracing::debug!(%remote, "closing an idle connection to make room for a new one");
                if !earned {
                    return Some(Closed::Evicted);
                }
                conn.as_mut().graceful_shutdown();
                closing = Some((Closed::Evicted, Instant::now() + GOAWAY_GRACE));
            }
            () = tokio::time::sleep_until(wake_at) => {
                if let Some((why, _)) = closing {
                    return Some(why);
                }
                let now = Instant::now();
                if !earned {
                    if activity.earned.load(Ordering::Relaxed) || now < first_deadline {
                        continue;
                    }
                    tracing::debug!(%remote, "no complete request head within header_read_timeout; closing");
                    return Some(Closed::FirstRequestTimeout);
                }
                if activity.head_since().is_some_and(|since| now >= since + settings.first_request_timeout) {
                    tracing::debug!(%remote, "a request head began but did not complete within header_read_timeout; closing");
                    return Some(Closed::HeadTimeout);
                }
                let taken = activity.taken.load(Ordering::Relaxed);
                if activity.undelivered.load(Ordering::Relaxed) == 0 {
                    stalled = None;
                } else {
                    match stalled {
                        Some((since, seen)) if seen == taken => {
                            if since.elapsed() >= settings.send_timeout {
                                tracing::debug!(%remote, "the client takes no response data; closing");
                                return Some(Closed::SendTimeout);
                            }
                        }
                        _ => stalled = Some((Instant::now(), taken)),
                    }
                }
                if activity.idle_since().is_some_and(|since| now >= since + settings.idle_timeout) {
                    // HTTP/1: closes now; HTTP/2: GOAWAY, then close once no stream is open.
                    tracing::debug!(%remote, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some((Closed::Idle, Instant::now() + GOAWAY_GRACE));
                }
            }
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Preface plus a frame header.
const H2_FIRST_FRAME_AT: usize = 24;
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;

/// The downstream socket, watching the first bytes: an HTTP/2 client earns its slot with the
/// preface and a complete first SETTINGS frame. (An HTTP/1 client earns it when hyper hands over
/// the first request head, see [`Tracked`].) After that, reads pass straight through.
struct FirstFlight<T> {
    inner: T,
    activity: Arc<Activity>,
    watching: bool,
    // The first preface + frame header bytes, and how many of them arrived.
    head: [u8; H2_FIRST_FRAME_AT + FRAME_HEADER],
    len: usize,
    // Bytes read so far, while watching.
    seen: usize,
    // The protocol ALPN agreed. hyper-util's upgradeable connections (needed for WebSocket)
    // choose the protocol by the first bytes whatever the builder says, so the choice is
    // enforced here: other bytes end the connection before hyper sees them.
    alpn: Option<Alpn>,
}

impl<T> FirstFlight<T> {
    fn new(inner: T, activity: Arc<Activity>, alpn: Option<Alpn>) -> Self {
        FirstFlight {
            inner,
            activity,
            watching: true,
            head: [0; H2_FIRST_FRAME_AT + FRAME_HEADER],
            len: 0,
            seen: 0,
            alpn,
        }
    }

    /// The first bytes are not the protocol ALPN agreed.
    fn off_protocol(&self) -> bool {
        match self.alpn {
            None => false,
            Some(Alpn::H2) => self.activity.http1.load(Ordering::Relaxed),
            Some(Alpn::Http1) => {
                self.len >= H2_PREFACE.len() && self.head[..H2_PREFACE.len()] == H2_PREFACE[..]
            }
        }
    }

    fn watch(&mut self, data: &[u8]) {
        let take = data.len().min(self.head.len() - self.len);
        self.head[self.len..self.len + take].copy_from_slice(&data[..take]);
        self.len += take;
        self.seen += data.len();
        let n = self.len.min(H2_PREFACE.len());
        if self.head[..n] != H2_PREFACE[..n] {
            // Not HTTP/2 with prior knowledge: HTTP/1 earns its slot with a request head.
            self.watching = false;
            self.activity.http1.store(true, Ordering::Relaxed);
            return;
        }
        if self.len < self.head.len() {
            return;
        }
        let frame = &self.head[H2_FIRST_FRAME_AT..];
        let length = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
        if frame[3] != SETTINGS {
            // hyper answers a protocol error; nothing is earned.
            self.watching = false;
        } else if self.seen >= H2_FIRST_FRAME_AT + FRAME_HEADER + length {
            self.activity.earned.store(true, Ordering::Relaxed);
            self.watching = false;
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstFlight<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let this = &mut *self;
            if this.watching {
                this.watch(&buf.filled()[before..]);
                if this.off_protocol() {
                    buf.set_filled(before);
                    let e =
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "not the protocol ALPN agreed");
                    return Poll::Ready(Err(e));
                }
            }
            if !this.watching {
                this.activity.bytes_read();
            }
        }
        poll
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstFlight<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A service that counts its requests as in flight from the request head until the response
/// body has been sent (or dropped).
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R, Response = http::Response<Body>>,
{
    type Response = http::Response<TrackedBody>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.activity.start_request();
        TrackedFuture { inner: self.inner.call(req), activity: Some(self.activity.clone()) }
    }
}

pin_project_lite::pin_project! {
    /// The service future; hands the in-flight count on to the response body.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        activity: Option<Arc<Activity>>,
    }

    impl<F> PinnedDrop for TrackedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(a) = this.project().activity.take() {
                a.end_request();
            }
        }
    }
}

impl<F, E> std::future::Future for TrackedFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<TrackedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let activity = this.activity.take();
        Poll::Ready(out.map(|resp| resp.map(|inner| TrackedBody { inner, activity, undelivered: false })))
    }
}

/// A response body that ends its request's in-flight count when it is done or dropped, and
/// tells the watchdog whether the client takes the data it produces.
pub(super) struct TrackedBody {
    inner: Body,
    activity: Option<Arc<Activity>>,
    // Produced data that hyper has not yet asked to follow with more.
    undelivered: bool,
}

impl TrackedBody {
    fn finish(&mut self) {
        if let Some(a) = self.activity.take() {
            if self.undelivered {
                a.undelivered.fetch_sub(1, Ordering::Relaxed);
            }
            a.end_request();
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(a) = &this.activity {
            // hyper asks for more only once the client has room for it.
            a.taken.fetch_add(1, Ordering::Relaxed);
            if this.undelivered {
                this.undelivered = false;
                a.undelivered.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Ready(Some(Ok(_))) => {
                if let Some(a) = &this.activity {
                    this.undelivered = true;
                    a.undelivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
