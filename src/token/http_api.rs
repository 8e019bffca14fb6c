//! `type: http` providers: a login request, an optional renew request, JSON field mapping.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};

use super::error::FetchError;
use super::response::{self, Issued, LifetimeSource};
use super::{Token, send};
use crate::config::{BodySpec, HttpProvider, HttpRequestSpec};
use crate::secret::Secret;

/// Fetches tokens for one `type: http` provider; remembers the latest refresh token.
pub struct HttpFetcher {
    config: HttpProvider,
    http: reqwest::Client,
    refresh_token: Mutex<Option<Secret>>,
    provider: String,
}

impl HttpFetcher {
    /// A fetcher for `config`; `name` is used in logs.
    pub fn new(name: &str, config: HttpProvider, http: reqwest::Client) -> Self {
        HttpFetcher { config, http, refresh_token: Mutex::new(None), provider: name.to_owned() }
    }

    /// Renews `current` when a refresh request and a refresh token exist, else (or when the
    /// renewal is refused) logs in.
    pub async fn fetch(&self, current: Option<&Token>) -> Result<Issued, FetchError> {
        let rt = self.refresh_token.lock().ok().and_then(|g| g.clone());
        if let (Some(spec), Some(rt), Some(current)) = (&self.config.refresh, rt, current) {
            match self.send(spec, Some(&current.value), Some(&rt)).await {
                Ok(mut issued) => {
                    // Some servers (Sensu Go) report the *old* token's expiry in a renew reply;
                    // an expiry that did not move forward is not believed.
                    let new_expiry = unix_now() + issued.lifetime.as_secs_f64();
                    if issued.lifetime_source == LifetimeSource::ExpiresAt
                        && new_expiry <= current.expires_unix + 1.0
                    {
                        let (lifetime, source) = response::fallback_lifetime(
                            issued.access_token.expose(),
                            self.config.common.default_ttl,
                        );
                        tracing::debug!(provider = %self.provider, ?source, "renew reply kept the old expiry; using the token's own");
                        issued.lifetime = lifetime;
                        issued.lifetime_source = source;
                    }
                    self.keep_refresh_token(issued.refresh_token.clone().or(Some(rt)));
                    return Ok(issued);
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(provider = %self.provider, error = %e, "token renewal refused; logging in again");
                    self.keep_refresh_token(None);
                }
            }
        }
        let issued = self.send(&self.config.login, None, None).await?;
        self.keep_refresh_token(issued.refresh_token.clone());
        Ok(issued)
    }

    fn keep_refresh_token(&self, rt: Option<Secret>) {
        if let Ok(mut g) = self.refresh_token.lock() {
            *g = rt;
        }
    }

    async fn send(
        &self,
        spec: &HttpRequestSpec,
        access: Option<&Secret>,
        refresh: Option<&Secret>,
    ) -> Result<Issued, FetchError> {
        // Whatever secret this request carries must not come back in an error text.
        let mut redactor = crate::secret::Redactor::default();
        for secret in [access, refresh].into_iter().flatten() {
            redactor.add(secret.expose());
        }
        if let Some((user, password)) = &spec.basic {
            redactor.add(password.expose());
            redactor.add_authorization(&format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!("{}:{}", user.expose(), password.expose())
                )
            ));
        }
        let fill = |v: &Secret| {
            v.expose()
                .replace("{refresh_token}", refresh.map_or("", Secret::expose))
                .replace("{access_token}", access.map_or("", Secret::expose))
        };
        let mut builder = self
            .http
            .request(spec.method.clone(), spec.url.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        for (k, v) in &spec.headers {
            builder = builder.header(k, v);
        }
        if let Some((user, password)) = &spec.basic {
            builder = builder.basic_auth(user.expose(), Some(password.expose()));
        }
        if spec.bearer_current_token {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", access.map_or("", Secret::expose)))
                .map_err(|_| FetchError::Local("the current token cannot be sent as a header".into()))?;
            v.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, v);
        }
        if let BodySpec::Form(fields) | BodySpec::Json(fields) = &spec.body {
            for (_, v) in fields {
                redactor.add(&fill(v));
            }
        }
        builder = match &spec.body {
            BodySpec::None => builder,
            BodySpec::Form(fields) => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                for (k, v) in fields {
                    form.append_pair(k, &fill(v));
                }
                builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded").body(form.finish())
            }
            BodySpec::Json(fields) => {
                let object: serde_json::Map<String, serde_json::Value> =
                    fields.iter().map(|(k, v)| (k.clone(), fill(v).into())).collect();
                builder
                    .header(CONTENT_TYPE, "application/json")
                    .body(serde_json::Value::Object(object).to_string())
            }
        };
        let reply =
            send::send(builder, self.config.common.egress.as_ref()).await.map_err(|e| e.redact(&redactor))?;
        if !reply.status.is_success() {
            return Err(response::parse_error(reply.status.as_u16(), &reply.body, reply.retry_after)
                .redact(&redactor));
        }
        response::parse_success(
            &reply.body,
            &self.config.response,
            reply.date,
            self.config.common.default_ttl,
        )
        .map_err(|e| e.redact(&redactor))
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
