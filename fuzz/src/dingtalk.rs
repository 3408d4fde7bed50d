//! DingTalk callbacks. Input: `[mode, aux, payload…]`.
//!
//! `mode` bits 0-1 choose the wrapping of `payload`:
//! - 0 RAW: `payload` is the query string, a blank line, then the body, sent as is;
//! - 1 SIGNED: `payload` is the event JSON, in a WX frame addressed to our AppKey, signed;
//! - 2 MISADDRESSED: as SIGNED but framed for another AppKey (must be refused);
//! - 3 FRAME: `payload` is the raw AES plaintext (random ‖ length ‖ message ‖ receive id ‖
//!   padding, all fuzzer-chosen), encrypted and signed, to reach the frame checks.
//!
//! bit 2: GET instead of POST. Bits 3-4 tamper with a signed push: 0 none, 1 stale
//! timestamp, 2 a wrong signature, 3 the signature in upper case (still valid). Bit 5: the
//! alternative parameter names (`msg_signature`, `timeStamp`).

use crate::wx::raw_encrypt;
use crate::{Expect, Reader, request, run_callback, split_head};
use imbridge::crypto::sorted_sha1_hex;
use imbridge::crypto::wx::WxKey;
use imbridge::model::{ImApp, Platform};

pub const APP_KEY: &str = "dingfzappkey";
pub const TOKEN: &str = "fz-dingtalk-token";
pub const NONCE: &str = "fznonce2";

pub const RAW: u8 = 0;
pub const SIGNED: u8 = 1;
pub const MISADDRESSED: u8 = 2;
pub const FRAME: u8 = 3;

pub fn app() -> ImApp {
    crate::app(
        Platform::Dingtalk,
        APP_KEY,
        Some(crate::WX_AES_KEY),
        Some(TOKEN),
    )
}

fn key() -> WxKey {
    WxKey::new(crate::WX_AES_KEY).expect("valid key")
}

pub fn query(encrypted: &str, ts_ms: u64, tamper: u8, alt_names: bool) -> String {
    let ts = ts_ms.to_string();
    let mut sig = sorted_sha1_hex(&[TOKEN, &ts, NONCE, encrypted]);
    match tamper {
        2 => sig.replace_range(0..1, if sig.starts_with('0') { "1" } else { "0" }),
        3 => sig = sig.to_uppercase(),
        _ => {}
    }
    let (s, t) = if alt_names {
        ("msg_signature", "timeStamp")
    } else {
        ("signature", "timestamp")
    };
    format!("{s}={sig}&{t}={ts}&nonce={NONCE}")
}

pub fn body(encrypted: &str) -> Vec<u8> {
    serde_json::json!({ "encrypt": encrypted })
        .to_string()
        .into_bytes()
}

pub fn run(data: &[u8]) -> imbridge::error::Result<usize> {
    let mut r = Reader::new(data);
    let mode = r.byte();
    let aux = r.byte();
    let payload = r.rest();
    let method = if mode & 4 != 0 { "GET" } else { "POST" };
    let tamper = (mode >> 3) & 3;
    let (q, b, expect) = if mode & 3 == RAW {
        let (head, body) = split_head(payload);
        (
            String::from_utf8_lossy(head).into_owned(),
            body.to_vec(),
            Expect::Any,
        )
    } else {
        let random = [aux; 16];
        let encrypted = match mode & 3 {
            SIGNED => key().encrypt(random, payload, APP_KEY),
            MISADDRESSED => key().encrypt(random, payload, "dingotherapp"),
            _ => raw_encrypt(payload),
        };
        // DingTalk signs milliseconds and allows the same 600 s window.
        let ts_ms = if tamper == 1 {
            crate::NOW_MS - 601_000
        } else {
            crate::NOW_MS
        };
        let expect = match (mode & 3, tamper) {
            (_, 1 | 2) | (MISADDRESSED, _) => Expect::Reject,
            _ => Expect::Any,
        };
        (
            query(&encrypted, ts_ms, tamper, mode & 32 != 0),
            body(&encrypted),
            expect,
        )
    };
    let expect = if method == "GET" {
        Expect::Reject
    } else {
        expect
    };
    let req = request(method, &q, Vec::new(), b);
    run_callback(
        &app(),
        &req,
        expect,
        &[crate::WX_AES_KEY, crate::APP_SECRET],
    )
}

pub fn input(mode: u8, aux: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![mode, aux];
    v.extend_from_slice(payload);
    v
}
