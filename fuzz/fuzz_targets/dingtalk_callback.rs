#![no_main]
//! See `imbridge_fuzz::dingtalk` for the input framing and the invariants checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = imbridge_fuzz::dingtalk::run(data);
});
