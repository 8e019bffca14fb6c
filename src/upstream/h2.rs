//! HTTP/2 connections to an upstream that chose `h2` by ALPN, held per worker thread.
//!
//! Each worker keeps its own connections, driven by its own event loop, so a second worker adds
//! a second connection's TLS and framing instead of queueing behind the first. A connection
//! carries as many requests at once as the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` allows;
//! past that another one is opened (each holds one of the upstream's connection slots).
//!
//! This speaks the `h2` crate directly rather than through hyper's client: the task serving the
//! downstream request opens the stream and awaits the response itself, where hyper would pass
//! the request through a channel to a dispatcher and spawn a task per request to wait for the
//! answer (about a tenth of the CPU per request at 100 B).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};

use super::Body;
use super::h1::{self, Conn, SHARDS};

/// One worker's connections to the upstream.
#[derive(Default)]
struct Shard {
    live: Mutex<Vec<Live>>,
    // The connection being opened, which other requests of this worker wait for rather than
    // each opening their own (a burst after a GOAWAY would otherwise be a burst of handshakes).
    opening: Mutex<Option<Opening>>,
}

/// How the opening of a connection ended: `None` while under way.
type Opening = tokio::sync::watch::Receiver<Option<Result<(), Arc<str>>>>;

/// Whose turn it is to open a connection.
pub enum Turn {
    /// Another request of this worker is opening one: wait for it.
    Wait(Opening),
    /// This request opens it, and reports how that went.
    Open(Opener),
}

/// The duty to report on a connection being opened; dropped unreported (the request was
/// cancelled), it lets the waiting requests open their own.
pub struct Opener(tokio::sync::watch::Sender<Option<Result<(), Arc<str>>>>);

impl Opener {
    /// Tells the waiting requests how it went (the error as text: they report it as their own).
    pub fn done(self, outcome: Result<(), String>) {
        self.0.send_replace(Some(outcome.map_err(Arc::from)));
    }
}

/// Waits for the connection another request is opening: `None` if that request went away.
pub async fn opened(mut opening: Opening) -> Option<Result<(), Arc<str>>> {
    opening.wait_for(Option::is_some).await.ok().and_then(|v| v.clone())
}

/// The HTTP/2 connections of one upstream, per worker thread.
pub struct Connections {
    shards: Box<[Shard]>,
    builder: h2::client::Builder,
    idle_timeout: Duration,
    // The origin of the idle clocks.
    epoch: Instant,
}

struct Live {
    send: h2::client::SendRequest<Bytes>,
    use_: Arc<Use>,
}

/// How busy a connection is, shared by its leases.
struct Use {
    // Requests sent whose response body is not yet read to the end.
    streams: AtomicUsize,
    // When `streams` last fell to zero, in milliseconds since the epoch.
    idle_since: AtomicU64,
    // Set by the connection's task when it ends.
    closed: AtomicBool,
    // Dropped with the last handle: that ends the connection's task (h2 alone would keep a
    // connection nobody can use open).
    _close: tokio::sync::oneshot::Sender<()>,
}

impl Use {
    /// Milliseconds until the connection has been idle for `limit` (0 once it has), at `now`
    /// (milliseconds since the epoch); `None` while a stream is open.
    fn idle_left(&self, now: u64, limit: u64) -> Option<u64> {
        if self.streams.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(limit.saturating_sub(now.saturating_sub(self.idle_since.load(Ordering::Relaxed))))
    }
}

/// One stream's claim on a connection, held until its response body ends or is dropped.
pub struct Lease {
    send: h2::client::SendRequest<Bytes>,
    use_: Arc<Use>,
    epoch: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.use_.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.use_.idle_since.store(millis(self.epoch), Ordering::Relaxed);
        }
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Live {
    fn lease(&self, epoch: Instant) -> Lease {
        self.use_.streams.fetch_add(1, Ordering::Relaxed);
        Lease { send: self.send.clone(), use_: self.use_.clone(), epoch }
    }

    fn has_room(&self) -> bool {
        // The peer's limit as it stands; until its SETTINGS arrive, h2 assumes no limit.
        let limit = self.send.current_max_send_streams().max(1);
        self.use_.streams.load(Ordering::Relaxed) < limit
    }

    /// Still worth keeping at `now` (milliseconds since the epoch).
    fn keep(&self, now: u64, idle_timeout: u64) -> bool {
        !self.use_.closed.load(Ordering::Relaxed) && self.use_.idle_left(now, idle_timeout) != Some(0)
    }
}

/// Why a request on an HTTP/2 connection failed.
pub enum Failure {
    /// The connection was gone before the request was written: it can go on another as it is.
    Unsent(Box<Request<Body>>, h2::Error),
    /// The request may have reached the upstream.
    Failed(h2::Error),
}

impl Connections {
    /// Connections closed after `idle_timeout` without a request, with response heads bounded
    /// by `max_head` bytes.
    pub fn new(idle_timeout: Duration, max_head: usize) -> Self {
        let mut builder = h2::client::Builder::new();
        builder
            .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
            .enable_push(false)
            // hyper's client windows: a large response is not held to 64 KiB per round trip.
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .max_send_buffer_size(1024 * 1024);
        Connections {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            builder,
            idle_timeout,
            epoch: Instant::now(),
        }
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.shards[h1::worker() % SHARDS].live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this request opens the worker's next connection or waits for the one under way.
    pub fn turn(&self) -> Turn {
        let shard = &self.shards[h1::worker() % SHARDS];
        let mut opening = shard.opening.lock().unwrap_or_else(PoisonError::into_inner);
        // Under way: nothing reported yet, and the opener still there.
        if let Some(o) = opening.as_ref().filter(|o| o.borrow().is_none() && o.has_changed().is_ok()) {
            return Turn::Wait(o.clone());
        }
        let (report, watch) = tokio::sync::watch::channel(None);
        *opening = Some(watch);
        Turn::Open(Opener(report))
    }

    /// A stream on one of this worker's connections with room for it. Closed connections, and
    /// those idle for the idle timeout, are let go (the upstream sees them close).
    pub fn lease(&self) -> Option<Lease> {
        let (now, limit) = (millis(self.epoch), self.idle_limit());
        let mut live = self.shard();
        live.retain(|l| l.keep(now, limit));
        live.iter().find(|l| l.has_room()).map(|l| l.lease(self.epoch))
    }

    fn idle_limit(&self) -> u64 {
        u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts HTTP/2 on `io` (TLS that negotiated `h2`) and keeps the connection for this worker.
    pub async fn adopt(&self, io: Conn) -> Result<Lease, h2::Error> {
        let (send, connection) = self.builder.handshake::<_, Bytes>(io).await?;
        let (close, closing) = tokio::sync::oneshot::channel();
        let use_ = Arc::new(Use {
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(millis(self.epoch)),
            closed: AtomicBool::new(false),
            _close: close,
        });
        let ended = Arc::downgrade(&use_);
        let (epoch, limit) = (self.epoch, self.idle_limit());
        // Spawned on this worker's runtime; it ends when the upstream closes the connection,
        // when the last handle to it is dropped, or when it has been idle for the idle timeout
        // (checked here too, so a connection is let go even if no request comes to notice).
        tokio::spawn(async move {
            tokio::pin!(connection);
            let mut closing = closing;
            loop {
                // Woken when the connection would have been idle long enough; while streams
                // are open, a limit later (at least 100 ms, so a zero limit does not spin).
                let left = match ended.upgrade().map(|u| u.idle_left(millis(epoch), limit)) {
                    Some(Some(0)) | None => break,
                    Some(Some(left)) => left,
                    Some(None) => limit.max(100),
                };
                let check = tokio::time::sleep(Duration::from_millis(left));
                tokio::select! {
                    done = &mut connection => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                        break;
                    }
                    _ = &mut closing => break,
                    () = check => {}
                }
            }
            if let Some(u) = ended.upgrade() {
                u.closed.store(true, Ordering::Relaxed);
            }
        });
        let live = Live { send, use_ };
        let lease = live.lease(self.epoch);
        let mut shard = self.shard();
        // Requests that raced to open the first connection each bring one: keep one with room
        // and let the rest close once their request is done.
        if !shard.iter().any(Live::has_room) {
            shard.push(live);
        }
        Ok(lease)
    }
}

impl Lease {
    /// Sends `req` (absolute URI: `:scheme` and `:authority` come from it) on this stream.
    pub async fn send(self, req: Request<Body>) -> Result<Response<Body>, Failure> {
        // Waits while the connection is at its stream limit; fails when it is gone, with the
        // request untouched.
        let mut send = match self.send.clone().ready().await {
            Ok(send) => send,
            Err(e) => return Err(Failure::Unsent(Box::new(req), e)),
        };
        // Connection-specific fields, which RFC 9113 section 8.2.2 forbids (h2 refuses a request
        // carrying them), are hop-by-hop headers: `headers::rewrite_request` removed them and
        // left `TE` only as `trailers`; configured route headers cannot name them.
        // `X-Request-Id` arrives marked sensitive (never indexed: it is unique per request).
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (response, stream) =
            send.send_request(Request::from_parts(head, ()), eos).map_err(Failure::Failed)?;
        if !eos {
            match body {
                Body::Full(Some(bytes)) => {
                    let mut stream = stream;
                    // Held in memory already (at most the replay buffer): h2 queues it against
                    // the flow-control window.
                    stream.send_data(bytes, true).map_err(Failure::Failed)?;
                }
                other => {
                    tokio::spawn(pipe(other, stream));
                }
            }
        }
        let resp = response.await.map_err(Failure::Failed)?;
        let (mut parts, recv) = resp.into_parts();
        super::hop::rewrite_response(&mut parts.headers);
        let body = if recv.is_end_stream() {
            Body::Empty
        } else {
            let remaining = content_length(&parts.headers);
            Body::Http2(Streaming { recv, remaining, _lease: self })
        };
        Ok(Response::from_parts(parts, body))
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Streams a request body onto its HTTP/2 stream as the upstream's window allows. A body that
/// fails (too large, too slow, malformed) resets the stream, which fails the response.
async fn pipe(mut body: Body, mut stream: h2::SendStream<Bytes>) {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
            let Some(Ok(n)) = granted else { return };
            if stream.send_data(data.split_to(n.min(data.len())), false).is_err() {
                return;
            }
        }
    }
}

/// A response body read from an HTTP/2 stream; the stream counts against its connection until
/// this is read to the end or dropped.
pub struct Streaming {
    recv: h2::RecvStream,
    // Bytes still to come by `Content-Length` (h2 checks the data against it).
    remaining: Option<u64>,
    _lease: Lease,
}

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match ready!(this.recv.poll_data(cx)) {
            Some(Ok(data)) => {
                // The window opens again as the downstream takes the data, so a slow client
                // holds at most a window's worth here.
                let _ = this.recv.flow_control().release_capacity(data.len());
                if let Some(r) = &mut this.remaining {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => match ready!(this.recv.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
