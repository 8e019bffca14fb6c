//! A lean HTTP/1.1 client for upstreams, plain or over TLS ([`super::stream`]).
//!
//! The task serving the downstream connection writes the request and reads the response itself:
//! no connection task, channel or checkout future in between, the response head and a body of up
//! to [`WHOLE_BODY`] come from one read into one buffer, and headers are slices of that buffer.
//! It only sends bodies held in memory (empty or buffered for a 401 replay); streamed uploads
//! go through the hyper client.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncReadExt;

use super::Body;
use super::egress::Path;
use super::stream::{Stream, Tls};
use crate::config::ProxyUrl;

/// The first read's buffer: a head and a small body arrive in one read.
const READ_BUF: usize = 32 * 1024;
/// Bodies up to this size are read whole before the response goes downstream, so the head and
/// body leave in one write; larger ones stream.
const WHOLE_BODY: u64 = 64 * 1024;
/// Request bodies up to this size are copied behind the head and sent with it.
const INLINE_BODY: usize = 64 * 1024;
/// Idle connections kept per upstream and worker thread.
const MAX_IDLE: usize = 256;
/// Idle connections that keep their read buffer for reuse, per upstream and worker thread; the
/// rest give it back, so a burst does not leave megabytes parked in idle buffers.
const KEEP_BUFFERS: usize = 64;
/// At most this many headers in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Bound on the chunk extensions of one body, all chunk-size lines together (hyper's limit).
const CHUNK_EXTENSIONS_LIMIT: usize = 16 * 1024;
/// Bound on the trailers of one body, which are read and dropped (hyper's limit).
const TRAILERS_LIMIT: usize = 16 * 1024;
/// Informational (1xx) responses accepted before the final one.
const MAX_INFORMATIONAL: usize = 8;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where to.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The upstream closed the connection before answering.
    #[error("connection closed before a response")]
    Closed,
    /// The upstream sent something that is not valid HTTP/1.1.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// Every connection slot of the upstream stayed taken for the queue timeout.
    #[error(transparent)]
    Busy(#[from] super::limit::Busy),
}

impl Error {
    /// Connecting failed (as opposed to a failure on an open connection).
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::ConnectTimeout(_))
    }
}

/// What goes on the request line and in the head; `Host` comes from the pool.
pub struct Head<'a> {
    /// The method.
    pub method: &'a Method,
    /// Path and query.
    pub target: &'a str,
    /// Headers, already rewritten for the upstream. `Content-Length` and `Expect` are replaced.
    pub headers: &'a HeaderMap,
}

/// Keep-alive connections to one upstream `host:port`.
pub struct Pool {
    addr: String,
    host: String,
    tls: Option<Tls>,
    // The same TLS offering only HTTP/1.1: upgrades are HTTP/1.1.
    upgrade_tls: Option<Tls>,
    // The egress proxy this upstream is reached through, if any.
    egress: Option<ProxyUrl>,
    // Through that proxy in absolute form (plain http): its `Proxy-Authorization`, if any.
    forward: Option<Option<HeaderValue>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_head: usize,
    // One idle list per worker thread: a connection stays with the event loop it is registered
    // with, so its readiness never has to cross threads.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    limit: super::limit::UpstreamLimit,
}

/// An upstream connection holding one of its upstream's slots until it is dropped.
pub struct Conn {
    io: Stream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Conn {
    /// TLS negotiated HTTP/2 by ALPN.
    pub fn speaks_h2(&self) -> bool {
        self.io.alpn() == Some(b"h2")
    }
}

/// What [`Pool::send`] did.
pub enum Sent {
    /// The upstream answered.
    Response(Response<Body>),
    /// The new connection it opened negotiated HTTP/2; the request was not sent.
    Http2(Conn),
}

/// What an upgrade request got.
pub enum Upgrade {
    /// `101 Switching Protocols`: the connection now carries the new protocol, and `rest` is what
    /// the upstream sent after the head.
    Switched {
        /// The 101 head.
        head: http::response::Parts,
        /// The connection.
        io: Conn,
        /// Bytes after the head.
        rest: Bytes,
    },
    /// Any other answer, which goes to the client as it is.
    Answered(Response<Body>),
}

// Conn carries HTTP/2 too, when ALPN says so: the h2 crate drives it then.
impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl std::ops::Deref for Conn {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        &self.io
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Stream {
        &mut self.io
    }
}

/// Idle lists per pool; workers beyond this share them.
pub(super) const SHARDS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `index`, whose upstream connections are pooled apart.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The current thread's worker index (0 off the workers).
pub(super) fn worker() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// A kept-alive connection with its read buffer, whose memory is reused once the last response
/// read into it has been written downstream.
struct Idle {
    io: Conn,
    buf: BytesMut,
    since: Instant,
}

impl Pool {
    /// A pool for `authority`, over TLS when `tls` is given (port 80, or 443 with TLS, when
    /// none is given).
    pub fn new(
        authority: &http::uri::Authority,
        tls: Option<Tls>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_head: usize,
        slots: &Arc<super::limit::UpstreamSlots>,
        egress: Option<ProxyUrl>,
    ) -> Self {
        let default_port = if tls.is_some() { 443 } else { 80 };
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(default_port));
        Pool {
            upgrade_tls: tls.as_ref().map(Tls::http1_only),
            forward: egress.as_ref().filter(|_| tls.is_none()).map(ProxyUrl::authorization),
            egress,
            tls,
            limit: slots.of(&addr.to_ascii_lowercase()),
            addr,
            host: authority.as_str().to_owned(),
            connect_timeout,
            idle_timeout,
            max_head,
            idle: (0..SHARDS).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }

    /// Lets requests waiting for a connection slot to this upstream close this pool's idle
    /// connections (on any thread's list).
    pub fn share_idle(self: &Arc<Self>) {
        let weak: std::sync::Weak<dyn super::limit::IdleConnections> = Arc::downgrade(self) as _;
        self.limit.register_idle(weak);
    }

    /// Idle connections kept for this thread.
    pub fn idle_connections(&self) -> usize {
        self.idle().len()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        let shard = &self.idle[worker() % SHARDS];
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one request and reads the response head (and a small body). A reused connection
    /// that turns out to be closed is replaced once, when the request cannot have been acted on.
    pub async fn send(self: &Arc<Self>, head: &Head<'_>, body: &Bytes) -> Result<Sent, Error> {
        let (out, inline) = self.request_bytes(head, body);
        if let Some((io, buf)) = self.checkout() {
            match self.exchange(io, buf, &out, (!inline).then_some(body), head.method).await {
                Err(Attempt::Unsent(_)) => {}
                Err(Attempt::Stale(_)) if replayable(head.method) => {}
                Err(Attempt::Stale(e) | Attempt::Failed(e)) => return Err(e),
                Ok(resp) => return Ok(Sent::Response(resp)),
            }
        }
        // Boxed: connecting is rare, and the handshake's state would make every request's
        // future larger.
        let io = Box::pin(self.open()).await?;
        if io.speaks_h2() {
            return Ok(Sent::Http2(io));
        }
        match self.exchange(io, BytesMut::new(), &out, (!inline).then_some(body), head.method).await {
            Ok(resp) => Ok(Sent::Response(resp)),
            Err(Attempt::Unsent(e) | Attempt::Stale(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    /// The request head, with a body up to the inline size behind it so the request is one
    /// write; the flag says whether the body went in.
    fn request_bytes(&self, head: &Head<'_>, body: &Bytes) -> (Vec<u8>, bool) {
        let inline = body.len() <= INLINE_BODY;
        let room = head_room(&self.host, head, self.forward.as_ref());
        let mut out = Vec::with_capacity(room + if inline { body.len() } else { 0 });
        encode(&mut out, &self.host, head, body, self.forward.as_ref());
        if inline {
            out.extend_from_slice(body);
        }
        (out, inline)
    }

    async fn exchange(
        self: &Arc<Self>,
        mut io: Conn,
        mut buf: BytesMut,
        head: &[u8],
        body: Option<&Bytes>,
        method: &Method,
    ) -> Result<Response<Body>, Attempt> {
        let written = async {
            io.send(head).await?;
            if let Some(body) = body {
                io.send(body).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        // A write that fails never reached a request handler: safe to retry on a new connection.
        written.await.map_err(|e| Attempt::Unsent(e.into()))?;
        buf.clear();
        buf.reserve(READ_BUF);
        let mut informational = 0;
        let (parts, framing, reusable) = loop {
            let (parts, framing, reusable) = read_head(&mut io, &mut buf, method, self.max_head).await?;
            // 1xx answers (100 Continue, 103 Early Hints) precede the real one.
            if !parts.status.is_informational() {
                break (parts, framing, reusable);
            }
            informational += 1;
            if parts.status == StatusCode::SWITCHING_PROTOCOLS || informational > MAX_INFORMATIONAL {
                return Err(Attempt::Failed(Error::Invalid("unexpected informational response")));
            }
        };
        if parts.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            && let (Some(proxy), Some(_)) = (&self.egress, &self.forward)
        {
            let why = "answered 407 Proxy Authentication Required: check the user and password in egress_proxy (or egress_proxy_password_file)";
            let source = super::egress::Refused::io(proxy, why.into());
            return Err(Attempt::Failed(Error::Connect { addr: self.addr.clone(), source }));
        }
        self.answer(io, buf, parts, framing, reusable).await.map_err(Attempt::Failed)
    }

    /// The response whose head was just read: a small body is read whole, a larger one streams.
    async fn answer(
        self: &Arc<Self>,
        io: Conn,
        buf: BytesMut,
        parts: http::response::Parts,
        framing: Framing,
        reusable: bool,
    ) -> Result<Response<Body>, Error> {
        let mut stream =
            Streaming { io: Some(io), pool: self.clone(), buf, framing, reusable, extensions: 0 };
        let body = match stream.framing {
            Framing::Length(n) if n <= WHOLE_BODY => Body::full(stream.read_whole(n).await?),
            _ => Body::Upstream(stream),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Sends an upgrade request (no body) on a new connection of its own, over TLS offering
    /// only HTTP/1.1, and reads the answer.
    pub async fn upgrade(self: &Arc<Self>, head: &Head<'_>) -> Result<Upgrade, Error> {
        let mut io = self.open_with(self.upgrade_tls.as_ref(), true).await?;
        let mut out = Vec::with_capacity(512);
        encode(&mut out, &self.host, head, &Bytes::new(), None);
        io.send(&out).await?;
        let mut buf = BytesMut::with_capacity(READ_BUF);
        let mut informational = 0;
        loop {
            let (parts, framing, reusable) =
                read_head(&mut io, &mut buf, head.method, self.max_head)
                    .await
                    .map_err(|(Attempt::Unsent(e) | Attempt::Stale(e) | Attempt::Failed(e))| e)?;
            if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(Upgrade::Switched { head: parts, io, rest: buf.freeze() });
            }
            if !parts.status.is_informational() {
                return Ok(Upgrade::Answered(self.answer(io, buf, parts, framing, reusable).await?));
            }
            informational += 1;
            if informational > MAX_INFORMATIONAL {
                return Err(Error::Invalid("too many informational responses"));
            }
        }
    }

    /// Opens a new connection, taking one of the upstream's slots (waiting for one if need be).
    pub async fn open(&self) -> Result<Conn, Error> {
        self.open_with(self.tls.as_ref(), false).await
    }

    /// How a connection gets to the upstream: through the egress proxy's CONNECT tunnel for TLS
    /// and upgrades, to the proxy itself for plain requests.
    fn path(&self, upgrade: bool) -> Path<'_> {
        match &self.egress {
            None => Path::Direct,
            Some(p) if self.forward.is_some() && !upgrade => Path::Forward(p),
            Some(p) => Path::Tunnel(p),
        }
    }

    async fn open_with(&self, tls: Option<&Tls>, upgrade: bool) -> Result<Conn, Error> {
        let slot = self.limit.acquire().await?;
        match Stream::connect(&self.addr, self.path(upgrade), tls, self.connect_timeout).await {
            Ok(None) => Err(Error::ConnectTimeout(self.addr.clone())),
            Err(source) => Err(Error::Connect { addr: self.addr.clone(), source }),
            Ok(Some(io)) => Ok(Conn { io, _slot: slot }),
        }
    }

    /// The most recently used live idle connection; stale ones are dropped.
    fn checkout(&self) -> Option<(Conn, BytesMut)> {
        loop {
            let mut idle = self.idle().pop_back()?;
            if idle.since.elapsed() < self.idle_timeout && idle.io.still_open() {
                return Some((idle.io, idle.buf));
            }
        }
    }

    /// Keeps `io`, a connection just opened by [`Pool::open`], for the next request.
    pub fn park(&self, io: Conn) {
        self.put(io, BytesMut::new());
    }

    fn put(&self, io: Conn, buf: BytesMut) {
        let now = Instant::now();
        let mut idle = self.idle();
        while idle.front().is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
            || idle.len() >= MAX_IDLE
        {
            idle.pop_front();
        }
        let buf = if idle.len() < KEEP_BUFFERS { buf } else { BytesMut::new() };
        idle.push_back(Idle { io, buf, since: now });
    }
}

impl super::limit::IdleConnections for Pool {
    fn close_one(&self) -> bool {
        for shard in self.idle.iter() {
            let oldest = shard.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
            if oldest.is_some() {
                // Dropped here, outside the lock: the socket closes and its slot is free.
                return true;
            }
        }
        false
    }
}

enum Attempt {
    /// The request could not be written: the upstream never saw it.
    Unsent(Error),
    /// Failed before anything came back on a connection that may have been closed while idle.
    Stale(Error),
    /// Failed otherwise.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// Methods RFC 9110 calls idempotent: a request that may have reached the upstream can be sent
/// again.
pub(super) fn replayable(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The request head; through a forward proxy (`forward`, with its credentials) the target is in
/// absolute form.
fn encode(
    out: &mut Vec<u8>,
    host: &str,
    head: &Head<'_>,
    body: &Bytes,
    forward: Option<&Option<HeaderValue>>,
) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    if forward.is_some() {
        out.extend_from_slice(b"http://");
        out.extend_from_slice(host.as_bytes());
    }
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(Some(auth)) = forward {
        out.extend_from_slice(b"proxy-authorization: ");
        out.extend_from_slice(auth.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.headers {
        // The body is sent whole with its own length; the client's Expect was answered by us.
        if name == header::CONTENT_LENGTH || name == header::EXPECT || name == header::HOST {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// What [`encode`] writes, at most: the head is one allocation, never grown (a real-sized
/// token alone is over a kilobyte, and growing a vector copies what it holds).
fn head_room(host: &str, head: &Head<'_>, forward: Option<&Option<HeaderValue>>) -> usize {
    let fields: usize = head.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    let proxy = match forward {
        Some(auth) => "http://".len() + host.len() + auth.as_ref().map_or(0, |a| a.len() + 23),
        None => 0,
    };
    // Request line and host, content-length with 20 digits, the blank line.
    let fixed = head.method.as_str().len() + head.target.len() + 2 * host.len() + 28 + 38 + 2;
    fixed + proxy + fields
}

/// How the response body ends (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Reads and parses one response head; `buf` keeps what follows it.
async fn read_head(
    io: &mut Conn,
    buf: &mut BytesMut,
    method: &Method,
    max_head: usize,
) -> Result<(http::response::Parts, Framing, bool), Attempt> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let parsed = parse_head(&resp, buf.as_ptr() as usize, method)?;
                    let head = buf.split_to(len).freeze();
                    return build(parsed, &head).map_err(Attempt::Failed);
                }
                Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                    return Err(Attempt::Failed(Error::Invalid("response head too large")));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Attempt::Failed(Error::Invalid("too many headers")));
                }
                Err(_) => return Err(Attempt::Failed(Error::Invalid("malformed response head"))),
            }
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_BUF);
        }
        let fresh = buf.is_empty();
        match io.read_buf(buf).await {
            Ok(0) if fresh => return Err(Attempt::Stale(Error::Closed)),
            Ok(0) => return Err(Attempt::Failed(Error::Invalid("connection closed inside the head"))),
            Ok(_) => {}
            Err(e) if fresh && is_reset(&e) => return Err(Attempt::Stale(e.into())),
            Err(e) => return Err(Attempt::Failed(e.into())),
        }
    }
}

/// The connection went away under the request. Over TLS a close without close_notify reads as
/// `UnexpectedEof`: the same as a plain connection's end.
fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

/// A parsed head as offsets into the read buffer, so values can become slices of it.
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: Vec<(HeaderName, std::ops::Range<usize>)>,
    framing: Framing,
    reusable: bool,
}

fn parse_head(resp: &httparse::Response<'_, '_>, base: usize, method: &Method) -> Result<Parsed, Attempt> {
    let invalid = |why| Attempt::Failed(Error::Invalid(why));
    let status = resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(invalid("bad status"))?;
    let version = if resp.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let (mut close, mut keep_alive) = (false, false);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut headers = Vec::with_capacity(resp.headers.len());
    let mut has_length = false;
    // These have no body whatever the head says (RFC 9112 section 6.3), so, as hyper does,
    // their Content-Length is not read.
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| invalid("bad header name"))?;
        if name == header::CONTENT_LENGTH {
            has_length = true;
        } else if name == header::TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                // HTTP/1.0 has no transfer codings: such a response is faulty (RFC 9112 section 6.1).
                return Err(invalid("transfer-encoding in an HTTP/1.0 response"));
            }
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default().trim_ascii();
            chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            let has = |option: &[u8]| {
                h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(option))
            };
            if has(b"close") {
                close = true;
            } else if has(b"keep-alive") {
                // HTTP/1.0 keeps a connection only when asked to (RFC 9112 section 9.3).
                keep_alive = true;
            }
        }
        let start = h.value.as_ptr() as usize - base;
        headers.push((name, start..start + h.value.len()));
    }
    // Content-Length matters only when nothing else frames the body (Transfer-Encoding wins,
    // and the value is then dropped), as in hyper. Repeated lengths must agree (RFC 9110
    // section 8.6); anything else is smuggling bait.
    if !no_body && chunked.is_none() && has_length {
        // A second pass over the few headers rather than a vector of the values per response.
        let lengths = resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length"));
        for part in lengths.flat_map(|h| h.value.split(|b| *b == b',')) {
            let n = parse_length(part.trim_ascii()).ok_or(invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    let mut reusable = !close && (version == Version::HTTP_11 || keep_alive);
    let framing = match (no_body, chunked, length) {
        (true, _, _) => Framing::Length(0),
        (false, Some(true), _) => Framing::Chunked(Chunk::Size),
        // Transfer-Encoding wins over Content-Length; a non-chunked coding runs to the close.
        (false, Some(false), _) | (false, None, None) => Framing::Close,
        (false, None, Some(n)) => Framing::Length(n),
    };
    if framing == Framing::Close || (chunked.is_some() && has_length) {
        reusable = false;
    }
    Ok(Parsed { status, version, headers, framing, reusable })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn build(parsed: Parsed, head: &Bytes) -> Result<(http::response::Parts, Framing, bool), Error> {
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut connection = None;
    for (name, range) in parsed.headers {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| Error::Invalid("bad header value"))?;
        // Hop-by-hop headers are dropped here rather than removed later: no map lookups.
        if name == header::CONNECTION {
            // Kept only when it names headers: a plain `keep-alive` costs no allocation.
            if super::hop::lists_headers(&value) {
                connection.get_or_insert_with(Vec::new).push(value);
            }
        } else if name == header::CONTENT_LENGTH && !matches!(parsed.framing, Framing::Length(_)) {
            // Beside Transfer-Encoding it is wrong (RFC 9112 section 6.3): the body is re-framed
            // downstream, so it is dropped.
        } else if !super::hop::is_hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    for value in connection.iter().flatten() {
        super::hop::remove_listed(&mut headers, value);
    }
    let mut parts = Response::new(()).into_parts().0;
    parts.status = parsed.status;
    parts.version = parsed.version;
    parts.headers = headers;
    Ok((parts, parsed.framing, parsed.reusable))
}

/// A response body read from the upstream connection as the downstream side asks for it. The
/// connection goes back to the pool once the body has been read to its end.
pub struct Streaming {
    io: Option<Conn>,
    pool: Arc<Pool>,
    buf: BytesMut,
    framing: Framing,
    reusable: bool,
    // Chunk-extension bytes read so far.
    extensions: usize,
}

impl Streaming {
    /// Reads a body of `n` bytes whole (the caller bounds `n`).
    async fn read_whole(&mut self, n: u64) -> Result<Bytes, Error> {
        let n = usize::try_from(n).map_err(|_| Error::Invalid("body too large"))?;
        if self.buf.len() < n {
            let io = self.io.as_mut().ok_or(Error::Closed)?;
            // One spare byte, so a read that completes the body is short and tokio knows the
            // socket is drained without another system call.
            self.buf.reserve(n + 1 - self.buf.len());
            while self.buf.len() < n {
                if io.read_buf(&mut self.buf).await? == 0 {
                    return Err(Error::Invalid("connection closed inside the body"));
                }
            }
        }
        let body = self.buf.split_to(n).freeze();
        self.framing = Framing::Length(0);
        self.finish();
        Ok(body)
    }

    /// The body is complete: the connection is reusable if nothing unexpected followed it.
    fn finish(&mut self) {
        if let Some(io) = self.io.take()
            && self.reusable
            && self.buf.is_empty()
        {
            self.pool.put(io, std::mem::take(&mut self.buf));
        }
    }

    /// Up to `n` buffered body bytes and how many of the `n` are still to come; `None` when
    /// nothing is buffered.
    fn take(&mut self, n: u64) -> Option<(Bytes, u64)> {
        if self.buf.is_empty() {
            return None;
        }
        let take = self.buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        Some((self.buf.split_to(take).freeze(), n - take as u64))
    }

    /// The next data frame from what is buffered, or `None` when more must be read.
    fn decode(&mut self) -> Result<Option<Option<Bytes>>, Error> {
        loop {
            match self.framing {
                Framing::Length(0) => return Ok(Some(None)),
                Framing::Length(n) => {
                    let Some((data, left)) = self.take(n) else { return Ok(None) };
                    self.framing = Framing::Length(left);
                    return Ok(Some(Some(data)));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(self.buf.split().freeze())));
                }
                Framing::Chunked(state) => match state {
                    Chunk::Size => match httparse::parse_chunk_size(&self.buf) {
                        Ok(httparse::Status::Complete((used, size))) => {
                            // Extensions are ignored, but their bytes count against the body.
                            let line = &self.buf[..used];
                            self.extensions += line.iter().position(|b| *b == b';').map_or(0, |at| used - at);
                            if self.extensions > CHUNK_EXTENSIONS_LIMIT {
                                return Err(Error::Invalid("chunk extensions too large"));
                            }
                            self.buf.advance(used);
                            let next = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                            self.framing = Framing::Chunked(next);
                        }
                        Ok(httparse::Status::Partial)
                            if self.buf.len() < CHUNK_EXTENSIONS_LIMIT - self.extensions =>
                        {
                            return Ok(None);
                        }
                        _ => return Err(Error::Invalid("bad chunk size")),
                    },
                    Chunk::Data(n) => {
                        let Some((data, left)) = self.take(n) else { return Ok(None) };
                        self.framing =
                            Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                        return Ok(Some(Some(data)));
                    }
                    Chunk::DataEnd => {
                        if self.buf.len() < 2 {
                            return Ok(None);
                        }
                        if &self.buf[..2] != b"\r\n" {
                            return Err(Error::Invalid("bad chunk end"));
                        }
                        self.buf.advance(2);
                        self.framing = Framing::Chunked(Chunk::Size);
                    }
                    // Trailers are not forwarded; they end with an empty line.
                    Chunk::Trailers => {
                        let end = if self.buf.starts_with(b"\r\n") {
                            Some(2)
                        } else {
                            self.buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
                        };
                        match end {
                            Some(end) if end > TRAILERS_LIMIT => {
                                return Err(Error::Invalid("trailers too large"));
                            }
                            // Dropped, but they must be header fields, as for hyper.
                            Some(end) if !valid_trailers(&self.buf[..end]) => {
                                return Err(Error::Invalid("bad trailers"));
                            }
                            Some(end) => {
                                self.buf.advance(end);
                                self.framing = Framing::Length(0);
                            }
                            None if self.buf.len() < TRAILERS_LIMIT => return Ok(None),
                            None => return Err(Error::Invalid("trailers too large")),
                        }
                    }
                },
            }
        }
    }
}

/// A trailer section (ending in an empty line) is well-formed header fields, at most
/// [`MAX_HEADERS`] of them.
fn valid_trailers(section: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    matches!(httparse::parse_headers(section, &mut fields), Ok(httparse::Status::Complete(_)))
}

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Err(e) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Ok(Some(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(None)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(Some(Err(Box::new(Error::Closed))));
            };
            if this.buf.capacity() - this.buf.len() < 4096 {
                this.buf.reserve(READ_BUF);
            }
            let read = std::pin::pin!(io.read_buf(&mut this.buf)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Ok(0)) if this.framing == Framing::Close => {
                    this.io = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(Box::new(Error::Invalid(
                        "connection closed inside the body",
                    )))));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &str, method: Method) -> Result<(Framing, bool), &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(head.as_bytes()).map_err(|_| "parse")?;
        match parse_head(&resp, head.as_ptr() as usize, &method) {
            Ok(p) => Ok((p.framing, p.reusable)),
            Err(Attempt::Failed(Error::Invalid(why)) | Attempt::Stale(Error::Invalid(why))) => Err(why),
            Err(_) => Err("other"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = |h: &str| framing(h, Method::GET);
        assert_eq!(ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), Ok((Framing::Length(5), true)));
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"), Ok((Framing::Length(5), true)));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"),
            Err("conflicting content-length")
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n"), Err("bad content-length"));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Ok((Framing::Chunked(Chunk::Size), true))
        );
        // Both: Transfer-Encoding wins and the connection is not reused.
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
            Ok((Framing::Chunked(Chunk::Size), false))
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"), Ok((Framing::Close, false)));
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), Ok((Framing::Close, false)));
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            Ok((Framing::Length(0), true))
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n"),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(ok("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"), Ok((Framing::Length(1), false)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", Method::HEAD),
            Ok((Framing::Length(0), true))
        );
    }

    fn decode_all(framing: Framing, wire: &[u8]) -> Result<Vec<u8>, Error> {
        let pool = Arc::new(Pool::new(
            &"127.0.0.1:1".parse().unwrap(),
            None,
            Duration::from_secs(1),
            Duration::from_secs(1),
            8192,
            &crate::upstream::limit::UpstreamSlots::new(1, Duration::from_secs(1)),
            None,
        ));
        let mut s =
            Streaming { io: None, pool, buf: BytesMut::new(), framing, reusable: true, extensions: 0 };
        let mut out = Vec::new();
        // Byte by byte: every state must cope with a split anywhere.
        for b in wire {
            s.buf.extend_from_slice(&[*b]);
            while let Some(frame) = s.decode()? {
                match frame {
                    Some(data) => out.extend_from_slice(&data),
                    None => return Ok(out),
                }
            }
        }
        Err(Error::Invalid("incomplete"))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        assert_eq!(decode_all(Framing::Chunked(Chunk::Size), wire).unwrap(), b"hello world");
        assert_eq!(decode_all(Framing::Chunked(Chunk::Size), b"0\r\n\r\n").unwrap(), b"");
        assert!(decode_all(Framing::Chunked(Chunk::Size), b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode_all(Framing::Chunked(Chunk::Size), b"zz\r\n").is_err());
        assert_eq!(decode_all(Framing::Length(3), b"abc").unwrap(), b"abc");
    }

    #[test]
    fn the_head_fits_the_room_made_for_it() {
        let token = format!("Bearer {}", "t".repeat(1200));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&token).unwrap());
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let body = Bytes::from(vec![b'x'; 123_456]);
        let auth = Some(HeaderValue::from_static("Basic dTpw"));
        for forward in [None, Some(&None), Some(&auth)] {
            for method in [Method::GET, Method::PATCH] {
                let head = Head { method: &method, target: "/a/b?c=d", headers: &headers };
                let room = head_room("api.example:8443", &head, forward);
                let mut out = Vec::new();
                encode(&mut out, "api.example:8443", &head, &body, forward);
                assert!(out.len() <= room, "{} > {room} ({method}, {forward:?})", out.len());
                assert!(room - out.len() < 100, "{room} for {}", out.len());
            }
        }
    }

    #[test]
    fn requests_are_encoded_with_host_and_own_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let mut out = Vec::new();
        let head = Head { method: &Method::POST, target: "/a?b=1", headers: &headers };
        encode(&mut out, "api.example:8080", &head, &Bytes::from_static(b"xy"), None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: api.example:8080\r\nauthorization: Bearer t\r\ncontent-length: 2\r\n\r\n"
        );
    }
}
