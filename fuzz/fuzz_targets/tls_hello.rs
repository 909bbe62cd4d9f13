//! `cargo xtask fuzz --target tls_hello`: see [`egress_fuzz::tls_hello`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::tls_hello(data));
