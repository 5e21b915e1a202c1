//! `Config::from_toml_with_env` over arbitrary TOML text and environment
//! overrides (after the first NUL byte, `SECTION__KEY=value` lines).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kdedup::config::fuzzing::config(data));
