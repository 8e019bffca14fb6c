//! Configuration loading on arbitrary text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tokengate::config::env::with_lookup(
        |name| (name == "SET").then(|| "value".to_string()),
        || tokengate::config::parse(text, "fuzz.yaml"),
    );
});
