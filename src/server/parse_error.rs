//! JSON bodies for the answers hyper writes itself.
//!
//! When a request head cannot be parsed (a malformed request line or header, a head larger than
//! `limits.max_header_size`, a request target too long), hyper answers on its own, before any
//! service sees a request, with an empty body: `HTTP/1.1 400 Bad Request`, `connection: close`,
//! `content-length: 0`, `date`. hyper has no hook for that answer, so the socket wrapper here
//! recognises exactly that shape, written while no request is in flight, and writes tokengate's
//! JSON error in its place, as every other error has, and writes its access-log line (these
//! requests never reach the proxy, which logs all others). Anything else passes through untouched.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::activity::Activity;
use crate::access_log::{AccessLog, Record};

/// Where the answers a connection's listener makes this way are logged: the listener's access
/// log and the client's address.
pub(super) struct LogTo {
    pub log: AccessLog,
    pub client: std::net::IpAddr,
}

/// hyper's answer is a status line and three short headers, about 110 bytes.
const HYPER_ANSWER_MAX: usize = 192;

/// The socket, with hyper's bodiless parse-error answers replaced.
pub(super) struct ErrorBodies<T> {
    inner: T,
    activity: Arc<Activity>,
    log: Option<LogTo>,
    // A replacement answer not yet written, and how much of it was.
    pending: Vec<u8>,
    written: usize,
}

impl<T> ErrorBodies<T> {
    pub(super) fn new(inner: T, activity: Arc<Activity>, log: Option<LogTo>) -> Self {
        ErrorBodies { inner, activity, log, pending: Vec::new(), written: 0 }
    }

    /// If `data` begins with one of hyper's own error answers, the replacement and how many
    /// bytes of `data` it replaces.
    fn replacement(&self, data: &[u8]) -> Option<(Vec<u8>, usize)> {
        // Cheap tests first: this runs for every write. hyper's answer is a short 4xx/5xx head.
        if data.len() > HYPER_ANSWER_MAX
            || !data.starts_with(b"HTTP/1.1 ")
            || !matches!(data.get(9), Some(b'4' | b'5'))
            || self.activity.in_flight() != 0
        {
            return None;
        }
        let end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = std::str::from_utf8(&data[..end]).ok()?;
        let mut lines = head.trim_end().split("\r\n");
        let status: u16 = lines.next()?.get(9..12)?.parse().ok()?;
        let mut names: Vec<&str> = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(": ")?;
            match (name, value) {
                ("connection", "close") | ("content-length", "0") | ("date", _) => names.push(name),
                _ => return None,
            }
        }
        names.sort_unstable();
        if names != ["connection", "content-length", "date"] {
            return None;
        }
        let (code, message) = match status {
            400 => (
                "invalid_request",
                "the request is not valid HTTP/1.1 (request line, header syntax or framing)",
            ),
            414 => ("uri_too_long", "the request target is too long"),
            431 => ("headers_too_large", "the request head is larger than limits.max_header_size"),
            505 => ("http_version_not_supported", "use HTTP/1.1, or HTTP/2 with prior knowledge"),
            _ if (400..600).contains(&status) => ("invalid_request", "the request could not be read"),
            _ => return None,
        };
        let body = format!("{}\n", serde_json::json!({ "error": code, "message": message }));
        let reason = http::StatusCode::from_u16(status).ok()?.canonical_reason().unwrap_or("Error");
        let id = crate::proxy::headers::request_id(&http::HeaderMap::new());
        self.record(id.to_str().unwrap_or("-"), status, code, body.len());
        let answer = format!(
            "HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-request-id: {}\r\ncontent-length: {}\r\n\r\n{body}",
            id.to_str().unwrap_or("-"),
            body.len()
        );
        Some((answer.into_bytes(), end))
    }

    /// The access-log line of an answer made here: no method, path or route could be read.
    fn record(&self, request_id: &str, status: u16, code: &'static str, bytes: usize) {
        let Some(to) = self.log.as_ref().filter(|to| to.log.enabled()) else { return };
        to.log.record(&Record {
            request_id,
            client: to.client,
            method: "-",
            path: "-",
            protocol: "HTTP/1.1",
            user_agent: None,
            bytes_in: None,
            upstream_duration: None,
            status,
            bytes: Some(bytes as u64),
            duration: self.activity.head_since().map_or(std::time::Duration::ZERO, |t| t.elapsed()),
            route: "_unmatched",
            upstream: None,
            provider: None,
            caller: None,
            error: Some(code),
            host: None,
            token_fetched: false,
            replayed: false,
        });
    }

    /// If `data` begins with hyper's own answer, takes it in place of those bytes: the
    /// replacement goes out now or from [`Self::drain`], before anything else. The result is what
    /// the write reports.
    fn intercept(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Option<std::io::Result<usize>>
    where
        T: tokio::io::AsyncWrite + Unpin,
    {
        let (answer, replaced) = self.replacement(data)?;
        self.pending = answer;
        self.written = 0;
        Some(match self.drain(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(replaced),
        })
    }

    /// Writes what is left of a replacement; ready when nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>
    where
        T: tokio::io::AsyncWrite + Unpin,
    {
        while self.written < self.pending.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ErrorBodies<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ErrorBodies<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(taken) = this.intercept(cx, data) {
            return Poll::Ready(taken);
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(taken) = this.intercept(cx, first)
        {
            return Poll::Ready(taken);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
