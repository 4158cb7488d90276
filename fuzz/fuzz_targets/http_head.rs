//! Fuzz target `http_head`: feeds arbitrary bytes to `checks::http_head` (see fuzz/src/checks.rs).
//! It must never hold state between runs.

#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::http_head(data));
