//! Sending a request to an identity provider with the safety settings every provider needs.

use std::time::{Duration, SystemTime};

use crate::config::ProviderCommon;

use super::error::FetchError;
use super::response;

/// Largest IdP response read; a token response is a few KiB at most.
const MAX_BODY: usize = 1 << 20;

/// A client for one provider: bounded time, no redirects (a 307 would re-post the secret to
/// another host), no environment proxies, verified TLS.
pub fn client(common: &ProviderCommon) -> Result<reqwest::Client, String> {
    client_with(common, None)
}

/// As [`client`], presenting `identity` for mutual TLS (RFC 8705).
pub fn client_with(
    common: &ProviderCommon,
    identity: Option<crate::tls::Identity>,
) -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config_with(common.ca_file.as_deref(), &[b"h2", b"http/1.1"], identity)
        .map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .timeout(common.timeout)
        .connect_timeout(common.timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// What came back.
pub struct Reply {
    /// Status.
    pub status: http::StatusCode,
    /// Body, at most 1 MiB.
    pub body: Vec<u8>,
    /// The `Date` header, for absolute expiry times.
    pub date: Option<SystemTime>,
    /// The `Retry-After` header.
    pub retry_after: Option<Duration>,
}

/// Sends the request and reads the reply.
pub async fn send(builder: reqwest::RequestBuilder) -> Result<Reply, FetchError> {
    let mut resp = builder.send().await.map_err(classify)?;
    let status = resp.status();
    let header =
        |name: http::HeaderName| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let date = header(http::header::DATE).and_then(|d| httpdate::parse_http_date(&d).ok());
    let retry_after = response::retry_after(header(http::header::RETRY_AFTER).as_deref());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Malformed("the response is larger than 1 MiB".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply { status, body, date, retry_after })
}

fn classify(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout;
    }
    // The innermost cause ("connection refused") is what an operator acts on.
    let mut innermost: Option<String> = None;
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        innermost = Some(c.to_string());
        cur = c.source();
    }
    let msg = e.without_url().to_string();
    FetchError::Network(match innermost {
        Some(c) if !msg.contains(&c) => format!("{msg}: {c}"),
        _ => msg,
    })
}
