#![no_main]
//! See `imbridge_fuzz::wecom` for the input framing and the invariants checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| imbridge_fuzz::wecom::run_xml(data));
