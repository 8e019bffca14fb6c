//! Provider configuration: where and how a token is obtained.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::client_auth::{self, AssertionSettings, ClientAuth, KeyFile, RawClientAuth};
use super::http_provider::{HttpProvider, RawHttpRequest, RawResponse};
use super::value::{self, Text};
use crate::jose::SigningAlg;
use crate::secret::Secret;

/// A named token source.
///
/// Read through one flat raw struct rather than a serde-tagged enum: tagged enums buffer their
/// input and lose the line numbers that errors should point at.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawProvider")]
#[allow(clippy::large_enum_variant, reason = "built once per load; boxing buys nothing")]
pub enum Provider {
    /// An OAuth2 token endpoint (RFC 6749).
    OAuth2(OAuth2Provider),
    /// A token API described by its login and refresh requests.
    Http(HttpProvider),
    /// A credential that is not fetched (an API key, a username and password).
    Static(super::static_provider::StaticProvider),
}

#[derive(Deserialize, schemars::JsonSchema, Clone, Copy)]
enum Kind {
    #[serde(rename = "oauth2")]
    OAuth2,
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "static")]
    Static,
}

impl Provider {
    /// Settings every provider type has.
    pub fn common(&self) -> &ProviderCommon {
        match self {
            Provider::OAuth2(p) => &p.common,
            Provider::Http(p) => &p.common,
            Provider::Static(p) => &p.common,
        }
    }

    pub(super) fn common_mut(&mut self) -> &mut ProviderCommon {
        match self {
            Provider::OAuth2(p) => &mut p.common,
            Provider::Http(p) => &mut p.common,
            Provider::Static(p) => &mut p.common,
        }
    }
}

/// Settings shared by every provider type.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderCommon {
    /// Timeout of one token request.
    pub timeout: Duration,
    /// Refresh this long before expiry instead of the default policy (10 % of the lifetime,
    /// clamped to 10 s..5 min and at most half the lifetime).
    pub refresh_margin: Option<Duration>,
    /// Lifetime assumed when a response states none and the token is not a JWT with `exp`.
    pub default_ttl: Duration,
    /// Extra PEM CA bundle trusted for the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// Where this provider's tokens may be sent (empty: anywhere a route says).
    pub allowed_upstreams: Vec<AllowedUpstream>,
    /// `egress_proxy` as written for this provider (`None`: the top-level setting).
    pub egress_proxy: Option<super::EgressSetting>,
    /// How the token endpoint is reached, resolved with the top-level settings at load.
    pub egress: Option<super::Egress>,
}

/// An upstream a provider's tokens may go to.
#[derive(Debug, Clone, PartialEq)]
pub enum AllowedUpstream {
    /// A host name or address (any port and scheme), or `*.example.com` for its subdomains.
    Host(String),
    /// A URL prefix, `https://api.example.com/v1`, matched at a path-segment boundary.
    Prefix(reqwest::Url),
}

impl AllowedUpstream {
    fn parse(s: &str) -> Result<Self, String> {
        if s.contains("://") {
            let url = reqwest::Url::parse(s)
                .map_err(|e| format!("allowed_upstreams: {s:?} is not a valid URL: {e}"))?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!("allowed_upstreams: {s:?} must not have a query or fragment"));
            }
            return Ok(AllowedUpstream::Prefix(url));
        }
        let host = s.trim().to_ascii_lowercase();
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(format!("allowed_upstreams: {s:?} is neither a host name nor a URL"));
        }
        Ok(AllowedUpstream::Host(host))
    }

    /// Whether `upstream` (a route's upstream URL) is covered.
    pub fn allows(&self, upstream: &str) -> bool {
        let Ok(u) = reqwest::Url::parse(upstream) else { return false };
        let host = u.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        match self {
            AllowedUpstream::Host(h) => match h.strip_prefix("*.") {
                Some(parent) => {
                    host.strip_suffix(parent).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
                }
                None => host == h.trim_start_matches('[').trim_end_matches(']'),
            },
            AllowedUpstream::Prefix(p) => {
                // A WebSocket upstream travels as its HTTP twin: `wss://` as `https://`.
                fn transport(scheme: &str) -> &str {
                    match scheme {
                        "wss" => "https",
                        "ws" => "http",
                        other => other,
                    }
                }
                if transport(u.scheme()) != transport(p.scheme())
                    || u.host() != p.host()
                    || u.port_or_known_default() != p.port_or_known_default()
                {
                    return false;
                }
                let (want, have) = (p.path().trim_end_matches('/'), u.path());
                have.strip_prefix(want).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

impl std::fmt::Display for AllowedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowedUpstream::Host(h) => f.write_str(h),
            AllowedUpstream::Prefix(u) => f.write_str(u.as_str()),
        }
    }
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEndpoint {
    /// A fixed URL.
    Url(reqwest::Url),
    /// Read `token_endpoint` from `{issuer}/.well-known/openid-configuration`.
    Discovery {
        /// The issuer; the discovery document's `issuer` must equal it.
        issuer: reqwest::Url,
    },
}

/// The OAuth2 grant used to obtain tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// `grant_type=client_credentials`.
    ClientCredentials,
    /// `grant_type=password` (RFC 9700 §2.4 discourages it; kept for legacy providers).
    Password {
        /// Resource owner's user name.
        username: Secret,
        /// Resource owner's password.
        password: Secret,
    },
    /// Only `grant_type=refresh_token`, seeded with a refresh token obtained interactively.
    RefreshToken {
        /// The initial refresh token.
        refresh_token: Secret,
        /// Where rotated refresh tokens are kept across restarts.
        state_file: Option<PathBuf>,
    },
    /// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 section 2.1).
    JwtBearer(Assertion),
    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693).
    TokenExchange(TokenExchange),
}

impl Grant {
    /// The grant's name in the configuration.
    pub fn name(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password { .. } => "password",
            Grant::RefreshToken { .. } => "refresh_token",
            Grant::JwtBearer(_) => "jwt_bearer",
            Grant::TokenExchange(_) => "token_exchange",
        }
    }
}

/// The assertion of the jwt-bearer grant.
#[derive(Debug, Clone, PartialEq)]
pub enum Assertion {
    /// Signed here with `private_key_file`, `iss` the client id.
    Signed {
        /// The key.
        key: KeyFile,
        /// `sub` (the client id unless `assertion_subject` says otherwise).
        subject: String,
    },
    /// Made by someone else, re-read from this file on every fetch.
    File(PathBuf),
}

/// RFC 8693 token exchange: trade a token read from a file for one for the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExchange {
    /// `subject_token` and `subject_token_type`.
    pub subject: ExchangeToken,
    /// `actor_token` and `actor_token_type`.
    pub actor: Option<ExchangeToken>,
    /// `requested_token_type`.
    pub requested_token_type: Option<String>,
    /// `audience` values.
    pub audience: Vec<String>,
    /// `resource` values.
    pub resource: Vec<String>,
}

/// A token handed to the exchange, re-read from its file on every fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeToken {
    /// Where the token comes from.
    pub from: TokenFrom,
    /// Its RFC 8693 token type URI.
    pub token_type: String,
}

/// Where a token sent in an exchange comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenFrom {
    /// A file, read for every exchange (a projected service-account token).
    File(PathBuf),
    /// The caller's own validated JWT (`subject_token: caller`): one exchanged token per caller
    /// subject.
    Caller,
    /// Another provider's current token (chained providers).
    Provider(String),
}

/// An OAuth2 provider, fully validated.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Provider {
    /// Token endpoint or issuer for discovery.
    pub endpoint: TokenEndpoint,
    /// The grant.
    pub grant: Grant,
    /// Client identifier.
    pub client_id: String,
    /// Client authentication method and its credential.
    pub client_auth: ClientAuth,
    /// How the assertions tokengate signs are addressed and how long they live.
    pub assertion: AssertionSettings,
    /// Requested scopes, sent space-separated.
    pub scopes: Vec<String>,
    /// Extra form fields (`audience`, `resource`, ...).
    pub params: Vec<(String, String)>,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Shared settings.
    pub common: ProviderCommon,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(rename = "type")]
    kind: Kind,
    #[serde(default)]
    grant: Option<GrantKind>,
    token_url: Option<Text>,
    issuer: Option<Text>,
    client_id: Option<Text>,
    client_secret: Option<Text>,
    client_secret_file: Option<Text>,
    client_auth: Option<client_auth::Method>,
    private_key_file: Option<Text>,
    signing_alg: Option<SigningAlg>,
    key_id: Option<Text>,
    signing_cert_file: Option<Text>,
    client_cert_file: Option<Text>,
    client_key_file: Option<Text>,
    client_assertion_file: Option<Text>,
    client_assertion_type: Option<Text>,
    assertion_audience: Option<Text>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    assertion_lifetime: Option<Duration>,
    assertion_file: Option<Text>,
    assertion_subject: Option<Text>,
    token_exchange: Option<RawTokenExchange>,
    #[serde(default)]
    allowed_upstreams: Vec<Text>,
    egress_proxy: Option<super::EgressSetting>,
    #[serde(default)]
    scopes: Vec<Text>,
    #[serde(default)]
    params: BTreeMap<String, Text>,
    #[serde(default)]
    headers: BTreeMap<String, Text>,
    username: Option<Text>,
    username_file: Option<Text>,
    password: Option<Text>,
    password_file: Option<Text>,
    refresh_token: Option<Text>,
    refresh_token_file: Option<Text>,
    state_file: Option<Text>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    timeout: Option<Duration>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    refresh_margin: Option<Duration>,
    #[schemars(with = "Option<crate::config::json_schema::DurationText>")]
    #[serde(default, deserialize_with = "value::opt_duration")]
    default_ttl: Option<Duration>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default)]
    ca_file: Option<Text>,
    login: Option<RawHttpRequest>,
    refresh: Option<RawHttpRequest>,
    response: Option<RawResponse>,
    value: Option<Text>,
    value_file: Option<Text>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawTokenExchange {
    subject_token_file: Option<Text>,
    subject_token: Option<Text>,
    subject_token_provider: Option<Text>,
    subject_token_type: Option<Text>,
    actor_token_file: Option<Text>,
    actor_token_provider: Option<Text>,
    actor_token_type: Option<Text>,
    requested_token_type: Option<Text>,
    #[serde(default)]
    audience: OneOrMany,
    #[serde(default)]
    resource: OneOrMany,
}

/// A string or a list of strings.
#[derive(Deserialize, schemars::JsonSchema, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(Text),
    Many(Vec<Text>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(t) => vec![t.0],
            OneOrMany::Many(v) => v.into_iter().map(|t| t.0).collect(),
        }
    }
}

/// RFC 8693 section 3 token type URIs by their short names.
fn token_type(key: &str, t: Option<Text>, default: &str) -> Result<String, String> {
    let t = t.map_or_else(|| default.to_owned(), |t| t.0);
    let full = match t.as_str() {
        "access_token" | "refresh_token" | "id_token" | "saml1" | "saml2" | "jwt" => {
            format!("urn:ietf:params:oauth:token-type:{t}")
        }
        _ if t.contains(':') => t,
        _ => {
            return Err(format!(
                "{key} {t:?} is not a token type: use access_token, refresh_token, id_token, jwt, saml1, saml2 or a URI"
            ));
        }
    };
    Ok(full)
}

/// The settings of [`ProviderCommon`] as written; serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, so each raw provider lists them and hands them over here.
pub(super) struct RawCommon {
    pub timeout: Option<Duration>,
    pub refresh_margin: Option<Duration>,
    pub default_ttl: Option<Duration>,
    pub allow_insecure_http: bool,
    pub ca_file: Option<Text>,
    pub allowed_upstreams: Vec<Text>,
    pub egress_proxy: Option<super::EgressSetting>,
}

#[derive(Deserialize, schemars::JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
    JwtBearer,
    TokenExchange,
}

/// Reads `name` inline or from `name_file`; exactly one may be set.
pub(super) fn secret(name: &str, inline: Option<Text>, file: Option<Text>) -> Result<Option<Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("set either {name} or {name}_file, not both")),
        (Some(v), None) => Ok(Some(Secret::new(v.0))),
        (None, Some(path)) if super::value::no_tilde(&path.0).is_err() => {
            super::value::no_tilde(&path.0).map(|()| None).map_err(|e| format!("{name}_file {e}"))
        }
        (None, Some(path)) => {
            super::files::record(&path.0);
            let text = std::fs::read_to_string(&path.0)
                .map_err(|e| format!("cannot read {name}_file {:?}: {e}", path.0))?;
            // Secret mounts and `echo > file` add a trailing newline that is not part of the secret.
            let value = text.strip_suffix('\n').unwrap_or(&text);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                return Err(format!("{name}_file {:?} is empty", path.0));
            }
            Ok(Some(Secret::new(value)))
        }
        (None, None) => Ok(None),
    }
}

fn required(name: &str, grant: &str, v: Option<Secret>) -> Result<Secret, String> {
    v.ok_or_else(|| format!("grant {grant} needs {name} (or {name}_file)"))
}

/// Parses a token endpoint URL, refusing plain http except to loopback or when allowed.
pub(super) fn endpoint_url(key: &str, s: &str, allow_insecure_http: bool) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{key} {s:?} is not a valid URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(&url) => {}
        "http" => {
            return Err(format!(
                "{key} {s:?} uses plain http, which would send credentials in clear text; use https, or set allow_insecure_http: true"
            ));
        }
        other => return Err(format!("{key} {s:?} has unsupported scheme {other:?}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{key} {s:?} must not contain user info"));
    }
    if url.host_str().is_none() {
        return Err(format!("{key} {s:?} has no host"));
    }
    Ok(url)
}

/// True when the URL's host is a loopback address or `localhost`.
pub fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl RawCommon {
    pub(super) fn build(self) -> Result<(ProviderCommon, bool), String> {
        let common = ProviderCommon {
            timeout: self.timeout.unwrap_or(Duration::from_secs(5)),
            refresh_margin: self.refresh_margin,
            default_ttl: self.default_ttl.unwrap_or(Duration::from_secs(300)),
            ca_file: self.ca_file.map(|t| PathBuf::from(t.0)),
            allowed_upstreams: self
                .allowed_upstreams
                .iter()
                .map(|t| AllowedUpstream::parse(&t.0))
                .collect::<Result<_, _>>()?,
            egress_proxy: self.egress_proxy,
            egress: None,
        };
        if common.timeout.is_zero() {
            return Err("timeout must be greater than zero".into());
        }
        if common.default_ttl < Duration::from_secs(1) {
            return Err("default_ttl must be at least 1s".into());
        }
        Ok((common, self.allow_insecure_http))
    }
}

pub(super) const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

/// `deserialize_with` for a map of extra headers.
pub(super) fn header_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(HeaderName, HeaderValue)>, D::Error> {
    headers(BTreeMap::<String, Text>::deserialize(d)?).map_err(serde::de::Error::custom)
}

pub(super) fn headers(raw: BTreeMap<String, Text>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    raw.into_iter()
        .map(|(k, v)| {
            let name =
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("invalid header name {k:?}"))?;
            let reserved = [http::header::AUTHORIZATION, http::header::CONTENT_TYPE, http::header::HOST];
            if reserved.contains(&name) || HOP_BY_HOP.contains(&name.as_str()) {
                return Err(format!("header {k:?} is set by tokengate and cannot be configured"));
            }
            let mut value =
                HeaderValue::from_str(&v.0).map_err(|_| format!("header {k:?} has an invalid value"))?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

impl TryFrom<RawProvider> for Provider {
    type Error = String;

    fn try_from(raw: RawProvider) -> Result<Self, String> {
        let common = RawCommon {
            timeout: raw.timeout,
            refresh_margin: raw.refresh_margin,
            default_ttl: raw.default_ttl,
            allow_insecure_http: raw.allow_insecure_http,
            ca_file: raw.ca_file.clone(),
            allowed_upstreams: raw.allowed_upstreams.clone(),
            egress_proxy: raw.egress_proxy.clone(),
        };
        if !matches!(raw.kind, Kind::Static) && (raw.value.is_some() || raw.value_file.is_some()) {
            return Err("value and value_file apply to type: static".into());
        }
        match raw.kind {
            Kind::Static => static_provider(raw, common),
            Kind::OAuth2 => {
                let http_only = [
                    ("login", raw.login.is_some()),
                    ("refresh", raw.refresh.is_some()),
                    ("response", raw.response.is_some()),
                ];
                if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
                    return Err(format!("{key} applies to type: http, not oauth2"));
                }
                oauth2(raw).map(Provider::OAuth2)
            }
            Kind::Http => {
                let oauth_only = [
                    ("grant", raw.grant.is_some()),
                    ("token_url", raw.token_url.is_some()),
                    ("issuer", raw.issuer.is_some()),
                    ("client_id", raw.client_id.is_some()),
                    ("client_secret", raw.client_secret.is_some() || raw.client_secret_file.is_some()),
                    ("client_auth", raw.client_auth.is_some()),
                    ("scopes", !raw.scopes.is_empty()),
                    ("params", !raw.params.is_empty()),
                    ("headers", !raw.headers.is_empty()),
                    ("username", raw.username.is_some() || raw.username_file.is_some()),
                    ("password", raw.password.is_some() || raw.password_file.is_some()),
                    ("refresh_token", raw.refresh_token.is_some() || raw.refresh_token_file.is_some()),
                    ("state_file", raw.state_file.is_some()),
                    ("private_key_file", raw.private_key_file.is_some()),
                    ("client_cert_file", raw.client_cert_file.is_some()),
                    ("client_assertion_file", raw.client_assertion_file.is_some()),
                    ("assertion_file", raw.assertion_file.is_some()),
                    ("token_exchange", raw.token_exchange.is_some()),
                ];
                if let Some((key, _)) = oauth_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "{key} applies to type: oauth2; a type: http provider sets it inside login/refresh"
                    ));
                }
                let (common, insecure) = common.build()?;
                super::http_provider::build(raw.login, raw.refresh, raw.response, common, insecure)
                    .map(Provider::Http)
            }
        }
    }
}

fn static_provider(raw: RawProvider, common: RawCommon) -> Result<Provider, String> {
    use super::static_provider::{self, Source};
    let fetching = [
        ("grant", raw.grant.is_some()),
        ("token_url", raw.token_url.is_some()),
        ("issuer", raw.issuer.is_some()),
        ("client_id", raw.client_id.is_some()),
        ("client_secret", raw.client_secret.is_some() || raw.client_secret_file.is_some()),
        ("scopes", !raw.scopes.is_empty()),
        ("login", raw.login.is_some()),
        ("refresh", raw.refresh.is_some()),
        ("refresh_token", raw.refresh_token.is_some() || raw.refresh_token_file.is_some()),
        ("username_file", raw.username_file.is_some()),
    ];
    if let Some((key, _)) = fetching.iter().find(|(_, set)| *set) {
        return Err(format!("{key} does not apply to type: static, which fetches nothing"));
    }
    let password = match (raw.password, raw.password_file) {
        (Some(p), None) => Some(Source::Inline(Secret::new(p.0))),
        (None, Some(f)) => Some(Source::File(client_auth::readable("password_file", PathBuf::from(f.0))?)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err("password and password_file: set one".into()),
    };
    let (common, _) = common.build()?;
    let username = raw.username.map(|t| t.0);
    static_provider::build(raw.value.map(|t| t.0), raw.value_file.map(|t| t.0), username, password, common)
        .map(Provider::Static)
}

fn oauth2(raw: RawProvider) -> Result<OAuth2Provider, String> {
    let (common, allow_insecure_http) = RawCommon {
        timeout: raw.timeout,
        refresh_margin: raw.refresh_margin,
        default_ttl: raw.default_ttl,
        allow_insecure_http: raw.allow_insecure_http,
        ca_file: raw.ca_file,
        allowed_upstreams: raw.allowed_upstreams,
        egress_proxy: raw.egress_proxy,
    }
    .build()?;
    let endpoint = match (raw.token_url, raw.issuer) {
        (Some(_), Some(_)) => {
            return Err("set either token_url or issuer (OIDC discovery), not both".into());
        }
        (None, None) => return Err("needs token_url, or issuer for OIDC discovery".into()),
        (Some(u), None) => TokenEndpoint::Url(endpoint_url("token_url", &u.0, allow_insecure_http)?),
        (None, Some(i)) => {
            TokenEndpoint::Discovery { issuer: endpoint_url("issuer", &i.0, allow_insecure_http)? }
        }
    };
    let client_id = raw.client_id.ok_or("needs client_id")?.0;
    if client_id.is_empty() {
        return Err("client_id is empty".into());
    }
    let client_secret = secret("client_secret", raw.client_secret, raw.client_secret_file)?;
    let grant_kind = raw.grant.unwrap_or(GrantKind::ClientCredentials);
    let discovery = matches!(endpoint, TokenEndpoint::Discovery { .. });
    let key =
        client_auth::key_file(raw.private_key_file, raw.signing_alg, raw.key_id, raw.signing_cert_file)?;
    let client_auth = RawClientAuth {
        method: raw.client_auth,
        secret: client_secret,
        // A signed jwt-bearer grant with private_key_jwt shares its key.
        key: key.clone(),
        client_cert_file: raw.client_cert_file,
        client_key_file: raw.client_key_file,
        client_assertion_file: raw.client_assertion_file,
        client_assertion_type: raw.client_assertion_type,
    }
    // The jwt-bearer and token-exchange grants carry the client's proof themselves.
    .build(matches!(grant_kind, GrantKind::JwtBearer | GrantKind::TokenExchange))?;
    let key_used = matches!(client_auth, ClientAuth::PrivateKeyJwt(_))
        || (grant_kind == GrantKind::JwtBearer && raw.assertion_file.is_none());
    let signs = key_used || matches!(client_auth, ClientAuth::SecretJwt(_));
    if !signs && (raw.assertion_audience.is_some() || raw.assertion_lifetime.is_some()) {
        let key = if raw.assertion_audience.is_some() { "assertion_audience" } else { "assertion_lifetime" };
        return Err(format!(
            "{key} applies to assertions tokengate signs (private_key_jwt, client_secret_jwt, grant: jwt_bearer)"
        ));
    }
    let assertion =
        client_auth::assertion_settings(raw.assertion_audience, raw.assertion_lifetime, discovery)?;
    let username = secret("username", raw.username, raw.username_file)?;
    let password = secret("password", raw.password, raw.password_file)?;
    let refresh_token = secret("refresh_token", raw.refresh_token, raw.refresh_token_file)?;
    if grant_kind != GrantKind::JwtBearer && (raw.assertion_file.is_some() || raw.assertion_subject.is_some())
    {
        let key = if raw.assertion_file.is_some() { "assertion_file" } else { "assertion_subject" };
        return Err(format!("{key} applies to grant: jwt_bearer"));
    }
    if grant_kind != GrantKind::TokenExchange && raw.token_exchange.is_some() {
        return Err("token_exchange settings need grant: token_exchange".into());
    }
    if key.is_some() && !key_used {
        return Err(
            "private_key_file is not used: set client_auth: private_key_jwt or grant: jwt_bearer".into()
        );
    }
    let grant = match grant_kind {
        GrantKind::ClientCredentials => Grant::ClientCredentials,
        GrantKind::Password => Grant::Password {
            username: required("username", "password", username.clone())?,
            password: required("password", "password", password.clone())?,
        },
        GrantKind::RefreshToken => Grant::RefreshToken {
            refresh_token: required("refresh_token", "refresh_token", refresh_token.clone())?,
            state_file: raw.state_file.as_ref().map(|t| PathBuf::from(&t.0)),
        },
        GrantKind::JwtBearer => Grant::JwtBearer(match (raw.assertion_file, key.clone()) {
            (Some(_), _) if raw.assertion_subject.is_some() => {
                return Err(
                    "assertion_subject applies to assertions tokengate signs, not to assertion_file".into()
                );
            }
            (Some(f), _) => Assertion::File(client_auth::readable("assertion_file", PathBuf::from(f.0))?),
            (None, Some(key)) => Assertion::Signed {
                key,
                subject: raw.assertion_subject.map_or_else(|| client_id.clone(), |t| t.0),
            },
            (None, None) => {
                return Err(
                    "grant jwt_bearer needs assertion_file, or private_key_file to sign the assertion".into(),
                );
            }
        }),
        GrantKind::TokenExchange => {
            let raw = raw.token_exchange.ok_or(
                "grant token_exchange needs a token_exchange block with subject_token_file, subject_token: caller or subject_token_provider",
            )?;
            let file = |key: &str, t: Text| {
                client_auth::readable(&format!("token_exchange.{key}"), PathBuf::from(t.0))
                    .map(TokenFrom::File)
            };
            let from = match (raw.subject_token_file, raw.subject_token, raw.subject_token_provider) {
                (Some(f), None, None) => file("subject_token_file", f)?,
                (None, Some(c), None) if c.0 == "caller" => TokenFrom::Caller,
                (None, Some(c), None) => {
                    return Err(format!("token_exchange.subject_token: {:?}; the only value is caller", c.0));
                }
                (None, None, Some(p)) => TokenFrom::Provider(p.0),
                _ => {
                    return Err("token_exchange needs one of subject_token_file, subject_token: caller or subject_token_provider".into());
                }
            };
            let subject = ExchangeToken {
                from,
                token_type: token_type("subject_token_type", raw.subject_token_type, "jwt")?,
            };
            let actor_from = match (raw.actor_token_file, raw.actor_token_provider) {
                (Some(f), None) => Some(file("actor_token_file", f)?),
                (None, Some(p)) => Some(TokenFrom::Provider(p.0)),
                (Some(_), Some(_)) => {
                    return Err(
                        "token_exchange: set actor_token_file or actor_token_provider, not both".into()
                    );
                }
                (None, None) => None,
            };
            let actor = match (actor_from, raw.actor_token_type) {
                (Some(from), t) => {
                    // Another provider's token is an access token; a file's, usually a JWT.
                    let default = if matches!(from, TokenFrom::Provider(_)) { "access_token" } else { "jwt" };
                    Some(ExchangeToken { from, token_type: token_type("actor_token_type", t, default)? })
                }
                (None, Some(_)) => {
                    return Err(
                        "token_exchange.actor_token_type needs actor_token_file or actor_token_provider"
                            .into(),
                    );
                }
                (None, None) => None,
            };
            Grant::TokenExchange(TokenExchange {
                subject,
                actor,
                requested_token_type: raw
                    .requested_token_type
                    .map(|t| token_type("requested_token_type", Some(t), ""))
                    .transpose()?,
                audience: raw.audience.into_vec(),
                resource: raw.resource.into_vec(),
            })
        }
    };
    let stray = match grant {
        Grant::ClientCredentials => [
            ("username", username.is_some()),
            ("password", password.is_some()),
            ("refresh_token", refresh_token.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set),
        Grant::Password { .. } => {
            [("refresh_token", refresh_token.is_some())].into_iter().find(|(_, set)| *set)
        }
        Grant::RefreshToken { .. } => [("username", username.is_some()), ("password", password.is_some())]
            .into_iter()
            .find(|(_, set)| *set),
        Grant::JwtBearer(_) | Grant::TokenExchange(_) => [
            ("username", username.is_some()),
            ("password", password.is_some()),
            ("refresh_token", refresh_token.is_some()),
        ]
        .into_iter()
        .find(|(_, set)| *set),
    };
    if let Some((name, _)) = stray {
        return Err(format!("{name} does not apply to this grant; set `grant:` or remove {name}"));
    }
    if raw.state_file.is_some() && !matches!(grant, Grant::RefreshToken { .. }) {
        return Err("state_file only applies to grant: refresh_token".into());
    }
    let scopes: Vec<String> =
        raw.scopes.iter().flat_map(|s| s.0.split_whitespace()).map(str::to_owned).collect();
    const RESERVED: [&str; 16] = [
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "username",
        "password",
        "refresh_token",
        "code",
        "client_assertion",
        "client_assertion_type",
        "assertion",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "requested_token_type",
    ];
    let params = raw
        .params
        .into_iter()
        .map(|(k, v)| {
            if RESERVED.contains(&k.as_str()) {
                Err(format!("params.{k} is set by tokengate; use the dedicated key instead"))
            } else {
                Ok((k, v.0))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(OAuth2Provider {
        endpoint,
        grant,
        client_id,
        client_auth,
        assertion,
        scopes,
        params,
        headers: headers(raw.headers)?,
        common,
    })
}

super::json_schema::schema_as!(Provider => RawProvider);
