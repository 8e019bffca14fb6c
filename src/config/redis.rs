//! Where the shared cache's Redis is and how to log in: `redis[s]://[user[:password]@]host[:port][/db]`,
//! checked when the file loads. Connecting is the token layer's (`token::redis`).

use std::path::PathBuf;

use redis::IntoConnectionInfo;

use crate::secret::Secret;

/// Where Redis is and how to log in, validated at load time.
#[derive(Clone, PartialEq)]
pub struct RedisTarget {
    /// The URL as written: it may carry a password, so it is a secret.
    pub url: Secret,
    /// `host:port/db` and the user, for logs.
    pub display: String,
    /// `rediss://`.
    pub tls: bool,
    /// From `password_file`, replacing none in the URL.
    pub password: Option<Secret>,
    /// A CA bundle trusted for `rediss://`.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("at", &self.display)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// Parses `redis[s]://[user[:password]@]host[:port][/db]` (user and password
    /// percent-encoded, as in any URL). `password` (from `password_file`) replaces a password in
    /// the URL, which must then have none; `ca_file` is trusted for `rediss://`.
    pub fn parse(url: &str, password: Option<Secret>, ca_file: Option<PathBuf>) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("redis {:?}: {e}", redact(url)))?;
        let tls = match parsed.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(format!("redis URL scheme {other:?}: use redis:// or rediss://")),
        };
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("the redis URL has no host".into());
        }
        if password.is_some() && parsed.password().is_some() {
            return Err("set the password in the redis URL or in password_file, not both".into());
        }
        if ca_file.is_some() && !tls {
            return Err("ca_file needs a rediss:// URL (TLS)".into());
        }
        let info = url.into_connection_info().map_err(|e| format!("redis URL: {e}"))?;
        let redis = info.redis_settings();
        let display = format!(
            "{}{}/{}",
            redis.username().map(|u| format!("{u}@")).unwrap_or_default(),
            info.addr(),
            redis.db()
        );
        Ok(RedisTarget { url: Secret::new(url), display, tls, password, ca_file })
    }
}

/// The URL with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable)".into(),
    }
}
