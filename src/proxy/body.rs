//! Request bodies on their way upstream: bounded in size, in the pause between pieces and in
//! their average rate.

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
    /// No data for `body_read_timeout`, or slower than `body_min_rate` on average.
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

/// How fast a request body must come: a bound on each pause and on the average rate.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Longest pause between two pieces.
    pub pause: Duration,
    /// Slowest average, bytes per second, counted once the body has come for `pause` (0: any).
    pub min_rate: u64,
}

impl Pace {
    /// Whether `read` bytes in `elapsed` is too slow.
    fn too_slow(self, read: u64, elapsed: Duration) -> bool {
        let Some(late) = elapsed.checked_sub(self.pause) else { return false };
        (read as f64) < self.min_rate as f64 * late.as_secs_f64()
    }
}

/// The downstream body with a size limit, a per-frame read timeout and a minimum rate.
pub struct Guarded {
    inner: Incoming,
    limit: Option<u64>,
    read: u64,
    pace: Pace,
    // Armed on first poll, so time spent connecting upstream does not count.
    sleep: Option<Pin<Box<Sleep>>>,
    started: Option<tokio::time::Instant>,
    fault: Arc<OnceLock<BodyFault>>,
    // What [`Guarded::read_up_to`] read ahead; sent before the rest.
    head: Option<Bytes>,
}

impl Guarded {
    /// Wraps `inner`; a fault is recorded in `fault` before the body errors.
    pub fn new(inner: Incoming, limit: Option<u64>, pace: Pace, fault: Arc<OnceLock<BodyFault>>) -> Self {
        Guarded { inner, limit, read: 0, pace, sleep: None, started: None, fault, head: None }
    }

    /// Reads the body until it ends or passes `max` bytes. `Some(body)` when it ended within
    /// `max`; `None` when it is longer, the part read then coming first when this body is
    /// polled. For bodies of unknown length (chunked, HTTP/2 without `content-length`), so
    /// small ones can be replayed after a 401 like those that declare their length.
    pub async fn read_up_to(&mut self, max: u64) -> Result<Option<Bytes>, super::BoxError> {
        use http_body_util::BodyExt;
        let mut buf = bytes::BytesMut::new();
        loop {
            match self.frame().await {
                None => return Ok(Some(buf.freeze())),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    // Trailers are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() as u64 > max {
                        self.head = Some(buf.freeze());
                        return Ok(None);
                    }
                }
            }
        }
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
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        let started = *this.started.get_or_insert_with(tokio::time::Instant::now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if this.limit.is_some_and(|l| this.read > l) {
                        return this.trip(BodyFault::TooLarge);
                    }
                    if this.pace.too_slow(this.read, started.elapsed()) {
                        return this.trip(BodyFault::Timeout);
                    }
                }
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(tokio::time::Instant::now() + this.pace.pause);
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
                let timeout = this.pace.pause;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return this.trip(BodyFault::Timeout);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + head);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;
    use std::time::Duration;

    #[test]
    fn the_average_rate_counts_once_the_body_has_come_for_one_pause() {
        let pace = Pace { pause: Duration::from_secs(30), min_rate: 500 };
        let s = Duration::from_secs;
        assert!(!pace.too_slow(0, s(29)), "within the first pause anything goes");
        assert!(!pace.too_slow(1, s(30)));
        assert!(pace.too_slow(2, s(59)), "a byte per 29 s");
        assert!(!pace.too_slow(500 * 29, s(59)));
        assert!(!Pace { min_rate: 0, ..pace }.too_slow(0, s(3600)), "0 turns it off");
    }
}
