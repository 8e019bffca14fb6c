//! The shared cache's Redis connection, on the `redis` crate: `redis://` and `rediss://` (rustls,
//! with an optional private CA), ACL users, percent-encoded credentials, a password from a file,
//! connect and command timeouts, and reconnection in the background (its `ConnectionManager`).

use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisTarget;

/// A Redis failure; the caller falls back to its own IdP fetches.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connection, TLS, timeout, authentication or protocol trouble, or an error reply.
    #[error("redis: {0}")]
    Redis(String),
}

impl From<redis::RedisError> for RedisError {
    fn from(e: redis::RedisError) -> Self {
        // The crate's messages name the failing step (connect, AUTH, timeout), never the password.
        RedisError::Redis(e.to_string())
    }
}

/// A client for `target`, with the password from its file and its private CA.
fn client(target: &RedisTarget) -> Result<redis::Client, RedisError> {
    let mut info = target.url.expose().into_connection_info()?;
    if let Some(pw) = &target.password {
        let settings = info.redis_settings().clone().set_password(pw.expose());
        info = info.set_redis_settings(settings);
    }
    match &target.ca_file {
        None => Ok(redis::Client::open(info)?),
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| RedisError::Redis(format!("ca_file {}: {e}", path.display())))?;
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
            Ok(redis::Client::build_with_tls(info, certs)?)
        }
    }
}

/// One multiplexed connection, opened on first use and reopened in the background after a
/// failure. Every command is bounded by one deadline (`connect_timeout + timeout`): the
/// connection manager's own reconnect sequence took 9.45 s with Redis unreachable, and a replica
/// started during an outage waited that long for its first token. After a connection failure
/// Redis is skipped for [`SKIP_AFTER_FAILURE`], so an outage costs each fetch nothing at all.
pub struct Redis {
    conn: ConnectionManager,
    // For the subscriber connection, which pub/sub needs to itself.
    client: redis::Client,
    deadline: Duration,
    // Milliseconds since `epoch` before which commands fail at once.
    skip_until_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

/// How long Redis is skipped after a connection failure or a missed deadline.
pub const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// The largest value read back; larger ones are not read whole (a planted 48 MiB value took
/// each replica past its memory limit) and count as no entry. A token is at most 32 KiB.
pub const MAX_VALUE: usize = 64 * 1024;

/// Deletes KEYS[1] only while it holds ARGV[1]: releasing a lock only if this replica owns it.
const COMPARE_AND_DELETE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl Redis {
    /// A client for `target`; nothing is connected until the first command.
    pub fn new(target: &RedisTarget, connect_timeout: Duration, timeout: Duration) -> Result<Self, String> {
        // rediss:// uses the process-wide rustls provider, which `main` installs; a library user
        // (tests) may not have.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(timeout))
            // Reconnect attempts back off from 100 ms to 1 s in the background, so sharing
            // resumes within about a second of Redis coming back; commands are bounded by their
            // own deadline meanwhile.
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(6);
        // The connection task is spawned on the caller's runtime.
        tokio::runtime::Handle::try_current().map_err(|e| format!("shared_cache: {e}"))?;
        let client = client(target).map_err(|e| format!("shared_cache.redis: {e}"))?;
        let conn = client
            .clone()
            .get_connection_manager_lazy(config)
            .map_err(|e| format!("shared_cache.redis: {e}"))?;
        Ok(Redis {
            conn,
            client,
            deadline: connect_timeout + timeout,
            skip_until_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `cmd` within the deadline, unless Redis is being skipped after a failure.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        use std::sync::atomic::Ordering;
        if self.now_ms() < self.skip_until_ms.load(Ordering::Relaxed) {
            return Err(RedisError::Redis("skipped after a recent failure".into()));
        }
        let failed = |this: &Self| {
            let until = this.now_ms().saturating_add(SKIP_AFTER_FAILURE.as_millis() as u64);
            this.skip_until_ms.store(until, Ordering::Relaxed);
        };
        match tokio::time::timeout(self.deadline, cmd.query_async(&mut self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
                {
                    failed(self);
                }
                Err(e.into())
            }
            Err(_) => {
                failed(self);
                Err(RedisError::Redis(format!("no answer within {} ms", self.deadline.as_millis())))
            }
        }
    }

    /// `GET key`, reading at most [`MAX_VALUE`] bytes: a longer value is `None`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let mut cmd = redis::cmd("GETRANGE");
        cmd.arg(key).arg(0).arg(MAX_VALUE);
        let value: Vec<u8> = self.run(&cmd).await?;
        // GETRANGE answers "" for a missing key; a stored value is never empty.
        Ok((!value.is_empty() && value.len() <= MAX_VALUE).then_some(value))
    }

    /// `SET key value PX ttl [NX]`; true when the value was set.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool, RedisError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ms);
        if only_if_absent {
            cmd.arg("NX");
        }
        let reply: Option<String> = self.run(&cmd).await?;
        Ok(reply.as_deref() == Some("OK"))
    }

    /// Gives `key` an expiry of `ttl` if it has none (`PEXPIRE ... NX`, Redis 7); true when it
    /// had none. A lock left without one would otherwise hold every refresh up for ever.
    pub async fn expire_if_persistent(&self, key: &str, ttl: Duration) -> Result<bool, RedisError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(ms).arg("NX");
        let set: i64 = self.run(&cmd).await?;
        Ok(set == 1)
    }

    /// `INCR key`: the next value of a counter.
    pub async fn incr(&self, key: &str) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("INCR");
        cmd.arg(key);
        self.run(&cmd).await
    }

    /// `PUBLISH channel message`.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        let _: i64 = self.run(&cmd).await?;
        Ok(())
    }

    /// A connection of its own subscribed to `channel`, within the deadline; its messages'
    /// payloads.
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSubStream, RedisError> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(self.deadline, connect).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(RedisError::Redis(format!("no answer within {} ms", self.deadline.as_millis()))),
        }
    }

    /// Deletes `key` only if it still holds `value` (releasing a lock we own).
    pub async fn delete_if(&self, key: &str, value: &[u8]) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPARE_AND_DELETE).arg(1).arg(key).arg(value);
        let _: i64 = self.run(&cmd).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn parses_redis_urls() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2", None, None).unwrap();
        assert_eq!(t.display, "127.0.0.1:6380/2");
        assert!(!t.tls);
        let t = RedisTarget::parse("rediss://tokengate:p%3Aw%40rd@cache.svc:6380/1", None, None).unwrap();
        assert_eq!(t.display, "tokengate@cache.svc:6380/1");
        let info = client(&t).unwrap().get_connection_info().clone();
        // Percent-decoded, and not cut at the ':' inside the password.
        assert_eq!(info.redis_settings().password(), Some("p:w@rd"));
        assert_eq!(info.redis_settings().username(), Some("tokengate"));
        let from_file = RedisTarget::parse("redis://app@cache", Some(Secret::new("f:ile")), None).unwrap();
        assert_eq!(
            client(&from_file).unwrap().get_connection_info().redis_settings().password(),
            Some("f:ile")
        );
        assert!(format!("{t:?}").contains("cache.svc") && !format!("{t:?}").contains("w%40rd"));
        for bad in ["http://x", "redis://", "redis://:pw@cache/x"] {
            assert!(RedisTarget::parse(bad, None, None).is_err(), "{bad}");
        }
        assert!(RedisTarget::parse("redis://:pw@cache", Some(Secret::new("x")), None).is_err());
        assert!(RedisTarget::parse("redis://cache", None, Some("ca.pem".into())).is_err());
        let err = RedisTarget::parse("redis://:hunter2@cache:notaport", None, None).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
