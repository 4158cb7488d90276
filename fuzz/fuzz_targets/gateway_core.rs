//! Fuzz target `gateway_core`: feeds arbitrary bytes to `checks::gateway_core` (see fuzz/src/checks.rs
//! and fuzz/src/gateway_core.rs). It must never hold state between runs.

#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gateway_core(data));
