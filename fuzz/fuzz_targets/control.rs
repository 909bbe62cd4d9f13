//! `cargo xtask fuzz --target control`: see [`egress_fuzz::control`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::control(data));
