//! Provider configuration: where and how a token is obtained.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::http_provider::{HttpProvider, RawHttpRequest, RawResponse};
use super::value::{self, Text};
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
}

#[derive(Deserialize, Clone, Copy)]
enum Kind {
    #[serde(rename = "oauth2")]
    OAuth2,
    #[serde(rename = "http")]
    Http,
}

impl Provider {
    /// Settings every provider type has.
    pub fn common(&self) -> &ProviderCommon {
        match self {
            Provider::OAuth2(p) => &p.common,
            Provider::Http(p) => &p.common,
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

/// How the client authenticates at the token endpoint (RFC 6749 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (client_secret_basic).
    Basic,
    /// Basic without the form-urlencoding step, for servers that do not decode it.
    BasicRaw,
    /// `client_id` and `client_secret` in the form body (client_secret_post).
    Post,
    /// Public client: only `client_id` in the body.
    None,
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
    /// Client secret (absent for `client_auth: none`).
    pub client_secret: Option<Secret>,
    /// Client authentication method.
    pub client_auth: ClientAuth,
    /// Requested scopes, sent space-separated.
    pub scopes: Vec<String>,
    /// Extra form fields (`audience`, `resource`, ...).
    pub params: Vec<(String, String)>,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Shared settings.
    pub common: ProviderCommon,
}

#[derive(Deserialize)]
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
    client_auth: Option<ClientAuth>,
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
    #[serde(default, deserialize_with = "value::opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "value::opt_duration")]
    refresh_margin: Option<Duration>,
    #[serde(default, deserialize_with = "value::opt_duration")]
    default_ttl: Option<Duration>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default)]
    ca_file: Option<Text>,
    login: Option<RawHttpRequest>,
    refresh: Option<RawHttpRequest>,
    response: Option<RawResponse>,
}

/// The settings of [`ProviderCommon`] as written; serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, so each raw provider lists them and hands them over here.
pub(super) struct RawCommon {
    pub timeout: Option<Duration>,
    pub refresh_margin: Option<Duration>,
    pub default_ttl: Option<Duration>,
    pub allow_insecure_http: bool,
    pub ca_file: Option<Text>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// Reads `name` inline or from `name_file`; exactly one may be set.
pub(super) fn secret(name: &str, inline: Option<Text>, file: Option<Text>) -> Result<Option<Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("set either {name} or {name}_file, not both")),
        (Some(v), None) => Ok(Some(Secret::new(v.0))),
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

const HOP_BY_HOP: [&str; 7] =
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
        };
        match raw.kind {
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

fn oauth2(raw: RawProvider) -> Result<OAuth2Provider, String> {
    let (common, allow_insecure_http) = RawCommon {
        timeout: raw.timeout,
        refresh_margin: raw.refresh_margin,
        default_ttl: raw.default_ttl,
        allow_insecure_http: raw.allow_insecure_http,
        ca_file: raw.ca_file,
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
    let client_auth = raw.client_auth.unwrap_or(ClientAuth::Basic);
    match (client_auth, &client_secret) {
        (ClientAuth::None, Some(_)) => {
            return Err("client_auth: none sends no secret; remove client_secret or pick basic/post".into());
        }
        (ClientAuth::None, None) => {}
        (_, None) => return Err("needs client_secret (or client_secret_file)".into()),
        (_, Some(s)) if s.is_empty() => return Err("client_secret is empty".into()),
        _ => {}
    }
    let username = secret("username", raw.username, raw.username_file)?;
    let password = secret("password", raw.password, raw.password_file)?;
    let refresh_token = secret("refresh_token", raw.refresh_token, raw.refresh_token_file)?;
    let grant = match raw.grant.unwrap_or(GrantKind::ClientCredentials) {
        GrantKind::ClientCredentials => Grant::ClientCredentials,
        GrantKind::Password => Grant::Password {
            username: required("username", "password", username.clone())?,
            password: required("password", "password", password.clone())?,
        },
        GrantKind::RefreshToken => Grant::RefreshToken {
            refresh_token: required("refresh_token", "refresh_token", refresh_token.clone())?,
            state_file: raw.state_file.as_ref().map(|t| PathBuf::from(&t.0)),
        },
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
    };
    if let Some((name, _)) = stray {
        return Err(format!("{name} does not apply to this grant; set `grant:` or remove {name}"));
    }
    if raw.state_file.is_some() && !matches!(grant, Grant::RefreshToken { .. }) {
        return Err("state_file only applies to grant: refresh_token".into());
    }
    let scopes: Vec<String> =
        raw.scopes.iter().flat_map(|s| s.0.split_whitespace()).map(str::to_owned).collect();
    const RESERVED: [&str; 8] = [
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "username",
        "password",
        "refresh_token",
        "code",
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
        client_secret,
        client_auth,
        scopes,
        params,
        headers: headers(raw.headers)?,
        common,
    })
}
