//! Fuzz target `tunnel_socket`: feeds arbitrary bytes to `checks::tunnel_socket` (see fuzz/src/checks.rs).
//! It must never hold state between runs.

#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::tunnel_socket(data));
