#![no_main]
//! See `imbridge_fuzz::wx` for the input framing and the invariants checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imbridge_fuzz::wx::run(data));
