//! Header-name decoding: UTF-8 kept, anything else as reversible `hex:`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kdedup::event::fuzzing::header_name(data));
