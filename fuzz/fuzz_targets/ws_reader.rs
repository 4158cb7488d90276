//! Fuzz target `ws_reader`: feeds arbitrary bytes to `checks::ws_reader` (see fuzz/src/checks.rs).
//! It must never hold state between runs.

#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::ws_reader(data));
