//! The optional token cache shared by replicas through Redis: one replica at a time refreshes
//! (a lock with expiry), the others pick up its token; entries are encrypted (AES-256-GCM, the
//! Redis key as associated data). When Redis is unreachable each replica fetches on its own.
//!
//! Replicas act as one: each stored token carries a generation from a Redis counter, announced on
//! a pub/sub channel, so every replica switches to it at once (an IdP that revokes the previous
//! token on refresh would otherwise turn the others' requests into 401s), and an entry older than
//! one a replica has seen (written back, say) is never used again.

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
    /// Generation: increases with every token stored for the provider.
    #[serde(default)]
    g: u64,
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
    redis: std::sync::Arc<Redis>,
    key: LessSafeKey,
    // Keys the provider digests in Redis key names; derived from the cache key.
    key_id: ring::hmac::Key,
    prefix: String,
    lock_ttl: Duration,
    rng: SystemRandom,
    // The newest entry taken, by provider key: its generation and expiry.
    seen: std::sync::Mutex<std::collections::HashMap<String, (u64, f64)>>,
    // Who to tell when another replica stores a token, by provider key; the listener task.
    listeners: std::sync::Arc<std::sync::Mutex<Listeners>>,
}

type Listeners = std::collections::HashMap<String, Vec<std::sync::Weak<tokio::sync::Notify>>>;

impl SharedCache {
    /// Connects lazily to the configured Redis.
    pub fn new(config: &SharedCacheConfig) -> Result<Self, String> {
        let key = UnboundKey::new(&AES_256_GCM, &config.key)
            .map_err(|_| "shared_cache.key must be 32 bytes".to_string())?;
        Ok(SharedCache {
            redis: std::sync::Arc::new(Redis::new(&config.redis, config.connect_timeout, config.timeout)?),
            key: LessSafeKey::new(key),
            key_id: {
                let label =
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"tokengate shared-cache key names v1");
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ring::hmac::sign(&label, &config.key).as_ref())
            },
            prefix: config.prefix.clone(),
            lock_ttl: config.lock_ttl,
            rng: SystemRandom::new(),
            seen: Default::default(),
            listeners: Default::default(),
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
        let usable = |entry: &Entry| self.usable(provider_key, entry, current, refresh_margin);
        match self.load(&token_key).await {
            Ok(Some(entry)) if usable(&entry) => return Ok(Shared::Hit(self.take(provider_key, entry))),
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
                    && let Err(e) = self.store(provider_key, &token_key, issued).await
                {
                    tracing::warn!(error = %e, "could not store the token in the shared cache");
                }
                let _ = self.redis.delete_if(&lock_key, owner.as_bytes()).await;
                result.map(Shared::Fetched)
            }
            Ok(false) if self.redis.expire_if_persistent(&lock_key, self.lock_ttl).await.unwrap_or(false) => {
                // Not a lock of ours (they all expire): it now expires, and this refresh goes on.
                tracing::warn!(
                    "the shared cache's refresh lock had no expiry; gave it one and fetching directly"
                );
                fetch().await.map(Shared::Fetched)
            }
            Ok(false) => {
                // Another replica is refreshing: wait for its token, then give up and fetch.
                let deadline = tokio::time::Instant::now() + self.lock_ttl.min(Duration::from_secs(5));
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(Some(entry)) = self.load(&token_key).await
                        && usable(&entry)
                    {
                        return Ok(Shared::Hit(self.take(provider_key, entry)));
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

    /// A token newer than `current` that another replica stored, if there is one.
    pub async fn peek(
        &self,
        provider_key: &str,
        current: Option<&Secret>,
        refresh_margin: Option<Duration>,
    ) -> Option<Issued> {
        let token_key = format!("{}{provider_key}:token", self.prefix);
        let entry = self.load(&token_key).await.ok()??;
        self.usable(provider_key, &entry, current, refresh_margin).then(|| self.take(provider_key, entry))
    }

    /// Whether `entry` may be used instead of `current`: another token, not about to expire, and
    /// not older than the newest entry taken. Older means a lower generation *and* an earlier
    /// expiry: a Redis that lost its data restarts the generation counter, and its new entries
    /// (which expire later than anything seen) must be taken, or replicas that revoke each
    /// other's tokens would never agree again.
    fn usable(
        &self,
        provider_key: &str,
        entry: &Entry,
        current: Option<&Secret>,
        margin: Option<Duration>,
    ) -> bool {
        let remaining = entry.e - unix_now();
        let margin = schedule::refresh_margin(Duration::from_secs_f64(entry.l.max(1.0)), margin);
        let seen = self.seen.lock().ok().and_then(|s| s.get(provider_key).copied());
        let newer = seen.is_none_or(|(g, e)| entry.g >= g || entry.e > e);
        remaining > margin.as_secs_f64() && current.is_none_or(|c| c.expose() != entry.t) && newer
    }

    /// Takes `entry` into use: it is the newest seen.
    fn take(&self, provider_key: &str, entry: Entry) -> Issued {
        self.saw(provider_key, entry.g, entry.e);
        issued(entry)
    }

    fn saw(&self, provider_key: &str, generation: u64, expiry: f64) {
        if let Ok(mut seen) = self.seen.lock() {
            let newest = seen.entry(provider_key.to_owned()).or_insert((generation, expiry));
            *newest = if generation >= newest.0 {
                (generation, expiry.max(newest.1))
            } else {
                (generation, expiry)
            };
        }
    }

    async fn load(&self, key: &str) -> Result<Option<Entry>, RedisError> {
        let Some(sealed) = self.redis.get(key).await? else { return Ok(None) };
        Ok(self.open(key, &sealed))
    }

    async fn store(&self, provider_key: &str, key: &str, issued: &Issued) -> Result<(), RedisError> {
        let generation = self.redis.incr(&format!("{}{provider_key}:generation", self.prefix)).await?;
        let entry = Entry {
            t: issued.access_token.expose().to_owned(),
            e: unix_now() + issued.lifetime.as_secs_f64(),
            l: issued.lifetime.as_secs_f64(),
            s: issued.scope.clone(),
            g: generation,
        };
        let sealed = self.seal(key, &entry).ok_or_else(|| RedisError::Redis("encryption failed".into()))?;
        self.redis.set(key, &sealed, issued.lifetime, false).await?;
        self.saw(provider_key, generation, entry.e);
        // The provider key is a digest, not a secret: it only says which provider to look at.
        self.redis.publish(&self.channel(), provider_key).await
    }

    fn channel(&self) -> String {
        format!("{}tokens", self.prefix)
    }

    /// Wakes `notify` whenever another replica stores a token for `provider_key`, for as long as
    /// `notify` lives. One subscriber connection serves every provider.
    pub fn listen(&self, provider_key: &str, notify: &std::sync::Arc<tokio::sync::Notify>) {
        let Ok(mut listeners) = self.listeners.lock() else { return };
        let first = listeners.is_empty();
        listeners.entry(provider_key.to_owned()).or_default().push(std::sync::Arc::downgrade(notify));
        if first {
            let redis = self.redis.clone();
            let channel = self.channel();
            tokio::spawn(subscriber(redis, channel, std::sync::Arc::downgrade(&self.listeners)));
        }
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

/// Keeps a subscription to `channel` while `listeners` lives, reconnecting after failures, and
/// wakes the listeners of each provider key announced on it.
async fn subscriber(
    redis: std::sync::Arc<Redis>,
    channel: String,
    listeners: std::sync::Weak<std::sync::Mutex<Listeners>>,
) {
    use futures_util::StreamExt;
    while listeners.strong_count() > 0 {
        let mut messages = match redis.subscribe(&channel).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "shared cache: cannot subscribe to token announcements; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
            let Some(listeners) = listeners.upgrade() else { return };
            match next {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(msg)) => {
                    let key: String = msg.get_payload().unwrap_or_default();
                    let mut map = listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(list) = map.get_mut(&key) {
                        list.retain(|n| n.upgrade().inspect(|n| n.notify_one()).is_some());
                    }
                }
            }
        }
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
        token_type: None,
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisTarget;

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
        let entry = Entry { t: "the-access-token".into(), e: 1.0e10, l: 300.0, s: None, g: 1 };
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
