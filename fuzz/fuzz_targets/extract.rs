//! An arbitrary record (key, payload, headers with raw name bytes) through
//! `KeyExtractor::extract` for every key source, with and without fingerprint
//! fields; the invariants are checked in `kdedup::event::fuzzing::extract`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kdedup::event::fuzzing::extract(data));
