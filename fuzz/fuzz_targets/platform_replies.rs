#![no_main]
//! See `imbridge_fuzz::replies` for the input framing and the invariants checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = imbridge_fuzz::replies::run(data);
});
