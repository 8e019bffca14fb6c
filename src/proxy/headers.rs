//! Request and response header hygiene.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

use crate::upstream::hop::{Present, strip_present};

/// `X-Request-Id`: one id per request, from the client or made here.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the client's `X-Request-Id` when it is well-formed (1 to 128 characters of
/// `A-Z a-z 0-9 - _ . :`, so it is safe in any log), else 32 random hex digits. Marked sensitive:
/// unique per request, it would only evict reusable entries from an HTTP/2 peer's HPACK table, so
/// it goes as a never-indexed literal, upstream and to the client (HTTP/1.1 ignores the mark).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let given = headers.get(&X_REQUEST_ID).filter(|v| {
        let b = v.as_bytes();
        (1..=128).contains(&b.len()) && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    let mut id = match given {
        Some(v) => v.clone(),
        None => {
            let mut hex = [0u8; 32];
            let id: u128 = rand::random();
            for (i, digit) in hex.iter_mut().enumerate() {
                *digit = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
            }
            HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("-"))
        }
    };
    id.set_sensitive(true);
    id
}

/// What the upstream is told about the client and the request's first hop.
pub struct Forwarding<'a> {
    /// The peer's address.
    pub client: IpAddr,
    /// The peer is in `access.trusted_proxies`: its forwarding headers are kept and appended to.
    pub trusted: bool,
    /// `http` or `https`: how the request reached tokengate.
    pub proto: &'static str,
    /// The request's authority (HTTP/2 sends no `Host`).
    pub authority: Option<&'a http::uri::Authority>,
    /// Which forwarding headers to add.
    pub format: crate::config::ForwardedFormat,
    /// `1.0`, `1.1` or `2`, for `Via`.
    pub version: &'static str,
}

/// Headers through which a client claims who it is, where it connected from or which host it
/// asked for. Only a trusted proxy may send them; anyone else's are removed. Frameworks and
/// gateways read dozens of spellings, so the rule is by shape, not a list: any `Forwarded*` or
/// `X-Forwarded*`, any name ending in `-ip`, `-addr` or `-address` (`X-Real-IP`, `Client-IP`,
/// `X-Remote-Addr`, `X-Envoy-External-Address`...), a host (`X-Host`, `X-Original-Host`,
/// `X-HTTP-Host-Override`), a scheme (`X-Url-Scheme`, `Front-End-Https`) or an `X-Original-*`
/// value.
fn is_client_claim(name: &str) -> bool {
    if name == "host" {
        return false;
    }
    let n = name.strip_prefix("x-").unwrap_or(name);
    n.starts_with("forwarded")
        || n.starts_with("original-")
        || n.ends_with("-ip")
        || n.ends_with("-addr")
        || n.ends_with("-address")
        || n == "host"
        || n.ends_with("-host")
        || n.contains("host-override")
        || n.ends_with("scheme")
        || n == "front-end-https"
}

/// Headers some frameworks (IIS, Symfony, Zend, nginx auth setups) read as the request's real
/// path: an upstream honouring them would serve a path that another route guards. Never forwarded.
fn is_path_override(name: &str) -> bool {
    matches!(name, "x-original-url" | "x-rewrite-url" | "x-original-uri")
}

/// Prepares the downstream request headers for the upstream: hop-by-hop headers, client
/// credentials, path overrides and (from untrusted peers) forwarding claims removed, forwarding
/// headers added, the credential attached when it goes in `Authorization` (`None`: the caller
/// attaches it elsewhere, and the client's `Authorization` is removed all the same).
pub fn rewrite_request(headers: &mut HeaderMap, hop: &Forwarding<'_>, authorization: Option<HeaderValue>) {
    // One pass over the names finds the hop-by-hop headers and those removed here; most
    // requests carry none of them but `Connection`.
    let mut hop_by_hop = Present::default();
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let n = name.as_str();
        if !hop_by_hop.note(n)
            && n.len() >= 6
            && (n == "proxy-authorization" || is_path_override(n) || (!hop.trusted && is_client_claim(n)))
        {
            doomed.push(name.clone());
        }
    }
    strip_present(headers, hop_by_hop);
    for name in doomed {
        headers.remove(name);
    }
    let host = headers
        .remove(header::HOST)
        .or_else(|| hop.authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if hop.format.x_forwarded() {
        // Entries, so each name is hashed once whether or not the client sent it.
        match headers.entry(HeaderName::from_static("x-forwarded-for")) {
            Entry::Occupied(e) => {
                let name = e.key().clone();
                append(headers, name, &hop.client.to_string());
            }
            Entry::Vacant(e) => {
                e.insert(ip_value(hop.client));
            }
        }
        headers
            .entry(HeaderName::from_static("x-forwarded-proto"))
            .or_insert(HeaderValue::from_static(hop.proto));
        if let (Some(h), Entry::Vacant(e)) =
            (&host, headers.entry(HeaderName::from_static("x-forwarded-host")))
        {
            e.insert(h.clone());
        }
    }
    if hop.format.rfc7239() {
        let mut element = match hop.client {
            IpAddr::V4(ip) => format!("for={ip}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        };
        if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()).filter(|h| !h.contains(['"', '\\'])) {
            element.push_str(&format!(";host=\"{h}\""));
        }
        element.push_str(";proto=");
        element.push_str(hop.proto);
        append(headers, header::FORWARDED, &element);
    }
    match headers.entry(header::VIA) {
        Entry::Occupied(_) => append(headers, header::VIA, &format!("{} tokengate", hop.version)),
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static(match hop.version {
                "2" => "2 tokengate",
                "1.0" => "1.0 tokengate",
                _ => "1.1 tokengate",
            }));
        }
    }
    match authorization {
        Some(value) => headers.insert(header::AUTHORIZATION, value),
        None => headers.remove(header::AUTHORIZATION),
    };
}

/// The address as a header value.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let mut text = Vec::with_capacity(15);
    crate::text::ip(&mut text, ip);
    // Handed over, not copied.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends `value` to a comma-separated header, joining existing values into one.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = {
        let existing: Vec<&str> = headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).collect();
        if existing.is_empty() { value.to_owned() } else { format!("{}, {value}", existing.join(", ")) }
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_claims_are_recognised_by_shape() {
        for claim in [
            "x-forwarded-for",
            "x-forwarded",
            "forwarded",
            "forwarded-for",
            "x-forwarded-host",
            "x-forwarded-by",
            "x-originating-ip",
            "x-host",
            "x-http-host-override",
            "x-remote-ip",
            "x-remote-addr",
            "x-client-ip",
            "x-cluster-client-ip",
            "client-ip",
            "true-client-ip",
            "cf-connecting-ip",
            "fastly-client-ip",
            "x-real-ip",
            "x-original-host",
            "x-original-forwarded-for",
            "x-envoy-external-address",
            "x-proxyuser-ip",
            "x-url-scheme",
            "x-forwarded-scheme",
            "front-end-https",
        ] {
            assert!(is_client_claim(claim), "{claim}");
        }
        for ordinary in
            ["host", "content-type", "authorization", "x-request-id", "user-agent", "x-api-key", "via"]
        {
            assert!(!is_client_claim(ordinary), "{ordinary}");
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn hop(trusted: bool, format: crate::config::ForwardedFormat) -> Forwarding<'static> {
        Forwarding {
            client: "127.0.0.1".parse().unwrap(),
            trusted,
            proto: "http",
            authority: None,
            format,
            version: "1.1",
        }
    }

    #[test]
    fn connection_named_headers_cannot_remove_the_credential() {
        let mut h = map(&[
            ("connection", "authorization, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("authorization", "Basic client"),
            ("proxy-authorization", "Basic p"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "tokengate:8080"),
            ("x-forwarded-for", "10.0.0.1"),
            ("accept", "application/json"),
        ]);
        rewrite_request(&mut h, &hop(true, Default::default()), Some(HeaderValue::from_static("Bearer T")));
        assert_eq!(h.get("authorization").unwrap(), "Bearer T");
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        for gone in [
            "connection",
            "x-secret-hop",
            "proxy-authorization",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "host",
        ] {
            assert!(h.get(gone).is_none(), "{gone} should be removed");
        }
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "tokengate:8080");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("via").unwrap(), "1.1 tokengate");
        assert_eq!(h.get("accept").unwrap(), "application/json");
    }

    #[test]
    fn an_untrusted_client_cannot_choose_what_the_upstream_is_told() {
        let claims = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-real-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("host", "tokengate"),
        ];
        let mut h = map(&claims);
        rewrite_request(
            &mut h,
            &hop(false, crate::config::ForwardedFormat::Both),
            Some(HeaderValue::from_static("Bearer T")),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "tokengate");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("forwarded").unwrap(), "for=127.0.0.1;host=\"tokengate\";proto=http");
        for gone in ["x-real-ip", "true-client-ip", "x-original-url", "x-rewrite-url"] {
            assert!(h.get(gone).is_none(), "{gone} should be removed");
        }
        // A trusted proxy's claims are kept and appended to; path overrides never pass.
        let mut h = map(&claims);
        rewrite_request(
            &mut h,
            &hop(true, crate::config::ForwardedFormat::Rfc7239),
            Some(HeaderValue::from_static("Bearer T")),
        );
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=1.2.3.4;proto=https, for=127.0.0.1;host=\"tokengate\";proto=http"
        );
        assert_eq!(h.get("x-real-ip").unwrap(), "1.2.3.4");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4");
        assert!(h.get("x-original-url").is_none());
    }

    #[test]
    fn request_ids_are_kept_when_well_formed_and_made_otherwise() {
        assert!(request_id(&HeaderMap::new()).is_sensitive(), "never indexed by HPACK");
        let id = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(X_REQUEST_ID, HeaderValue::from_str(v).unwrap());
            }
            request_id(&h).to_str().unwrap().to_owned()
        };
        assert_eq!(id(Some("abc-123_x.y:z")), "abc-123_x.y:z");
        for bad in [None, Some(""), Some("has space"), Some("quote\""), Some(&*"x".repeat(129))] {
            let made = id(bad);
            assert_eq!(made.len(), 32, "{bad:?}");
            assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(id(None), id(None));
    }
}
