//! `cargo xtask fuzz --target policy_yaml`: see [`egress_fuzz::policy_yaml`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| egress_fuzz::policy_yaml(data));
