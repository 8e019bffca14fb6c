//! The prefix table and the path checks that run before it.

use std::borrow::Cow;
use std::collections::HashMap;

/// Why a request path was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (`/...`).
    #[error("the path must start with '/'")]
    NotOriginForm,
    /// A `.` or `..` segment, plain or percent-encoded; could climb into another route.
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
    /// `//`: upstreams disagree on what it means.
    #[error("the path contains an empty segment ('//')")]
    EmptySegment,
    /// A backslash or a percent-encoded `/` or `\`: some servers treat them as separators.
    #[error("the path contains a backslash or an encoded slash")]
    EncodedSeparator,
    /// A control byte, raw or percent-encoded, or a malformed escape.
    #[error("the path contains a control character or a malformed percent escape")]
    BadByte,
    /// A `;` parameter decides the route: servers that strip `;` parameters (Tomcat, Jetty,
    /// Spring) would serve a path another route guards.
    #[error("a ';' parameter in the path changes which route it belongs to")]
    AmbiguousParameter,
}

/// Checks a request path (without query) and returns its normal form (RFC 3986 section 6.2.2):
/// percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, the hex digits of
/// every other escape upper-cased. Routes are matched on this form and it is what the upstream
/// receives, so `/a/%61dmin` is `/a/admin` to tokengate exactly as it is to the upstream.
///
/// What stays ambiguous after normalising is refused: dot segments (also `..;x`, which servlet
/// containers read as `..`), empty segments, backslashes and encoded `/` or `\`, control bytes
/// and malformed escapes. `;` is otherwise an ordinary character; [`matrix_free`] gives the
/// path as servers that strip `;` parameters see it, so the caller can refuse a path whose route
/// depends on that reading.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut normal: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::EncodedSeparator),
            b if b < 0x20 || b == 0x7f => return Err(PathError::BadByte),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadByte)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(PathError::BadByte);
                }
                let decoded = (hex_value(hex[0]) << 4) | hex_value(hex[1]);
                match decoded {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b if b < 0x20 || b == 0x7f => return Err(PathError::BadByte),
                    _ => {}
                }
                let unreserved =
                    decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~');
                let canonical = !unreserved && !hex.iter().any(u8::is_ascii_lowercase);
                if !canonical && normal.is_none() {
                    normal = Some(path[..i].to_owned());
                }
                if let Some(out) = normal.as_mut() {
                    if unreserved {
                        out.push(char::from(decoded));
                    } else {
                        out.push('%');
                        out.push(char::from(hex[0].to_ascii_uppercase()));
                        out.push(char::from(hex[1].to_ascii_uppercase()));
                    }
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        if let Some(out) = normal.as_mut() {
            // Copy one character (multi-byte ones whole); its first byte was checked above and
            // continuation bytes are never ASCII.
            let len = path[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&path[i..i + len]);
            i += len;
        } else {
            i += 1;
        }
    }
    let normal = match normal {
        Some(n) => Cow::Owned(n),
        None => Cow::Borrowed(path),
    };
    check_segments(&normal)?;
    Ok(normal)
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        _ => (digit | 0x20) - b'a' + 10,
    }
}

/// Checks a request path without normalising it; see [`normalize`].
pub fn check_path(path: &str) -> Result<(), PathError> {
    normalize(path).map(|_| ())
}

/// The path with `;` parameters removed from every segment (`/a;x/b` → `/a/b`), as Tomcat,
/// Jetty and Spring read it; `None` when it has none.
pub fn matrix_free(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for (n, segment) in path.split('/').enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(segment));
    }
    Some(out)
}

fn check_segments(path: &str) -> Result<(), PathError> {
    let count = path[1..].split('/').count();
    for (n, segment) in path[1..].split('/').enumerate() {
        if segment.is_empty() && n + 1 < count {
            return Err(PathError::EmptySegment);
        }
        // `..;x` is `..` to servlet containers, so look at what stands before any `;`.
        let head = segment.split(';').next().unwrap_or(segment);
        if is_dot_segment(head) {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

fn is_dot_segment(segment: &str) -> bool {
    let mut dots = 0;
    let mut rest = segment.as_bytes();
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e' {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Maps path prefixes to values; the longest prefix matching whole segments wins.
///
/// Lookup walks the path's ancestors (`/a/b/c`, `/a/b`, `/a`, `/`) through a hash map, so it costs
/// one hash per segment whatever the number of routes.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    by_prefix: HashMap<Box<str>, T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable { by_prefix: HashMap::new() }
    }
}

impl<T> RouteTable<T> {
    /// Adds a route under a normalised prefix (see [`crate::config::Prefix`]); returns the value
    /// it replaced, if any.
    pub fn insert(&mut self, prefix: &str, value: T) -> Option<T> {
        self.by_prefix.insert(prefix.into(), value)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// The value for the longest prefix of `path`, with the matched prefix.
    pub fn lookup<'a>(&'a self, path: &str) -> Option<(&'a str, &'a T)> {
        let mut candidate = path.trim_end_matches('/');
        loop {
            if candidate.is_empty() {
                return self.by_prefix.get_key_value("/").map(|(k, v)| (&**k, v));
            }
            if let Some((k, v)) = self.by_prefix.get_key_value(candidate) {
                return Some((k, v));
            }
            match candidate.rfind('/') {
                Some(i) => candidate = &candidate[..i],
                None => return None,
            }
        }
    }
}

impl<T> RouteTable<T> {
    /// The route for a path in normal form (see [`normalize`]). A path whose route changes when
    /// its `;` parameters are removed is refused: a servlet container upstream would serve a
    /// path that another route guards.
    pub fn route<'a>(&'a self, normal_path: &str) -> Result<Option<(&'a str, &'a T)>, PathError> {
        let found = self.lookup(normal_path);
        if let Some(plain) = matrix_free(normal_path) {
            let other = self.lookup(&plain).map(|(prefix, _)| prefix);
            if other != found.map(|(prefix, _)| prefix) {
                return Err(PathError::AmbiguousParameter);
            }
        }
        Ok(found)
    }
}

/// The upstream path for a request: base path, then the request path with the route prefix
/// removed when `strip` is set. Always starts with `/`.
pub fn upstream_path(base: &str, prefix: &str, strip: bool, path: &str) -> String {
    let rest = if strip && prefix != "/" { &path[prefix.len().min(path.len())..] } else { path };
    let mut out = String::with_capacity(base.len() + rest.len() + 1);
    out.push_str(base);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let mut t = RouteTable::default();
        t.insert("/api", 1);
        t.insert("/api/v2", 2);
        t.insert("/", 0);
        assert_eq!(t.lookup("/api/v2/users").map(|r| *r.1), Some(2));
        assert_eq!(t.lookup("/api/v2").map(|r| *r.1), Some(2));
        assert_eq!(t.lookup("/api/v2/").map(|r| *r.1), Some(2));
        assert_eq!(t.lookup("/api/v3").map(|r| *r.1), Some(1));
        assert_eq!(t.lookup("/apix").map(|r| *r.1), Some(0));
        assert_eq!(t.lookup("/other").map(|r| r.0), Some("/"));
        let mut no_root = RouteTable::default();
        no_root.insert("/api", 1);
        assert!(no_root.lookup("/apix").is_none());
        assert!(no_root.lookup("/").is_none());
    }

    #[test]
    fn strips_prefix_and_joins_base_path() {
        assert_eq!(upstream_path("", "/echo", true, "/echo/a/b"), "/a/b");
        assert_eq!(upstream_path("", "/echo", true, "/echo"), "/");
        assert_eq!(upstream_path("/api/v2", "/echo", true, "/echo/x"), "/api/v2/x");
        assert_eq!(upstream_path("/api/v2", "/echo", false, "/echo/x"), "/api/v2/echo/x");
        assert_eq!(upstream_path("", "/", true, "/x"), "/x");
    }

    #[test]
    fn normal_form_decodes_unreserved_and_uppercases_the_rest() {
        for (raw, normal) in [
            ("/a/%61dmin/users", "/a/admin/users"),
            ("/%41%42c", "/ABc"),
            ("/a%7e%7E%2D%5f", "/a~~-_"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/x%3b%20y", "/x%3B%20y"),
            ("/plain/path", "/plain/path"),
            ("/d\u{e9}j\u{e0}/%61", "/d\u{e9}j\u{e0}/a"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(normal), "{raw}");
            assert_eq!(normalize(normal).as_deref(), Ok(normal), "idempotent: {normal}");
        }
        assert!(matches!(normalize("/already/normal%20x"), Ok(Cow::Borrowed(_))));
        assert_eq!(normalize("/a/%2e%2E/b"), Err(PathError::DotSegment));
        assert_eq!(normalize("/a/%2+/b"), Err(PathError::BadByte));
    }

    #[test]
    fn matrix_parameters_are_removed_per_segment() {
        assert_eq!(matrix_free("/a;x=1/admin;v/u"), Some("/a/admin/u".into()));
        assert_eq!(matrix_free("/a/b"), None);
    }

    #[test]
    fn refuses_traversal_and_ambiguous_paths() {
        for ok in ["/", "/a/b", "/a/b/", "/a/.well-known", "/a/...", "/a%20b", "/a/%41"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/..", PathError::DotSegment),
            ("/a/%2e%2e/b", PathError::DotSegment),
            ("/a/%2E./b", PathError::DotSegment),
            ("/a/.%2e", PathError::DotSegment),
            ("/a/..;x/b", PathError::DotSegment),
            ("/a//b", PathError::EmptySegment),
            ("//evil/x", PathError::EmptySegment),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/a\\b", PathError::EncodedSeparator),
            ("/a%00b", PathError::BadByte),
            ("/a%0d%0ab", PathError::BadByte),
            ("/a%zz", PathError::BadByte),
            ("/a%2", PathError::BadByte),
            ("http://evil/", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
        ] {
            assert_eq!(check_path(bad), Err(why), "{bad}");
        }
    }
}
