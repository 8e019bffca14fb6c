//! The first phases of a request: is it well-formed, may this client use this route?

use std::net::SocketAddr;

use http::{Method, Request, Version, header};

use super::{ProxyError, Route, Runtime};
use crate::config::allowed;
use crate::route;

/// What the request path knows about the downstream connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The client's address.
    pub remote: SocketAddr,
    /// Arrived on the TLS listener.
    pub secure: bool,
    /// The client presented a certificate that chains to the configured client CA.
    pub client_cert: bool,
    /// Who the verified client certificate names, for callers known by certificate.
    pub peer: Option<std::sync::Arc<crate::caller::PeerCert>>,
    /// Arrived on the forward-proxy listener: absolute-form targets, routes matched by host.
    pub forward: bool,
}

/// Why a request was refused by access control; the `reason` label of
/// `tokengate_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The client address is not in an allow list.
    Address,
    /// `Host` is not one this proxy serves.
    Host,
    /// The request comes from a web browser.
    Browser,
    /// No API key, or an unknown one.
    ApiKey,
    /// No API key, or an unknown one, as the proxy password on the forward-proxy listener.
    ProxyApiKey,
    /// The route needs a verified client certificate.
    ClientCert,
    /// The caller is not one the route serves.
    Caller,
}

impl Denied {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Denied::Address => "address_not_allowed",
            Denied::Host => "host_not_allowed",
            Denied::Browser => "browser_request",
            Denied::ApiKey | Denied::ProxyApiKey => "invalid_api_key",
            Denied::ClientCert => "client_cert_required",
            Denied::Caller => "caller_not_allowed",
        }
    }
}

/// Checks the request's form and the listener-wide rules: request target, path, `Host`, header
/// names, browser headers, client address. The path is put in its normal form (see
/// [`route::normalize`]): what is routed and checked is what the upstream receives. Says whether
/// the request asks for a WebSocket.
pub fn admit<B>(
    req: &mut Request<B>,
    conn: &Conn,
    runtime: &Runtime,
) -> Result<Option<super::websocket::Ask>, ProxyError> {
    let ask = super::websocket::asks(req)?;
    if conn.forward {
        // An HTTP_PROXY client names the upstream: `GET http://host/path`.
        if req.uri().scheme_str() != Some("http") || req.uri().authority().is_none() {
            return Err(ProxyError::OriginForm);
        }
    } else if req.version() != Version::HTTP_2 && req.uri().scheme().is_some() {
        // HTTP/2 requests always carry scheme and authority; only HTTP/1 absolute-form is refused.
        return Err(ProxyError::AbsoluteForm);
    }
    let normal = match route::normalize(req.uri().path()).map_err(ProxyError::InvalidPath)? {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(normal) => Some(normal),
    };
    if let Some(path) = normal {
        *req.uri_mut() = with_path(req.uri(), &path)?;
    }
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next()
        && (codings.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"))
    {
        return Err(ProxyError::TransferCoding);
    }
    let host_headers = req.headers().get_all(header::HOST).iter().count();
    let host_ok = match req.version() {
        Version::HTTP_2 | Version::HTTP_10 | Version::HTTP_09 => host_headers <= 1,
        _ => host_headers == 1,
    };
    if !host_ok {
        return Err(ProxyError::InvalidHeader("exactly one Host header is required"));
    }
    // Upstreams may treat `_` and `-` alike, so `x_api_key` could smuggle a header past a
    // filter on `x-api-key`.
    if req.headers().keys().any(|k| k.as_str().contains('_')) {
        return Err(ProxyError::InvalidHeader("header names with underscores are not accepted"));
    }
    let listener_allow = match (conn.forward, conn.secure) {
        (true, _) => &runtime.forward_allow,
        (false, true) => &runtime.tls_allow,
        (false, false) => &runtime.access.allow,
    };
    if !allowed(listener_allow, conn.remote.ip()) {
        return Err(ProxyError::Denied(Denied::Address));
    }
    // On the forward-proxy listener, Host names the upstream, which chooses the route. An
    // HTTP/1.0 request may have none; browsers always send one.
    let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("?"));
    let host = host.or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !conn.forward && host.is_some_and(|h| !crate::config::host_served(&runtime.access.hosts, h)) {
        return Err(ProxyError::Denied(Denied::Host));
    }
    if !runtime.access.allow_browsers && from_browser(req.headers()) {
        return Err(ProxyError::Denied(Denied::Browser));
    }
    Ok(ask)
}

/// Methods a route serves unless its `methods` list says otherwise. `TRACE` echoes the request,
/// credential included, back to whoever sent it; unknown methods (WebDAV and the like) are for
/// routes that name them.
pub const DEFAULT_METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS];

/// Headers that frameworks (Rails, Express, Spring, Google APIs) read as the request's method.
// Names made at compile time: a `&str` would be parsed again on every request.
static METHOD_OVERRIDES: [header::HeaderName; 3] = [
    header::HeaderName::from_static("x-http-method-override"),
    header::HeaderName::from_static("x-http-method"),
    header::HeaderName::from_static("x-method-override"),
];

/// Checks the route's own rules: address, method, API key, client certificate.
pub fn authorize<B>(
    req: &Request<B>,
    conn: &Conn,
    route: &Route,
    runtime: &Runtime,
) -> Result<(), ProxyError> {
    if !allowed(&route.allow, conn.remote.ip()) {
        return Err(ProxyError::Denied(Denied::Address));
    }
    // A method override header is the method to frameworks that honour it, so it must pass the
    // same rule as the request method.
    let overrides = METHOD_OVERRIDES.iter().flat_map(|h| req.headers().get_all(h));
    let overridden = overrides.map(|v| Method::from_bytes(v.as_bytes()).map_err(|_| ()));
    let allowed_method = |m: &Method| {
        if route.methods.is_empty() { DEFAULT_METHODS.contains(m) } else { route.methods.contains(m) }
    };
    // An HTTP/2 WebSocket (extended CONNECT) is the HTTP/1.1 upgrade's GET.
    let method = if req.method() == Method::CONNECT { &Method::GET } else { req.method() };
    let refused =
        !allowed_method(method) || overridden.into_iter().any(|m| !m.is_ok_and(|m| allowed_method(&m)));
    if refused {
        let allow = if route.methods.is_empty() { DEFAULT_METHODS.to_vec() } else { route.methods.clone() };
        return Err(ProxyError::MethodNotAllowed { allow });
    }
    if route.require_api_key {
        let ok = runtime.access.api_keys.as_ref().is_some_and(|keys| {
            match req.headers().get(&keys.header) {
                Some(value) => keys.accepts(value.as_bytes()),
                // HTTP_PROXY clients can only send proxy credentials: the key is the password of
                // `http://any-user:KEY@tokengate:3128`.
                None if conn.forward => proxy_password(req).is_some_and(|p| keys.accepts(&p)),
                None => false,
            }
        });
        if !ok {
            return Err(ProxyError::Denied(if conn.forward { Denied::ProxyApiKey } else { Denied::ApiKey }));
        }
    }
    if route.require_client_cert && !conn.client_cert {
        return Err(ProxyError::Denied(Denied::ClientCert));
    }
    Ok(())
}

/// `uri` with its path replaced, query kept.
fn with_path(uri: &http::Uri, path: &str) -> Result<http::Uri, ProxyError> {
    let mut target = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    target.push_str(path);
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(target.parse().map_err(|_| ProxyError::InvalidPath(route::PathError::BadByte))?);
    http::Uri::from_parts(parts).map_err(|_| ProxyError::InvalidPath(route::PathError::BadByte))
}

/// The password of `Proxy-Authorization: Basic base64(user:password)`.
fn proxy_password<B>(req: &Request<B>) -> Option<Vec<u8>> {
    use base64::Engine;
    let value = req.headers().get(header::PROXY_AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// True when a web browser sent the request (`Origin`, `Sec-Fetch-*`): a page must not be able
/// to use tokengate's credentials, or its admin endpoints, through the user's browser.
pub(crate) fn from_browser(headers: &http::HeaderMap) -> bool {
    // One pass over the names a request carries (a handful) costs less than three hashed lookups.
    headers
        .keys()
        .any(|name| *name == header::ORIGIN || matches!(name.as_str(), "sec-fetch-mode" | "sec-fetch-site"))
}

#[cfg(test)]
mod tests {
    use super::from_browser;

    #[test]
    fn a_browser_is_known_by_origin_or_fetch_metadata() {
        let with = |names: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for name in names {
                let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap_or(http::header::ACCEPT);
                headers.append(name, http::HeaderValue::from_static("x"));
            }
            from_browser(&headers)
        };
        assert!(!with(&[]));
        assert!(!with(&["accept", "user-agent", "sec-fetch-dest", "originator"]));
        for name in ["Origin", "sec-fetch-mode", "Sec-Fetch-Site"] {
            assert!(with(&["accept", name]), "{name}");
        }
    }
}
