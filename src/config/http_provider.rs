//! `type: http`: token APIs that are not OAuth2 (Sensu Go and similar vendors), described
//! declaratively: a login request, an optional refresh request, and where the token, its expiry
//! and a refresh token are found in the JSON reply.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use super::provider::{ProviderCommon, endpoint_url, headers, secret};
use super::value::Text;
use crate::secret::Secret;

/// A declarative token API.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpProvider {
    /// Obtains a token from credentials.
    pub login: HttpRequestSpec,
    /// Renews a token; on failure tokengate logs in again.
    pub refresh: Option<HttpRequestSpec>,
    /// Where things are in the JSON reply.
    pub response: FieldMap,
    /// Shared settings.
    pub common: ProviderCommon,
}

/// One request of a token API. Body values may contain `{refresh_token}` and `{access_token}`,
/// replaced with the current values when the request is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequestSpec {
    /// Method (default POST).
    pub method: Method,
    /// URL.
    pub url: reqwest::Url,
    /// `Authorization: Basic` from these credentials.
    pub basic: Option<(Secret, Secret)>,
    /// `Authorization: Bearer <current access token>` (possibly expired), as Sensu's renew wants.
    pub bearer_current_token: bool,
    /// The body.
    pub body: BodySpec,
    /// Extra headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A request body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodySpec {
    /// No body.
    None,
    /// `application/x-www-form-urlencoded` fields.
    Form(Vec<(String, Secret)>),
    /// A JSON object of string fields.
    Json(Vec<(String, Secret)>),
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttpRequest {
    method: Option<Text>,
    url: Text,
    username: Option<Text>,
    username_file: Option<Text>,
    password: Option<Text>,
    password_file: Option<Text>,
    #[serde(default)]
    bearer_current_token: bool,
    form: Option<BTreeMap<String, Text>>,
    json: Option<BTreeMap<String, Text>>,
    #[serde(default)]
    headers: BTreeMap<String, Text>,
}

#[derive(Deserialize, schemars::JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse {
    access_token: Option<Text>,
    expires_in: Option<Text>,
    expires_at: Option<Text>,
    refresh_token: Option<Text>,
    token_type: Option<Text>,
    scope: Option<Text>,
}

impl RawHttpRequest {
    fn build(self, what: &str, allow_insecure_http: bool) -> Result<HttpRequestSpec, String> {
        let method = match self.method {
            None => Method::POST,
            Some(m) => Method::from_bytes(m.0.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("{what}.method {:?} is not an HTTP method", m.0))?,
        };
        let url = endpoint_url(&format!("{what}.url"), &self.url.0, allow_insecure_http)?;
        let username = secret(&format!("{what}.username"), self.username, self.username_file)?;
        let password = secret(&format!("{what}.password"), self.password, self.password_file)?;
        let basic = match (username, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => {
                return Err(format!("{what}: Basic credentials need both username and password"));
            }
        };
        let fields = |m: BTreeMap<String, Text>| m.into_iter().map(|(k, v)| (k, Secret::new(v.0))).collect();
        let body = match (self.form, self.json) {
            (Some(_), Some(_)) => return Err(format!("{what}: set either form or json, not both")),
            (Some(f), None) => BodySpec::Form(fields(f)),
            (None, Some(j)) => BodySpec::Json(fields(j)),
            (None, None) => BodySpec::None,
        };
        if body != BodySpec::None && method == Method::GET {
            return Err(format!("{what}: a GET request cannot carry a form or json body"));
        }
        if basic.is_some() && self.bearer_current_token {
            return Err(format!("{what}: choose Basic credentials or bearer_current_token, not both"));
        }
        Ok(HttpRequestSpec {
            method,
            url,
            basic,
            bearer_current_token: self.bearer_current_token,
            body,
            headers: headers(self.headers)?,
        })
    }
}

impl RawResponse {
    fn build(self) -> FieldMap {
        let name = |t: Option<Text>, default: &str| Some(t.map_or_else(|| default.to_owned(), |t| t.0));
        FieldMap {
            access_token: self.access_token.map_or_else(|| "access_token".to_owned(), |t| t.0),
            expires_in: name(self.expires_in, "expires_in"),
            expires_at: name(self.expires_at, "expires_at"),
            refresh_token: name(self.refresh_token, "refresh_token"),
            token_type: name(self.token_type, "token_type"),
            scope: name(self.scope, "scope"),
        }
    }
}

/// Builds an HTTP provider from its raw parts.
pub(super) fn build(
    login: Option<RawHttpRequest>,
    refresh: Option<RawHttpRequest>,
    response: Option<RawResponse>,
    common: ProviderCommon,
    allow_insecure_http: bool,
) -> Result<HttpProvider, String> {
    let login = login
        .ok_or("type http needs a login request (login: {url: ...})")?
        .build("login", allow_insecure_http)?;
    if login.bearer_current_token {
        return Err("login cannot use bearer_current_token: there is no token before the first login".into());
    }
    let refresh = refresh.map(|r| r.build("refresh", allow_insecure_http)).transpose()?;
    Ok(HttpProvider { login, refresh, response: response.unwrap_or_default().build(), common })
}

/// Names of the JSON fields of a token response; dotted names reach into nested objects.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMap {
    /// Field holding the access token.
    pub access_token: String,
    /// Field with the lifetime in seconds, if the response has one.
    pub expires_in: Option<String>,
    /// Field with the absolute expiry in epoch seconds, if the response has one.
    pub expires_at: Option<String>,
    /// Field with the refresh token.
    pub refresh_token: Option<String>,
    /// Field with the token type, checked to be Bearer when present.
    pub token_type: Option<String>,
    /// Field with the granted scope.
    pub scope: Option<String>,
}

impl FieldMap {
    /// RFC 6749 §5.1 names.
    pub fn oauth2() -> Self {
        FieldMap {
            access_token: "access_token".into(),
            expires_in: Some("expires_in".into()),
            expires_at: None,
            refresh_token: Some("refresh_token".into()),
            token_type: Some("token_type".into()),
            scope: Some("scope".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{BodySpec, Provider, env, parse};

    fn provider(body: &str) -> Result<Provider, String> {
        let text = format!(
            "providers:\n  s:\n    type: http\n{body}routes:\n  - prefix: /\n    upstream: https://api.example\n    provider: s\n"
        );
        env::with_lookup(|_| None, || parse(&text, "t.yaml"))
            .map(|mut c| c.providers.remove("s").unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sensu_style_provider_parses_with_defaults() {
        let p = provider(
            "    login:\n      method: get\n      url: https://sensu/auth\n      username: u\n      password: p\n    refresh:\n      url: https://sensu/auth/token\n      bearer_current_token: true\n      json: {refresh_token: '{refresh_token}'}\n",
        )
        .unwrap();
        let Provider::Http(h) = p else { panic!("not http") };
        assert_eq!(h.login.method, http::Method::GET);
        assert!(h.login.basic.is_some());
        let refresh = h.refresh.unwrap();
        assert_eq!(refresh.method, http::Method::POST);
        assert!(refresh.bearer_current_token);
        assert!(matches!(&refresh.body, BodySpec::Json(f) if f[0].0 == "refresh_token"));
        assert_eq!(h.response.expires_at.as_deref(), Some("expires_at"));
    }

    #[test]
    fn invalid_http_providers_are_explained() {
        for (body, needle) in [
            ("", "needs a login request"),
            ("    login:\n      url: https://x/auth\n      username: u\n", "both username and password"),
            (
                "    login:\n      method: GET\n      url: https://x/auth\n      form: {a: b}\n",
                "GET request cannot carry",
            ),
            (
                "    login:\n      url: https://x/auth\n      bearer_current_token: true\n",
                "no token before the first login",
            ),
            ("    login:\n      url: http://x.example/auth\n", "plain http"),
            (
                "    client_id: c\n    login:\n      url: https://x/auth\n",
                "client_id applies to type: oauth2",
            ),
            (
                "    login:\n      url: https://x/auth\n      form: {a: b}\n      json: {a: b}\n",
                "either form or json",
            ),
        ] {
            let err = provider(body).unwrap_err();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
    }
}
