//! OAuth2 token requests (RFC 6749): building them, discovery, sending, refresh-token handling.

use std::path::Path;
use std::sync::Mutex;

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};

use super::assertion::{Endpoint, Proofs, Prover};
use super::error::{FetchError, tidy};
use super::response::{self, FieldMap, Issued};
use super::send;
use crate::config::{ClientAuth, Grant, OAuth2Provider, TokenEndpoint};

/// `grant_type` of RFC 7523 section 2.1.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `grant_type` of RFC 8693.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
use crate::secret::Secret;

/// A token request, ready to send. Built by a pure function so tests can pin the exact bytes.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The token endpoint.
    pub url: reqwest::Url,
    /// Headers, including client authentication (marked sensitive).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The form-urlencoded body. May contain secrets: never log it.
    pub body: String,
}

/// Which grant a request uses.
#[derive(Debug, Clone, Copy)]
pub enum GrantRequest<'a> {
    /// The configured grant.
    Configured,
    /// `grant_type=refresh_token` with this refresh token.
    Refresh(&'a Secret),
}

/// `Authorization: Basic` value per RFC 6749 §2.3.1: id and secret are form-urlencoded first,
/// unless `raw` is set for servers that do not decode them.
pub fn basic_auth(client_id: &str, secret: &str, raw: bool) -> String {
    let enc = |s: &str| -> String {
        if raw { s.to_owned() } else { form_urlencoded::byte_serialize(s.as_bytes()).collect() }
    };
    format!("Basic {}", crate::secret::basic_credentials(&enc(client_id), &enc(secret)))
}

/// A proof's value; `Prover::proofs` makes every one the configuration asks for.
fn expose(s: &Option<Secret>) -> &str {
    s.as_ref().map_or("", Secret::expose)
}

/// Builds the token request for `provider` against `url`, carrying `proofs` (assertions and
/// exchange tokens made or read for this request).
pub fn build_request(
    provider: &OAuth2Provider,
    url: &reqwest::Url,
    grant: GrantRequest<'_>,
    proofs: &Proofs,
) -> TokenRequest {
    let mut form = form_urlencoded::Serializer::new(String::new());
    match (grant, &provider.grant) {
        (GrantRequest::Refresh(rt), _)
        | (GrantRequest::Configured, Grant::RefreshToken { refresh_token: rt, .. }) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", rt.expose());
        }
        (GrantRequest::Configured, Grant::ClientCredentials) => {
            form.append_pair("grant_type", "client_credentials");
        }
        (GrantRequest::Configured, Grant::Password { username, password }) => {
            form.append_pair("grant_type", "password");
            form.append_pair("username", username.expose());
            form.append_pair("password", password.expose());
        }
        (GrantRequest::Configured, Grant::JwtBearer(_)) => {
            form.append_pair("grant_type", JWT_BEARER_GRANT);
            form.append_pair("assertion", expose(&proofs.grant_assertion));
        }
        (GrantRequest::Configured, Grant::TokenExchange(x)) => {
            form.append_pair("grant_type", TOKEN_EXCHANGE_GRANT);
            form.append_pair("subject_token", expose(&proofs.subject_token));
            form.append_pair("subject_token_type", &x.subject.token_type);
            if let Some(actor) = &x.actor {
                form.append_pair("actor_token", expose(&proofs.actor_token));
                form.append_pair("actor_token_type", &actor.token_type);
            }
            if let Some(t) = &x.requested_token_type {
                form.append_pair("requested_token_type", t);
            }
            for a in &x.audience {
                form.append_pair("audience", a);
            }
            for r in &x.resource {
                form.append_pair("resource", r);
            }
        }
    }
    // RFC 6749 §6: a refresh keeps the original scope when none is sent.
    let refreshing =
        matches!(grant, GrantRequest::Refresh(_)) || matches!(provider.grant, Grant::RefreshToken { .. });
    if !provider.scopes.is_empty() && !refreshing {
        form.append_pair("scope", &provider.scopes.join(" "));
    }
    for (k, v) in &provider.params {
        form.append_pair(k, v);
    }
    let mut headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded")),
        (ACCEPT, HeaderValue::from_static("application/json")),
    ];
    match &provider.client_auth {
        ClientAuth::Basic(secret) | ClientAuth::BasicRaw(secret) => {
            let raw = matches!(provider.client_auth, ClientAuth::BasicRaw(_));
            if let Ok(mut v) = HeaderValue::from_str(&basic_auth(&provider.client_id, secret.expose(), raw)) {
                v.set_sensitive(true);
                headers.push((AUTHORIZATION, v));
            }
        }
        ClientAuth::Post(secret) => {
            form.append_pair("client_id", &provider.client_id);
            form.append_pair("client_secret", secret.expose());
        }
        // RFC 8705 section 2: the certificate authenticates; client_id says whose it is.
        ClientAuth::None | ClientAuth::Tls { .. } => {
            form.append_pair("client_id", &provider.client_id);
        }
        ClientAuth::SecretJwt(_) | ClientAuth::PrivateKeyJwt(_) | ClientAuth::AssertionFile { .. } => {
            let kind = match &provider.client_auth {
                ClientAuth::AssertionFile { assertion_type, .. } => assertion_type.as_str(),
                _ => crate::config::JWT_BEARER_ASSERTION,
            };
            form.append_pair("client_id", &provider.client_id);
            form.append_pair("client_assertion_type", kind);
            form.append_pair("client_assertion", expose(&proofs.client_assertion));
        }
    }
    headers.extend(provider.headers.iter().cloned());
    TokenRequest { url: url.clone(), headers, body: form.finish() }
}

/// What OIDC discovery found.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// `issuer`, verbatim: the audience of assertions addressed to the issuer.
    pub issuer: String,
    /// `token_endpoint`.
    pub token_endpoint: reqwest::Url,
    /// `mtls_endpoint_aliases.token_endpoint` (RFC 8705 section 5), for mutual-TLS clients.
    pub mtls_token_endpoint: Option<reqwest::Url>,
}

/// Fetches tokens for one OAuth2 provider; remembers the discovered endpoint and the latest
/// refresh token.
pub struct OAuth2Fetcher {
    config: OAuth2Provider,
    http: reqwest::Client,
    prover: Prover,
    discovered: Mutex<Option<Discovered>>,
    refresh_token: Mutex<Option<Secret>>,
    provider: String,
}

impl OAuth2Fetcher {
    /// A fetcher for `config`; `name` is used in logs.
    pub fn new(name: &str, config: OAuth2Provider, http: reqwest::Client) -> Self {
        let mut initial = None;
        if let Grant::RefreshToken { refresh_token, state_file } = &config.grant {
            initial = Some(refresh_token.clone());
            if let Some(path) = state_file {
                match read_state(path) {
                    Ok(Some(saved)) => initial = Some(saved),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(provider = name, error = %e, "cannot read the refresh-token state file; using the configured refresh token")
                    }
                }
            }
        }
        if matches!(config.grant, Grant::Password { .. }) {
            tracing::warn!(
                provider = name,
                "the password grant is deprecated (RFC 9700 section 2.4); use it only for providers that offer nothing else"
            );
        }
        OAuth2Fetcher {
            config,
            http,
            prover: Prover::new(name),
            discovered: Mutex::new(None),
            refresh_token: Mutex::new(initial),
            provider: name.to_owned(),
        }
    }

    /// Obtains a new token: with the refresh token when there is one, falling back to the
    /// configured grant once when the refresh is refused.
    pub async fn fetch(&self, inputs: &super::assertion::Inputs) -> Result<Issued, FetchError> {
        let target = self.endpoint().await?;
        let refresh = self.refresh_token.lock().map(|g| g.clone()).unwrap_or(None);
        let uses_refresh = matches!(self.config.grant, Grant::Password { .. } | Grant::RefreshToken { .. });
        if let (true, Some(rt)) = (uses_refresh, refresh) {
            match self.send(&target, GrantRequest::Refresh(&rt), inputs).await {
                Ok(issued) => return self.keep_refresh_token(issued, Some(rt)),
                Err(e) if e.is_transient() || matches!(self.config.grant, Grant::RefreshToken { .. }) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(provider = %self.provider, error = %e, "refresh token refused; falling back to the configured grant");
                    if let Ok(mut g) = self.refresh_token.lock() {
                        *g = None;
                    }
                }
            }
        }
        let issued = self.send(&target, GrantRequest::Configured, inputs).await?;
        if uses_refresh { self.keep_refresh_token(issued, None) } else { Ok(issued) }
    }

    /// Stores a rotated refresh token (or keeps the one used when none came back).
    fn keep_refresh_token(&self, issued: Issued, used: Option<Secret>) -> Result<Issued, FetchError> {
        let next = issued.refresh_token.clone().or(used);
        if let (Some(rt), Grant::RefreshToken { state_file: Some(path), .. }) = (&next, &self.config.grant) {
            write_state(path, rt).map_err(|e| {
                FetchError::Local(format!("cannot save the rotated refresh token to {}: {e}", path.display()))
            })?;
        }
        if let Ok(mut g) = self.refresh_token.lock() {
            *g = next;
        }
        Ok(issued)
    }

    async fn send(
        &self,
        target: &Target,
        grant: GrantRequest<'_>,
        inputs: &super::assertion::Inputs,
    ) -> Result<Issued, FetchError> {
        let url = &target.url;
        let proofs = self.prover.proofs(
            &self.config,
            &Endpoint { token_url: url.as_str(), issuer: target.issuer.as_deref() },
            inputs,
        )?;
        let http = match self.config.client_auth.identity() {
            Some(files) => {
                self.prover.tls_client(files, |id| super::send::client_with(&self.config.common, Some(id)))?
            }
            None => self.http.clone(),
        };
        // Whatever secret this request carries must not come back in an error text.
        let mut redactor = crate::secret::Redactor::default();
        if let Some(secret) = self.config.client_auth.secret() {
            redactor.add(secret.expose());
        }
        for p in proofs.values() {
            redactor.add(p.expose());
        }
        if let Grant::Password { password, .. } = &self.config.grant {
            redactor.add(password.expose());
        }
        match grant {
            GrantRequest::Refresh(rt) => redactor.add(rt.expose()),
            GrantRequest::Configured => {
                if let Grant::RefreshToken { refresh_token, .. } = &self.config.grant {
                    redactor.add(refresh_token.expose());
                }
            }
        }
        let req = build_request(&self.config, url, grant, &proofs);
        let mut builder = http.post(req.url).body(req.body);
        for (k, v) in req.headers {
            if k == http::header::AUTHORIZATION {
                redactor.add_authorization(v.to_str().unwrap_or_default());
            }
            builder = builder.header(k, v);
        }
        let reply =
            send::send(builder, self.config.common.egress.as_ref()).await.map_err(|e| e.redact(&redactor))?;
        if !reply.status.is_success() {
            if reply.status.as_u16() == 404 || reply.status.is_server_error() {
                self.forget_discovery();
            }
            return Err(response::parse_error(reply.status.as_u16(), &reply.body, reply.retry_after)
                .redact(&redactor));
        }
        response::parse_success(&reply.body, &FieldMap::oauth2(), reply.date, self.config.common.default_ttl)
            .map_err(|e| e.redact(&redactor))
    }

    fn forget_discovery(&self) {
        if let Ok(mut g) = self.discovered.lock() {
            *g = None;
        }
    }

    /// The token endpoint (the mutual-TLS alias for certificate-bound clients), configured or
    /// discovered once and cached.
    pub async fn endpoint(&self) -> Result<Target, FetchError> {
        let issuer = match &self.config.endpoint {
            TokenEndpoint::Url(u) => return Ok(Target { url: u.clone(), issuer: None }),
            TokenEndpoint::Discovery { issuer } => issuer,
        };
        let cached = self.discovered.lock().ok().and_then(|g| g.clone());
        let found = match cached {
            Some(d) => d,
            None => {
                let found = discover(&self.http, issuer, self.config.common.egress.as_ref()).await?;
                if found.token_endpoint.host_str() != issuer.host_str() {
                    tracing::info!(provider = %self.provider, token_endpoint = %found.token_endpoint, "discovered token endpoint is on another host than the issuer");
                }
                let https = |u: &reqwest::Url| u.scheme() == "https" || crate::config::is_loopback(u);
                if issuer.scheme() == "https"
                    && (!https(&found.token_endpoint)
                        || found.mtls_token_endpoint.as_ref().is_some_and(|u| !https(u)))
                {
                    return Err(FetchError::Discovery(format!(
                        "token_endpoint {} is not https",
                        found.token_endpoint
                    )));
                }
                if let Ok(mut g) = self.discovered.lock() {
                    *g = Some(found.clone());
                }
                found
            }
        };
        let url = match (&found.mtls_token_endpoint, self.config.client_auth.identity()) {
            (Some(alias), Some(_)) => alias.clone(),
            _ => found.token_endpoint,
        };
        Ok(Target { url, issuer: Some(found.issuer) })
    }
}

/// Where a token request goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The token endpoint.
    pub url: reqwest::Url,
    /// The issuer identifier, when discovered.
    pub issuer: Option<String>,
}

/// OIDC discovery: `GET {issuer}/.well-known/openid-configuration`, whose `issuer` must equal the
/// configured one (RFC 8414 §3.3).
pub async fn discover(
    http: &reqwest::Client,
    issuer: &reqwest::Url,
    egress: Option<&crate::config::Egress>,
) -> Result<Discovered, FetchError> {
    let base = issuer.as_str().trim_end_matches('/');
    let doc_url = format!("{base}/.well-known/openid-configuration");
    let reply = send::send(http.get(&doc_url).header(ACCEPT, "application/json"), egress)
        .await
        .map_err(|e| FetchError::Discovery(format!("{doc_url}: {e}")))?;
    if !reply.status.is_success() {
        return Err(FetchError::Discovery(format!("{doc_url} answered HTTP {}", reply.status.as_u16())));
    }
    let doc: serde_json::Value = serde_json::from_slice(&reply.body)
        .map_err(|_| FetchError::Discovery(format!("{doc_url} did not return JSON")))?;
    let stated = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or_default();
    if stated.trim_end_matches('/') != base {
        return Err(FetchError::Discovery(format!(
            "the document names issuer {:?}, not the configured {base:?}; refusing it",
            tidy(stated)
        )));
    }
    let url = |v: Option<&serde_json::Value>, name: &str| -> Result<Option<reqwest::Url>, FetchError> {
        match v.and_then(|v| v.as_str()) {
            None => Ok(None),
            Some(s) => reqwest::Url::parse(s)
                .map(Some)
                .map_err(|_| FetchError::Discovery(format!("{name} {:?} is not a URL", tidy(s)))),
        }
    };
    let token_endpoint = url(doc.get("token_endpoint"), "token_endpoint")?
        .ok_or_else(|| FetchError::Discovery(format!("{doc_url} has no token_endpoint")))?;
    let mtls_token_endpoint = url(
        doc.get("mtls_endpoint_aliases").and_then(|a| a.get("token_endpoint")),
        "mtls_endpoint_aliases.token_endpoint",
    )?;
    Ok(Discovered { issuer: stated.to_owned(), token_endpoint, mtls_token_endpoint })
}

fn read_state(path: &Path) -> std::io::Result<Option<Secret>> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Ok(Some(Secret::new(s.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the refresh token atomically (temp file, fsync, rename) with mode 0600.
fn write_state(path: &Path, token: &Secret) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir
        .join(format!(".{}.tmp", path.file_name().map_or("tokengate-state".into(), |n| n.to_string_lossy())));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(token.expose().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderCommon;
    use base64::Engine;
    use std::time::Duration;

    fn provider(auth: fn(Secret) -> ClientAuth, secret: &str) -> OAuth2Provider {
        OAuth2Provider {
            endpoint: TokenEndpoint::Url(reqwest::Url::parse("https://idp/token").unwrap()),
            grant: Grant::ClientCredentials,
            client_id: "sampleclientid".into(),
            client_auth: auth(Secret::new(secret)),
            assertion: crate::config::AssertionSettings {
                audience: crate::config::Audience::TokenEndpoint,
                lifetime: Duration::from_secs(60),
            },
            scopes: vec![],
            params: vec![],
            headers: vec![],
            common: ProviderCommon {
                timeout: Duration::from_secs(5),
                refresh_margin: None,
                default_ttl: Duration::from_secs(300),
                ca_file: None,
                allowed_upstreams: vec![],
                egress_proxy: None,
                egress: None,
            },
        }
    }

    fn header<'a>(r: &'a TokenRequest, name: &HeaderName) -> Option<&'a str> {
        r.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn basic_auth_vectors() {
        // Covata's document: exampleClientApplication:exampleClientApplicationSecret.
        assert_eq!(
            basic_auth("exampleClientApplication", "exampleClientApplicationSecret", false),
            "Basic ZXhhbXBsZUNsaWVudEFwcGxpY2F0aW9uOmV4YW1wbGVDbGllbnRBcHBsaWNhdGlvblNlY3JldA=="
        );
        // CoreView's sample has a stray newline; ours decodes to exactly id:secret.
        assert_eq!(
            basic_auth("sampleclientid", "sampleclientsecret", false),
            "Basic c2FtcGxlY2xpZW50aWQ6c2FtcGxlY2xpZW50c2VjcmV0"
        );
        // RFC 6749 §2.3.1: reserved characters are form-urlencoded before base64.
        let h = basic_auth("id:x", "a+b%c d:é", false);
        let decoded = base64::engine::general_purpose::STANDARD.decode(&h[6..]).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "id%3Ax:a%2Bb%25c+d%3A%C3%A9");
        let raw = basic_auth("id", "a+b", true);
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&raw[6..]).unwrap(), b"id:a+b");
    }

    #[test]
    fn coreview_request_bytes() {
        let mut p = provider(ClientAuth::Basic, "sampleclientsecret");
        p.scopes = "delegation.read delegation.write operator.read operator.write platform.read licensepool.write licensepool.read license.read"
            .split(' ').map(String::from).collect();
        let r = build_request(
            &p,
            &reqwest::Url::parse("https://identity.coreview.com/connect/token").unwrap(),
            GrantRequest::Configured,
            &Proofs::default(),
        );
        assert_eq!(
            r.body,
            "grant_type=client_credentials&scope=delegation.read+delegation.write+operator.read+operator.write+platform.read+licensepool.write+licensepool.read+license.read"
        );
        assert_eq!(header(&r, &AUTHORIZATION), Some("Basic c2FtcGxlY2xpZW50aWQ6c2FtcGxlY2xpZW50c2VjcmV0"));
        assert_eq!(header(&r, &CONTENT_TYPE), Some("application/x-www-form-urlencoded"));
        assert!(!r.body.contains("client_secret"));
    }

    #[test]
    fn corti_post_auth_puts_credentials_in_body() {
        let p = provider(ClientAuth::Post, "se+cret");
        let r = build_request(
            &p,
            &reqwest::Url::parse("https://auth.eu.corti.app/t").unwrap(),
            GrantRequest::Configured,
            &Proofs::default(),
        );
        assert_eq!(r.body, "grant_type=client_credentials&client_id=sampleclientid&client_secret=se%2Bcret");
        assert_eq!(header(&r, &AUTHORIZATION), None);
    }

    #[test]
    fn password_and_refresh_grants() {
        let mut p = provider(ClientAuth::Basic, "s");
        p.grant = Grant::Password { username: Secret::new("alice"), password: Secret::new("p&ss") };
        p.scopes = vec!["a".into()];
        let url = reqwest::Url::parse("https://covata/token").unwrap();
        let r = build_request(&p, &url, GrantRequest::Configured, &Proofs::default());
        assert_eq!(r.body, "grant_type=password&username=alice&password=p%26ss&scope=a");
        let rt = Secret::new("R1");
        let r = build_request(&p, &url, GrantRequest::Refresh(&rt), &Proofs::default());
        assert_eq!(r.body, "grant_type=refresh_token&refresh_token=R1");
    }

    #[test]
    fn state_file_is_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt");
        write_state(&path, &Secret::new("R2")).unwrap();
        assert_eq!(read_state(&path).unwrap().unwrap().expose(), "R2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(read_state(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn assertion_methods_and_new_grants_put_exactly_these_fields_in_the_body() {
        let url = reqwest::Url::parse("https://idp/token").unwrap();
        let proofs = Proofs {
            client_assertion: Some(Secret::new("CA")),
            grant_assertion: Some(Secret::new("GA")),
            subject_token: Some(Secret::new("ST")),
            actor_token: Some(Secret::new("AT")),
        };
        let mut p = provider(ClientAuth::SecretJwt, "s");
        let r = build_request(&p, &url, GrantRequest::Configured, &proofs);
        assert_eq!(
            r.body,
            "grant_type=client_credentials&client_id=sampleclientid&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=CA"
        );
        assert_eq!(header(&r, &AUTHORIZATION), None);
        p.client_auth = ClientAuth::None;
        p.grant = Grant::JwtBearer(crate::config::Assertion::File("/a".into()));
        let r = build_request(&p, &url, GrantRequest::Configured, &proofs);
        assert_eq!(
            r.body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=GA&client_id=sampleclientid"
        );
        p.client_auth = ClientAuth::Basic(Secret::new("s"));
        p.grant = Grant::TokenExchange(crate::config::TokenExchange {
            subject: crate::config::ExchangeToken {
                from: crate::config::TokenFrom::File("/s".into()),
                token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
            },
            actor: Some(crate::config::ExchangeToken {
                from: crate::config::TokenFrom::File("/a".into()),
                token_type: "urn:x".into(),
            }),
            requested_token_type: Some("urn:ietf:params:oauth:token-type:access_token".into()),
            audience: vec!["a1".into(), "a2".into()],
            resource: vec!["https://r".into()],
        });
        let r = build_request(&p, &url, GrantRequest::Configured, &proofs);
        assert_eq!(
            r.body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=ST&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&actor_token=AT&actor_token_type=urn%3Ax&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token&audience=a1&audience=a2&resource=https%3A%2F%2Fr"
        );
        assert!(header(&r, &AUTHORIZATION).is_some());
    }

    #[test]
    fn a_private_key_assertion_carries_the_claims_rfc_7523_requires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem();
        std::fs::write(&path, &pem).unwrap();
        let mut p = provider(ClientAuth::Post, "x");
        p.client_auth = ClientAuth::PrivateKeyJwt(crate::config::KeyFile {
            path,
            alg: crate::jose::SigningAlg::EdDSA,
            key_id: None,
            cert_file: None,
        });
        p.assertion.audience = crate::config::Audience::Issuer;
        let prover = Prover::new("t");
        let endpoint = Endpoint { token_url: "https://idp/token", issuer: Some("https://idp") };
        let a = prover.proofs(&p, &endpoint, &Default::default()).unwrap().client_assertion.unwrap();
        let b = prover.proofs(&p, &endpoint, &Default::default()).unwrap().client_assertion.unwrap();
        let claims = super::super::jwt::claims(a.expose()).unwrap();
        assert_eq!(claims["iss"], "sampleclientid");
        assert_eq!(claims["sub"], "sampleclientid");
        assert_eq!(claims["aud"], "https://idp");
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 60);
        assert_ne!(claims["jti"], super::super::jwt::claims(b.expose()).unwrap()["jti"]);
        let header = a.expose().split('.').next().unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap())
                .unwrap();
        assert_eq!(header["alg"], "EdDSA");
        let key = crate::jose::SigningKey::from_pem(pem.as_bytes(), None, None, None).unwrap();
        assert_eq!(header["kid"], key.kid());
        assert_eq!(key.public_jwk()["kid"], key.kid());
    }
}
