//! `cargo xtask fuzz --target http_target`: see [`egress_fuzz::http_target`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::http_target(data));
