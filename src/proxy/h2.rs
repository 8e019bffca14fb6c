//! HTTP/2 connections to an upstream that chose `h2` by ALPN, held per worker thread.
//!
//! Each worker keeps its own connections, driven by its own event loop, so a second worker adds
//! a second connection's TLS and framing instead of queueing behind the first. A connection
//! carries as many requests at once as the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` allows;
//! past that another one is opened (each holds one of the upstream's connection slots).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Body;
use super::h1::{self, Conn, SHARDS};

/// One worker's live connections to the upstream.
type Shard = Mutex<Vec<Live>>;

/// The HTTP/2 connections of one upstream, per worker thread.
pub struct Connections {
    shards: Box<[Shard]>,
    builder: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    // The origin of the idle clocks.
    epoch: Instant,
}

struct Live {
    send: SendRequest<Body>,
    use_: Arc<Use>,
}

/// How busy a connection is.
struct Use {
    // Requests sent whose response body is not yet read to the end.
    streams: AtomicUsize,
    // When `streams` last fell to zero, in milliseconds since the epoch.
    idle_since: AtomicU64,
    // Asked for the peer's SETTINGS_MAX_CONCURRENT_STREAMS as it stands now; also polled by
    // the connection's task (on the same worker, so the lock is never contended).
    // Dropped once it ends, which is what closes the request channel.
    connection: Mutex<Option<Pin<Box<Connection>>>>,
}

type Connection = http2::Connection<TokioIo<Conn>, Body, TokioExecutor>;

/// One stream's claim on a connection, held until its response body ends or is dropped.
pub struct Lease {
    send: SendRequest<Body>,
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

impl Use {
    fn max_streams(&self) -> usize {
        let connection = self.connection.lock().unwrap_or_else(PoisonError::into_inner);
        connection.as_ref().map_or(0, |c| c.current_max_send_streams())
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
        let limit = self.use_.max_streams();
        self.use_.streams.load(Ordering::Relaxed) < limit
    }

    /// Still worth keeping at `now` (milliseconds since the epoch).
    fn keep(&self, now: u64, idle_timeout: u64) -> bool {
        !self.send.is_closed()
            && (self.use_.streams.load(Ordering::Relaxed) > 0
                || now.saturating_sub(self.use_.idle_since.load(Ordering::Relaxed)) < idle_timeout)
    }
}

/// Why a request on an HTTP/2 connection failed.
pub enum Failure {
    /// The connection was gone before the request was written: it can go on another as it is.
    Unsent(Box<Request<Body>>, hyper::Error),
    /// The request may have reached the upstream.
    Failed(hyper::Error),
}

impl Connections {
    /// Connections closed after `idle_timeout` without a request, with response heads bounded
    /// by `max_head` bytes.
    pub fn new(idle_timeout: Duration, max_head: usize) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
            // A connection that stops answering is found and closed while requests wait on it.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        Connections {
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            builder,
            idle_timeout,
            epoch: Instant::now(),
        }
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.shards[h1::worker() % SHARDS].lock().unwrap_or_else(PoisonError::into_inner)
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
    pub async fn adopt(&self, io: Conn) -> Result<Lease, hyper::Error> {
        let (send, connection) = self.builder.handshake(TokioIo::new(io)).await?;
        let use_ = Arc::new(Use {
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            connection: Mutex::new(Some(Box::pin(connection))),
        });
        let driven = use_.clone();
        // Spawned on this worker's runtime; it ends when the upstream closes the connection or
        // when every handle to it is dropped and its streams are done.
        tokio::spawn(async move {
            let ended = std::future::poll_fn(|cx| {
                let mut slot = driven.connection.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(connection) = slot.as_mut() else { return Poll::Ready(Ok(())) };
                let polled = connection.as_mut().poll(cx);
                if polled.is_ready() {
                    *slot = None;
                }
                polled
            });
            if let Err(e) = ended.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
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

    /// Idle and busy connections kept for this thread.
    pub fn connections(&self) -> usize {
        self.shard().iter().filter(|l| !l.send.is_closed()).count()
    }
}

impl Lease {
    /// Sends `req` (absolute URI: `:scheme` and `:authority` come from it) on this stream.
    pub async fn send(mut self, req: Request<Body>) -> Result<Response<Body>, Failure> {
        match self.send.try_send_request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                super::headers::rewrite_response(&mut parts.headers);
                Ok(Response::from_parts(parts, Body::Http2(Streaming { body, _lease: self })))
            }
            Err(mut e) => match e.take_message() {
                Some(req) => Err(Failure::Unsent(Box::new(req), e.into_error())),
                None => Err(Failure::Failed(e.into_error())),
            },
        }
    }
}

/// A response body read from an HTTP/2 stream; the stream counts against its connection until
/// this is read to the end or dropped.
pub struct Streaming {
    body: Incoming,
    _lease: Lease,
}

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx).map_err(|e| Box::new(e) as super::BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
