//! `cargo xtask fuzz --target git_push`: see [`egress_fuzz::git_push`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::git_push(data));
