//! Request bodies on their way upstream: bounded in size and in the pause between pieces.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

/// Why a request body was cut off. Shared with the request path, which turns it into 413 or 408
/// once the upstream request fails because of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// More than `max_body_size` bytes.
    TooLarge,
    /// No data for `body_read_timeout`.
    Timeout,
    /// The client sent a body that cannot be read (malformed chunked encoding, a reset stream).
    Malformed,
}

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyFault::TooLarge => "request body too large",
            BodyFault::Timeout => "request body timed out",
            BodyFault::Malformed => "request body malformed",
        })
    }
}

impl std::error::Error for BodyFault {}

/// The downstream body with a size limit and a per-frame read timeout.
pub struct Guarded {
    inner: Incoming,
    limit: Option<u64>,
    read: u64,
    timeout: Duration,
    // Armed on first poll, so time spent connecting upstream does not count.
    sleep: Option<Pin<Box<Sleep>>>,
    fault: Arc<OnceLock<BodyFault>>,
}

impl Guarded {
    /// Wraps `inner`; a fault is recorded in `fault` before the body errors.
    pub fn new(
        inner: Incoming,
        limit: Option<u64>,
        timeout: Duration,
        fault: Arc<OnceLock<BodyFault>>,
    ) -> Self {
        Guarded { inner, limit, read: 0, timeout, sleep: None, fault }
    }

    fn trip(&self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, super::BoxError>>> {
        let _ = self.fault.set(fault);
        Poll::Ready(Some(Err(Box::new(fault))))
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if this.limit.is_some_and(|l| this.read > l) {
                        return this.trip(BodyFault::TooLarge);
                    }
                }
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + this.timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The client's fault, not the upstream's: the request path answers 400.
                tracing::debug!(error = %e, "downstream request body failed");
                let _ = this.fault.set(BodyFault::Malformed);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return this.trip(BodyFault::Timeout);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Every body tokengate sends, downstream or upstream. An enum rather than a boxed trait object:
/// no allocation per request, and exact size hints so `Content-Length` is kept.
pub enum Body {
    /// No body.
    Empty,
    /// A body in memory (JSON errors, buffered request bodies for replay).
    Full(Option<Bytes>),
    /// A downstream request body streamed upstream.
    Request(Guarded),
    /// An upstream response body streamed downstream.
    Incoming(Incoming),
    /// An upstream response body read from a lean HTTP/1.1 connection.
    Upstream(super::h1::Streaming),
    /// An upstream response body read from an HTTP/2 stream.
    Http2(super::h2::Streaming),
}

impl Body {
    /// A body held in memory.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() { Body::Empty } else { Body::Full(Some(bytes)) }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Request(g) => Pin::new(g).poll_frame(cx),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx).map_err(|e| Box::new(e) as super::BoxError),
            Body::Upstream(u) => Pin::new(u).poll_frame(cx),
            Body::Http2(h) => Pin::new(h).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Request(g) => g.is_end_stream(),
            Body::Incoming(i) => i.is_end_stream(),
            Body::Upstream(u) => u.is_end_stream(),
            Body::Http2(h) => h.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Request(g) => g.size_hint(),
            Body::Incoming(i) => i.size_hint(),
            Body::Upstream(u) => u.size_hint(),
            Body::Http2(h) => h.size_hint(),
        }
    }
}
