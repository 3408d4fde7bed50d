//! WeCom callbacks (XML, or the JSON variant). Input: `[mode, aux, payload…]`.
//!
//! `mode` bits 0-2 choose the wrapping of `payload`:
//! - 0 RAW: POST; `payload` is the query string, a blank line, then the body, sent as is;
//! - 1 XML: `payload` is the decrypted message, framed for our CorpID, in the XML envelope;
//! - 2 JSON: the same in the JSON envelope (`{"encrypt": …}`);
//! - 3 ECHO: GET URL verification with `payload` as the echo string, signed;
//! - 4 RAW_GET: GET; `payload` is the query string;
//! - 5 MISADDRESSED: as XML but framed for another CorpID (must be refused);
//! - 6 FRAME: `payload` is the raw AES plaintext, encrypted and signed;
//! - 7 OUTER: `payload` is the outer XML body, with every `$ENC` replaced by a valid signed
//!   ciphertext of a real approval event: the envelope parser sees fuzzer bytes while the
//!   signature still verifies.
//!
//! Bits 3-4 tamper with a signed request: 0 none, 1 stale timestamp, 2 a wrong signature,
//! 3 the signature in upper case (still valid).

use crate::wx::raw_encrypt;
use crate::{Expect, Reader, request, run_callback, split_head};
use imbridge::crypto::sorted_sha1_hex;
use imbridge::crypto::wx::WxKey;
use imbridge::http::percent_encode;
use imbridge::model::{ImApp, Platform};

pub const CORP_ID: &str = "wwfzcorp";
pub const TOKEN: &str = "fz-wecom-token";
pub const NONCE: &str = "fznonce3";

pub const RAW: u8 = 0;
pub const XML: u8 = 1;
pub const JSON: u8 = 2;
pub const ECHO: u8 = 3;
pub const RAW_GET: u8 = 4;
pub const MISADDRESSED: u8 = 5;
pub const FRAME: u8 = 6;
pub const OUTER: u8 = 7;

pub fn app() -> ImApp {
    crate::app(
        Platform::Wecom,
        CORP_ID,
        Some(crate::WX_AES_KEY),
        Some(TOKEN),
    )
}

fn key() -> WxKey {
    WxKey::new(crate::WX_AES_KEY).expect("valid key")
}

/// A `sys_approval_change` as WeCom sends it: approver u1 agreed, the approval is approved.
pub fn approval_event(sp_no: &str, sp_status: u32) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[sys]]>\
         </FromUserName><CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
         <Event><![CDATA[sys_approval_change]]></Event><AgentID>1000002</AgentID>\
         <ApprovalInfo><SpNo>{sp_no}</SpNo><SpName><![CDATA[imbridge]]></SpName>\
         <SpStatus>{sp_status}</SpStatus><SpRecord><SpStatus>2</SpStatus>\
         <ApproverAttr>1</ApproverAttr><Details><Approver><UserId><![CDATA[u1]]></UserId>\
         </Approver><Speech><![CDATA[ok]]></Speech><SpStatus>2</SpStatus>\
         <SpTime>{now}</SpTime></Details></SpRecord><StatuChangeEvent>2</StatuChangeEvent>\
         </ApprovalInfo></xml>",
        now = crate::NOW_S
    )
}

pub fn xml_envelope(encrypted: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]>\
         </Encrypt><AgentID><![CDATA[1000002]]></AgentID></xml>"
    )
}

/// The signed query; `extra` is appended (e.g. `&echostr=…`).
pub fn query(encrypted: &str, ts: u64, tamper: u8, extra: &str) -> String {
    let ts = ts.to_string();
    let mut sig = sorted_sha1_hex(&[TOKEN, &ts, NONCE, encrypted]);
    match tamper {
        2 => sig.replace_range(0..1, if sig.starts_with('0') { "1" } else { "0" }),
        3 => sig = sig.to_uppercase(),
        _ => {}
    }
    format!("msg_signature={sig}&timestamp={ts}&nonce={NONCE}{extra}")
}

pub fn run(data: &[u8]) -> imbridge::error::Result<usize> {
    let mut r = Reader::new(data);
    let mode = r.byte();
    let aux = r.byte();
    let payload = r.rest();
    let wrap = mode & 7;
    let tamper = (mode >> 3) & 3;
    let ts = if tamper == 1 {
        crate::NOW_S + 601
    } else {
        crate::NOW_S
    };
    let random = [aux; 16];
    let signed_expect = if matches!(tamper, 1 | 2) {
        Expect::Reject
    } else {
        Expect::Any
    };
    let (method, q, body, expect) = match wrap {
        RAW => {
            let (head, body) = split_head(payload);
            let q = String::from_utf8_lossy(head).into_owned();
            ("POST", q, body.to_vec(), Expect::Any)
        }
        RAW_GET => {
            let q = String::from_utf8_lossy(payload).into_owned();
            ("GET", q, Vec::new(), Expect::NoStateChange)
        }
        ECHO => {
            let enc = key().encrypt(random, payload, CORP_ID);
            let extra = format!("&echostr={}", percent_encode(&enc));
            let expect = if signed_expect == Expect::Reject {
                Expect::Reject
            } else {
                Expect::NoStateChange
            };
            ("GET", query(&enc, ts, tamper, &extra), Vec::new(), expect)
        }
        OUTER => {
            let enc = key().encrypt(
                random,
                approval_event(crate::PENDING, 2).as_bytes(),
                CORP_ID,
            );
            let body = String::from_utf8_lossy(payload).replace("$ENC", &enc);
            (
                "POST",
                query(&enc, ts, tamper, ""),
                body.into_bytes(),
                signed_expect,
            )
        }
        _ => {
            let enc = match wrap {
                MISADDRESSED => key().encrypt(random, payload, "wwothercorp"),
                FRAME => raw_encrypt(payload),
                _ => key().encrypt(random, payload, CORP_ID),
            };
            let body = if wrap == JSON {
                serde_json::json!({ "encrypt": enc, "agentid": 1000002 }).to_string()
            } else {
                xml_envelope(&enc)
            };
            let expect = if wrap == MISADDRESSED {
                Expect::Reject
            } else {
                signed_expect
            };
            (
                "POST",
                query(&enc, ts, tamper, ""),
                body.into_bytes(),
                expect,
            )
        }
    };
    let req = request(method, &q, Vec::new(), body);
    run_callback(
        &app(),
        &req,
        expect,
        &[crate::WX_AES_KEY, crate::APP_SECRET],
    )
}

/// The XML parser and event extraction alone, on arbitrary bytes.
pub fn run_xml(data: &[u8]) {
    use imbridge::platform::wecom::{Node, inbound_events, parse_xml};
    fn depth(n: &Node) -> usize {
        1 + n.children.iter().map(depth).max().unwrap_or(0)
    }
    if let Ok(node) = parse_xml(data) {
        assert!(depth(&node) <= 16, "XML deeper than the limit was accepted");
        let _ = inbound_events(&node);
    }
}

pub fn input(mode: u8, aux: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![mode, aux];
    v.extend_from_slice(payload);
    v
}
