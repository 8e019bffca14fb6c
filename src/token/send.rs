//! Sending a request to an identity provider with the safety settings every provider needs.

use std::time::{Duration, SystemTime};

use crate::config::{Egress, ProviderCommon, ProxyUrl};

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
    let mut builder = reqwest::Client::builder()
        .timeout(common.timeout)
        .connect_timeout(common.timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        // The environment's proxies are used only when the configuration says `env`.
        .no_proxy()
        .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured(tls);
    if let Some(egress) = common.egress.clone() {
        builder = builder.proxy(reqwest::Proxy::custom(move |url| {
            let proxy = egress.proxy_for(url.scheme() == "https", url.host_str()?)?;
            proxy_url(proxy)
        }));
    }
    builder.build().map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The proxy as reqwest takes it: credentials in the URL.
fn proxy_url(proxy: &ProxyUrl) -> Option<reqwest::Url> {
    let mut url = reqwest::Url::parse(&proxy.to_string()).ok()?;
    if let Some((user, password)) = &proxy.credentials {
        url.set_username(user).ok()?;
        url.set_password(Some(password.expose())).ok()?;
    }
    Some(url)
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

/// Sends the request and reads the reply; `egress` says which proxy it goes through, so its
/// failures are reported as the proxy's, not the identity provider's.
pub async fn send(builder: reqwest::RequestBuilder, egress: Option<&Egress>) -> Result<Reply, FetchError> {
    let (client, request) = builder.build_split();
    let request = request.map_err(|e| classify(e, None))?;
    let url = request.url();
    let via = egress.and_then(|e| e.proxy_for(url.scheme() == "https", url.host_str().unwrap_or_default()));
    let via = via.map(ToString::to_string);
    let mut resp = client.execute(request).await.map_err(|e| classify(e, via.as_deref()))?;
    let status = resp.status();
    if let Some(proxy) = via
        && refused_by_proxy(status, resp.headers())
    {
        return Err(FetchError::EgressProxy(format!("{proxy} {PROXY_AUTH}")));
    }
    let header =
        |name: http::HeaderName| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let date = header(http::header::DATE).and_then(|d| httpdate::parse_http_date(&d).ok());
    let retry_after = response::retry_after(header(http::header::RETRY_AFTER).as_deref());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(e, None))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(FetchError::Malformed("the response is larger than 1 MiB".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply { status, body, date, retry_after })
}

/// A 407, or a 401 that is no token endpoint's (no JSON body; tinyproxy answers refused
/// credentials so), came from the proxy.
fn refused_by_proxy(status: http::StatusCode, headers: &http::HeaderMap) -> bool {
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    status == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
        || (status == http::StatusCode::UNAUTHORIZED && !json)
}

/// What a 407 from the egress proxy means to an operator.
const PROXY_AUTH: &str = "answered 407 Proxy Authentication Required: check the user and password in egress_proxy (or egress_proxy_password_file)";

fn classify(e: reqwest::Error, via: Option<&str>) -> FetchError {
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
    let connect = e.is_connect();
    let msg = e.without_url().to_string();
    let msg = match innermost {
        Some(c) if !msg.contains(&c) => format!("{msg}: {c}"),
        _ => msg,
    };
    let lower = msg.to_ascii_lowercase();
    match via {
        None => FetchError::Network(msg),
        // Through a proxy, the connection is the proxy's: it failed, not the IdP's.
        Some(proxy) if lower.contains("407") || lower.contains("proxy auth") => {
            FetchError::EgressProxy(format!("{proxy} {PROXY_AUTH}"))
        }
        Some(proxy) if connect => FetchError::EgressProxy(format!(
            "{proxy} cannot be reached or refused the way to the token endpoint: {msg}"
        )),
        Some(proxy) => FetchError::EgressProxy(format!(
            "{proxy}: the connection through it failed before the token endpoint answered ({msg}); a proxy that refuses credentials may reset it: check egress_proxy"
        )),
    }
}
