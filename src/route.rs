//! The prefix table and the path checks that run before it.

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
}

/// Checks a request path (without query) so that what is routed is what the upstream sees.
///
/// Rather than normalise (and risk disagreeing with the upstream about the result), anything
/// ambiguous is refused.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::EncodedSeparator),
            b if b < 0x20 || b == 0x7f => return Err(PathError::BadByte),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::BadByte)?;
                match decoded {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b if b < 0x20 || b == 0x7f => return Err(PathError::BadByte),
                    _ => {}
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let segments = path[1..].split('/');
    let count = path[1..].split('/').count();
    for (n, segment) in segments.enumerate() {
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
