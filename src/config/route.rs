//! A route's keys: its prefix, upstream, provider and what it forwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// How tokengate speaks to an `https://` upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// Each new connection offers HTTP/2 and HTTP/1.1 by ALPN and the upstream chooses. HTTP/2
    /// connections are held per worker thread and carry many requests at once; HTTP/1.1 ones
    /// are the lean keep-alive connections. Either way a second worker adds throughput.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN `http/1.1`), for upstreams whose HTTP/2 is broken or slow.
    Http1,
}

/// One route: requests whose path starts with `prefix` go to `upstream` with `provider`'s token.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Label used in metrics and logs (default: the prefix).
    #[serde(default)]
    pub name: Option<Text>,
    /// Path prefix, matched on whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    pub prefix: Prefix,
    /// Upstream base URL: `https://host[:port][/base/path]`.
    pub upstream: Upstream,
    /// Name of the provider whose token is attached.
    pub provider: Text,
    /// Remove the prefix before forwarding (default true).
    #[serde(default = "value::yes")]
    pub strip_prefix: bool,
    /// Extra PEM CA bundle trusted for this upstream, in addition to the public roots.
    #[schemars(with = "Option<crate::config::json_schema::PathText>")]
    #[serde(default, deserialize_with = "value::opt_path")]
    pub ca_file: Option<PathBuf>,
    /// How requests reach an `https://` upstream (plain `http://` is always HTTP/1.1).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// The name the upstream's certificate must carry (and the TLS SNI), when it is not the
    /// upstream's host: an upstream reached by IP address or through an alias.
    #[serde(default)]
    pub server_name: Option<Text>,
    /// A client certificate (PEM chain, leaf first) presented to an `https://` upstream that
    /// asks for one; with `client_key_file`.
    #[schemars(with = "Option<crate::config::json_schema::PathText>")]
    #[serde(default, deserialize_with = "value::opt_path")]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `client_cert_file`.
    #[schemars(with = "Option<crate::config::json_schema::PathText>")]
    #[serde(default, deserialize_with = "value::opt_path")]
    pub client_key_file: Option<PathBuf>,
    /// Client address blocks allowed on this route, in addition to the listener's list.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Methods allowed on this route (default: any); others get 405.
    #[schemars(with = "Vec<String>")]
    #[serde(default, deserialize_with = "methods")]
    pub methods: Vec<http::Method>,
    /// Require an inbound API key (default: true when `access.api_keys` is set).
    #[serde(default)]
    pub require_api_key: Option<bool>,
    /// Require a verified client certificate (only reachable through the TLS listener).
    #[serde(default)]
    pub require_client_cert: bool,
    /// After an upstream 401, fetch a new token and replay the request once (default true).
    #[serde(default = "value::yes")]
    pub retry_on_401: bool,
    /// Headers set on every upstream request of this route (an API's tenant header, say).
    #[schemars(with = "std::collections::BTreeMap<String, String>")]
    #[serde(default, deserialize_with = "provider::header_map")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Where the credential goes; `None` (not written) is `Authorization: Bearer <token>`.
    #[serde(default)]
    pub inject: Option<Inject>,
    /// Forward WebSocket upgrades (HTTP/1.1 `Upgrade: websocket`, HTTP/2 extended CONNECT) with
    /// the credential on the upgrade request, then tunnel both ways. Implied by a `ws://` or
    /// `wss://` upstream; without it upgrades get 501.
    #[serde(default)]
    pub websocket: bool,
    /// When a WebSocket tunnel is closed (close 1001) so the client reconnects: `token` (before
    /// the token it was opened with expires) or a duration. Default: no limit.
    #[serde(default)]
    pub websocket_max_lifetime: Option<TunnelLifetime>,
    /// The callers that may use this route (empty: every caller); others get 403.
    #[serde(default)]
    pub callers: Vec<Text>,
    /// Another provider for some callers: their requests carry that provider's token.
    #[serde(default)]
    pub provider_by_caller: BTreeMap<String, Text>,
    /// `egress_proxy` for this route's upstream (`None`: the top-level setting).
    #[serde(default)]
    pub egress_proxy: Option<EgressSetting>,
    /// How the upstream is reached, resolved with the top-level settings at load.
    #[serde(skip)]
    pub egress: Option<Egress>,
}

/// How long a WebSocket tunnel may stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelLifetime {
    /// Until the token it was opened with is no longer usable.
    Token,
    /// A fixed time.
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for TunnelLifetime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        if text == "token" {
            return Ok(TunnelLifetime::Token);
        }
        match value::parse_duration(&text) {
            Ok(d) if !d.is_zero() => Ok(TunnelLifetime::Fixed(d)),
            _ => Err(serde::de::Error::custom(format!(
                "{text:?}: `token` (close before the token expires) or a duration such as 10m"
            ))),
        }
    }
}

fn methods<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<http::Method>, D::Error> {
    Vec::<Text>::deserialize(d)?
        .into_iter()
        .map(|m| {
            let upper = m.0.to_ascii_uppercase();
            if upper == "CONNECT" {
                return Err(serde::de::Error::custom("CONNECT cannot be allowed on a route"));
            }
            http::Method::from_bytes(upper.as_bytes())
                .map_err(|_| serde::de::Error::custom(format!("{:?} is not an HTTP method", m.0)))
        })
        .collect()
}

impl RouteConfig {
    /// The label for metrics and logs.
    pub fn label(&self) -> &str {
        self.name.as_ref().map_or(self.prefix.as_str(), |n| n.0.as_str())
    }

    /// WebSocket upgrades are forwarded (`websocket: true`, or a `ws://`/`wss://` upstream).
    pub fn websocket(&self) -> bool {
        self.websocket || self.upstream.websocket
    }

    /// The client certificate presented to the upstream, if any (the load checks that both
    /// files are named together).
    pub fn client_identity(&self) -> Option<IdentityFiles> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert_file), Some(key_file)) => {
                Some(IdentityFiles { cert_file: cert_file.clone(), key_file: key_file.clone() })
            }
            _ => None,
        }
    }
}

/// A route prefix: starts with `/`, no trailing `/` (except the root), no `.`/`..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// Parses and normalises a prefix.
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("prefix {s:?} must start with '/'"));
        }
        // Requests are matched in normal form, so the prefix is put in it too.
        let Ok(normal) = crate::route::normalize(s) else {
            return Err(format!(
                "prefix {s:?} must be a plain path: no '.', '..' or empty segments, percent-encoded slashes or control characters"
            ));
        };
        if s.contains(['?', '#', ';']) {
            return Err(format!("prefix {s:?} must not contain '?', '#' or ';'"));
        }
        if s.contains('*') {
            return Err(format!(
                "prefix {s:?}: no wildcards; a prefix already matches every path below it, so write {:?}",
                s.split('*').next().unwrap_or("/").trim_end_matches('/')
            ));
        }
        let trimmed = normal.trim_end_matches('/');
        Ok(Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() }))
    }

    /// The normalised prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Prefix::parse(&Text::deserialize(d)?.0).map_err(serde::de::Error::custom)
    }
}

/// Where a route forwards to: scheme, authority and an optional base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// `host[:port]`, also sent as `Host`.
    pub authority: http::uri::Authority,
    /// Base path without trailing slash (empty for none).
    pub base_path: String,
    /// Written `ws://` or `wss://` (reached as `http://` or `https://`).
    pub websocket: bool,
}

impl Upstream {
    /// Parses `https://host[:port][/base]`; no query, fragment or user info.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("upstream {s:?} is not a valid URL: {e}"))?;
        let (scheme, websocket) = match uri.scheme_str() {
            Some("https") => (http::uri::Scheme::HTTPS, false),
            Some("http") => (http::uri::Scheme::HTTP, false),
            Some("wss") => (http::uri::Scheme::HTTPS, true),
            Some("ws") => (http::uri::Scheme::HTTP, true),
            _ => {
                return Err(format!("upstream {s:?} must start with https://, http://, wss:// or ws://"));
            }
        };
        let authority = uri.authority().cloned().ok_or_else(|| format!("upstream {s:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "upstream {s:?} must not contain user info; credentials come from the provider"
            ));
        }
        if authority.host().is_empty() {
            return Err(format!("upstream {s:?} has no host"));
        }
        if uri.query().is_some() || s.contains('#') {
            return Err(format!("upstream {s:?} must not have a query or fragment"));
        }
        let path = match uri.path() {
            "/" => "/".into(),
            path => crate::route::normalize(path)
                .map_err(|_| format!("upstream {s:?} has an invalid base path"))?,
        };
        Ok(Upstream { scheme, authority, base_path: path.trim_end_matches('/').to_owned(), websocket })
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match (self.websocket, self.scheme == http::uri::Scheme::HTTPS) {
            (false, _) => self.scheme.as_str(),
            (true, true) => "wss",
            (true, false) => "ws",
        };
        write!(f, "{scheme}://{}{}", self.authority, self.base_path)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Upstream::parse(&Text::deserialize(d)?.0).map_err(serde::de::Error::custom)
    }
}
