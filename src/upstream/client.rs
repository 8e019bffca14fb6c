//! The one entry point: a [`Client`] per route, built by [`Clients`], sends a request on
//! HTTP/1.1 or HTTP/2 as the origin chose and reports failures as one [`Error`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

use super::h1::{self, Head};
use super::limit::{self, UpstreamSlots};
use super::origin::{self, Origin};
use super::{Body, hop, pooled, stream};
use crate::config::{Egress, IdentityFiles, Limits, ProxyUrl, Upstream, UpstreamProtocol};

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every connection slot of the upstream stayed taken for `upstream_queue_timeout`.
    #[error("{0}")]
    Busy(String),
    /// No connection could be made (refused, unresolvable, TLS handshake failed).
    #[error("{0}")]
    Unreachable(String),
    /// No response head within `upstream_timeout`.
    #[error("no response head within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection failed after it was made (reset, malformed response).
    #[error("{0}")]
    Failed(String),
    /// The egress proxy refused or could not open the way to the upstream.
    #[error("{0}")]
    Proxy(String),
    /// TLS to the upstream failed on its certificate; the text says why and what to change.
    #[error("{0}")]
    Certificate(String),
}

/// What an upgrade request got.
pub enum Upgrade {
    /// `101 Switching Protocols`: the head (hop-by-hop headers removed) and the connection.
    Switched(http::response::Parts, super::Tunnel),
    /// Any other answer (hop-by-hop headers removed), which goes to the client as it is.
    Answered(Response<Body>),
}

/// A request body as it goes upstream.
pub enum Payload {
    /// In memory: sent with the head in one write, and can be sent again.
    Buffered(Bytes),
    /// Streamed from the client; sent once.
    Streamed(Body),
}

/// One upstream as a route reaches it.
#[derive(Clone)]
pub struct Client {
    origin: Arc<Origin>,
    pooled: pooled::WorkerClients,
    upstream: Upstream,
}

impl Client {
    /// Sends `head` with `payload`, waiting at most `timeout` for the response head. Hop-by-hop
    /// headers of the response are removed.
    pub async fn send(
        &self,
        head: &Head<'_>,
        payload: Payload,
        timeout: Duration,
    ) -> Result<Response<Body>, Error> {
        let sent = async {
            match payload {
                Payload::Buffered(bytes) => self.origin.send(head, &bytes).await.map_err(origin_error),
                // Boxed: streamed uploads are rare, and the common path's future stays small.
                Payload::Streamed(body) => Box::pin(self.stream(head, body)).await,
            }
        };
        tokio::time::timeout(timeout, sent).await.map_err(|_| Error::Timeout(timeout))?
    }

    /// Asks the upstream to switch the connection to `protocol` (`websocket`): sends `head` with
    /// `Connection: upgrade` on an HTTP/1.1 connection of its own, waiting at most `timeout` for
    /// the answer.
    pub async fn upgrade(
        &self,
        head: &Head<'_>,
        protocol: &http::HeaderValue,
        timeout: Duration,
    ) -> Result<Upgrade, Error> {
        let mut headers = head.headers.clone();
        headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        headers.insert(http::header::UPGRADE, protocol.clone());
        let head = Head { method: head.method, target: head.target, headers: &headers };
        let sent = self.origin.h1().upgrade(&head);
        let answer = tokio::time::timeout(timeout, sent)
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|e| origin_error(e.into()))?;
        Ok(match answer {
            h1::Upgrade::Switched { mut head, io, rest } => {
                hop::rewrite_response(&mut head.headers);
                Upgrade::Switched(head, super::Tunnel::new(io, rest))
            }
            h1::Upgrade::Answered(mut resp) => {
                hop::rewrite_response(resp.headers_mut());
                Upgrade::Answered(resp)
            }
        })
    }

    async fn stream(&self, head: &Head<'_>, body: Body) -> Result<Response<Body>, Error> {
        let mut req = self.request(head, body)?;
        if self.origin.speaks_h2() {
            match self.origin.stream(req).await.map_err(origin_error)? {
                origin::Streamed::Response(resp) => return Ok(resp),
                origin::Streamed::NotHttp2(back) => req = back,
            }
        }
        let resp = self.pooled.get().request(req).await.map_err(|e| {
            if let Some(refused) = super::egress::refusal(&e) {
                Error::Proxy(refused)
            } else if let Some(problem) = stream::certificate_problem(&e) {
                Error::Certificate(problem)
            } else if limit::is_busy(&e) {
                Error::Busy(e.to_string())
            } else if e.is_connect() {
                Error::Unreachable(e.to_string())
            } else {
                Error::Failed(e.to_string())
            }
        })?;
        let (mut parts, body) = resp.into_parts();
        hop::rewrite_response(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::Incoming(body)))
    }

    /// A request for the streamed-body clients (HTTP/2, or hyper's HTTP/1.1), which take `Host`
    /// or `:authority` from the URI.
    fn request(&self, head: &Head<'_>, body: Body) -> Result<Request<Body>, Error> {
        let uri = origin::absolute(&self.upstream.scheme, &self.upstream.authority, head.target)
            .ok_or_else(|| Error::Failed(format!("request target {:?} is not a valid URI", head.target)))?;
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = head.headers.clone();
        Ok(req)
    }
}

fn origin_error(e: origin::Error) -> Error {
    if let Some(refused) = super::egress::refusal(&e) {
        return Error::Proxy(refused);
    }
    if let Some(problem) = stream::certificate_problem(&e) {
        return Error::Certificate(problem);
    }
    match e {
        origin::Error::Http1(h1::Error::Busy(busy)) => Error::Busy(busy.to_string()),
        e if e.is_connect() => Error::Unreachable(e.to_string()),
        e => Error::Failed(e.to_string()),
    }
}

/// How a route reaches its upstream.
#[derive(Clone, Copy)]
pub struct Reach<'a> {
    /// The upstream.
    pub upstream: &'a Upstream,
    /// A CA bundle trusted besides the public roots.
    pub ca_file: Option<&'a PathBuf>,
    /// The client certificate presented when the upstream asks for one.
    pub identity: Option<&'a IdentityFiles>,
    /// HTTP/2 or HTTP/1.1 over TLS.
    pub protocol: UpstreamProtocol,
    /// The egress proxy settings, if any.
    pub egress: Option<&'a Egress>,
    /// The name the certificate must carry, when not the upstream's host.
    pub server_name: Option<&'a str>,
}

/// The TLS settings of an origin.
struct TlsFor<'a> {
    ca_file: Option<&'a PathBuf>,
    identity: Option<crate::tls::Identity>,
    server_name: Option<&'a str>,
}

/// What keys a pool by its proxy: the proxy and its credentials (never shown).
pub(super) fn proxy_key(proxy: Option<&ProxyUrl>) -> String {
    proxy.map_or_else(String::new, |p| {
        let user = p.credentials.as_ref().map_or("", |(u, _)| u.as_str());
        let password = p.credentials.as_ref().map_or("", |(_, s)| s.expose());
        format!("{p}|{user}|{password}")
    })
}

/// Builds the clients of a configuration: routes to the same origin (scheme, host, port, CA and
/// protocol) share its pools, and every upstream `host:port` has one set of connection slots.
pub struct Clients {
    limits: Limits,
    slots: Arc<UpstreamSlots>,
    pooled: pooled::Clients,
    origins: HashMap<String, Arc<Origin>>,
}

impl Clients {
    /// No clients yet, under `limits`.
    pub fn new(limits: &Limits) -> Self {
        Clients {
            limits: limits.clone(),
            slots: UpstreamSlots::new(limits.upstream_max_connections, limits.upstream_queue_timeout),
            pooled: pooled::Clients::default(),
            origins: HashMap::new(),
        }
    }

    /// The client for a route's upstream, as `reach` describes it. The identity's files are
    /// read now: a reload after they change builds new connections with the new certificate,
    /// while those in flight finish on the old one.
    pub fn client(&mut self, reach: &Reach<'_>) -> Result<Client, String> {
        let Reach { upstream, ca_file, identity, protocol, egress, server_name } = *reach;
        let https = upstream.scheme == http::uri::Scheme::HTTPS;
        let proxy = egress.and_then(|e| e.proxy_for(https, upstream.authority.host()));
        let loaded = identity.map(crate::tls::Identity::load).transpose()?;
        let identity_key = identity
            .map(|i| format!("{}|{}", i.cert_file.display(), i.key_file.display()))
            .unwrap_or_default();
        let pooled = self
            .pooled
            .get(
                &self.limits,
                pooled::Trust { ca_file, server_name },
                loaded.clone().map(|id| (identity_key.as_str(), id)),
                &self.slots,
                proxy,
            )
            .map_err(|e| e.to_string())?;
        let key = format!(
            "{}://{}|{}|{identity_key}|{protocol:?}|{}|{}",
            upstream.scheme,
            upstream.authority.as_str().to_ascii_lowercase(),
            ca_file.map(|p| p.display().to_string()).unwrap_or_default(),
            proxy_key(proxy),
            server_name.unwrap_or_default(),
        );
        let origin = match self.origins.get(&key) {
            Some(o) => o.clone(),
            None => {
                let offer_h2 = https && protocol == UpstreamProtocol::Auto;
                let tls = TlsFor { ca_file, identity: loaded, server_name };
                let o = Arc::new(self.origin(upstream, tls, offer_h2, proxy)?);
                self.origins.insert(key, o.clone());
                o
            }
        };
        Ok(Client { origin, pooled, upstream: upstream.clone() })
    }

    fn origin(
        &self,
        upstream: &Upstream,
        tls: TlsFor<'_>,
        offer_h2: bool,
        proxy: Option<&ProxyUrl>,
    ) -> Result<Origin, String> {
        let TlsFor { ca_file, identity, server_name } = tls;
        let limits = &self.limits;
        let max_head = usize::try_from(limits.max_header_size).unwrap_or(usize::MAX);
        let alpn = if offer_h2 { origin::H2_OR_H1 } else { origin::H1_ONLY };
        let tls = if upstream.scheme == http::uri::Scheme::HTTPS {
            Some(
                stream::Tls::new(
                    server_name.unwrap_or(upstream.authority.host()),
                    ca_file.map(PathBuf::as_path),
                    identity,
                    alpn,
                )
                .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let pool = Arc::new(h1::Pool::new(
            &upstream.authority,
            tls,
            limits.upstream_connect_timeout,
            limits.upstream_idle_timeout,
            max_head,
            &self.slots,
            proxy.cloned(),
        ));
        pool.share_idle();
        let h2 = offer_h2.then(|| super::h2::Connections::new(limits.upstream_idle_timeout, max_head));
        Ok(Origin::new(pool, h2, upstream.scheme.clone(), upstream.authority.clone()))
    }
}
