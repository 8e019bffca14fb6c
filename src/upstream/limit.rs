//! Bounded fan-out: how many connections tokengate opens to one upstream.
//!
//! Without a bound, one HTTP/2 client connection with 100 streams opens 100 upstream
//! connections, and a few such clients exhaust the process's file descriptors for everyone. Each
//! upstream `host:port` gets a fixed number of connection slots, shared by the lean HTTP/1.1
//! client and the hyper client (through [`Limited`], a connector wrapper). A request that finds
//! no free slot waits up to `upstream_queue_timeout` for one (an idle pooled connection is reused
//! meanwhile if one frees up), then gets `503 upstream_busy`. Idle pooled connections hold slots
//! too: a request that finds none free first closes an idle one (another worker's, say), so idle
//! connections never starve a busy thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Every connection slot of an upstream stayed taken for the whole queue timeout.
#[derive(Debug, thiserror::Error)]
#[error("all {max} connections to {upstream} are in use")]
pub struct Busy {
    /// `host:port`.
    pub upstream: String,
    /// The limit.
    pub max: usize,
}

/// Connection slots per upstream `host:port`.
pub struct UpstreamSlots {
    max: usize,
    wait: Duration,
    by_upstream: Mutex<HashMap<String, Arc<Upstream>>>,
}

/// A pool that keeps idle connections to an upstream and can close one to free its slot.
pub trait IdleConnections: Send + Sync {
    /// Closes one idle connection (the oldest); false when there is none.
    fn close_one(&self) -> bool;
}

/// One upstream's slots and the pools whose idle connections hold some of them.
struct Upstream {
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<std::sync::Weak<dyn IdleConnections>>>,
}

/// How long a request waiting for a slot sleeps before it looks for an idle connection again.
const SLOT_RETRY: Duration = Duration::from_millis(10);

impl UpstreamSlots {
    /// `max` connections per upstream; a request waits up to `wait` for one.
    pub fn new(max: usize, wait: Duration) -> Arc<Self> {
        Arc::new(UpstreamSlots {
            max: max.clamp(1, Semaphore::MAX_PERMITS),
            wait,
            by_upstream: Mutex::new(HashMap::new()),
        })
    }

    /// The slots of `host:port` (lower-case).
    pub fn of(self: &Arc<Self>, upstream: &str) -> UpstreamLimit {
        let mut map = self.by_upstream.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map
            .entry(upstream.to_owned())
            .or_insert_with(|| {
                Arc::new(Upstream { slots: Arc::new(Semaphore::new(self.max)), idle: Mutex::new(Vec::new()) })
            })
            .clone();
        UpstreamLimit { upstream: upstream.to_owned(), entry, max: self.max, wait: self.wait }
    }

    fn of_uri(self: &Arc<Self>, uri: &Uri) -> UpstreamLimit {
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let host = uri.host().unwrap_or("").to_ascii_lowercase();
        self.of(&format!("{host}:{port}"))
    }
}

/// One upstream's connection slots.
#[derive(Clone)]
pub struct UpstreamLimit {
    upstream: String,
    entry: Arc<Upstream>,
    max: usize,
    wait: Duration,
}

impl UpstreamLimit {
    /// Lets waiting requests close `pool`'s idle connections to this upstream.
    pub fn register_idle(&self, pool: std::sync::Weak<dyn IdleConnections>) {
        self.entry.idle.lock().unwrap_or_else(PoisonError::into_inner).push(pool);
    }

    /// A slot for one new connection, held until the connection is dropped. When none is free,
    /// an idle connection is closed for it; else it waits up to the queue timeout.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Busy> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            if let Ok(p) = self.entry.slots.clone().try_acquire_owned() {
                return Ok(p);
            }
            if self.close_an_idle_one() {
                continue;
            }
            let step = deadline.saturating_duration_since(tokio::time::Instant::now()).min(SLOT_RETRY);
            if step.is_zero() {
                return Err(Busy { upstream: self.upstream.clone(), max: self.max });
            }
            if let Ok(Ok(p)) = tokio::time::timeout(step, self.entry.slots.clone().acquire_owned()).await {
                return Ok(p);
            }
        }
    }

    fn close_an_idle_one(&self) -> bool {
        let pools: Vec<_> = self.entry.idle.lock().unwrap_or_else(PoisonError::into_inner).clone();
        pools.iter().filter_map(std::sync::Weak::upgrade).any(|p| p.close_one())
    }
}

/// True when `error` (or what caused it) is a [`Busy`].
pub fn is_busy(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(error);
    while let Some(err) = e {
        if err.is::<Busy>() {
            return true;
        }
        e = err.source();
    }
    false
}

/// A connector that takes an upstream slot before connecting; the connection holds it.
#[derive(Clone)]
pub struct Limited<C> {
    inner: C,
    slots: Arc<UpstreamSlots>,
}

impl<C> Limited<C> {
    /// Wraps `inner`.
    pub fn new(inner: C, slots: Arc<UpstreamSlots>) -> Self {
        Limited { inner, slots }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<Uri> for Limited<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Permitted<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let limit = self.slots.of_uri(&uri);
        // The clone is ready only if polled; the one polled ready is used (tower's convention).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let permit = limit.acquire().await?;
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(Permitted { io, _permit: permit })
        })
    }
}

pin_project_lite::pin_project! {
    /// A connection holding its upstream slot.
    pub struct Permitted<T> {
        #[pin]
        io: T,
        _permit: OwnedSemaphorePermit,
    }
}

impl<T: Connection> Connection for Permitted<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for Permitted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for Permitted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}
