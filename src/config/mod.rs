//! Configuration: the YAML schema, loading and validation.
//!
//! The file is parsed once into these types; the rest of tokengate never sees an invalid route, an
//! unknown grant or a missing secret. Every string value may use `${VAR}` (see [`mod@env`]).

mod access;
mod callers;
mod client_auth;
mod egress;
pub mod env;
mod files;
mod http_provider;
mod inject;
mod provider;
mod redis;
mod source;
pub mod static_provider;
mod value;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use access::{
    Access, ApiKeys, Cidr, ForwardedFormat, accepts_any, allowed, constant_time_eq, host_served,
};
pub use callers::{Caller, Callers, CertMatch, JwksSource, JwtCaller, Method, MethodKind, subject_matches};
pub use client_auth::{
    AssertionSettings, Audience, CertifiedPem, ClientAuth, IdentityFiles, JWT_BEARER_ASSERTION, KeyFile,
    MAX_ASSERTION_LIFETIME, certified_pem,
};
pub use egress::{Egress, EgressSetting, NoProxy, ProxyUrl};
pub use http_provider::FieldMap;
pub use http_provider::{BodySpec, HttpProvider, HttpRequestSpec};
pub use inject::Inject;
pub use provider::{
    AllowedUpstream, Assertion, ExchangeToken, Grant, OAuth2Provider, Provider, ProviderCommon,
    TokenEndpoint, TokenExchange, TokenFrom, is_loopback,
};
pub use redis::RedisTarget;
pub use value::{Text, parse_duration, parse_size};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens (default `127.0.0.1:8080`: loopback unless told otherwise).
    #[serde(default = "default_listen", deserialize_with = "value::socket_addr")]
    pub listen: SocketAddr,
    /// The admin listener (metrics and health).
    #[serde(default)]
    pub admin: Admin,
    /// An optional HTTPS listener, with optional client certificates (mTLS).
    #[serde(default)]
    pub tls: Option<InboundTls>,
    /// Who may use the proxy.
    #[serde(default)]
    pub access: Access,
    /// Optional listener for apps that only honour `HTTP_PROXY`.
    #[serde(default)]
    pub forward_proxy: Option<ForwardProxy>,
    /// Optional token cache shared by replicas through Redis.
    #[serde(default)]
    pub shared_cache: Option<SharedCacheConfig>,
    /// Timeouts and size limits.
    #[serde(default)]
    pub limits: Limits,
    /// Where the access log goes: `stderr` (default), a file, or `off`.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// The HTTP proxy token requests and upstream connections go through: a URL, `env`
    /// (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) or `none` (the default). Providers and routes
    /// may say otherwise.
    #[serde(default)]
    pub egress_proxy: Option<EgressSetting>,
    /// The proxy's password, from a file (the URL then names only the user).
    #[serde(default, deserialize_with = "egress::password_file")]
    pub egress_proxy_password_file: Option<crate::secret::Secret>,
    /// Destinations reached directly: host names (with their subdomains), addresses and blocks.
    #[serde(default, deserialize_with = "egress::no_proxy_list")]
    pub no_proxy: Vec<NoProxy>,
    /// Named callers: who is sending a request, told by an API key, a JWT or an address block.
    /// With callers defined, a request that is none of them is refused.
    #[serde(default)]
    pub callers: Callers,
    /// Named token sources.
    pub providers: BTreeMap<String, Provider>,
    /// Path-prefix routes; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    /// Reload when this file, or a secret, key, certificate or CA file it names, changes
    /// (default true; SIGHUP always reloads).
    #[serde(default = "yes")]
    pub watch: bool,
    /// Every file this configuration read or names for reading besides itself (filled in by
    /// [`parse`]): what [`Config::watch`] watches.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    /// The first 12 hex digits of the SHA-256 of the file this was loaded from (set by
    /// [`load`]), so the status page can say which version of the file is in force.
    #[serde(skip)]
    pub digest: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// The access log: one line per request, written off the request path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessLogConfig {
    /// Where lines go.
    pub to: AccessLogTo,
    /// `text` or `json`; when absent, what `--log-format` says.
    pub format: Option<AccessLogFormat>,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AccessLogTo {
    /// Standard error, beside the other logs.
    #[default]
    Stderr,
    /// A file, appended to and reopened on SIGUSR1 (after logrotate moved it).
    File(PathBuf),
    /// Nowhere.
    Off,
}

/// The shape of access-log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// `time client "METHOD path" status bytes duration route=... upstream=... provider=...`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Whether `provider`'s tokens may have a `token_type` other than Bearer: every route using
    /// it says in `inject` how its token is sent (sent as Bearer by default, it would not be the
    /// credential the IdP issued).
    pub fn any_token_type(&self, provider: &str) -> bool {
        let uses = |r: &&RouteConfig| {
            r.provider.0 == provider || r.provider_by_caller.values().any(|p| p.0 == provider)
        };
        let mut routes = self.routes.iter().filter(uses).peekable();
        routes.peek().is_some() && routes.all(|r| r.inject.is_some())
    }
}

impl<'de> Deserialize<'de> for AccessLogConfig {
    /// `access_log: off`, `access_log: /var/log/tokengate/access.log`, or
    /// `access_log: {to: stderr, format: json}`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            #[serde(default)]
            to: Option<Text>,
            #[serde(default)]
            format: Option<AccessLogFormat>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            To(Text),
            Full(Full),
        }
        let to = |t: Option<Text>| match t.as_ref().map(|t| t.0.as_str()) {
            None | Some("stderr") => Ok(AccessLogTo::Stderr),
            Some("off") => Ok(AccessLogTo::Off),
            Some("") => Err(serde::de::Error::custom("access_log: use stderr, off or a file path")),
            Some(path) => Ok(AccessLogTo::File(PathBuf::from(path))),
        };
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "access_log: use stderr, off, a file path, or {to: ..., format: text|json}",
            )
        })? {
            Raw::To(t) => Ok(AccessLogConfig { to: to(Some(t))?, format: None }),
            Raw::Full(f) => Ok(AccessLogConfig { to: to(f.to)?, format: f.format }),
        }
    }
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (default `127.0.0.1:9090`).
    #[serde(default = "default_admin_listen", deserialize_with = "value::socket_addr")]
    pub listen: SocketAddr,
    /// Client address blocks allowed to use the admin listener (empty: any that can reach it).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Host names the admin listener answers to besides IP literals and `localhost`
    /// (DNS-rebinding defence).
    #[serde(default)]
    pub hosts: Vec<Text>,
    /// Serve `POST /reload` (off by default: a reload is a privileged action; SIGHUP always works).
    #[serde(default)]
    pub reload: bool,
    /// `/readyz` also requires every provider to hold a valid token (as `/readyz?strict=1`
    /// always does). Off by default: an IdP outage would take every replica out of the Service
    /// at once, and clients would get connection errors instead of `503 token_unavailable`.
    #[serde(default)]
    pub strict_readiness: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin_listen(),
            allow: Vec::new(),
            hosts: Vec::new(),
            reload: false,
            strict_readiness: false,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// Timeouts and limits for downstream connections and upstream requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time a downstream client has to send the request head (slowloris bound).
    #[serde(deserialize_with = "value::duration")]
    pub header_read_timeout: Duration,
    /// Largest request head accepted from a downstream client.
    #[serde(deserialize_with = "value::size")]
    pub max_header_size: u64,
    /// Time to establish a TCP (and TLS) connection to an upstream.
    #[serde(deserialize_with = "value::duration")]
    pub upstream_connect_timeout: Duration,
    /// Time from sending a request upstream until its response head arrives.
    #[serde(deserialize_with = "value::duration")]
    pub upstream_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    #[serde(deserialize_with = "value::duration")]
    pub upstream_idle_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(deserialize_with = "value::duration")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long `/readyz` answers 503 while the listeners keep accepting, so load
    /// balancers stop sending before connections are refused; then the drain starts.
    #[serde(deserialize_with = "value::duration")]
    pub shutdown_delay: Duration,
    /// At start, `/readyz` waits this long at most for every provider's first token; after
    /// that (or once all have one) the replica is ready even if a provider is failing.
    #[serde(deserialize_with = "value::duration")]
    pub warmup_timeout: Duration,
    /// A downstream connection with no request in flight and no traffic for this long is closed.
    #[serde(deserialize_with = "value::duration")]
    pub idle_timeout: Duration,
    /// Longest time a client may take none of the response data ready for it (slow-reader bound:
    /// the connection is closed, freeing the upstream connection the response holds).
    #[serde(deserialize_with = "value::duration")]
    pub send_timeout: Duration,
    /// Longest pause allowed between two pieces of a request body (slow-body bound; 408).
    #[serde(deserialize_with = "value::duration")]
    pub body_read_timeout: Duration,
    /// Slowest average rate a request body may arrive at, in bytes per second, once it has
    /// been arriving for `body_read_timeout` (408 below it): a body trickled in with pauses just
    /// under the timeout would hold its upstream connection for ever. `0` turns it off.
    #[serde(deserialize_with = "value::size")]
    pub body_min_rate: u64,
    /// Largest request body accepted (413); unlimited when absent.
    #[serde(deserialize_with = "value::opt_size")]
    pub max_body_size: Option<u64>,
    /// Request bodies up to this size are buffered so a request can be replayed after an
    /// upstream 401; larger ones stream and are not replayed.
    #[serde(deserialize_with = "value::size")]
    pub replay_buffer: u64,
    /// Downstream connections served at once per listener, across all worker threads. When all
    /// are taken, the oldest connection with no request in flight is closed for the newcomer;
    /// if every connection is busy, further clients wait in the accept queue.
    pub max_connections: usize,
    /// Streams one HTTP/2 client connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Connections tokengate opens to one upstream `host:port` at most, per process.
    pub upstream_max_connections: usize,
    /// How long a request waits for an upstream connection slot before `503 upstream_busy`.
    #[serde(deserialize_with = "value::duration")]
    pub upstream_queue_timeout: Duration,
    /// Requests worked on at once across all listeners; more get `503 overloaded` at once.
    pub max_requests_in_flight: usize,
    /// How long a request with no valid token waits for the fetch under way (an IdP that hangs
    /// instead of refusing), then `503 token_unavailable` with `Retry-After: 1` while the fetch
    /// goes on.
    #[serde(deserialize_with = "value::duration")]
    pub token_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 64 * 1024,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(90),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            warmup_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            body_read_timeout: Duration::from_secs(30),
            // Apache's mod_reqtimeout default.
            body_min_rate: 500,
            send_timeout: Duration::from_secs(60),
            max_body_size: None,
            replay_buffer: 64 * 1024,
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            upstream_max_connections: 256,
            upstream_queue_timeout: Duration::from_secs(5),
            max_requests_in_flight: 4096,
            token_wait: Duration::from_secs(2),
        }
    }
}

/// How tokengate speaks to an `https://` upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    #[serde(default = "yes")]
    pub strip_prefix: bool,
    /// Extra PEM CA bundle trusted for this upstream, in addition to the public roots.
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
    #[serde(default, deserialize_with = "value::opt_path")]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `client_cert_file`.
    #[serde(default, deserialize_with = "value::opt_path")]
    pub client_key_file: Option<PathBuf>,
    /// Client address blocks allowed on this route, in addition to the listener's list.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Methods allowed on this route (default: any); others get 405.
    #[serde(default, deserialize_with = "methods")]
    pub methods: Vec<http::Method>,
    /// Require an inbound API key (default: true when `access.api_keys` is set).
    #[serde(default)]
    pub require_api_key: Option<bool>,
    /// Require a verified client certificate (only reachable through the TLS listener).
    #[serde(default)]
    pub require_client_cert: bool,
    /// After an upstream 401, fetch a new token and replay the request once (default true).
    #[serde(default = "yes")]
    pub retry_on_401: bool,
    /// Headers set on every upstream request of this route (an API's tenant header, say).
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

fn yes() -> bool {
    true
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

/// The forward-proxy listener: accepts `GET http://host/path` from apps configured with
/// `HTTP_PROXY`, matches routes by upstream host, and refuses every other host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardProxy {
    /// Where it listens.
    #[serde(deserialize_with = "value::socket_addr")]
    pub listen: SocketAddr,
    /// Client address blocks allowed on this listener (empty: any).
    #[serde(default)]
    pub allow: Vec<Cidr>,
}

/// The Redis-backed token cache shared by replicas.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawSharedCache")]
pub struct SharedCacheConfig {
    /// Where Redis is.
    pub redis: RedisTarget,
    /// AES-256-GCM key (32 bytes) that encrypts tokens at rest in Redis.
    pub key: Vec<u8>,
    /// Prefix of every Redis key.
    pub prefix: String,
    /// How long the refresh lock is held at most.
    pub lock_ttl: Duration,
    /// Timeout of each Redis command.
    pub timeout: Duration,
    /// Timeout of connecting (TCP, TLS, AUTH) to Redis.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for SharedCacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCacheConfig")
            .field("redis", &self.redis)
            .field("key", &"***")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedCache {
    redis: Text,
    #[serde(default)]
    password_file: Option<Text>,
    #[serde(default)]
    ca_file: Option<Text>,
    key: Option<Text>,
    key_file: Option<Text>,
    #[serde(default)]
    prefix: Option<Text>,
    #[serde(default, deserialize_with = "value::opt_duration")]
    lock_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "value::opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "value::opt_duration")]
    connect_timeout: Option<Duration>,
}

impl TryFrom<RawSharedCache> for SharedCacheConfig {
    type Error = String;

    fn try_from(raw: RawSharedCache) -> Result<Self, String> {
        use base64::Engine;
        let password = provider::secret("password", None, raw.password_file)?;
        let ca_file = raw.ca_file.map(|t| PathBuf::from(t.0));
        if let Some(ca) = &ca_file {
            files::record(ca);
        }
        let redis = RedisTarget::parse(&raw.redis.0, password, ca_file)?;
        let key = provider::secret("key", raw.key, raw.key_file)?.ok_or(
            "needs key (or key_file): 32 random bytes as base64 or hex, e.g. `openssl rand -base64 32`",
        )?;
        let text = key.expose().trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).unwrap_or(0)).collect()
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| "key is neither base64 nor hex")?
        };
        if bytes.len() != 32 {
            return Err(format!("key must be 32 bytes, got {}", bytes.len()));
        }
        Ok(SharedCacheConfig {
            redis,
            key: bytes,
            prefix: raw.prefix.map_or_else(|| "tokengate:".to_owned(), |p| p.0),
            lock_ttl: raw.lock_ttl.unwrap_or(Duration::from_secs(10)),
            timeout: raw.timeout.unwrap_or(Duration::from_millis(500)),
            connect_timeout: raw.connect_timeout.unwrap_or(Duration::from_secs(1)),
        })
    }
}

/// The HTTPS listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundTls {
    /// Where it listens.
    #[serde(deserialize_with = "value::socket_addr")]
    pub listen: SocketAddr,
    /// PEM certificate chain.
    #[serde(deserialize_with = "value::path")]
    pub cert_file: PathBuf,
    /// PEM private key.
    #[serde(deserialize_with = "value::path")]
    pub key_file: PathBuf,
    /// PEM CA bundle that client certificates must chain to (enables mTLS).
    #[serde(default, deserialize_with = "value::opt_path")]
    pub client_ca_file: Option<PathBuf>,
    /// `required` (default with a client CA): handshakes without a valid certificate fail;
    /// `optional`: a certificate is verified when sent, and routes with
    /// `require_client_cert` refuse requests without one.
    #[serde(default)]
    pub client_cert: Option<ClientCertMode>,
    /// Client address blocks allowed on this listener (empty: any).
    #[serde(default)]
    pub allow: Vec<Cidr>,
}

/// Whether the TLS listener demands client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Handshake fails without a valid certificate.
    Required,
    /// Verified if presented.
    Optional,
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

/// A configuration that could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the file: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: source::SourceError,
    },
    /// Environment variables the file uses are not set (all of them, with their lines).
    #[error("{path}:{}: environment variables not set: {}", missing.first().map_or(0, |m| m.0), missing.iter().map(|(line, name)| format!("{name} (line {line})")).collect::<Vec<_>>().join(", "))]
    MissingEnv {
        /// The file.
        path: String,
        /// Line and name of each reference to an unset variable.
        missing: Vec<(usize, String)>,
    },
    /// A value is malformed or missing, or values do not fit together.
    #[error("{path}:{}: {key}: {message}", line.map_or_else(|| "?".to_string(), |l| l.to_string()))]
    Invalid {
        /// The file.
        path: String,
        /// Line of the offending key, where it could be found.
        line: Option<usize>,
        /// Dotted key path, like `routes[2].provider`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Loads a configuration file, expanding `${VAR}` from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::fmt::Write;
    let text = source::read(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let mut config = parse(&text, &path.display().to_string())?;
    if let Some(o) = LISTENERS.get() {
        config.listen = o.listen.unwrap_or(config.listen);
        config.admin.listen = o.admin.unwrap_or(config.admin.listen);
        if config.listen == config.admin.listen && config.listen.port() != 0 {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                line: None,
                key: "admin.listen".into(),
                message: format!("the admin listener must not share the proxy address {}", config.listen),
            });
        }
    }
    let sha = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    config.digest = Some(sha.as_ref()[..6].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }));
    Ok(config)
}

/// Listener addresses given on the command line (`run --listen`, `--admin-listen`) or as
/// `TOKENGATE_LISTEN` / `TOKENGATE_ADMIN_LISTEN`, which win over the file's at every load, so a
/// container can bind `0.0.0.0` with a file written for loopback, and a reload keeps them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenerOverrides {
    /// The proxy listener.
    pub listen: Option<SocketAddr>,
    /// The admin listener.
    pub admin: Option<SocketAddr>,
}

static LISTENERS: std::sync::OnceLock<ListenerOverrides> = std::sync::OnceLock::new();

/// Sets the listener overrides for every later [`load`] in this process (once, at start).
pub fn override_listeners(overrides: ListenerOverrides) {
    let _ = LISTENERS.set(overrides);
}

/// Keys whose values are secrets when written inline.
const SECRET_KEYS: [&str; 5] = ["client_secret", "password", "refresh_token", "api_key", "keys"];

/// A warning when the file holds inline secrets (not `${VAR}` or `_file` references) and can be
/// read by group or others.
pub fn permission_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o044 == 0 {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let inline = text.lines().enumerate().find(|(_, line)| {
            let line = line.trim_start().trim_start_matches("- ");
            SECRET_KEYS.iter().any(|k| {
                line.strip_prefix(k).and_then(|rest| rest.trim_start().strip_prefix(':')).is_some_and(|v| {
                    let v = v.trim().trim_matches(['"', '\'']);
                    !v.is_empty() && !v.starts_with("${") && !v.starts_with('#')
                })
            })
        })?;
        Some(format!(
            "{}:{}: the file holds an inline secret and is readable by group or others (mode {:o}); use ${{VAR}} or a _file key, or chmod 600",
            path.display(),
            inline.0 + 1,
            mode & 0o777
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Parses configuration text; `path` is only used in error messages.
pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
    if let Some(line) = source::too_deep(text) {
        let message = format!("'[' and '{{' nest more than {} levels deep here", source::MAX_DEPTH);
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            line: Some(line),
            key: "structure".into(),
            message,
        });
    }
    let missing = env::missing(text);
    if !missing.is_empty() {
        return Err(ConfigError::MissingEnv { path: path.to_owned(), missing });
    }
    let de = serde_norway::Deserializer::from_str(text);
    let (parsed, read) = files::collect(|| serde_path_to_error::deserialize::<_, Config>(de));
    let mut config = parsed.map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        // serde points at the start of the enclosing mapping for errors raised by value parsers,
        // `locate` at the key itself; the later of the two is the offending line.
        let message = bare_message(&inner.to_string(), &key);
        // A required key that is missing may be in the file, in the wrong map.
        let needed = message.strip_prefix("needs ").and_then(|m| m.split([' ', ',', ':']).next());
        if let Some((line, hint)) = needed.and_then(|field| misplaced(text, &key, field)) {
            return ConfigError::Invalid { path: path.to_owned(), line: Some(line), key, message: hint };
        }
        let lines: Vec<&str> = text.lines().collect();
        let line = match (inner.location().map(|l| l.line()), locate(text, &key)) {
            // serde's position is the more precise one when it lies inside the key's own block
            // (a bad value deep in a list); elsewhere it is where parsing went on after the key.
            (Some(serde), Some(key_line)) => {
                let indent = lines.get(key_line - 1).map_or(0, |l| key_indent(l));
                let end = block_end(&lines, key_line - 1, indent);
                Some(if serde >= key_line && serde <= end { serde } else { key_line })
            }
            (a, b) => b.or(a),
        };
        ConfigError::Invalid { path: path.to_owned(), line, message, key }
    })?;
    let invalid = |key: String, message: String| ConfigError::Invalid {
        line: locate(text, &key),
        path: path.to_owned(),
        key,
        message,
    };
    if config.routes.is_empty() {
        return Err(invalid("routes".into(), "at least one route is needed".into()));
    }
    resolve_egress(&mut config, &|name| std::env::var(name).ok())
        .map_err(|(key, message)| invalid(key, message))?;
    check_exchanges(&config).map_err(|(key, message)| invalid(key, message))?;
    let mut seen = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        if !config.providers.contains_key(&route.provider.0) {
            let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
            return Err(invalid(
                format!("routes[{i}].provider"),
                format!(
                    "no provider named {:?}; defined providers: {}",
                    route.provider.0,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            ));
        }
        // A provider's tokens go only where it allows: a route sending them elsewhere (a typo,
        // or a config change made without the IdP owner) is refused.
        let allowed = &config.providers[&route.provider.0].common().allowed_upstreams;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.allows(&route.upstream.to_string())) {
            let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            return Err(invalid(
                format!("routes[{i}].upstream"),
                format!(
                    "route {} sends provider {}'s tokens to {}, which is not in its allowed_upstreams ({})",
                    route.label(),
                    route.provider.0,
                    route.upstream,
                    list.join(", ")
                ),
            ));
        }
        if !seen.insert(route.prefix.as_str()) {
            return Err(invalid(
                format!("routes[{i}].prefix"),
                format!("prefix {:?} is used by an earlier route", route.prefix.as_str()),
            ));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        if route.require_api_key == Some(true) && config.access.api_keys.is_none() {
            return Err(invalid(
                format!("routes[{i}].require_api_key"),
                "no keys are configured; add access.api_keys".into(),
            ));
        }
        check_callers(&config, i, route).map_err(|(key, message)| invalid(key, message))?;
        if route.websocket_max_lifetime.is_some() && !route.websocket() {
            return Err(invalid(
                format!("routes[{i}].websocket_max_lifetime"),
                "applies to WebSocket tunnels; add websocket: true".into(),
            ));
        }
        if route.server_name.is_some() && route.upstream.scheme != http::uri::Scheme::HTTPS {
            return Err(invalid(
                format!("routes[{i}].server_name"),
                format!("applies to TLS; the upstream {} is plain http", route.upstream),
            ));
        }
        if let Some(name) = &route.server_name
            && rustls::pki_types::ServerName::try_from(name.0.as_str()).is_err()
        {
            return Err(invalid(
                format!("routes[{i}].server_name"),
                format!("{:?} is not a host name or address", name.0),
            ));
        }
        match (&route.client_cert_file, &route.client_key_file) {
            (Some(_), None) => {
                return Err(invalid(format!("routes[{i}].client_cert_file"), "needs client_key_file".into()));
            }
            (None, Some(_)) => {
                return Err(invalid(format!("routes[{i}].client_key_file"), "needs client_cert_file".into()));
            }
            (Some(_), Some(_)) if route.upstream.scheme != http::uri::Scheme::HTTPS => {
                return Err(invalid(
                    format!("routes[{i}].client_cert_file"),
                    format!("a client certificate needs TLS; the upstream {} is plain http", route.upstream),
                ));
            }
            _ => {}
        }
        if route.require_client_cert && config.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none()) {
            return Err(invalid(
                format!("routes[{i}].require_client_cert"),
                "needs a TLS listener with client_ca_file (tls.client_ca_file)".into(),
            ));
        }
    }
    let by_cert =
        config.callers.0.iter().find(|(_, c)| c.methods.iter().any(|m| m.kind() == MethodKind::ClientCert));
    if let Some((name, _)) = by_cert
        && config.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none())
    {
        return Err(invalid(
            format!("callers.{name}.client_cert"),
            "needs a TLS listener that verifies client certificates (tls.client_ca_file)".into(),
        ));
    }
    if let Some(tls) = &config.tls
        && tls.client_cert.is_some()
        && tls.client_ca_file.is_none()
    {
        return Err(invalid(
            "tls.client_cert".into(),
            "needs tls.client_ca_file to verify certificates".into(),
        ));
    }
    if config.limits.max_connections == 0 {
        return Err(invalid("limits.max_connections".into(), "must be at least 1".into()));
    }
    if config.listen == config.admin.listen && config.listen.port() != 0 {
        return Err(invalid(
            "admin.listen".into(),
            format!("the admin listener must not share the proxy address {}", config.listen),
        ));
    }
    config.files = named_files(&config, read);
    Ok(config)
}

/// The providers whose exchanges take other providers' tokens name providers that exist,
/// without a cycle; an exchange of the caller's token needs callers known by JWT.
fn check_exchanges(config: &Config) -> Result<(), (String, String)> {
    let links = |name: &str| -> Vec<(String, &'static str)> {
        let Some(Provider::OAuth2(p)) = config.providers.get(name) else { return Vec::new() };
        let Grant::TokenExchange(x) = &p.grant else { return Vec::new() };
        let mut out = Vec::new();
        if let TokenFrom::Provider(n) = &x.subject.from {
            out.push((n.clone(), "subject_token_provider"));
        }
        if let Some(ExchangeToken { from: TokenFrom::Provider(n), .. }) = &x.actor {
            out.push((n.clone(), "actor_token_provider"));
        }
        out
    };
    for name in config.providers.keys() {
        for (target, key) in links(name) {
            let at = format!("providers.{name}.token_exchange.{key}");
            if !config.providers.contains_key(&target) {
                return Err((at, format!("no provider named {target:?}")));
            }
            // Follow the chain from the target: it must not come back here.
            let (mut seen, mut next) = (Vec::new(), vec![target]);
            while let Some(n) = next.pop() {
                if n == *name {
                    return Err((
                        at,
                        format!("providers take each other's tokens in a cycle through {name:?}"),
                    ));
                }
                if !seen.contains(&n) {
                    next.extend(links(&n).into_iter().map(|(t, _)| t));
                    seen.push(n);
                }
            }
        }
        if let Some(Provider::OAuth2(p)) = config.providers.get(name)
            && let Grant::TokenExchange(x) = &p.grant
            && x.subject.from == TokenFrom::Caller
            && !config.callers.0.iter().any(|(_, c)| c.methods.iter().any(|m| m.kind() == MethodKind::Jwt))
        {
            return Err((
                format!("providers.{name}.token_exchange.subject_token"),
                "exchanges the caller's token: define a caller known by jwt (callers.<name>.jwt)".into(),
            ));
        }
    }
    Ok(())
}

/// A route's `callers` and `provider_by_caller` name defined callers and providers, and the
/// providers may send their tokens to the route's upstream.
fn check_callers(config: &Config, i: usize, route: &RouteConfig) -> Result<(), (String, String)> {
    let defined: Vec<&str> = config.callers.0.iter().map(|(n, _)| n.as_str()).collect();
    let unknown = |name: &str| {
        format!(
            "no caller named {name:?}; defined callers: {}",
            if defined.is_empty() { "none".into() } else { defined.join(", ") }
        )
    };
    for name in &route.callers {
        if config.callers.get(&name.0).is_none() {
            return Err((format!("routes[{i}].callers"), unknown(&name.0)));
        }
    }
    for (caller, provider) in &route.provider_by_caller {
        let key = format!("routes[{i}].provider_by_caller.{caller}");
        if config.callers.get(caller).is_none() {
            return Err((key, unknown(caller)));
        }
        if !route.callers.is_empty() && !route.callers.iter().any(|c| c.0 == *caller) {
            return Err((key, format!("caller {caller:?} is not in this route's callers")));
        }
        let Some(p) = config.providers.get(&provider.0) else {
            return Err((key, format!("no provider named {:?}", provider.0)));
        };
        let allowed = &p.common().allowed_upstreams;
        if !allowed.is_empty() && !allowed.iter().any(|a| a.allows(&route.upstream.to_string())) {
            return Err((
                key,
                format!("provider {} may not send its tokens to {}", provider.0, route.upstream),
            ));
        }
    }
    Ok(())
}

/// Settles how every provider and route reaches its destination (the top-level `egress_proxy`,
/// `no_proxy` and password, or its own `egress_proxy`); an error names the key.
fn resolve_egress(config: &mut Config, env: egress::Env<'_>) -> Result<(), (String, String)> {
    let defaults = egress::Defaults {
        setting: config.egress_proxy.as_ref(),
        password: config.egress_proxy_password_file.as_ref(),
        no_proxy: &config.no_proxy,
    };
    for (name, provider) in config.providers.iter_mut() {
        let common = provider.common_mut();
        common.egress = egress::resolve(common.egress_proxy.as_ref(), &defaults, env)
            .map_err(|e| (format!("providers.{name}.egress_proxy"), e))?;
    }
    for (i, route) in config.routes.iter_mut().enumerate() {
        route.egress = egress::resolve(route.egress_proxy.as_ref(), &defaults, env)
            .map_err(|e| (format!("routes[{i}].egress_proxy"), e))?;
    }
    Ok(())
}

/// The files `read` while parsing plus those the configuration names for later reading
/// (certificates, keys, CA bundles), each once. The access log and `state_file`, which tokengate
/// writes itself, are not among them.
fn named_files(config: &Config, mut files: Vec<PathBuf>) -> Vec<PathBuf> {
    if let Some(tls) = &config.tls {
        files.extend([tls.cert_file.clone(), tls.key_file.clone()]);
        files.extend(tls.client_ca_file.clone());
    }
    for r in &config.routes {
        files.extend(r.ca_file.iter().chain(&r.client_cert_file).chain(&r.client_key_file).cloned());
    }
    files.extend(config.providers.values().filter_map(|p| p.common().ca_file.clone()));
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    files
}

/// serde_norway's message without its own key prefix and position suffix, which the caller
/// reports in a uniform way.
fn bare_message(message: &str, key: &str) -> String {
    let mut m = message;
    if let Some(i) = m.rfind(" at line ") {
        m = &m[..i];
    }
    if let Some((prefix, rest)) = m.split_once(": ")
        && key.starts_with(prefix)
    {
        m = rest;
    }
    m.to_owned()
}

/// Finds the line of a dotted key path such as `routes[2].provider` in block-style YAML.
/// Best effort: serde reports positions for parse errors, this covers cross-key checks.
fn locate(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut min_indent = 0;
    let mut found = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (line, indent) = (start..lines.len()).find_map(|i| {
            let l = lines[i];
            let indent = key_indent(l);
            let body = l.trim_start_matches([' ', '-']);
            (indent >= min_indent
                && body.starts_with(name)
                && body[name.len()..].trim_start().starts_with(':'))
            .then_some((i, indent))
        })?;
        found = Some(line);
        start = line + 1;
        min_indent = indent + 1;
        if let Some(n) = index {
            let value = lines[line].split_once(':').map_or("", |(_, v)| v.trim());
            if value.starts_with('[') {
                // A flow list (`allow: [a, b]`): its items are on this line.
                return Some(line + 1);
            }
            // Block items belong to this key only until the next line indented like it or less.
            let end = block_end(&lines, line, indent);
            let mut items = (start..end).filter(|&i| {
                let l = lines[i];
                let t = l.trim_start();
                t.starts_with('-') && l.len() - t.len() >= indent
            });
            let item = items.nth(n)?;
            found = Some(item);
            start = item;
            min_indent = indent;
        }
    }
    found.map(|l| l + 1)
}

/// Where a line's key starts: its indentation counting a list item's `- ` (`  - prefix:` is 4).
fn key_indent(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '-']).len()
}

/// The index of the first line after `line` (whose key is indented `indent`) that is indented
/// as much or less: where that key's block ends. Blank and comment lines belong to no block.
fn block_end(lines: &[&str], line: usize, indent: usize) -> usize {
    (line + 1..lines.len())
        .find(|&i| {
            let l = lines[i];
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#') && l.len() - t.len() <= indent && !t.starts_with('-')
        })
        .unwrap_or(lines.len())
}

/// When `key` (a map, like `providers.idp`) lacks `field`, a line that names `field` but ended
/// up outside that map because of its indentation, with a message saying so.
fn misplaced(text: &str, key: &str, field: &str) -> Option<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let at = locate(text, key)? - 1;
    let own = key_indent(lines[at]);
    // The indentation of the map's own keys: its first content line.
    let child = lines[at + 1..].iter().find_map(|l| {
        let t = l.trim_start();
        (!t.is_empty() && !t.starts_with('#')).then_some(l.len() - t.len())
    })?;
    if child <= own {
        return None;
    }
    for (i, l) in lines.iter().enumerate().skip(at + 1) {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = l.len() - t.len();
        // Past the map's parent: another section; nothing of this map is there.
        if indent < own || (indent == own && t.starts_with('-')) {
            break;
        }
        let names_field = t.strip_prefix(field).is_some_and(|rest| rest.trim_start().starts_with(':'));
        if names_field && indent != child {
            let parent = key.rsplit_once('.').map_or(key, |(_, last)| last);
            return Some((
                i + 1,
                format!(
                    "`{field}` here is indented {indent} spaces, so it is not one of {key}'s keys (indented {child}); \
                     indent it like `{parent}`'s other keys ({key}: needs {field})"
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
providers:
  idp:
    type: oauth2
    token_url: https://idp.example.com/token
    client_id: app
    client_secret: s3cret
    scopes: [read]
routes:
  - prefix: /api/
    upstream: https://api.example.com/v2/
    provider: idp
";

    fn parse_with_env(text: &str) -> Result<Config, ConfigError> {
        env::with_lookup(|_| None, || parse(text, "test.yaml"))
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse_with_env(MINIMAL).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        let r = &c.routes[0];
        assert_eq!(r.prefix.as_str(), "/api");
        assert_eq!(r.upstream.base_path, "/v2");
        assert_eq!(r.upstream.authority.as_str(), "api.example.com");
        assert!(r.strip_prefix);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text =
            MINIMAL.replace("strip", "x").replace("    provider: idp", "    provider: idp\n    upstrem: x");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:12: routes[0].upstrem: unknown field `upstrem`"), "{err}");
    }

    #[test]
    fn unknown_provider_reference_names_line() {
        let text = MINIMAL.replace("provider: idp", "provider: nope");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "test.yaml:11: routes[0].provider: no provider named \"nope\"; defined providers: idp"
        );
    }

    #[test]
    fn bad_values_are_rejected_with_their_line() {
        for (from, to, needle) in [
            (
                "prefix: /api/",
                "prefix: api",
                "test.yaml:9: routes[0].prefix: prefix \"api\" must start with '/'",
            ),
            (
                "prefix: /api/",
                "prefix: /a/../b",
                "test.yaml:9: routes[0].prefix: prefix \"/a/../b\" must be a plain path",
            ),
            (
                "https://api.example.com/v2/",
                "ftp://x",
                "test.yaml:10: routes[0].upstream: upstream \"ftp://x\" must start with https://",
            ),
            (
                "https://api.example.com/v2/",
                "https://u:p@x/",
                "test.yaml:10: routes[0].upstream: upstream \"https://u:p@x/\" must not contain user info",
            ),
            (
                "https://api.example.com/v2/",
                "https://x/?a=1",
                "test.yaml:10: routes[0].upstream: upstream \"https://x/?a=1\" must not have a query",
            ),
            ("client_id: app", "client_id: ''", "test.yaml:2: providers.idp: client_id is empty"),
            (
                "scopes: [read]",
                "scopes: [read]\n    username: bob",
                "test.yaml:2: providers.idp: username does not apply",
            ),
        ] {
            let err = parse_with_env(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.starts_with(needle), "{to}: {err}");
        }
    }

    #[test]
    fn warns_about_readable_files_with_inline_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = permission_warning(&path).unwrap();
        assert!(w.contains("c.yaml:6:") && w.contains("mode 644"), "{w}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(permission_warning(&path).is_none());
        std::fs::write(&path, MINIMAL.replace("s3cret", "${SECRET}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(permission_warning(&path).is_none());
    }

    #[test]
    fn a_key_in_the_wrong_map_is_reported_at_its_own_line() {
        for (indent, spaces) in [("   ", 3), ("  ", 2)] {
            let text = MINIMAL
                .replace("    client_id: app\n", "")
                .replace("    scopes: [read]\n", &format!("    scopes: [read]\n{indent}client_id: app\n"));
            let err = parse_with_env(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:7: providers.idp: `client_id` here is indented"),
                "{spaces}: {err}"
            );
            assert!(
                err.contains(&format!("indented {spaces} spaces")) && err.contains("(indented 4)"),
                "{err}"
            );
        }
        // Really missing: the plain message, at the provider's line.
        let text = MINIMAL.replace("    client_id: app\n", "");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2: providers.idp: needs client_id"), "{err}");
    }

    #[test]
    fn bad_top_level_cidrs_are_reported_at_their_own_line() {
        for (section, extra) in [("access", ""), ("forward_proxy", "  listen: 127.0.0.1:3128\n")] {
            let text = format!("{section}:\n{extra}  allow: [10.0.0.0/8, 10.0.0.0/33]\n{MINIMAL}");
            let err = parse_with_env(&text).unwrap_err().to_string();
            let line = if extra.is_empty() { 2 } else { 3 };
            assert!(err.starts_with(&format!("test.yaml:{line}: {section}.allow")), "{err}");
            let block = format!("{section}:\n{extra}  allow:\n    - 10.0.0.0/8\n    - 300.0.0.1\n{MINIMAL}");
            let err = parse_with_env(&block).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{section}.allow")) && !err.contains(":12:") && !err.contains(":13:"),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicate_prefix_is_an_error() {
        let text = format!("{MINIMAL}  - prefix: /api\n    upstream: https://b/\n    provider: idp\n");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert!(err.contains("routes[1].prefix") && err.contains("earlier route"), "{err}");
        assert!(err.starts_with("test.yaml:12:"), "{err}");
    }

    #[test]
    fn env_vars_expand_inside_values_without_changing_structure() {
        let text = MINIMAL.replace("client_secret: s3cret", "client_secret: ${SECRET}");
        let c =
            env::with_lookup(|n| (n == "SECRET").then(|| "a: b # c".to_string()), || parse(&text, "t.yaml"))
                .unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!("not oauth2") };
        assert_eq!(p.client_auth.secret().unwrap().expose(), "a: b # c");
        let err = parse_with_env(&text).unwrap_err().to_string();
        assert_eq!(err, "test.yaml:6: environment variables not set: SECRET (line 6)");
    }

    /// Every string value of the schema may use `${VAR}`: a table of keys, each given a variable,
    /// and not one `${` may survive parsing while every expanded value is in the result.
    #[test]
    fn every_string_value_expands_variables() {
        let table = [
            ("listen", "listen: ${LISTEN}"),
            ("admin.listen", "admin:\n  listen: ${ADMIN_LISTEN}\n  hosts:\n    - ${ADMIN_HOST}"),
            (
                "tls",
                "tls:\n  listen: ${TLS_LISTEN}\n  cert_file: ${TLS_CERT}\n  key_file: ${TLS_KEY}\n  client_ca_file: ${TLS_CA}",
            ),
            ("forward_proxy.listen", "forward_proxy:\n  listen: ${FWD_LISTEN}"),
            ("access", "access:\n  hosts:\n    - ${ACCESS_HOST}"),
            ("access_log", "access_log: ${ACCESS_LOG}"),
            (
                "providers",
                "providers:\n  idp:\n    type: oauth2\n    token_url: ${TOKEN_URL}\n    client_id: ${CLIENT_ID}\n    client_secret: s\n    scopes:\n      - ${SCOPE}\n    params:\n      audience: ${AUDIENCE}\n    headers:\n      X-Idp: ${IDP_HEADER}\n    ca_file: ${IDP_CA}\n    allowed_upstreams:\n      - ${ALLOWED}.example",
            ),
            (
                "routes",
                "routes:\n  - name: ${ROUTE_NAME}\n    prefix: ${PREFIX}\n    upstream: ${UPSTREAM}\n    provider: idp\n    ca_file: ${ROUTE_CA}\n    headers:\n      X-Tenant: ${TENANT}",
            ),
        ];
        // Each value holds its variable's name in lower case, the marker looked for below.
        let value = |name: &str| match name {
            n if n.ends_with("LISTEN") => format!("127.0.0.{}:1{}", n.len(), n.len()),
            "TOKEN_URL" => "https://idp.example/token_url".into(),
            "UPSTREAM" => "https://allowed.example/upstream".into(),
            "PREFIX" => "/prefix".into(),
            "ALLOWED" => "allowed".into(),
            n => format!("/expanded-{}", n.to_lowercase()),
        };
        let text: String = table.iter().map(|(_, yaml)| format!("{yaml}\n")).collect();
        let config = env::with_lookup(move |n| Some(value(n)), || parse(&text, "t.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("${"), "{shown}");
        // Header values are hidden from Debug: looked at directly.
        let Provider::OAuth2(idp) = &config.providers["idp"] else { panic!("not oauth2") };
        let headers = idp.headers.iter().chain(&config.routes[0].headers).map(|(_, v)| v.as_bytes());
        let headers: Vec<String> = headers.map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        for (key, yaml) in table {
            for var in yaml.split("${").skip(1).filter_map(|v| v.split('}').next()) {
                let marker = if var.ends_with("LISTEN") { value(var) } else { var.to_lowercase() };
                let found = shown.contains(&marker) || headers.iter().any(|h| h.contains(&marker));
                assert!(found, "{key}: ${{{var}}} was not expanded: {shown}");
            }
        }
    }

    fn with_key(extra: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        std::fs::write(&key, pem).unwrap();
        let text = MINIMAL.replace(
            "    client_secret: s3cret\n",
            &format!("    client_auth: private_key_jwt\n    private_key_file: {}\n{extra}", key.display()),
        );
        (dir, text)
    }

    #[test]
    fn private_key_jwt_settles_the_algorithm_and_audience_at_load() {
        let (_dir, text) = with_key("");
        let c = parse_with_env(&text).unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!() };
        let ClientAuth::PrivateKeyJwt(key) = &p.client_auth else { panic!("{:?}", p.client_auth) };
        assert_eq!(key.alg, crate::jose::SigningAlg::ES256);
        // With token_url, the assertion is addressed to the token endpoint.
        assert_eq!(p.assertion.audience, Audience::TokenEndpoint);
        assert_eq!(p.assertion.lifetime, std::time::Duration::from_secs(60));
        assert!(c.files.iter().any(|f| f.ends_with("key.pem")), "the key file is watched");
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn client_authentication_mistakes_are_load_errors() {
        for (extra, needle) in [
            ("    signing_alg: RS256\n", "cannot sign RS256; use signing_alg: ES256"),
            ("    client_secret: s3cret\n", "client_secret does not apply to client_auth: private_key_jwt"),
            ("    assertion_lifetime: 1h\n", "assertion_lifetime must be between 10s and 5m"),
            ("    assertion_audience: issuer\n", "assertion_audience: issuer needs issuer"),
            ("    client_cert_file: c.pem\n", "client_cert_file needs client_key_file"),
        ] {
            let (_dir, text) = with_key(extra);
            let err = parse_with_env(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:2: providers.idp: ") && err.contains(needle),
                "{extra}: {err}"
            );
        }
        for (from, to, needle) in [
            (
                "    client_secret: s3cret\n",
                "",
                "needs client_secret (or client_secret_file), or client_auth: private_key_jwt",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: private_key_jwt\n    private_key_file: /nonexistent/key.pem\n",
                "cannot read private_key_file \"/nonexistent/key.pem\"",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: tls_client_auth\n",
                "client_auth: tls_client_auth needs client_cert_file and client_key_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_auth: client_assertion_file\n    client_assertion_file: /nonexistent/token\n",
                "cannot read client_assertion_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    grant: jwt_bearer\n",
                "grant jwt_bearer needs assertion_file, or private_key_file",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    grant: token_exchange\n",
                "needs a token_exchange block",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    token_exchange:\n      subject_token_file: /x\n",
                "token_exchange settings need grant: token_exchange",
            ),
            (
                "    client_secret: s3cret\n",
                "    client_secret: s3cret\n    params: {client_assertion: x}\n",
                "params.client_assertion is set by tokengate",
            ),
        ] {
            let err = parse_with_env(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }

    #[test]
    fn a_token_exchange_reads_its_files_and_expands_token_types() {
        let dir = tempfile::tempdir().unwrap();
        let subject = dir.path().join("subject");
        std::fs::write(&subject, "eyJ.x.y").unwrap();
        let text = MINIMAL.replace(
            "    client_secret: s3cret\n",
            &format!(
                "    client_secret: s3cret\n    grant: token_exchange\n    token_exchange:\n      subject_token_file: {}\n      subject_token_type: access_token\n      requested_token_type: jwt\n      audience: [a, b]\n      resource: https://r\n",
                subject.display()
            ),
        );
        let c = parse_with_env(&text).unwrap();
        let Provider::OAuth2(p) = &c.providers["idp"] else { panic!() };
        let Grant::TokenExchange(x) = &p.grant else { panic!() };
        assert_eq!(x.subject.token_type, "urn:ietf:params:oauth:token-type:access_token");
        assert_eq!(x.requested_token_type.as_deref(), Some("urn:ietf:params:oauth:token-type:jwt"));
        assert_eq!(x.audience, ["a", "b"]);
        assert_eq!(x.resource, ["https://r"]);
        // The subject token is data read per fetch, not configuration: its rotation is no reload.
        assert!(!c.files.iter().any(|f| f == &subject));
    }

    #[test]
    fn allowed_upstreams_keep_a_providers_tokens_on_its_own_hosts() {
        let ok = [
            "[api.example.com]",
            "[\"*.example.com\"]",
            "[https://api.example.com/v2]",
            "[https://api.example.com]",
            "[other.example.org, API.example.com]",
        ];
        for allowed in ok {
            let text = MINIMAL.replace(
                "    scopes: [read]\n",
                &format!("    scopes: [read]\n    allowed_upstreams: {allowed}\n"),
            );
            parse_with_env(&text).unwrap_or_else(|e| panic!("{allowed}: {e}"));
        }
        let refused = [
            "[other.example.com]",
            "[\"*.api.example.com\"]",
            "[https://api.example.com/v1]",
            "[https://api.example.com/v]",
            "[http://api.example.com]",
            "[\"https://api.example.com:8443\"]",
        ];
        for allowed in refused {
            let text = MINIMAL.replace(
                "    scopes: [read]\n",
                &format!("    scopes: [read]\n    allowed_upstreams: {allowed}\n"),
            );
            let err = parse_with_env(&text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.yaml:11: routes[0].upstream: route /api sends provider idp's tokens to https://api.example.com/v2, which is not in its allowed_upstreams"),
                "{allowed}: {err}"
            );
        }
    }
}
