//! Feishu/Lark callbacks. Input: `[mode, tamper, aux, payload…]`.
//!
//! `mode` bits 0-1 choose the wrapping of `payload`:
//! - 0 RAW: `payload` is `Header: value` lines, a blank line, then the body, sent as is;
//! - 1 SIGNED: `payload` is the inner JSON, encrypted and signed exactly as Feishu does, then
//!   altered according to `tamper`;
//! - 2 ENCRYPTED: encrypted but unsigned (how Feishu sends the URL handshake);
//! - 3 PLAIN: `payload` is the body, no headers (apps without an Encrypt Key).
//!
//! bit 2: GET instead of POST. Bits 3-4 choose the app's configuration: 0 key + token,
//! 1 key only, 2 token only, 3 neither (the key is the empty string).

use crate::{Expect, Reader, header_lines, request, run_callback, split_head};
use imbridge::crypto::feishu::{encrypt, signature};
use imbridge::model::{ImApp, Platform};

pub const KEY: &str = "fz-feishu-encrypt-key";
pub const TOKEN: &str = "fz-verification-token";
pub const NONCE: &str = "fznonce01";

pub const RAW: u8 = 0;
pub const SIGNED: u8 = 1;
pub const ENCRYPTED: u8 = 2;
pub const PLAIN: u8 = 3;

/// Tampering applied to a SIGNED push (`tamper % 8`).
pub const T_NONE: u8 = 0;
pub const T_STALE: u8 = 1;
pub const T_NO_SIG: u8 = 2;
pub const T_UPPER_SIG: u8 = 3;
pub const T_PADDED_TS: u8 = 4;
pub const T_DUP_SIG: u8 = 5;
pub const T_WRONG_NONCE: u8 = 6;
pub const T_FLIP_BODY: u8 = 7;

pub fn app(config: u8) -> ImApp {
    let (key, token) = match config & 3 {
        0 => (Some(KEY), Some(TOKEN)),
        1 => (Some(KEY), None),
        2 => (None, Some(TOKEN)),
        _ => (Some(""), None),
    };
    crate::app(Platform::Feishu, "cli_fuzz", key, token)
}

/// The `{"encrypt": …}` body for `plaintext`, with a fixed IV (the IV does not matter here).
pub fn encrypted_body(plaintext: &[u8]) -> Vec<u8> {
    serde_json::json!({"encrypt": encrypt(KEY, [0x42; 16], plaintext)})
        .to_string()
        .into_bytes()
}

pub fn signed_headers(ts: &str, nonce: &str, body: &[u8]) -> Vec<(String, String)> {
    vec![
        (
            "Content-Type".into(),
            "application/json; charset=utf-8".into(),
        ),
        ("X-Lark-Request-Timestamp".into(), ts.into()),
        ("X-Lark-Request-Nonce".into(), nonce.into()),
        ("X-Lark-Signature".into(), signature(ts, nonce, KEY, body)),
    ]
}

pub fn run(data: &[u8]) -> imbridge::error::Result<usize> {
    let mut r = Reader::new(data);
    let mode = r.byte();
    let tamper = r.byte() % 8;
    let aux = r.byte();
    let payload = r.rest();
    let method = if mode & 4 != 0 { "GET" } else { "POST" };
    let app = app(mode >> 3);
    let now = crate::NOW_S.to_string();

    let (headers, body, expect) = match mode & 3 {
        RAW => {
            let (head, body) = split_head(payload);
            (header_lines(head), body.to_vec(), Expect::Any)
        }
        SIGNED => {
            let mut body = encrypted_body(payload);
            let ts = match tamper {
                // Just outside Feishu's default window (eight hours), either way.
                T_STALE if aux & 1 == 0 => (crate::NOW_S - 8 * 3600 - 1).to_string(),
                T_STALE => (crate::NOW_S + 8 * 3600 + 1).to_string(),
                T_PADDED_TS => format!(" {now} "),
                _ => now.clone(),
            };
            let mut headers = signed_headers(&ts, NONCE, &body);
            let expect = match tamper {
                T_STALE | T_DUP_SIG | T_WRONG_NONCE | T_FLIP_BODY => Expect::Reject,
                T_NO_SIG => Expect::NoStateChange,
                _ => Expect::Any,
            };
            match tamper {
                T_NO_SIG => headers.retain(|(k, _)| k != "X-Lark-Signature"),
                T_UPPER_SIG => headers[3].1 = format!("  {}  ", headers[3].1.to_uppercase()),
                // The first of two signature headers wins and it is wrong.
                T_DUP_SIG => headers.insert(0, ("x-lark-signature".into(), "0".repeat(64))),
                T_WRONG_NONCE => headers[2].1.push('x'),
                T_FLIP_BODY if !body.is_empty() => {
                    let i = aux as usize % body.len();
                    body[i] ^= 1 << (aux % 8);
                }
                _ => {}
            }
            (headers, body, expect)
        }
        ENCRYPTED => (Vec::new(), encrypted_body(payload), Expect::NoStateChange),
        _ => (Vec::new(), payload.to_vec(), Expect::Any),
    };
    // A GET never gets past the method check.
    let expect = if method == "GET" {
        Expect::Reject
    } else {
        expect
    };
    let req = request(method, "", headers, body);
    run_callback(&app, &req, expect, &[KEY, crate::APP_SECRET])
}

/// A fuzz input in this framing.
pub fn input(mode: u8, tamper: u8, aux: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![mode, tamper, aux];
    v.extend_from_slice(payload);
    v
}
