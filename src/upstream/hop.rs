//! Hop-by-hop rules (RFC 9110 section 7.6.1): what is removed before a message crosses to the
//! next hop, in either direction.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

// `Connection` first and `TE` fourth: `strip_hop_by_hop` treats them by position.
const HOP_COUNT: usize = 8;
const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

const CONNECTION_AT: usize = 0;
const TE_AT: usize = 3;

/// Whether `name` is a hop-by-hop header of its own (those named in `Connection` aside). `TE`
/// counts: [`strip_hop_by_hop`] puts `TE: trailers` back on requests.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The header names a `Connection` value lists. `close` names no header and `keep-alive` is
/// dropped as hop-by-hop anyway: the two values nearly every `Connection` carries are skipped,
/// so they cost no name parsing or lookup.
fn listed(connection: &HeaderValue) -> impl Iterator<Item = &str> {
    let tokens = connection.to_str().into_iter().flat_map(|v| v.split(',')).map(str::trim);
    tokens.filter(|t| {
        !t.is_empty() && !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close")
    })
}

/// Whether a `Connection` value names headers to remove (most name none).
pub fn lists_headers(connection: &HeaderValue) -> bool {
    listed(connection).next().is_some()
}

/// Removes the headers a `Connection` value lists.
pub fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    for name in listed(connection).filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()) {
        headers.remove(name);
    }
}

/// Which hop-by-hop headers a message carries, noted during a pass over its names that a
/// caller may be making anyway (the request rewrite makes one), so the strip needs no pass of
/// its own and looks up only what is there.
#[derive(Default)]
pub struct Present([bool; HOP_COUNT]);

impl Present {
    /// Notes `name` (a header name, lower case as `HeaderName::as_str` gives it). True if it
    /// is hop-by-hop.
    pub fn note(&mut self, name: &str) -> bool {
        let at = match name {
            "connection" => CONNECTION_AT,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "te" => TE_AT,
            "trailer" => 4,
            "transfer-encoding" => 5,
            "upgrade" => 6,
            "proxy-authenticate" => 7,
            _ => return false,
        };
        self.0[at] = true;
        true
    }

    /// Every hop-by-hop header `headers` carries.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut present = Present::default();
        for name in headers.keys() {
            present.note(name.as_str());
        }
        present
    }
}

/// Removes hop-by-hop headers and every header the `Connection` header names. Runs before the
/// credential is attached: a client sending `Connection: authorization` must not be able to make
/// the next hop drop it. `TE: trailers` survives (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_present(headers, Present::of(headers));
}

/// [`strip_hop_by_hop`] when the pass over the names has been made: `present` says what
/// `headers` carries.
pub fn strip_present(headers: &mut HeaderMap, present: Present) {
    let Present(present) = present;
    if present[CONNECTION_AT] {
        let listed: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
        for connection in &listed {
            remove_listed(headers, connection);
        }
    }
    let te_trailers = present[TE_AT]
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
        });
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes hop-by-hop headers from an upstream response before it goes downstream.
pub fn rewrite_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::TE);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap_or(header::ACCEPT),
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        h
    }

    #[test]
    fn positions_match_the_list() {
        assert_eq!(HOP_BY_HOP[CONNECTION_AT], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[TE_AT], header::TE);
        for (at, name) in HOP_BY_HOP.iter().enumerate() {
            let mut present = Present::default();
            assert!(present.note(name.as_str()), "{name}");
            assert_eq!(present.0.iter().position(|p| *p), Some(at), "{name}");
        }
        assert!(!Present::default().note("authorization"));
    }

    #[test]
    fn connection_values_name_headers_unless_keep_alive_or_close() {
        for (value, names) in [
            ("keep-alive", false),
            ("Close", false),
            (" , keep-alive,", false),
            ("x-a", true),
            ("close, X-A", true),
        ] {
            assert_eq!(lists_headers(&HeaderValue::from_static(value)), names, "{value}");
        }
        let mut h = map(&[("x-a", "1"), ("x-b", "2"), ("keep-alive", "timeout=5")]);
        remove_listed(&mut h, &HeaderValue::from_static("close, X-A"));
        assert!(h.get("x-a").is_none() && h.get("x-b").is_some() && h.get("keep-alive").is_some());
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = map(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()).unwrap_or_default(), b"trailers");
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }
}
