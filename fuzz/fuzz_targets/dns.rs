//! `cargo xtask fuzz --target dns`: see [`egress_fuzz::dns`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::dns(data));
