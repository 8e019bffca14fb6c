//! What a token request proves besides the configuration, made or read afresh for every
//! request: client assertions signed with a key (private_key_jwt) or the secret
//! (client_secret_jwt), the jwt-bearer grant's assertion, assertions and exchange tokens other
//! parties write to files, and the client certificate of mutual TLS.
//!
//! Files are read on every fetch (a fetch happens once per token lifetime), so a rotated key,
//! certificate or projected token is used from the next fetch on, without a reload.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

use super::FetchError;
use crate::config::{
    Assertion, Audience, ClientAuth, Grant, IdentityFiles, KeyFile, OAuth2Provider, TokenFrom,
};
use crate::jose::SigningKey;
use crate::secret::Secret;

/// The tokens of an exchange that come from elsewhere than files: the caller's, or another
/// provider's.
#[derive(Default, Clone)]
pub struct Inputs {
    /// `subject_token`.
    pub subject: Option<Secret>,
    /// `actor_token`.
    pub actor: Option<Secret>,
}

/// Values made for one token request. Each is a credential: never log them.
#[derive(Debug, Default)]
pub struct Proofs {
    /// `client_assertion`.
    pub client_assertion: Option<Secret>,
    /// `assertion` of the jwt-bearer grant.
    pub grant_assertion: Option<Secret>,
    /// `subject_token` of a token exchange.
    pub subject_token: Option<Secret>,
    /// `actor_token` of a token exchange.
    pub actor_token: Option<Secret>,
}

impl Proofs {
    /// Every value, for redaction.
    pub fn values(&self) -> impl Iterator<Item = &Secret> {
        [&self.client_assertion, &self.grant_assertion, &self.subject_token, &self.actor_token]
            .into_iter()
            .flatten()
    }
}

/// Where an assertion is addressed, as the server names itself.
pub struct Endpoint<'a> {
    /// The token endpoint the request goes to.
    pub token_url: &'a str,
    /// The issuer identifier from discovery, verbatim.
    pub issuer: Option<&'a str>,
}

/// A parsed file, kept while the file's bytes stay the same.
struct Cached<T> {
    digest: [u8; 32],
    value: Arc<T>,
}

/// Makes the proofs of one provider, keeping the parsed signing key and mTLS client between
/// fetches while their files are unchanged.
pub struct Prover {
    provider: String,
    key: Mutex<Option<Cached<SigningKey>>>,
    tls: Mutex<Option<Cached<reqwest::Client>>>,
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Prover {
    /// A prover for provider `name` (used in logs).
    pub fn new(name: &str) -> Self {
        Prover { provider: name.to_owned(), key: Mutex::new(None), tls: Mutex::new(None) }
    }

    /// The proofs for one request of `config` to `endpoint`; exchanged tokens that do not come
    /// from files are in `inputs`.
    pub fn proofs(
        &self,
        config: &OAuth2Provider,
        endpoint: &Endpoint<'_>,
        inputs: &Inputs,
    ) -> Result<Proofs, FetchError> {
        let mut proofs = Proofs::default();
        let audience = || match &config.assertion.audience {
            Audience::Issuer => endpoint.issuer.unwrap_or(endpoint.token_url).to_owned(),
            Audience::TokenEndpoint => endpoint.token_url.to_owned(),
            Audience::Fixed(a) => a.clone(),
        };
        let claims = |subject: &str| {
            let iat = now_unix();
            serde_json::json!({
                "iss": config.client_id,
                "sub": subject,
                "aud": audience(),
                "jti": jti(),
                "iat": iat,
                "nbf": iat,
                "exp": iat + config.assertion.lifetime.as_secs(),
            })
        };
        match &config.client_auth {
            ClientAuth::PrivateKeyJwt(key) => {
                let signed = self.signing_key(key)?.sign(&claims(&config.client_id)).map_err(sign_error)?;
                proofs.client_assertion = Some(Secret::new(signed));
            }
            ClientAuth::SecretJwt(secret) => {
                let signed = crate::jose::sign_hs256(secret.expose().as_bytes(), &claims(&config.client_id));
                proofs.client_assertion = Some(Secret::new(signed));
            }
            ClientAuth::AssertionFile { path, .. } => {
                proofs.client_assertion = Some(read_assertion("client_assertion_file", path)?);
            }
            _ => {}
        }
        match &config.grant {
            Grant::JwtBearer(Assertion::Signed { key, subject }) => {
                let signed = self.signing_key(key)?.sign(&claims(subject)).map_err(sign_error)?;
                proofs.grant_assertion = Some(Secret::new(signed));
            }
            Grant::JwtBearer(Assertion::File(path)) => {
                proofs.grant_assertion = Some(read_assertion("assertion_file", path)?);
            }
            Grant::TokenExchange(x) => {
                let token = |what: &str, from: &TokenFrom, given: &Option<Secret>| match from {
                    TokenFrom::File(path) => read_token(&format!("{what}_file"), path),
                    TokenFrom::Caller | TokenFrom::Provider(_) => {
                        given.clone().ok_or_else(|| FetchError::Credential(format!("no {what} to exchange")))
                    }
                };
                proofs.subject_token = Some(token("subject_token", &x.subject.from, &inputs.subject)?);
                if let Some(actor) = &x.actor {
                    proofs.actor_token = Some(token("actor_token", &actor.from, &inputs.actor)?);
                }
            }
            _ => {}
        }
        Ok(proofs)
    }

    /// The key in `file`, parsed again only when the file changed. A file that no longer parses
    /// (caught halfway through a rewrite) leaves the previous key in use, with a warning.
    fn signing_key(&self, file: &KeyFile) -> Result<Arc<SigningKey>, FetchError> {
        let (pem, cert) = file.read().map_err(FetchError::Credential)?;
        let d = digest(&[&pem, cert.as_deref().unwrap_or_default()]);
        let mut cached = self.key.lock().map_err(|_| FetchError::Local("key cache poisoned".into()))?;
        if let Some(c) = cached.as_ref().filter(|c| c.digest == d) {
            return Ok(c.value.clone());
        }
        match SigningKey::from_pem(&pem, Some(file.alg), file.key_id.as_deref(), cert.as_deref()) {
            Ok(key) => {
                if cached.is_some() {
                    tracing::info!(provider = %self.provider, kid = key.kid(), "signing with the new key in private_key_file");
                }
                let key = Arc::new(key);
                *cached = Some(Cached { digest: d, value: key.clone() });
                Ok(key)
            }
            Err(e) => match cached.as_ref() {
                Some(c) => {
                    tracing::warn!(provider = %self.provider, file = %file.path.display(), error = %e, "private_key_file cannot be used; signing with the previous key");
                    Ok(c.value.clone())
                }
                None => Err(FetchError::Credential(format!("private_key_file {} {e}", file.path.display()))),
            },
        }
    }

    /// The HTTP client presenting the certificate in `files`, rebuilt when they change.
    pub fn tls_client(
        &self,
        files: &IdentityFiles,
        build: impl FnOnce(crate::tls::Identity) -> Result<reqwest::Client, String>,
    ) -> Result<reqwest::Client, FetchError> {
        let (cert, key) = files.read().map_err(FetchError::Credential)?;
        let d = digest(&[&cert, &key]);
        let mut cached = self.tls.lock().map_err(|_| FetchError::Local("client cache poisoned".into()))?;
        if let Some(c) = cached.as_ref().filter(|c| c.digest == d) {
            return Ok((*c.value).clone());
        }
        let built = crate::tls::Identity::from_pem(&cert, &key).and_then(build);
        match built {
            Ok(client) => {
                if cached.is_some() {
                    tracing::info!(provider = %self.provider, "presenting the new client certificate");
                }
                *cached = Some(Cached { digest: d, value: Arc::new(client.clone()) });
                Ok(client)
            }
            Err(e) => match cached.as_ref() {
                Some(c) => {
                    tracing::warn!(provider = %self.provider, error = %e, "client_cert_file / client_key_file cannot be used; presenting the previous certificate");
                    Ok((*c.value).clone())
                }
                None => Err(FetchError::Credential(format!(
                    "client_cert_file {} / client_key_file {}: {e}",
                    files.cert_file.display(),
                    files.key_file.display()
                ))),
            },
        }
    }
}

fn sign_error(_: ring::error::Unspecified) -> FetchError {
    FetchError::Credential("signing the client assertion failed".into())
}

/// A fresh `jti`: 128 random bits.
fn jti() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token from a file, without the newline editors and `echo` add.
fn read_token(key: &str, path: &Path) -> Result<Secret, FetchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FetchError::Credential(format!("cannot read {key} {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(FetchError::Credential(format!("{key} {} is empty", path.display())));
    }
    Ok(Secret::new(token))
}

/// Seconds of validity an assertion read from a file must have left to be sent: the IdP checks
/// it a moment later, maybe with a clock a little ahead.
const ASSERTION_MIN_LEFT: Duration = Duration::from_secs(5);

/// An assertion someone else wrote (a projected service-account token): a JWT that is not sent
/// once its `exp` has passed.
fn read_assertion(key: &str, path: &Path) -> Result<Secret, FetchError> {
    let token = read_token(key, path)?;
    let Some(claims) = super::jwt::claims(token.expose()) else {
        return Err(FetchError::Credential(format!("{key} {} does not hold a JWT", path.display())));
    };
    if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_f64) {
        let now = now_unix() as f64;
        if exp < now + ASSERTION_MIN_LEFT.as_secs_f64() {
            let ago = (now - exp).max(0.0) as u64;
            return Err(FetchError::Credential(format!(
                "{key} {} holds an assertion that expired {ago} s ago (exp {}); whoever writes the file (the kubelet, for a projected service-account token) has not renewed it",
                path.display(),
                exp as u64,
            )));
        }
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        crate::jose::sign_hs256(b"k", &claims)
    }

    #[test]
    fn an_expired_assertion_file_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, jwt(serde_json::json!({ "exp": now_unix() - 30 }))).unwrap();
        let err = read_assertion("client_assertion_file", &path).unwrap_err().to_string();
        assert!(err.contains("expired 30 s ago"), "{err}");
        let fresh = jwt(serde_json::json!({ "exp": now_unix() + 600 }));
        std::fs::write(&path, format!("{fresh}\n")).unwrap();
        assert_eq!(read_assertion("client_assertion_file", &path).unwrap().expose(), fresh);
        std::fs::write(&path, "not-a-jwt").unwrap();
        let err = read_assertion("client_assertion_file", &path).unwrap_err().to_string();
        assert!(err.contains("does not hold a JWT"), "{err}");
        assert!(!err.contains("not-a-jwt"));
    }

    #[test]
    fn jtis_differ() {
        assert_ne!(jti(), jti());
        assert_eq!(jti().len(), 22);
    }
}
