//! Path checks and route matching on arbitrary request targets: never panic, and an accepted
//! path only ever matches a prefix on a segment boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::route::{check_path, upstream_path, RouteTable};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if check_path(path).is_err() {
        return;
    }
    assert!(!path.contains("/../") && !path.contains("/./") && !path.contains("//"));
    let mut table = RouteTable::default();
    for p in ["/", "/coreview/eu", "/coreview/gov", "/api/v2"] {
        table.insert(p, ());
    }
    if let Some((prefix, ())) = table.lookup(path) {
        assert!(prefix == "/" || path == prefix || path.starts_with(&format!("{prefix}/")));
        let up = upstream_path("/base", prefix, true, path);
        assert!(up.starts_with("/base/") && !up.starts_with("//"));
    }
});
