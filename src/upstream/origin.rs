//! One upstream as routes reach it: the lean HTTP/1.1 pool, and for an `https://` upstream
//! that may speak HTTP/2 (`upstream_protocol: auto`) the HTTP/2 connections, used once a TLS
//! handshake has negotiated `h2` by ALPN.
//!
//! Every new connection offers both protocols and the upstream's answer decides, so one that
//! gains or loses HTTP/2 (a redeploy, another server behind the same name) is followed at the
//! next connection, with no handshake wasted on finding out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, Uri};

use super::Body;
use super::h1::{self, Head, Sent};
use super::h2;

/// The ALPN protocols offered to an upstream that may speak HTTP/2, in order of preference.
pub const H2_OR_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// The ALPN protocol offered with `upstream_protocol: http1`.
pub const H1_ONLY: &[&[u8]] = &[b"http/1.1"];

/// Connections to one upstream.
pub struct Origin {
    h1: Arc<h1::Pool>,
    // With `auto` over TLS.
    h2: Option<h2::Connections>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    // What the latest handshake negotiated.
    speaks_h2: AtomicBool,
}

/// Why a request sent to an [`Origin`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// On an HTTP/1.1 connection, or while connecting.
    #[error(transparent)]
    Http1(#[from] h1::Error),
    /// On an HTTP/2 connection.
    #[error("HTTP/2: {0}")]
    Http2(#[from] ::h2::Error),
    /// The connection another request was opening, which this one waited for, failed.
    #[error("{0}")]
    Connect(Arc<str>),
    /// The path and query do not form a URI (routing checks paths, so this is a bug).
    #[error("request target {0:?} is not a valid URI")]
    Target(String),
}

impl Error {
    /// Connecting failed (as opposed to a failure on an open connection).
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Http1(e) if e.is_connect()) || matches!(self, Error::Connect(_))
    }
}

/// Why one attempt on HTTP/2 failed.
enum Failure {
    /// The connection was gone before the request was written; here it is back.
    Unsent(Box<Request<Body>>, Error),
    /// The request may have reached the upstream.
    Sent(Error),
    /// No connection could be had: trying again would meet the same.
    Final(Error),
}

impl From<h2::Failure> for Failure {
    fn from(f: h2::Failure) -> Self {
        match f {
            h2::Failure::Unsent(req, e) => Failure::Unsent(req, e.into()),
            h2::Failure::Failed(e) => Failure::Sent(e.into()),
        }
    }
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Unsent(_, e) | Failure::Sent(e) | Failure::Final(e) => e,
        }
    }
}

/// What became of a streamed request offered to [`Origin::stream`].
pub enum Streamed {
    /// The upstream answered.
    Response(Response<Body>),
    /// The upstream does not speak HTTP/2 (any more); the request, untouched, goes another way.
    NotHttp2(Request<Body>),
}

impl Origin {
    /// An origin served by `h1`, and over HTTP/2 when `h2` is given and ALPN agrees.
    pub fn new(
        h1: Arc<h1::Pool>,
        h2: Option<h2::Connections>,
        scheme: http::uri::Scheme,
        authority: http::uri::Authority,
    ) -> Self {
        Origin { h1, h2, scheme, authority, speaks_h2: AtomicBool::new(false) }
    }

    /// The HTTP/1.1 connections, which also carry upgrades.
    pub fn h1(&self) -> &Arc<h1::Pool> {
        &self.h1
    }

    /// The last connection opened negotiated HTTP/2.
    pub fn speaks_h2(&self) -> bool {
        self.h2.is_some() && self.speaks_h2.load(Ordering::Relaxed)
    }

    /// Sends a request whose body is in memory, on HTTP/2 or HTTP/1.1 as the upstream chose.
    pub async fn send(&self, head: &Head<'_>, body: &Bytes) -> Result<Response<Body>, Error> {
        let Some(h2) = self.h2.as_ref().filter(|_| self.speaks_h2()) else {
            return self.send_h1(head, body).await;
        };
        // Boxed, so requests to HTTP/1.1 upstreams do not carry (and move) the larger HTTP/2
        // state in their future.
        Box::pin(self.send_h2(h2, head, body)).await
    }

    async fn send_h2(
        &self,
        h2: &h2::Connections,
        head: &Head<'_>,
        body: &Bytes,
    ) -> Result<Response<Body>, Error> {
        let again = match self.on_h2(h2, self.request(head, body)?, false).await {
            Ok(Streamed::Response(resp)) => return Ok(resp),
            // A new connection came back HTTP/1.1 and was parked in the pool: use it.
            Ok(Streamed::NotHttp2(_)) => return Box::pin(self.send_h1(head, body)).await,
            Err(Failure::Unsent(req, _)) => *req,
            // Sent, but nothing came back: once more on a new connection when repeating it is
            // harmless, or when the upstream said it did not act on it.
            Err(Failure::Sent(e)) if h1::replayable(head.method) || refused(&e) => {
                self.request(head, body)?
            }
            Err(f) => return Err(f.into_error()),
        };
        match self.on_h2(h2, again, true).await {
            Ok(Streamed::Response(resp)) => Ok(resp),
            Ok(Streamed::NotHttp2(_)) => Box::pin(self.send_h1(head, body)).await,
            Err(f) => Err(f.into_error()),
        }
    }

    async fn send_h1(&self, head: &Head<'_>, body: &Bytes) -> Result<Response<Body>, Error> {
        match self.h1.send(head, body).await? {
            Sent::Response(resp) => Ok(resp),
            Sent::Http2(io) => {
                let Some(h2) = &self.h2 else {
                    // Only offered with `auto`; an upstream choosing it unasked is broken.
                    return Err(h1::Error::Invalid("HTTP/2 chosen without being offered").into());
                };
                self.speaks_h2.store(true, Ordering::Relaxed);
                let first = async {
                    match h2.adopt(io).await?.send(self.request(head, body)?).await {
                        Ok(resp) => Ok(resp),
                        Err(h2::Failure::Unsent(_, e) | h2::Failure::Failed(e)) => Err(e.into()),
                    }
                };
                Box::pin(first).await
            }
        }
    }

    /// Sends a streamed request over HTTP/2, or hands it back when the upstream no longer
    /// speaks it. Only a request the connection never took is tried again.
    pub async fn stream(&self, req: Request<Body>) -> Result<Streamed, Error> {
        let Some(h2) = &self.h2 else { return Ok(Streamed::NotHttp2(req)) };
        let again = match self.on_h2(h2, req, false).await {
            Ok(done) => return Ok(done),
            Err(Failure::Unsent(req, _)) => *req,
            Err(f) => return Err(f.into_error()),
        };
        self.on_h2(h2, again, true).await.map_err(Failure::into_error)
    }

    /// Sends `req` on one of this worker's HTTP/2 connections with room for it, or on a new
    /// connection when none has room or `fresh` asks for one. Requests that find no room while
    /// another request of the worker is opening a connection wait for that one.
    async fn on_h2(
        &self,
        h2: &h2::Connections,
        req: Request<Body>,
        fresh: bool,
    ) -> Result<Streamed, Failure> {
        // Opening a connection is boxed: it is rare, and its state would make every request's
        // future larger.
        if fresh {
            return Box::pin(self.open_h2(h2, req, None)).await;
        }
        if let Some(lease) = h2.lease() {
            return lease.send(req).await.map(Streamed::Response).map_err(Failure::from);
        }
        let opening = match h2.turn() {
            h2::Turn::Open(opener) => return Box::pin(self.open_h2(h2, req, Some(opener))).await,
            h2::Turn::Wait(opening) => opening,
        };
        match h2::opened(opening).await {
            Some(Err(why)) => return Err(Failure::Final(Error::Connect(why))),
            Some(Ok(())) if !self.speaks_h2() => return Ok(Streamed::NotHttp2(req)),
            Some(Ok(())) => {
                if let Some(lease) = h2.lease() {
                    return lease.send(req).await.map(Streamed::Response).map_err(Failure::from);
                }
            }
            // The opener went away (its client did): open one here.
            None => {}
        }
        Box::pin(self.open_h2(h2, req, None)).await
    }

    /// Opens a connection for `req`; `opener` tells the requests waiting for it how that went.
    async fn open_h2(
        &self,
        h2: &h2::Connections,
        req: Request<Body>,
        opener: Option<h2::Opener>,
    ) -> Result<Streamed, Failure> {
        let report = |outcome: Result<(), String>| {
            if let Some(o) = opener {
                o.done(outcome);
            }
        };
        let io = match self.h1.open().await {
            Ok(io) => io,
            Err(e) => {
                report(Err(e.to_string()));
                return Err(Failure::Final(e.into()));
            }
        };
        if !io.speaks_h2() {
            self.speaks_h2.store(false, Ordering::Relaxed);
            self.h1.park(io);
            report(Ok(()));
            return Ok(Streamed::NotHttp2(req));
        }
        let lease = match h2.adopt(io).await {
            Ok(lease) => lease,
            Err(e) => {
                report(Err(format!("HTTP/2: {e}")));
                return Err(Failure::Final(e.into()));
            }
        };
        report(Ok(()));
        lease.send(req).await.map(Streamed::Response).map_err(Failure::from)
    }

    /// The request as the HTTP/2 client takes it: `:scheme` and `:authority` come from the
    /// absolute URI.
    fn request(&self, head: &Head<'_>, body: &Bytes) -> Result<Request<Body>, Error> {
        let mut req = Request::new(Body::full(body.clone()));
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = absolute(&self.scheme, &self.authority, head.target)
            .ok_or_else(|| Error::Target(head.target.to_owned()))?;
        let headers = req.headers_mut();
        *headers = head.headers.clone();
        // The client's Expect was answered by tokengate, and the body is whole.
        headers.remove(http::header::EXPECT);
        Ok(req)
    }
}

/// `scheme://authority` + `target` (path and query, already checked when routing).
pub fn absolute(scheme: &http::uri::Scheme, authority: &http::uri::Authority, target: &str) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(target.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The upstream did not act on the request: it refused the stream (RFC 9113 section 8.7), or
/// the stream was past the last one its GOAWAY accepted (section 6.8).
fn refused(e: &Error) -> bool {
    let Error::Http2(e) = e else { return false };
    e.reason() == Some(::h2::Reason::REFUSED_STREAM) && e.is_remote() || e.is_go_away() && e.is_remote()
}
