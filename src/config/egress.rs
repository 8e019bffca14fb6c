//! Corporate egress proxies: `egress_proxy` (a URL, `env` or `none`) at the top level, for a
//! provider or for a route, and `no_proxy`. Resolved when the file is loaded into an [`Egress`]
//! per provider and route: `env` reads `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` as curl does.

use serde::Deserialize;

use super::access::Cidr;
use super::value::Text;
use crate::secret::Secret;

/// `egress_proxy` as written.
#[derive(Debug, Clone, PartialEq)]
pub enum EgressSetting {
    /// `none`: connect directly.
    None,
    /// `env`: `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, read at load.
    Env,
    /// An `http://[user:password@]host:port` URL.
    Url(ProxyUrl),
}

impl<'de> Deserialize<'de> for EgressSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(d)?.0;
        match text.as_str() {
            "none" => Ok(EgressSetting::None),
            "env" => Ok(EgressSetting::Env),
            url => ProxyUrl::parse(url).map(EgressSetting::Url).map_err(serde::de::Error::custom),
        }
    }
}

/// An HTTP proxy: where it listens and the Basic credentials it wants, if any.
#[derive(Clone, PartialEq)]
pub struct ProxyUrl {
    /// `host:port`.
    pub authority: http::uri::Authority,
    /// Basic credentials (from the URL or `egress_proxy_password_file`).
    pub credentials: Option<(String, Secret)>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// The proxy as logs and errors name it: never with its password.
impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

impl ProxyUrl {
    /// Parses `http://[user[:password]@]host[:port]` (port 80 when none is given).
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| {
            format!("egress proxy {:?} is not a URL ({e}); write http://host:port, env or none", redact(s))
        })?;
        if url.scheme() != "http" {
            return Err(format!(
                "egress proxy {:?}: only http:// proxies are supported (TLS to the destination goes through a CONNECT tunnel)",
                redact(s)
            ));
        }
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or("the egress proxy URL has no host")?;
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(format!("egress proxy {:?}: no path, query or fragment", redact(s)));
        }
        let port = url.port().unwrap_or(80);
        let authority = format!("{host}:{port}")
            .parse()
            .map_err(|_| format!("egress proxy {:?}: invalid host", redact(s)))?;
        let decode = |v: &str| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned();
        let credentials = (!url.username().is_empty())
            .then(|| (decode(url.username()), Secret::new(decode(url.password().unwrap_or_default()))));
        Ok(ProxyUrl { authority, credentials })
    }

    /// The `Proxy-Authorization` value, if the proxy wants credentials.
    pub fn authorization(&self) -> Option<http::HeaderValue> {
        let (user, password) = self.credentials.as_ref()?;
        let encoded = crate::secret::basic_credentials(user, password.expose());
        let mut value = http::HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// A URL with its user info blanked, for messages.
fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &s[..scheme + 3], &s[at..]),
        _ => s.to_owned(),
    }
}

/// A `no_proxy` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum NoProxy {
    /// `*`: every destination.
    All,
    /// A host name: it and its subdomains (`example.com`, `.example.com`).
    Domain(String),
    /// An address block (or one address).
    Block(Cidr),
}

impl NoProxy {
    /// Parses one entry (`*`, a host name, an address or a block); a `:port` is ignored.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        if s == "*" {
            return Some(NoProxy::All);
        }
        if let Ok(block) = Cidr::parse(s.trim_start_matches('[').trim_end_matches(']')) {
            return Some(NoProxy::Block(block));
        }
        let host = s.rsplit_once(':').map_or(s, |(h, port)| if port.parse::<u16>().is_ok() { h } else { s });
        Some(NoProxy::Domain(host.trim_start_matches("*.").trim_start_matches('.').to_ascii_lowercase()))
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            NoProxy::All => true,
            NoProxy::Block(block) => host.parse().is_ok_and(|ip| block.contains(ip)),
            NoProxy::Domain(d) => {
                host == d || host.strip_suffix(d.as_str()).is_some_and(|rest| rest.ends_with('.'))
            }
        }
    }
}

/// `deserialize_with` for `egress_proxy_password_file`: the file's content.
pub fn password_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let path = Text::deserialize(d)?;
    super::provider::secret("egress_proxy_password", None, Some(path)).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for `no_proxy`.
pub fn no_proxy_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<NoProxy>, D::Error> {
    Ok(Vec::<Text>::deserialize(d)?.iter().filter_map(|t| NoProxy::parse(&t.0)).collect())
}

/// How one provider or route reaches its destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct Egress {
    /// For `https://` (and `wss://`) destinations.
    pub https: Option<ProxyUrl>,
    /// For `http://` (and `ws://`) destinations.
    pub http: Option<ProxyUrl>,
    /// Destinations reached directly.
    pub no_proxy: Vec<NoProxy>,
}

impl Egress {
    /// The proxy for a destination, or `None` to connect directly.
    pub fn proxy_for(&self, https: bool, host: &str) -> Option<&ProxyUrl> {
        let host =
            host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        if self.no_proxy.iter().any(|n| n.matches(&host)) {
            return None;
        }
        if https { self.https.as_ref() } else { self.http.as_ref() }
    }
}

/// The top-level settings every provider and route starts from.
pub struct Defaults<'a> {
    /// `egress_proxy`.
    pub setting: Option<&'a EgressSetting>,
    /// `egress_proxy_password_file`, read.
    pub password: Option<&'a Secret>,
    /// `no_proxy`.
    pub no_proxy: &'a [NoProxy],
}

/// Where the process environment is read (a seam for tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Resolves a provider's or route's `egress_proxy` (`own`) against the top-level `defaults`.
/// `None`: no proxy at all.
pub fn resolve(
    own: Option<&EgressSetting>,
    defaults: &Defaults<'_>,
    env: Env<'_>,
) -> Result<Option<Egress>, String> {
    let setting = own.or(defaults.setting);
    let with_password = |mut p: ProxyUrl| {
        // A password file fills in for a URL that names only the user (or no one).
        if let Some(password) = defaults.password {
            let user = p.credentials.take().map(|(u, _)| u).unwrap_or_default();
            p.credentials = Some((user, password.clone()));
        }
        p
    };
    match setting {
        None | Some(EgressSetting::None) => Ok(None),
        Some(EgressSetting::Url(p)) => {
            let p = with_password(p.clone());
            Ok(Some(Egress { https: Some(p.clone()), http: Some(p), no_proxy: defaults.no_proxy.to_vec() }))
        }
        Some(EgressSetting::Env) => {
            let var = |names: &[&'static str]| {
                names.iter().find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
            };
            let proxy = |names: &[&'static str]| -> Result<Option<ProxyUrl>, String> {
                match var(names) {
                    None => Ok(None),
                    Some((name, v)) => {
                        // curl accepts a bare host:port.
                        let v = if v.contains("://") { v } else { format!("http://{v}") };
                        ProxyUrl::parse(&v)
                            .map(|p| Some(with_password(p)))
                            .map_err(|e| format!("{name}: {e}"))
                    }
                }
            };
            let mut no_proxy = defaults.no_proxy.to_vec();
            if let Some((_, list)) = var(&["NO_PROXY", "no_proxy"]) {
                no_proxy.extend(list.split(',').filter_map(NoProxy::parse));
            }
            let egress = Egress {
                https: proxy(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])?,
                // curl reads only the lowercase name: CGI scripts get HTTP_PROXY from a client's
                // `Proxy:` header ("httpoxy").
                http: proxy(&["http_proxy", "ALL_PROXY", "all_proxy"])?,
                no_proxy,
            };
            Ok((egress.https.is_some() || egress.http.is_some()).then_some(egress))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> ProxyUrl {
        ProxyUrl::parse(s).unwrap()
    }

    #[test]
    fn proxy_urls_parse_and_never_show_their_password() {
        let p = url("http://user:p%40ss@proxy.corp:3128");
        assert_eq!(p.authority.as_str(), "proxy.corp:3128");
        assert_eq!(p.credentials.as_ref().map(|(u, s)| (u.as_str(), s.expose())), Some(("user", "p@ss")));
        assert_eq!(format!("{p} {p:?}"), "http://proxy.corp:3128 http://proxy.corp:3128");
        assert_eq!(url("http://proxy").authority.as_str(), "proxy:80");
        let err = ProxyUrl::parse("https://user:secret@proxy:443").unwrap_err();
        assert!(err.contains("only http://") && !err.contains("secret"), "{err}");
        assert!(ProxyUrl::parse("http://proxy:3128/path").is_err());
    }

    #[test]
    fn no_proxy_matches_hosts_subdomains_and_blocks() {
        let no: Vec<NoProxy> = ["internal.corp", ".svc.cluster.local", "10.0.0.0/8", "::1", "localhost:8080"]
            .iter()
            .filter_map(|s| NoProxy::parse(s))
            .collect();
        let e = Egress { https: Some(url("http://p:1")), http: None, no_proxy: no };
        for direct in [
            "internal.corp",
            "api.internal.corp",
            "redis.ns.svc.cluster.local",
            "10.2.3.4",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(e.proxy_for(true, direct).is_none(), "{direct}");
        }
        for proxied in ["notinternal.corp", "api.example.com", "11.0.0.1", "corp"] {
            assert!(e.proxy_for(true, proxied).is_some(), "{proxied}");
        }
        assert!(e.proxy_for(false, "api.example.com").is_none(), "no proxy for http");
    }

    #[test]
    fn env_reads_the_variables_curl_reads() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| (*v).to_owned())
        };
        let defaults = Defaults { setting: Some(&EgressSetting::Env), password: None, no_proxy: &[] };
        let env = vars(&[
            ("HTTPS_PROXY", "proxy:3128"),
            ("HTTP_PROXY", "http://evil:1"),
            ("NO_PROXY", "a.corp, 10.0.0.0/8"),
        ]);
        let e = resolve(None, &defaults, &env).unwrap().unwrap();
        assert_eq!(e.https.as_ref().unwrap().authority.as_str(), "proxy:3128");
        assert!(e.http.is_none(), "HTTP_PROXY (upper case) is not read");
        assert!(e.proxy_for(true, "x.a.corp").is_none() && e.proxy_for(true, "10.1.1.1").is_none());
        assert!(resolve(None, &defaults, &vars(&[])).unwrap().is_none(), "no variables: no proxy");
        let bad = resolve(None, &defaults, &vars(&[("https_proxy", "socks5://p:1")])).unwrap_err();
        assert!(bad.starts_with("https_proxy: "), "{bad}");
        // A route or provider may say none.
        assert!(resolve(Some(&EgressSetting::None), &defaults, &env).unwrap().is_none());
    }
}
