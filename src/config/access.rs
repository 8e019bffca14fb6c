//! Who may use the proxy: client address lists, API keys, hosts, browsers.

use std::net::IpAddr;

use http::HeaderName;
use serde::Deserialize;

use super::provider::secret;
use super::value::Text;
use crate::secret::Secret;

/// An address block such as `10.0.0.0/8`, `::1/128` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not an address block; use forms like 10.0.0.0/8, 127.0.0.1 or ::1/128");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is inside the block. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask(u128::from(net), u128::from(ip), self.prefix, 128),
            _ => false,
        }
    }
}

fn mask(net: u128, ip: u128, prefix: u8, bits: u32) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = bits - u32::from(prefix);
    (net >> shift) == (ip >> shift)
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Cidr::parse(&Text::deserialize(d)?.0).map_err(serde::de::Error::custom)
    }
}

/// True when `ip` is in one of `blocks`, or `blocks` is empty (no restriction).
pub fn allowed(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.is_empty() || blocks.iter().any(|b| b.contains(ip))
}

/// Whether a listener serves a request with this `Host` (DNS-rebinding defence): an IP literal
/// (what probes, scrapers and most clients in a cluster send), `localhost`, or a name in `names`;
/// any host when `names` holds `*`. A web page served from a name that resolves to tokengate
/// sends that name, which is none of these.
pub fn host_served(names: &[Text], host: &str) -> bool {
    let name = host_name(host);
    if host.starts_with('[') {
        return host.contains(']') && name.parse::<std::net::Ipv6Addr>().is_ok();
    }
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|h| h.0 == "*" || h.0.eq_ignore_ascii_case(name))
}

/// The host name of a `Host` value: without the port, IPv6 literals without their brackets.
pub fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Access control for the plain listener and the defaults of every route.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Access {
    /// Client address blocks allowed to connect to the plain listener (empty: any).
    pub allow: Vec<Cidr>,
    /// Inbound API keys; when set, every route requires one unless it says otherwise.
    pub api_keys: Option<ApiKeys>,
    /// Host names served besides IP literals and `localhost` (DNS-rebinding defence; see
    /// [`host_served`]); `*` serves any.
    pub hosts: Vec<Text>,
    /// Serve requests that carry browser headers (`Origin`, `Sec-Fetch-*`). Off by default: a web
    /// page must not be able to use tokengate's credentials through the user's browser.
    pub allow_browsers: bool,
    /// Peers (load balancers, ingress proxies) whose `X-Forwarded-*`, `Forwarded` and
    /// `X-Real-IP` headers are kept and appended to. From anyone else they are removed: a client
    /// must not be able to choose the address or host the upstream is told about.
    pub trusted_proxies: Vec<Cidr>,
    /// Which forwarding headers tokengate adds: `x_forwarded` (default), `rfc7239`
    /// (`Forwarded`) or `both`.
    pub forwarded: ForwardedFormat,
}

/// The forwarding headers tokengate adds to upstream requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForwardedFormat {
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`.
    #[default]
    XForwarded,
    /// RFC 7239 `Forwarded: for=...;host=...;proto=...`.
    Rfc7239,
    /// Both.
    Both,
}

impl ForwardedFormat {
    /// Adds `X-Forwarded-*`.
    pub fn x_forwarded(self) -> bool {
        self != ForwardedFormat::Rfc7239
    }

    /// Adds `Forwarded`.
    pub fn rfc7239(self) -> bool {
        self != ForwardedFormat::XForwarded
    }
}

/// Inbound API keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawApiKeys")]
pub struct ApiKeys {
    /// The request header carrying the key (removed before forwarding).
    pub header: HeaderName,
    /// Accepted keys; several so they can be rotated.
    pub keys: Vec<Secret>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawApiKeys {
    header: Option<Text>,
    #[serde(default)]
    keys: Vec<Text>,
    keys_file: Option<Text>,
}

impl TryFrom<RawApiKeys> for ApiKeys {
    type Error = String;

    fn try_from(raw: RawApiKeys) -> Result<Self, String> {
        let header = match raw.header {
            Some(h) => HeaderName::from_bytes(h.0.as_bytes())
                .map_err(|_| format!("header {:?} is not a header name", h.0))?,
            None => HeaderName::from_static("x-api-key"),
        };
        if header == http::header::AUTHORIZATION {
            return Err("the API key header cannot be Authorization: tokengate replaces it".into());
        }
        let mut keys: Vec<Secret> = raw.keys.into_iter().map(|k| Secret::new(k.0)).collect();
        if let Some(file) = secret("keys", None, raw.keys_file)? {
            keys.extend(key_lines(&file));
        }
        if keys.is_empty() {
            return Err("api_keys needs at least one key (keys or keys_file)".into());
        }
        if !long_enough(&keys) {
            return Err(format!("API keys must be at least {MIN_KEY_LEN} characters"));
        }
        Ok(ApiKeys { header, keys })
    }
}

/// The shortest API key accepted: shorter ones can be guessed.
pub const MIN_KEY_LEN: usize = 16;

/// The keys of a keys file: one per line, blank lines skipped.
pub fn key_lines(file: &Secret) -> Vec<Secret> {
    file.expose().lines().map(str::trim).filter(|l| !l.is_empty()).map(Secret::new).collect()
}

/// Every key has at least [`MIN_KEY_LEN`] characters.
pub fn long_enough(keys: &[Secret]) -> bool {
    keys.iter().all(|k| k.expose().len() >= MIN_KEY_LEN)
}

/// True when `presented` equals one of `keys`. Every key is compared, matched or not, each in
/// constant time.
pub fn accepts_any(keys: &[Secret], presented: &[u8]) -> bool {
    keys.iter().fold(false, |ok, k| constant_time_eq(k.expose().as_bytes(), presented) | ok)
}

/// Compares in time that depends only on the lengths, so a key cannot be guessed byte by byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

impl ApiKeys {
    /// True when `presented` equals one of the keys. Every key is compared, matched or not.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        accepts_any(&self.keys, presented)
    }
}

super::json_schema::schema_as!(ApiKeys => RawApiKeys);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let c = |s| Cidr::parse(s).unwrap();
        assert!(c("10.0.0.0/8").contains("10.200.1.1".parse().unwrap()));
        assert!(!c("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(c("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(!c("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        assert!(c("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(c("127.0.0.0/8").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(c("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(!c("fd00::/8").contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0/8", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(allowed(&[], "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn api_keys_compare_every_key() {
        let keys = ApiKeys {
            header: HeaderName::from_static("x-api-key"),
            keys: vec![Secret::new("old-key-0123456789"), Secret::new("new-key-0123456789")],
        };
        assert!(keys.accepts(b"old-key-0123456789"));
        assert!(keys.accepts(b"new-key-0123456789"));
        assert!(!keys.accepts(b"new-key-012345678"));
        assert!(!keys.accepts(b"new-key-01234567890"));
        assert!(!keys.accepts(b""));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}

#[cfg(test)]
mod host_tests {
    use super::{Text, host_name, host_served};

    #[test]
    fn hosts_are_ip_literals_localhost_or_configured() {
        let names = [Text("tokengate.svc".into())];
        for ok in
            ["127.0.0.1:9090", "10.1.2.3", "[::1]:9090", "localhost:9090", "LOCALHOST", "tokengate.svc:80"]
        {
            assert!(host_served(&names, ok), "{ok}");
        }
        for bad in
            ["evil.example", "evil.example:9090", "127.0.0.1.evil.example", "[evil]:1", "localhost.evil", ""]
        {
            assert!(!host_served(&names, bad), "{bad}");
        }
        assert!(host_served(&[Text("*".into())], "evil.example"));
    }

    #[test]
    fn host_without_port() {
        assert_eq!(host_name("tokengate:8080"), "tokengate");
        assert_eq!(host_name("tokengate"), "tokengate");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("127.0.0.1:80"), "127.0.0.1");
    }
}
