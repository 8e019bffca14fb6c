//! Arbitrary upstream response bytes, read by tokengate's lean HTTP/1.1 client and by hyper's
//! client over loopback: the verdicts (status, headers, body, reuse) must agree. The harness is
//! the one `tests/h1_differential.rs` runs on stable.
#![no_main]

#[path = "../../tests/h1_diff/mod.rs"]
mod h1_diff;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (lean, hyper) = rt.block_on(h1_diff::both(data.to_vec()));
    assert!(h1_diff::agree(data, &lean, &hyper), "lean {lean:?}\nhyper {hyper:?}");
});
