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
