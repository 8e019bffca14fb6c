//! The optional token cache shared by replicas through Redis: one replica at a time refreshes
//! (a lock with expiry), the others pick up its token; entries are encrypted (AES-256-GCM, the
//! Redis key as associated data). When Redis is unreachable each replica fetches on its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::redis::{Redis, RedisError};
use super::response::{Issued, LifetimeSource};
use super::schedule;
use crate::config::SharedCacheConfig;
use crate::secret::Secret;

/// A token as stored in Redis.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    /// The access token.
    t: String,
    /// Expiry, Unix seconds.
    e: f64,
    /// Lifetime when issued, seconds.
    l: f64,
    /// Granted scope.
    s: Option<String>,
}

/// Outcome of a fetch through the shared cache.
pub enum Shared {
    /// Another replica's token, no IdP call.
    Hit(Issued),
    /// This replica called the IdP (and stored the result when it could).
    Fetched(Issued),
}

/// The shared cache client.
pub struct SharedCache {
    redis: Redis,
    key: LessSafeKey,
    // Keys the provider digests in Redis key names; derived from the cache key.
    key_id: ring::hmac::Key,
    prefix: String,
    lock_ttl: Duration,
    rng: SystemRandom,
}

impl SharedCache {
    /// Connects lazily to the configured Redis.
    pub fn new(config: &SharedCacheConfig) -> Result<Self, String> {
        let key = UnboundKey::new(&AES_256_GCM, &config.key)
            .map_err(|_| "shared_cache.key must be 32 bytes".to_string())?;
        Ok(SharedCache {
            redis: Redis::new(&config.redis, config.connect_timeout, config.timeout)?,
            key: LessSafeKey::new(key),
            key_id: {
                let label =
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"tokengate shared-cache key names v1");
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ring::hmac::sign(&label, &config.key).as_ref())
            },
            prefix: config.prefix.clone(),
            lock_ttl: config.lock_ttl,
            rng: SystemRandom::new(),
        })
    }

    /// The Redis key part for a provider: its name (for people reading Redis) and an
    /// HMAC-SHA256, under a key derived from the cache key, of the canonical encoding of its
    /// token-request inputs ([`super::canonical`]). Replicas share a token only when they would
    /// have fetched the same one, whatever their build; without the cache key the digest says
    /// nothing about the secrets in it.
    pub fn provider_key(&self, name: &str, canonical: &[u8]) -> String {
        use std::fmt::Write;
        let tag = ring::hmac::sign(&self.key_id, canonical);
        let mut out = format!("{name}:");
        for b in &tag.as_ref()[..16] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Gets a token newer than `current` from the cache, or fetches one with `fetch` while
    /// holding the refresh lock (waiting briefly for another replica that holds it).
    pub async fn fetch<F, Fut>(
        &self,
        provider_key: &str,
        current: Option<&Secret>,
        refresh_margin: Option<Duration>,
        fetch: F,
    ) -> Result<Shared, super::FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Issued, super::FetchError>>,
    {
        let token_key = format!("{}{provider_key}:token", self.prefix);
        let lock_key = format!("{}{provider_key}:lock", self.prefix);
        let usable = |entry: &Entry| {
            let remaining = entry.e - unix_now();
            let margin = schedule::refresh_margin(Duration::from_secs_f64(entry.l.max(1.0)), refresh_margin);
            remaining > margin.as_secs_f64() && current.is_none_or(|c| c.expose() != entry.t)
        };
        match self.load(&token_key).await {
            Ok(Some(entry)) if usable(&entry) => return Ok(Shared::Hit(issued(entry))),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "shared token cache unavailable; fetching from the IdP directly");
                return fetch().await.map(Shared::Fetched);
            }
        }
        let mut owner = [0u8; 16];
        let _ = self.rng.fill(&mut owner);
        let owner = base64::engine::general_purpose::STANDARD_NO_PAD.encode(owner);
        match self.redis.set(&lock_key, owner.as_bytes(), self.lock_ttl, true).await {
            Ok(true) => {
                let result = fetch().await;
                if let Ok(issued) = &result
                    && let Err(e) = self.store(&token_key, issued).await
                {
                    tracing::warn!(error = %e, "could not store the token in the shared cache");
                }
                let _ = self.redis.delete_if(&lock_key, owner.as_bytes()).await;
                result.map(Shared::Fetched)
            }
            Ok(false) => {
                // Another replica is refreshing: wait for its token, then give up and fetch.
                let deadline = tokio::time::Instant::now() + self.lock_ttl.min(Duration::from_secs(5));
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(Some(entry)) = self.load(&token_key).await
                        && usable(&entry)
                    {
                        return Ok(Shared::Hit(issued(entry)));
                    }
                }
                tracing::warn!("no token from the replica holding the refresh lock; fetching directly");
                fetch().await.map(Shared::Fetched)
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared token cache unavailable; fetching from the IdP directly");
                fetch().await.map(Shared::Fetched)
            }
        }
    }

    async fn load(&self, key: &str) -> Result<Option<Entry>, RedisError> {
        let Some(sealed) = self.redis.get(key).await? else { return Ok(None) };
        Ok(self.open(key, &sealed))
    }

    async fn store(&self, key: &str, issued: &Issued) -> Result<(), RedisError> {
        let entry = Entry {
            t: issued.access_token.expose().to_owned(),
            e: unix_now() + issued.lifetime.as_secs_f64(),
            l: issued.lifetime.as_secs_f64(),
            s: issued.scope.clone(),
        };
        let sealed = self.seal(key, &entry).ok_or_else(|| RedisError::Redis("encryption failed".into()))?;
        self.redis.set(key, &sealed, issued.lifetime, false).await.map(|_| ())
    }

    fn seal(&self, key: &str, entry: &Entry) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut data = serde_json::to_vec(entry).ok()?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.as_bytes()),
                &mut data,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Some(base64::engine::general_purpose::STANDARD.encode(out).into_bytes())
    }

    /// Decrypts an entry; anything that does not decrypt (another key, tampering) is ignored.
    fn open(&self, key: &str, sealed: &[u8]) -> Option<Entry> {
        let mut raw = base64::engine::general_purpose::STANDARD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&raw[..NONCE_LEN]).ok()?;
        let plain = self.key.open_in_place(nonce, Aad::from(key.as_bytes()), &mut raw[NONCE_LEN..]).ok()?;
        serde_json::from_slice(plain).ok()
    }
}

fn issued(entry: Entry) -> Issued {
    Issued {
        access_token: Secret::new(entry.t),
        lifetime: Duration::from_secs_f64((entry.e - unix_now()).max(1.0)),
        lifetime_source: LifetimeSource::ExpiresIn,
        refresh_token: None,
        scope: entry.s,
        server_date: None,
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::redis::RedisTarget;

    fn cache(key: [u8; 32]) -> SharedCache {
        SharedCache::new(&SharedCacheConfig {
            redis: RedisTarget::parse("redis://127.0.0.1:1", None, None).unwrap(),
            key: key.to_vec(),
            prefix: "tg:".into(),
            lock_ttl: Duration::from_secs(5),
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(100),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn entries_are_encrypted_and_bound_to_their_key() {
        let c = cache([7; 32]);
        let entry = Entry { t: "the-access-token".into(), e: 1.0e10, l: 300.0, s: None };
        let sealed = c.seal("tg:p:token", &entry).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("the-access-token"));
        assert_eq!(c.open("tg:p:token", &sealed).unwrap().t, "the-access-token");
        assert!(c.open("tg:other:token", &sealed).is_none(), "moved to another key");
        assert!(cache([8; 32]).open("tg:p:token", &sealed).is_none(), "another encryption key");
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(c.open("tg:p:token", &tampered).is_none());
    }
}
