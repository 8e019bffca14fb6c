//! The keys that sign a caller's JWTs: a JWKS fetched from a URL (or the issuer's OpenID
//! configuration) or read from a file, cached, refreshed every [`MAX_AGE`], and fetched again
//! when a token names a key id it does not hold (at most every [`REFETCH_EVERY`], so tokens with
//! made-up key ids cannot make tokengate hammer the issuer).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

use crate::config::{JwksSource, JwtCaller};

/// Keys are fetched again after this long.
const MAX_AGE: Duration = Duration::from_secs(300);
/// An unknown key id fetches the set again at most this often.
const REFETCH_EVERY: Duration = Duration::from_secs(1);
/// Largest JWKS or discovery document read.
const MAX_DOCUMENT: usize = 256 * 1024;

/// Why no key could be had for a token.
#[derive(Debug, Clone)]
pub enum KeyError {
    /// The key set could not be read (the issuer is down): no fault of the token.
    Unavailable(String),
    /// The set holds no key for the token.
    Unknown(String),
}

/// One key of the set.
pub struct Key {
    /// The key.
    pub key: DecodingKey,
    /// The `alg` the JWK names, if any: then only that one is accepted with it.
    pub alg: Option<Algorithm>,
}

struct Set {
    by_kid: HashMap<String, Arc<Key>>,
    // Keys without a `kid`.
    anonymous: Vec<Arc<Key>>,
    fetched: Instant,
}

/// Verified tokens remembered at most.
const MAX_VERIFIED: usize = 10_000;
/// A verified token is taken on trust at most this long (so a key withdrawn from the set stops
/// being honoured soon), and never past its `exp`.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// A verified token: its subject key (`None`: valid, but a subject the caller does not cover),
/// until when.
type Verified = (Option<String>, Instant);

/// A caller's key source, and the tokens it has verified (by SHA-256): verifying an ES256 or
/// RS256 signature costs tens of microseconds, a lookup well under one.
pub struct Jwks {
    verified: std::sync::Mutex<HashMap<Vec<u8>, Verified>>,
    source: JwksSource,
    issuer: String,
    http: reqwest::Client,
    current: ArcSwapOption<Set>,
    // One fetch at a time; holds when the last one started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    /// The key source of `caller`.
    pub fn new(caller: &JwtCaller) -> Result<Self, String> {
        let tls = crate::tls::client_config(caller.ca_file.as_deref(), &[b"http/1.1"])
            .map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        Ok(Jwks {
            verified: std::sync::Mutex::new(HashMap::new()),
            source: caller.jwks.clone(),
            issuer: caller.issuer.clone(),
            http,
            current: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    /// What the token with this digest was found to be, if it was verified and still counts.
    pub fn verified(&self, digest: &[u8]) -> Option<Option<String>> {
        let map = self.verified.lock().ok()?;
        let (key, until) = map.get(digest)?;
        (Instant::now() < *until).then(|| key.clone())
    }

    /// Remembers a verified token until its `exp` (Unix seconds), at most [`VERIFIED_FOR`].
    pub fn remember(&self, digest: &[u8], key: Option<String>, exp: u64) {
        let now_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let left = Duration::from_secs(exp.saturating_sub(now_unix)).min(VERIFIED_FOR);
        let Ok(mut map) = self.verified.lock() else { return };
        if map.len() >= MAX_VERIFIED {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_VERIFIED {
                // Still full of live entries: start over rather than scan for the oldest.
                map.clear();
            }
        }
        map.insert(digest.to_vec(), (key, Instant::now() + left));
    }

    /// The key for `kid` (or the only keys without one): fetched first when none is held yet,
    /// the set is old, or `kid` is unknown.
    pub async fn key(&self, kid: Option<&str>) -> Result<Vec<Arc<Key>>, KeyError> {
        let find = |set: &Set| -> Vec<Arc<Key>> {
            match kid {
                Some(k) => set.by_kid.get(k).cloned().into_iter().collect(),
                None => set.anonymous.clone(),
            }
        };
        if let Some(set) = self.current.load_full()
            && set.fetched.elapsed() < MAX_AGE
        {
            let found = find(&set);
            if !found.is_empty() {
                return Ok(found);
            }
        }
        self.refresh().await.map_err(KeyError::Unavailable)?;
        let set = self
            .current
            .load_full()
            .ok_or_else(|| KeyError::Unavailable("no signing keys could be read".into()))?;
        let found = find(&set);
        if found.is_empty() {
            return Err(KeyError::Unknown(match kid {
                Some(k) => format!(
                    "unknown key id {:?}",
                    k.chars().filter(char::is_ascii_graphic).take(64).collect::<String>()
                ),
                None => "the token names no key id and the key set has no key without one".into(),
            }));
        }
        Ok(found)
    }

    async fn refresh(&self) -> Result<(), String> {
        let mut last = self.fetching.lock().await;
        // Another request fetched meanwhile, or one did so very recently.
        if last.is_some_and(|at| at.elapsed() < REFETCH_EVERY) {
            return if self.current.load().is_some() {
                Ok(())
            } else {
                Err("the signing keys could not be read".into())
            };
        }
        *last = Some(Instant::now());
        match self.read().await {
            Ok(set) => {
                self.current.store(Some(Arc::new(set)));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "cannot read the signing keys of JWT callers");
                // Keys already held stay in use.
                if self.current.load().is_some() { Ok(()) } else { Err(e) }
            }
        }
    }

    async fn read(&self) -> Result<Set, String> {
        let document = match &self.source {
            JwksSource::File(path) => read_file(path).await?,
            JwksSource::Uri(url) => self.get(url.as_str()).await?,
            JwksSource::Discovery => {
                let base = self.issuer.trim_end_matches('/');
                let doc = self.get(&format!("{base}/.well-known/openid-configuration")).await?;
                let config: serde_json::Value = serde_json::from_slice(&doc)
                    .map_err(|e| format!("the OpenID configuration is not JSON: {e}"))?;
                if config["issuer"].as_str() != Some(self.issuer.as_str()) {
                    return Err("the OpenID configuration names another issuer".into());
                }
                let uri = config["jwks_uri"].as_str().ok_or("the OpenID configuration has no jwks_uri")?;
                self.get(uri).await?
            }
        };
        let set: JwkSet =
            serde_json::from_slice(&document).map_err(|e| format!("the JWKS is not a key set: {e}"))?;
        let mut by_kid = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in &set.keys {
            // Keys of kinds tokengate cannot use (or symmetric ones) are skipped.
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            if matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)) {
                continue;
            }
            let alg = jwk.common.key_algorithm.and_then(|a| a.to_string().parse().ok());
            let key = Arc::new(Key { key, alg });
            match &jwk.common.key_id {
                Some(kid) => {
                    by_kid.insert(kid.clone(), key);
                }
                None => anonymous.push(key),
            }
        }
        Ok(Set { by_kid, anonymous, fetched: Instant::now() })
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self.http.get(url).send().await.map_err(|e| format!("{url}: {}", e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("{url} answered HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(format!("{url}: larger than {MAX_DOCUMENT} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

async fn read_file(path: &PathBuf) -> Result<Vec<u8>, String> {
    tokio::fs::read(path).await.map_err(|e| format!("cannot read jwks_file {path:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwks() -> Jwks {
        let caller = JwtCaller {
            issuer: "https://k8s".into(),
            jwks: JwksSource::File("/nonexistent".into()),
            ca_file: None,
            audiences: vec!["a".into()],
            subjects: vec![],
            algorithms: vec![Algorithm::ES256],
            leeway: Duration::from_secs(30),
        };
        Jwks::new(&caller).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_verified_token_counts_until_its_exp_and_never_longer_than_five_minutes() {
        let j = jwks();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        j.remember(b"live", Some("k".into()), now + 3600);
        j.remember(b"expired", Some("k".into()), now - 1);
        j.remember(b"other", None, now + 60);
        assert_eq!(j.verified(b"live"), Some(Some("k".into())));
        assert_eq!(j.verified(b"expired"), None);
        assert_eq!(j.verified(b"other"), Some(None));
        assert_eq!(j.verified(b"never"), None);
        let until = j.verified.lock().map(|m| m[b"live".as_slice()].1).unwrap_or_else(|_| Instant::now());
        assert!(until <= Instant::now() + VERIFIED_FOR);
    }
}
