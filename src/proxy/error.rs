//! Every way a request can fail inside tokengate, mapped to a status and a small JSON body.

use http::{HeaderValue, Response, StatusCode, header};

use super::Body;
use crate::route::PathError;

/// A request that tokengate answers itself. The body names the problem with a stable `error`
/// code and never carries internal detail (addresses, IdP answers, secrets).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No route's prefix matches the path.
    #[error("no route matches this path")]
    NoRoute {
        /// The request path.
        path: String,
    },
    /// The path is ambiguous or climbs out of its prefix.
    #[error("invalid request path: {0}")]
    InvalidPath(PathError),
    /// `GET http://host/...`: tokengate is a reverse proxy, not an open forward proxy.
    #[error("absolute-form request targets are not accepted; send the path only")]
    AbsoluteForm,
    /// A forward-proxy listener needs `GET http://host/path`.
    #[error("this is the forward-proxy listener: send absolute-form requests (GET http://host/path)")]
    OriginForm,
    /// `CONNECT` tunnels are never opened.
    #[error("CONNECT is not supported")]
    Connect,
    /// An upgrade this route does not forward: any but WebSocket, or WebSocket on a route
    /// without `websocket: true`.
    #[error("{0}")]
    UpgradeNotSupported(&'static str),
    /// A WebSocket opening handshake that cannot be forwarded as it is.
    #[error("invalid WebSocket handshake: {0}")]
    InvalidWebSocket(&'static str),
    /// Access control refused the request.
    #[error("{}", denied_message(*.0))]
    Denied(super::Denied),
    /// The route does not allow this method.
    #[error("this route does not allow the method")]
    MethodNotAllowed {
        /// The methods it allows.
        allow: Vec<http::Method>,
    },
    /// `Transfer-Encoding` other than one `chunked` (a compression coding, an unknown one, two
    /// headers): the body's meaning would change on the way (RFC 9112 section 6.1).
    #[error(
        "transfer codings other than a single 'chunked' are not supported; send the body with Content-Length or chunked alone"
    )]
    TransferCoding,
    /// A malformed or ambiguous header.
    #[error("invalid request header: {0}")]
    InvalidHeader(&'static str),
    /// The issuer's keys that would check the caller's JWT cannot be read right now.
    #[error("the keys that check this caller's token cannot be read right now; retry later")]
    CallerKeysUnavailable,
    /// The route's provider exchanges the caller's JWT, and this caller was not known by one.
    #[error("this route exchanges the caller's own token: send a bearer token of a caller known by jwt")]
    CallerTokenNeeded,
    /// Callers are configured and the request is none of them.
    #[error("this request is from no known caller: send its API key or token")]
    CallerUnknown,
    /// A bearer token was presented that no caller accepts; it is never passed on.
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    /// The route's provider has no valid token.
    #[error("no valid token is available for this route's provider")]
    TokenUnavailable {
        /// The provider.
        provider: String,
        /// When its next fetch is due.
        retry_in: std::time::Duration,
    },
    /// The upstream could not be reached.
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    /// TLS to the upstream failed on its certificate: the message says why and the fix (the
    /// route's configuration, not a secret).
    #[error("the upstream's TLS certificate was refused: {0}")]
    UpstreamCertificate(String),
    /// The egress proxy refused or failed the connection to the upstream.
    #[error("the egress proxy refused or could not open the connection to the upstream")]
    EgressProxy,
    /// The upstream did not answer in time.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The request body is larger than `limits.max_body_size`.
    #[error("the request body is larger than this proxy accepts")]
    BodyTooLarge,
    /// The client paused sending the body for longer than `limits.body_read_timeout`.
    #[error("the request body was not received in time")]
    BodyTimeout,
    /// The request body could not be read (malformed chunked encoding, say).
    #[error("the request body could not be read")]
    InvalidBody,
    /// The upstream connection failed after it was established.
    #[error("the upstream connection failed")]
    UpstreamFailed,
    /// Every connection slot of the upstream stayed taken for `upstream_queue_timeout`.
    #[error("the upstream has too many requests in progress; retry later")]
    UpstreamBusy,
    /// `max_requests_in_flight` requests are already being worked on.
    #[error("tokengate has too many requests in progress; retry later")]
    Overloaded,
}

impl ProxyError {
    /// Status and stable error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            ProxyError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            ProxyError::AbsoluteForm => (StatusCode::BAD_REQUEST, "absolute_form_not_allowed"),
            ProxyError::Connect => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ProxyError::UpgradeNotSupported(_) => (StatusCode::NOT_IMPLEMENTED, "upgrade_not_supported"),
            ProxyError::InvalidWebSocket(_) => (StatusCode::BAD_REQUEST, "invalid_websocket_handshake"),
            ProxyError::OriginForm => (StatusCode::BAD_REQUEST, "absolute_form_required"),
            ProxyError::TokenUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable"),
            ProxyError::Denied(super::Denied::ApiKey) => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            ProxyError::Denied(super::Denied::ProxyApiKey) => {
                (StatusCode::PROXY_AUTHENTICATION_REQUIRED, "invalid_api_key")
            }
            ProxyError::Denied(d) => (StatusCode::FORBIDDEN, d.label()),
            ProxyError::CallerUnknown => (StatusCode::UNAUTHORIZED, "caller_unknown"),
            ProxyError::CallerKeysUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "caller_keys_unavailable"),
            ProxyError::CallerTokenNeeded => (StatusCode::UNAUTHORIZED, "caller_token_needed"),
            ProxyError::InvalidToken(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ProxyError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ProxyError::InvalidHeader(_) => (StatusCode::BAD_REQUEST, "invalid_header"),
            ProxyError::TransferCoding => (StatusCode::NOT_IMPLEMENTED, "unsupported_transfer_coding"),
            ProxyError::UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            ProxyError::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::EgressProxy => (StatusCode::BAD_GATEWAY, "egress_proxy_failed"),
            ProxyError::UpstreamCertificate(_) => (StatusCode::BAD_GATEWAY, "upstream_certificate_refused"),
            ProxyError::UpstreamFailed => (StatusCode::BAD_GATEWAY, "upstream_error"),
            ProxyError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ProxyError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ProxyError::InvalidBody => (StatusCode::BAD_REQUEST, "invalid_body"),
            ProxyError::UpstreamBusy => (StatusCode::SERVICE_UNAVAILABLE, "upstream_busy"),
            ProxyError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        }
    }

    /// The JSON response.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let mut body = serde_json::json!({ "error": code, "message": self.to_string() });
        let mut allow_header = None;
        match &self {
            ProxyError::NoRoute { path } => body["path"] = path.as_str().into(),
            ProxyError::TokenUnavailable { provider, .. } => body["provider"] = provider.as_str().into(),
            ProxyError::MethodNotAllowed { allow } => {
                let list = allow.iter().map(http::Method::as_str).collect::<Vec<_>>().join(", ");
                allow_header = HeaderValue::from_str(&list).ok();
            }
            _ => {}
        }
        let mut resp = json_response(status, &body);
        if let Some(v) = allow_header {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        let h = resp.headers_mut();
        match &self {
            // Load passes quickly; a client that honours Retry-After comes back soon.
            ProxyError::UpstreamBusy | ProxyError::Overloaded | ProxyError::CallerKeysUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // When the provider's next fetch is due, in whole seconds, at least 1.
            ProxyError::TokenUnavailable { retry_in, .. } => {
                let secs = retry_in.as_secs() + u64::from(retry_in.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            // RFC 6750 section 3.
            ProxyError::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            // RFC 9110 section 11.6.1: a 401 says how to authenticate.
            ProxyError::Denied(super::Denied::ApiKey) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey realm=\"tokengate\""));
            }
            // HTTP_PROXY clients send the key as the proxy password (RFC 9110 section 11.7.1).
            ProxyError::Denied(super::Denied::ProxyApiKey) => {
                h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"tokengate\""));
            }
            // The body's framing is not trusted: nothing after it may be read as a request.
            ProxyError::TransferCoding => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

fn denied_message(d: super::Denied) -> &'static str {
    use super::Denied;
    match d {
        Denied::Address => "this client address may not use this proxy or route",
        Denied::Host => "this Host is not served here",
        Denied::Browser => "requests from web browsers are not accepted",
        Denied::ApiKey => "a valid API key is required",
        Denied::ProxyApiKey => "a valid API key is required as the proxy password",
        Denied::ClientCert => "this route requires a client certificate",
        Denied::Caller => "this caller may not use this route",
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut bytes = body.to_string().into_bytes();
    bytes.push(b'\n');
    let mut resp = Response::new(Body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
