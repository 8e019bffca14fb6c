//! The one body type of every message tokengate sends, downstream or upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// Error type of streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body tokengate sends, downstream or upstream. An enum rather than a boxed trait object:
/// no allocation per request, and exact size hints so `Content-Length` is kept.
pub enum Body {
    /// No body.
    Empty,
    /// A body in memory (JSON errors, buffered request bodies for replay).
    Full(Option<Bytes>),
    /// A request body streamed upstream (boxed: streamed uploads are rare, and every response
    /// body would otherwise be as large as its state).
    Streaming(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send>>),
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Streaming(b) => b.as_mut().poll_frame(cx),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
            Body::Upstream(u) => Pin::new(u).poll_frame(cx),
            Body::Http2(h) => Pin::new(h).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Streaming(b) => b.is_end_stream(),
            Body::Incoming(i) => i.is_end_stream(),
            Body::Upstream(u) => u.is_end_stream(),
            Body::Http2(h) => h.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Streaming(b) => b.size_hint(),
            Body::Incoming(i) => i.size_hint(),
            Body::Upstream(u) => u.size_hint(),
            Body::Http2(h) => h.size_hint(),
        }
    }
}
