#![no_main]
//! Query strings and %-escapes as callbacks deliver them (DingTalk and WeCom put the signature,
//! timestamp, nonce and WeCom's echostr there).

use imbridge::http::{parse_query, percent_decode, percent_encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = parse_query(&s);
    // Encoding then decoding is the identity, for any string.
    assert_eq!(
        percent_decode(&percent_encode(&s)).expect("own encoding"),
        s
    );
    if let Ok(d) = percent_decode(&s) {
        // Decoding happens exactly once: without '%', nothing changes.
        if !s.contains('%') {
            assert_eq!(d, s);
        }
    }
    // Any value survives a round trip through a query string, as key and as value.
    let e = percent_encode(&s);
    let q = parse_query(&format!("k={e}&{e}=v")).expect("own encoding");
    assert_eq!(q[0], ("k".to_string(), s.to_string()));
    if !s.is_empty() {
        assert_eq!(q[1], (s.to_string(), "v".to_string()));
    }
});
