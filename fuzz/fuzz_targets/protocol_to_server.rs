//! Fuzz target `protocol_to_server`: feeds arbitrary bytes to `checks::protocol_to_server` (see fuzz/src/checks.rs).
//! It must never hold state between runs.

#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::protocol_to_server(data));
