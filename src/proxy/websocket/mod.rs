//! WebSocket through routes with `websocket: true`: the opening handshake (HTTP/1.1
//! `Upgrade: websocket`, or HTTP/2 extended CONNECT, RFC 8441) goes upstream as an HTTP/1.1
//! upgrade carrying the credential, and once the upstream switches, the bytes are relayed both
//! ways ([`relay`]) until one side ends, the tunnel idles, its lifetime ends or the listener
//! drains.

mod frames;
mod relay;
mod tunnels;

use base64::Engine;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;

pub use relay::Ended;
pub use tunnels::{ConnTunnels, Hold};

use super::error::ProxyError;
use super::{Conn, Notes, Proxy, Route, Runtime};
use crate::config::TunnelLifetime;
use crate::upstream::{self, Body};

/// The GUID of the accept hash (RFC 6455 section 1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How the client asked for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// HTTP/1.1 `GET` with `Upgrade: websocket`: answered `101 Switching Protocols`.
    Http1,
    /// HTTP/2 extended CONNECT with `:protocol websocket`: answered `200`.
    Http2,
}

/// Whether `req` asks for a WebSocket; an upgrade to anything else, or a CONNECT that is not
/// one, is refused. `Upgrade: h2c` (curl --http2 on http://) is an offer that may be ignored,
/// and is.
pub fn asks<B>(req: &Request<B>) -> Result<Option<Ask>, ProxyError> {
    if req.method() == Method::CONNECT {
        return match req.extensions().get::<hyper::ext::Protocol>() {
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => Ok(Some(Ask::Http2)),
            _ => Err(ProxyError::Connect),
        };
    }
    let mut websocket = false;
    for offer in req.headers().get_all(header::UPGRADE).iter() {
        for p in offer.to_str().unwrap_or("?").split(',').map(str::trim) {
            if p.eq_ignore_ascii_case("websocket") {
                websocket = true;
            } else if !p.eq_ignore_ascii_case("h2c") {
                return Err(ProxyError::UpgradeNotSupported("only WebSocket upgrades are forwarded"));
            }
        }
    }
    if !websocket {
        return Ok(None);
    }
    if req.version() != Version::HTTP_11 || req.method() != Method::GET {
        return Err(ProxyError::InvalidWebSocket("an upgrade to WebSocket is a GET over HTTP/1.1"));
    }
    let connection_upgrade =
        req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        });
    if !connection_upgrade {
        return Err(ProxyError::InvalidWebSocket("Upgrade: websocket needs Connection: upgrade"));
    }
    if req.headers().get(header::SEC_WEBSOCKET_KEY).is_none() {
        return Err(ProxyError::InvalidWebSocket("Sec-WebSocket-Key is missing"));
    }
    // Bytes after the head belong to the tunnel; a body in between would be read as frames.
    let framed = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if framed {
        return Err(ProxyError::InvalidWebSocket("a WebSocket handshake has no body"));
    }
    Ok(Some(Ask::Http1))
}

/// The `Sec-WebSocket-Accept` value that answers `key`.
fn accept(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Prepares the upstream handshake's headers (already rewritten for the upstream, credential
/// attached): an HTTP/2 client sends no key, so one is made; returns the key to check the
/// upstream's accept against.
pub fn upstream_key(ask: Ask, headers: &mut http::HeaderMap) -> HeaderValue {
    if ask == Ask::Http2 {
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let key = HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    headers.get(header::SEC_WEBSOCKET_KEY).cloned().unwrap_or(HeaderValue::from_static(""))
}

/// The client's answer to a switched upstream, or why there is none: the upstream must have
/// accepted the key it was sent.
pub fn switched(
    ask: Ask,
    key: &HeaderValue,
    upstream: &http::response::Parts,
) -> Result<Response<Body>, ProxyError> {
    let accepted = upstream.headers.get(header::SEC_WEBSOCKET_ACCEPT);
    if accepted.map(HeaderValue::as_bytes) != Some(accept(key.as_bytes()).as_bytes()) {
        return Err(ProxyError::UpstreamFailed);
    }
    let mut resp = Response::new(Body::Empty);
    if ask == Ask::Http1 {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    let h = resp.headers_mut();
    for (name, value) in &upstream.headers {
        // The HTTP/2 client sent no key; its answer carries no accept.
        if ask == Ask::Http2 && name == header::SEC_WEBSOCKET_ACCEPT {
            continue;
        }
        h.append(name, value.clone());
    }
    if ask == Ask::Http1 {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    h.remove(header::CONTENT_LENGTH);
    Ok(resp)
}

/// Relays between the client's upgraded connection and `tunnel` on a task of its own, holding
/// `hold` (the downstream connection's count) and reporting how it ended to `ended`.
fn spawn(
    upgrade: hyper::upgrade::OnUpgrade,
    tunnel: upstream::Tunnel,
    limits: relay::Limits,
    hold: Hold,
    ended: impl FnOnce(Ended) + Send + 'static,
) {
    let drain = hold.draining();
    tokio::spawn(async move {
        let why = match upgrade.await {
            Ok(client) => relay::relay(hyper_util::rt::TokioIo::new(client), tunnel, limits, drain).await,
            Err(e) => {
                tracing::debug!(error = %e, "the client's connection was not upgraded");
                Ended::Error
            }
        };
        drop(hold);
        ended(why);
    });
}

impl Proxy {
    /// Forwards a WebSocket handshake with the credential; once the upstream switches, answers
    /// the client and relays. After an upstream 401, the handshake is sent once more with a new
    /// token.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_websocket(
        &self,
        runtime: &Runtime,
        route: &Route,
        mut req: Request<Incoming>,
        ask: Ask,
        conn: &Conn,
        tunnels: &ConnTunnels,
        notes: &mut Notes,
    ) -> Result<Response<Body>, ProxyError> {
        let upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        parts.method = Method::GET;
        let (mut request, mut token) = self.outgoing(runtime, route, parts, conn, notes).await?;
        let key = upstream_key(ask, &mut request.headers);
        let mut answer = self.upgrade(runtime, route, &request, notes).await?;
        if let upstream::Upgrade::Answered(resp) = &answer
            && resp.status() == StatusCode::UNAUTHORIZED
            && route.retry_on_401
        {
            match super::replacement(route, &token, notes).await {
                Some(fresh) => {
                    self.count_401(route, "replayed");
                    notes.replayed = true;
                    super::attach(&route.inject, &mut request, &fresh);
                    answer = self.upgrade(runtime, route, &request, notes).await?;
                    token = fresh;
                }
                None => self.count_401(route, "no_new_token"),
            }
        }
        let (head, tunnel) = match answer {
            upstream::Upgrade::Answered(resp) => {
                super::accepted(route, &token, resp.status());
                return Ok(resp);
            }
            upstream::Upgrade::Switched(head, tunnel) => (head, tunnel),
        };
        super::accepted(route, &token, head.status);
        let resp = switched(ask, &key, &head)?;
        let close_at = match route.websocket.flatten() {
            Some(TunnelLifetime::Token) if route.provider.expires() => Some(token.usable_until),
            Some(TunnelLifetime::Fixed(d)) => Some(tokio::time::Instant::now() + d),
            _ => None,
        };
        let limits = relay::Limits { idle: runtime.limits.idle_timeout, close_at };
        let metrics = self.metrics.clone();
        let label = route.label.clone();
        metrics.websocket_open.with_label_values(&[&label]).inc();
        spawn(upgrade, tunnel, limits, tunnels.hold(), move |why| {
            metrics.websocket_open.with_label_values(&[&label]).dec();
            metrics.websocket_closed.with_label_values(&[&label, why.label()]).inc();
        });
        Ok(resp)
    }

    /// Sends the handshake upstream within the upstream timeout and maps failures.
    async fn upgrade(
        &self,
        runtime: &Runtime,
        route: &Route,
        request: &super::Outgoing,
        notes: &mut Notes,
    ) -> Result<upstream::Upgrade, ProxyError> {
        // A traced handshake carries its own traceparent (the only case that copies the head).
        let mut headers = std::borrow::Cow::Borrowed(&request.headers);
        let exchange = notes.trace.as_ref().map(|t| t.upstream(headers.to_mut(), &route.upstream_text));
        let head = upstream::h1::Head { method: &request.method, target: &request.target, headers: &headers };
        let sent = std::time::Instant::now();
        let protocol = HeaderValue::from_static("websocket");
        let answer = route.client.upgrade(&head, &protocol, runtime.limits.upstream_timeout).await;
        notes.upstream_duration = Some(sent.elapsed());
        if let Some(span) = exchange {
            match &answer {
                Ok(upstream::Upgrade::Switched(head, _)) => span.responded(head.status.as_u16()),
                Ok(upstream::Upgrade::Answered(r)) => span.responded(r.status().as_u16()),
                Err(_) => span.done(false),
            }
        }
        answer.map_err(|e| self.upstream_error(route, &e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_matches_rfc_6455() {
        assert_eq!(super::accept(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
