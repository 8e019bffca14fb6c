//! A minimal Redis client (RESP2 over TCP) for the shared token cache: GET, SET with NX/PX,
//! compare-and-delete. One connection, reconnected on error; every call is bounded in time.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::secret::Secret;

/// A Redis failure; the caller falls back to its own IdP fetches.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Connection, timeout or protocol trouble.
    #[error("redis: {0}")]
    Io(String),
    /// The server answered with an error.
    #[error("redis error reply: {0}")]
    Reply(String),
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisTarget {
    /// `host:port`.
    pub addr: String,
    /// Database number.
    pub db: u32,
    /// `AUTH` password, if any.
    pub password: Option<Secret>,
}

impl RedisTarget {
    /// Parses `redis://[:password@]host[:port][/db]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| format!("{url:?} must start with redis://"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, d)) if !d.is_empty() => {
                (h, d.parse().map_err(|_| format!("database {d:?} is not a number"))?)
            }
            Some((h, _)) => (h, 0),
            None => (rest, 0),
        };
        if hostport.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let addr = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:6379") };
        let password = auth.map(|a| Secret::new(a.rsplit(':').next().unwrap_or(a)));
        Ok(RedisTarget { addr, db, password })
    }
}

/// A reply value.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// `+OK`, or an integer.
    Simple(String),
    /// A bulk string; `None` for nil.
    Bulk(Option<Vec<u8>>),
}

/// A single shared connection.
pub struct Redis {
    target: RedisTarget,
    timeout: Duration,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

const COMPARE_AND_DELETE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl Redis {
    /// A client; nothing is connected until the first call.
    pub fn new(target: RedisTarget, timeout: Duration) -> Self {
        Redis { target, timeout, conn: Mutex::new(None) }
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        match self.call(&[b"GET", key.as_bytes()]).await? {
            Reply::Bulk(v) => Ok(v),
            Reply::Simple(s) => Err(RedisError::Io(format!("unexpected reply {s:?} to GET"))),
        }
    }

    /// `SET key value PX ttl [NX]`; true when the value was set.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool, RedisError> {
        let ms = ttl.as_millis().max(1).to_string();
        let mut args: Vec<&[u8]> = vec![b"SET", key.as_bytes(), value, b"PX", ms.as_bytes()];
        if only_if_absent {
            args.push(b"NX");
        }
        Ok(matches!(self.call(&args).await?, Reply::Simple(s) if s == "OK"))
    }

    /// Deletes `key` only if it still holds `value` (releasing a lock we own).
    pub async fn delete_if(&self, key: &str, value: &[u8]) -> Result<(), RedisError> {
        self.call(&[b"EVAL", COMPARE_AND_DELETE.as_bytes(), b"1", key.as_bytes(), value]).await.map(|_| ())
    }

    async fn call(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let mut guard = self.conn.lock().await;
        let result = tokio::time::timeout(self.timeout, async {
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let conn = guard.as_mut().ok_or_else(|| RedisError::Io("not connected".into()))?;
            send(conn, args).await?;
            read_reply(conn).await
        })
        .await
        .unwrap_or_else(|_| Err(RedisError::Io("timed out".into())));
        if matches!(result, Err(RedisError::Io(_))) {
            // Unknown state after an I/O error: start over on the next call.
            *guard = None;
        }
        result
    }

    async fn connect(&self) -> Result<BufReader<TcpStream>, RedisError> {
        let stream = TcpStream::connect(&self.target.addr)
            .await
            .map_err(|e| RedisError::Io(format!("connect {}: {e}", self.target.addr)))?;
        let _ = stream.set_nodelay(true);
        let mut conn = BufReader::new(stream);
        if let Some(pw) = &self.target.password {
            send(&mut conn, &[b"AUTH", pw.expose().as_bytes()]).await?;
            read_reply(&mut conn).await?;
        }
        if self.target.db != 0 {
            let db = self.target.db.to_string();
            send(&mut conn, &[b"SELECT", db.as_bytes()]).await?;
            read_reply(&mut conn).await?;
        }
        Ok(conn)
    }
}

async fn send(conn: &mut BufReader<TcpStream>, args: &[&[u8]]) -> Result<(), RedisError> {
    let mut buf = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
    conn.get_mut().write_all(&buf).await.map_err(|e| RedisError::Io(e.to_string()))
}

async fn read_reply(conn: &mut BufReader<TcpStream>) -> Result<Reply, RedisError> {
    let mut line = String::new();
    let n = conn.read_line(&mut line).await.map_err(|e| RedisError::Io(e.to_string()))?;
    if n == 0 {
        return Err(RedisError::Io("connection closed".into()));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Err(RedisError::Reply(rest.chars().take(200).collect())),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| RedisError::Io("bad bulk length".into()))?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = usize::try_from(len).map_err(|_| RedisError::Io("bad bulk length".into()))?;
            if len > 1 << 20 {
                return Err(RedisError::Io("bulk reply larger than 1 MiB".into()));
            }
            let mut data = vec![0u8; len + 2];
            conn.read_exact(&mut data).await.map_err(|e| RedisError::Io(e.to_string()))?;
            data.truncate(len);
            Ok(Reply::Bulk(Some(data)))
        }
        other => Err(RedisError::Io(format!("unsupported reply type {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((t.addr.as_str(), t.db, t.password.is_none()), ("127.0.0.1:6380", 2, true));
        let t = RedisTarget::parse("redis://:pw@cache").unwrap();
        assert_eq!((t.addr.as_str(), t.password.unwrap().expose()), ("cache:6379", "pw"));
        assert!(RedisTarget::parse("http://x").is_err());
        assert!(RedisTarget::parse("redis://").is_err());
    }
}
