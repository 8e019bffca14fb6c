//! Property tests for the code that hostile input reaches first: path checks, route matching
//! and configuration parsing. The same properties are fuzz targets under fuzz/.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tokengate::route::{RouteTable, check_path, upstream_path};

/// Characters that matter for traversal and encoding tricks.
fn tricky_path() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "%", "%00", "%25", "a", "eu", "gov",
        "%41", "~", "?",
    ]);
    prop::collection::vec(atoms, 0..12).prop_map(|parts| format!("/{}", parts.concat()))
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn accepted_paths_have_no_dot_segments_even_after_decoding(path in tricky_path()) {
        if check_path(&path).is_ok() {
            let decoded = percent_decode(&path);
            let text = String::from_utf8_lossy(&decoded);
            let segments: Vec<&str> = text[1..].split('/').collect();
            for (i, seg) in segments.iter().enumerate() {
                let head = seg.split(';').next().unwrap_or(seg);
                prop_assert!(head != "." && head != "..", "{path} decodes to a dot segment");
                prop_assert!(!seg.is_empty() || i + 1 == segments.len(), "{path} has an empty segment");
            }
            prop_assert!(!decoded.contains(&b'\\'));
            prop_assert!(!decoded.iter().any(|b| *b < 0x20));
        }
    }

    #[test]
    fn a_matched_prefix_is_a_whole_segment_prefix(path in tricky_path()) {
        let mut table = RouteTable::default();
        for p in ["/coreview/eu", "/coreview/gov", "/a", "/eu"] {
            table.insert(p, p.to_owned());
        }
        if check_path(&path).is_ok()
            && let Some((prefix, _)) = table.lookup(&path) {
                prop_assert!(path == prefix || path.starts_with(&format!("{prefix}/")), "{path} matched {prefix}");
                let up = upstream_path("/base", prefix, true, &path);
                prop_assert!(up.starts_with("/base/") || up == "/base/", "{up}");
                prop_assert!(!up.starts_with("//"));
            }
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in "[a-z_:\\- \\n\\[\\]{}$/.0-9'\"]{0,200}") {
        let _ = tokengate::config::env::with_lookup(|_| None, || tokengate::config::parse(&text, "fuzz.yaml"));
    }
}

/// Path pieces that spell the same segment several ways, or try to change it.
fn spelled_path() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "/",
        "a",
        "%61",
        "%41",
        "A",
        "dmin",
        "admin",
        "%61dmin",
        "%64%6d%69%6e",
        "users",
        "%7e",
        "%7E",
        "~",
        "%2D",
        "-",
        "%5F",
        "%20",
        "%c3%a9",
        "%C3%A9",
        ";",
        ";x=1",
        "%3b",
        "%3B",
        ".",
        "%2e",
        "%25",
        "%2f",
    ]);
    prop::collection::vec(atoms, 0..10).prop_map(|parts| format!("/{}", parts.concat()))
}

/// How an upstream reads a path: every escape of an unreserved character decoded, and other
/// escapes compared case-insensitively (RFC 3986 section 6.2.2).
fn upstream_view(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&path[i + 1..i + 3], 16)
        {
            if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                out.push(char::from(v));
            } else {
                out.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

fn spelled_table() -> RouteTable<&'static str> {
    let mut table = RouteTable::default();
    for p in ["/", "/a", "/a/admin", "/a/admin/users", "/A", "/a~", "/caf%C3%A9"] {
        table.insert(p, p);
    }
    table
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// The route that checks a request is the route the upstream serves: for any spelling, the
    /// chosen route is the one chosen for its normal form and for the upstream's reading, and the
    /// forwarded path normalises back into the route's upstream base path.
    #[test]
    fn the_route_chosen_is_the_route_of_the_normal_form(path in spelled_path()) {
        let table = spelled_table();
        let Ok(normal) = tokengate::route::normalize(&path) else { return Ok(()) };
        prop_assert_eq!(tokengate::route::normalize(&normal).unwrap(), normal.clone(), "normalize is idempotent");
        prop_assert_eq!(upstream_view(&path), upstream_view(&normal));
        let Ok(chosen) = table.route(&normal) else {
            // Refused because a `;` parameter would change the route: check that it would.
            let plain = tokengate::route::matrix_free(&normal).unwrap();
            prop_assert_ne!(table.lookup(&plain).map(|r| r.0), table.lookup(&normal).map(|r| r.0));
            return Ok(());
        };
        let (prefix, _) = chosen.unwrap();
        let upstream = upstream_view(&path);
        prop_assert_eq!(table.lookup(&upstream).map(|r| r.0), Some(prefix), "{} reads as {}", path, upstream);
        if let Some(plain) = tokengate::route::matrix_free(&upstream) {
            prop_assert_eq!(table.lookup(&plain).map(|r| r.0), Some(prefix), "servlet reading {}", plain);
        }
        for strip in [true, false] {
            let forwarded = upstream_path("/base/v1", prefix, strip, &normal);
            let again = tokengate::route::normalize(&forwarded).unwrap();
            prop_assert_eq!(&again, &forwarded, "the forwarded path is already normal");
            prop_assert!(again.starts_with("/base/v1/"), "{}", again);
        }
    }
}
