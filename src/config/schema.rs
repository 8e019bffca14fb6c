//! The configuration file's top level: listeners, limits, the access log, the shared cache and
//! the HTTPS listener. Routes are in `route.rs`, providers in `provider.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens (default `127.0.0.1:8080`: loopback unless told otherwise).
    #[schemars(with = "crate::config::json_schema::AddressText")]
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
    /// OpenTelemetry traces of proxied requests (off unless set).
    #[serde(default)]
    pub tracing: Option<Tracing>,
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
    #[schemars(with = "Option<crate::config::json_schema::PathText>")]
    #[serde(default, deserialize_with = "egress::password_file")]
    pub egress_proxy_password_file: Option<crate::secret::Secret>,
    /// Destinations reached directly: host names (with their subdomains), addresses and blocks.
    #[schemars(with = "Vec<String>")]
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
    #[serde(default = "value::yes")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (default `127.0.0.1:9090`).
    #[schemars(with = "crate::config::json_schema::AddressText")]
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
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time a downstream client has to send the request head (slowloris bound).
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub header_read_timeout: Duration,
    /// Largest request head accepted from a downstream client.
    #[schemars(with = "crate::config::json_schema::SizeText")]
    #[serde(deserialize_with = "value::size")]
    pub max_header_size: u64,
    /// Time to establish a TCP (and TLS) connection to an upstream.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub upstream_connect_timeout: Duration,
    /// Time from sending a request upstream until its response head arrives.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub upstream_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub upstream_idle_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long `/readyz` answers 503 while the listeners keep accepting, so load
    /// balancers stop sending before connections are refused; then the drain starts.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub shutdown_delay: Duration,
    /// At start, `/readyz` waits this long at most for every provider's first token; after
    /// that (or once all have one) the replica is ready even if a provider is failing.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub warmup_timeout: Duration,
    /// A downstream connection with no request in flight and no traffic for this long is closed.
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub idle_timeout: Duration,
    /// Longest time a client may take none of the response data ready for it (slow-reader bound:
    /// the connection is closed, freeing the upstream connection the response holds).
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub send_timeout: Duration,
    /// Longest pause allowed between two pieces of a request body (slow-body bound; 408).
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub body_read_timeout: Duration,
    /// Slowest average rate a request body may arrive at, in bytes per second, once it has
    /// been arriving for `body_read_timeout` (408 below it): a body trickled in with pauses just
    /// under the timeout would hold its upstream connection for ever. `0` turns it off.
    #[schemars(with = "crate::config::json_schema::SizeText")]
    #[serde(deserialize_with = "value::size")]
    pub body_min_rate: u64,
    /// Largest request body accepted (413); unlimited when absent.
    #[schemars(with = "Option<crate::config::json_schema::SizeText>")]
    #[serde(deserialize_with = "value::opt_size")]
    pub max_body_size: Option<u64>,
    /// Request bodies up to this size are buffered so a request can be replayed after an
    /// upstream 401; larger ones stream and are not replayed.
    #[schemars(with = "crate::config::json_schema::SizeText")]
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
    #[schemars(with = "crate::config::json_schema::DurationText")]
    #[serde(deserialize_with = "value::duration")]
    pub upstream_queue_timeout: Duration,
    /// Requests worked on at once across all listeners; more get `503 overloaded` at once.
    pub max_requests_in_flight: usize,
    /// How long a request with no valid token waits for the fetch under way (an IdP that hangs
    /// instead of refusing), then `503 token_unavailable` with `Retry-After: 1` while the fetch
    /// goes on.
    #[schemars(with = "crate::config::json_schema::DurationText")]
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

/// The forward-proxy listener: accepts `GET http://host/path` from apps configured with
/// `HTTP_PROXY`, matches routes by upstream host, and refuses every other host.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardProxy {
    /// Where it listens.
    #[schemars(with = "crate::config::json_schema::AddressText")]
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

#[derive(Deserialize, schemars::JsonSchema)]
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
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    lock_ttl: Option<Duration>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    timeout: Option<Duration>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
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
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InboundTls {
    /// Where it listens.
    #[schemars(with = "crate::config::json_schema::AddressText")]
    #[serde(deserialize_with = "value::socket_addr")]
    pub listen: SocketAddr,
    /// PEM certificate chain.
    #[schemars(with = "crate::config::json_schema::PathText")]
    #[serde(deserialize_with = "value::path")]
    pub cert_file: PathBuf,
    /// PEM private key.
    #[schemars(with = "crate::config::json_schema::PathText")]
    #[serde(deserialize_with = "value::path")]
    pub key_file: PathBuf,
    /// PEM CA bundle that client certificates must chain to (enables mTLS).
    #[schemars(with = "Option<crate::config::json_schema::PathText>")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Handshake fails without a valid certificate.
    Required,
    /// Verified if presented.
    Optional,
}

super::json_schema::schema_as!(SharedCacheConfig => RawSharedCache);
