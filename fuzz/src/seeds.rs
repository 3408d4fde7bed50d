//! Real-format samples for each target, in that target's framing. `cargo run --example
//! gen_corpus` writes them to `fuzz/corpus/<target>/`; regenerate after changing a framing.

use crate::{dingtalk, feishu, wecom};
use serde_json::{Value, json};

pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub data: Vec<u8>,
}

fn seed(target: &'static str, name: &str, data: Vec<u8>) -> Seed {
    Seed {
        target,
        name: name.into(),
        data,
    }
}

fn v1(uuid: &str, event: Value) -> Vec<u8> {
    json!({
        "uuid": uuid, "token": feishu::TOKEN, "ts": "1700000000.0000000",
        "type": "event_callback", "event": event,
    })
    .to_string()
    .into_bytes()
}

fn v2(event_id: &str, event_type: &str, event: Value) -> Vec<u8> {
    json!({
        "schema": "2.0",
        "header": {
            "event_id": event_id, "event_type": event_type, "create_time": "1700000000000",
            "token": feishu::TOKEN, "app_id": "cli_fuzz", "tenant_key": "tk",
        },
        "event": event,
    })
    .to_string()
    .into_bytes()
}

fn feishu_instance(code: &str, status: &str) -> Value {
    json!({
        "type": "approval_instance", "approval_code": "C1", "instance_code": code,
        "status": status, "operate_time": "1700000000000",
    })
}

fn feishu_task(code: &str, user: &str, status: &str) -> Value {
    json!({
        "type": "approval_task", "approval_code": "C1", "instance_code": code,
        "task_id": "7000000000000000001", "open_id": user, "user_id": user,
        "status": status, "operate_time": "1700000000000",
    })
}

fn feishu_seeds() -> Vec<Seed> {
    use feishu::*;
    let t = "feishu_callback";
    let approved = v1("uuid-1", feishu_instance(crate::PENDING, "APPROVED"));
    let handshake = json!({"challenge": "c-1", "token": TOKEN, "type": "url_verification"})
        .to_string()
        .into_bytes();
    let mut out = vec![
        seed(
            t,
            "v1_instance_approved",
            input(SIGNED, T_NONE, 0, &approved),
        ),
        seed(
            t,
            "v1_task_approved",
            input(
                SIGNED,
                T_NONE,
                0,
                &v1("uuid-2", feishu_task(crate::PENDING, "u1", "APPROVED")),
            ),
        ),
        seed(
            t,
            "v2_task_rejected",
            input(
                SIGNED,
                T_NONE,
                0,
                &v2(
                    "ev-1",
                    "approval_task",
                    feishu_task(crate::PENDING, "u2", "REJECTED"),
                ),
            ),
        ),
        seed(
            t,
            "v2_terminal_instance_rejected",
            input(
                SIGNED,
                T_NONE,
                0,
                &v2(
                    "ev-2",
                    "approval_instance",
                    feishu_instance(crate::APPROVED, "REJECTED"),
                ),
            ),
        ),
        seed(
            t,
            "v2_message_ignored",
            input(
                SIGNED,
                T_NONE,
                0,
                &v2(
                    "ev-3",
                    "im.message.receive_v1",
                    json!({"message": {"content": "{}"}}),
                ),
            ),
        ),
        seed(
            t,
            "url_verification_encrypted",
            input(ENCRYPTED, 0, 0, &handshake),
        ),
        seed(
            t,
            "url_verification_plain",
            input(PLAIN | (2 << 3), 0, 0, &handshake),
        ),
        seed(
            t,
            "plain_v1_token_only",
            input(PLAIN | (2 << 3), 0, 0, &approved),
        ),
        seed(t, "signed_not_json", input(SIGNED, T_NONE, 0, b"hello")),
        seed(
            t,
            "signed_deep_json",
            input(SIGNED, T_NONE, 0, &[b'['; 300]),
        ),
        seed(t, "get_method", input(SIGNED | 4, T_NONE, 0, &approved)),
    ];
    for (name, tamper) in [
        ("stale", T_STALE),
        ("no_sig", T_NO_SIG),
        ("upper_sig", T_UPPER_SIG),
        ("padded_ts", T_PADDED_TS),
        ("dup_sig", T_DUP_SIG),
        ("wrong_nonce", T_WRONG_NONCE),
        ("flip_body", T_FLIP_BODY),
    ] {
        out.push(seed(
            t,
            &format!("tamper_{name}"),
            input(SIGNED, tamper, 17, &approved),
        ));
    }
    // A whole signed request in the RAW framing: headers, blank line, body.
    let body = encrypted_body(&approved);
    let mut raw = Vec::new();
    for (k, v) in signed_headers(&crate::NOW_S.to_string(), NONCE, &body) {
        raw.extend_from_slice(format!("{k}: {v}\n").as_bytes());
    }
    raw.push(b'\n');
    raw.extend_from_slice(&body);
    out.push(seed(t, "raw_signed_request", input(RAW, 0, 0, &raw)));
    out
}

fn dingtalk_seeds() -> Vec<Seed> {
    use dingtalk::*;
    let t = "dingtalk_callback";
    let task = json!({
        "EventType": "bpms_task_change", "processInstanceId": crate::PENDING, "corpId": "dingcorp",
        "createTime": 1_699_999_000_000u64, "type": "finish", "staffId": "u1",
        "processCode": "PROC-1", "taskId": 42, "finishTime": 1_700_000_000_000u64,
        "result": "agree", "remark": "ok",
    })
    .to_string();
    let inst = json!({
        "EventType": "bpms_instance_change", "processInstanceId": crate::PENDING,
        "type": "finish", "result": "refuse", "finishTime": 1_700_000_000_000u64,
    })
    .to_string();
    let terminate = json!({
        "EventType": "bpms_instance_change", "processInstanceId": crate::APPROVED,
        "type": "terminate",
    })
    .to_string();
    let check_url = json!({"EventType": "check_url"}).to_string();
    // A frame whose length field claims more bytes than follow.
    let mut bad_len = vec![0u8; 16];
    bad_len.extend_from_slice(&1000u32.to_be_bytes());
    bad_len.extend_from_slice(b"{}dingfzappkey");
    bad_len.resize(64, 10);
    let enc = imbridge::crypto::wx::WxKey::new(crate::WX_AES_KEY)
        .expect("key")
        .encrypt([3; 16], task.as_bytes(), APP_KEY);
    let mut raw = query(&enc, crate::NOW_MS, 0, false).into_bytes();
    raw.extend_from_slice(b"\n\n");
    raw.extend_from_slice(&body(&enc));
    vec![
        seed(t, "task_finish_agree", input(SIGNED, 1, task.as_bytes())),
        seed(
            t,
            "instance_finish_refuse",
            input(SIGNED, 2, inst.as_bytes()),
        ),
        seed(
            t,
            "terminal_terminate",
            input(SIGNED, 3, terminate.as_bytes()),
        ),
        seed(t, "check_url", input(SIGNED, 4, check_url.as_bytes())),
        seed(
            t,
            "alt_names_upper_sig",
            input(SIGNED | (3 << 3) | 32, 5, task.as_bytes()),
        ),
        seed(t, "stale", input(SIGNED | (1 << 3), 6, task.as_bytes())),
        seed(t, "wrong_sig", input(SIGNED | (2 << 3), 7, task.as_bytes())),
        seed(t, "misaddressed", input(MISADDRESSED, 8, task.as_bytes())),
        seed(t, "frame_bad_length", input(FRAME, 0, &bad_len)),
        seed(t, "get_method", input(SIGNED | 4, 9, task.as_bytes())),
        seed(t, "raw_signed_request", input(RAW, 0, &raw)),
    ]
}

fn wecom_seeds() -> Vec<Seed> {
    use wecom::*;
    let t = "wecom_callback";
    let ev = approval_event(crate::PENDING, 2);
    let terminal = approval_event(crate::APPROVED, 3);
    let json_plain = json!({
        "ToUserName": CORP_ID, "FromUserName": "sys", "CreateTime": crate::NOW_S,
        "MsgType": "event", "Event": "sys_approval_change",
        "ApprovalInfo": {"SpNo": crate::PENDING, "SpStatus": 3, "SpRecord": [{"SpStatus": 3,
            "Details": [{"Approver": {"UserId": "u2"}, "SpStatus": 3, "SpTime": crate::NOW_S}]}]},
    })
    .to_string();
    let text = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName>u1</FromUserName>\
         <CreateTime>1700000000</CreateTime><MsgType>text</MsgType><Content>hi &amp; &#x4e2d;\
         </Content><MsgId>123</MsgId><AgentID>1000002</AgentID></xml>"
    );
    let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">\
                <!ENTITY lol2 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">]>\
                <xml><Encrypt>&lol2;</Encrypt></xml>";
    let enc = imbridge::crypto::wx::WxKey::new(crate::WX_AES_KEY)
        .expect("key")
        .encrypt([5; 16], ev.as_bytes(), CORP_ID);
    let mut raw = query(&enc, crate::NOW_S, 0, "").into_bytes();
    raw.extend_from_slice(b"\n\n");
    raw.extend_from_slice(xml_envelope(&enc).as_bytes());
    vec![
        seed(t, "xml_approval_approved", input(XML, 1, ev.as_bytes())),
        seed(
            t,
            "xml_terminal_rejected",
            input(XML, 2, terminal.as_bytes()),
        ),
        seed(t, "json_envelope", input(JSON, 3, ev.as_bytes())),
        seed(t, "json_plaintext", input(XML, 4, json_plain.as_bytes())),
        seed(t, "xml_text_message", input(XML, 5, text.as_bytes())),
        seed(t, "echo", input(ECHO, 6, b"1616140317555161061")),
        seed(
            t,
            "raw_get",
            input(
                RAW_GET,
                0,
                b"msg_signature=0&timestamp=1&nonce=2&echostr=a%2Bb",
            ),
        ),
        seed(t, "stale", input(XML | (1 << 3), 7, ev.as_bytes())),
        seed(t, "wrong_sig", input(XML | (2 << 3), 8, ev.as_bytes())),
        seed(t, "upper_sig", input(XML | (3 << 3), 9, ev.as_bytes())),
        seed(t, "misaddressed", input(MISADDRESSED, 10, ev.as_bytes())),
        seed(t, "frame", input(FRAME, 0, &[0x20; 64])),
        seed(
            t,
            "outer_envelope",
            input(OUTER, 11, xml_envelope("$ENC").as_bytes()),
        ),
        seed(t, "outer_json", input(OUTER, 12, br#"{"Encrypt":"$ENC"}"#)),
        seed(t, "outer_entity_bomb", input(OUTER, 13, bomb.as_bytes())),
        seed(t, "raw_signed_request", input(RAW, 0, &raw)),
    ]
}

fn xml_seeds() -> Vec<Seed> {
    let t = "wecom_xml";
    let deep = format!("{}x{}", "<a>".repeat(20), "</a>".repeat(20));
    vec![
        seed(
            t,
            "approval_event",
            wecom::approval_event(crate::PENDING, 2).into_bytes(),
        ),
        seed(
            t,
            "entity_bomb",
            b"<!DOCTYPE x [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;\">]><xml>&b;</xml>".to_vec(),
        ),
        seed(t, "undeclared_entity", b"<xml><A>&foo;</A></xml>".to_vec()),
        seed(
            t,
            "char_refs",
            b"<xml><A>&#65;&#x42;&lt;&amp;<![CDATA[<x>]]></A></xml>".to_vec(),
        ),
        seed(t, "too_deep", deep.into_bytes()),
        seed(t, "mismatched", b"<xml><A></B></xml>".to_vec()),
    ]
}

fn wx_seeds() -> Vec<Seed> {
    let t = "wx_frame";
    let mut rt = vec![2u8];
    rt.extend_from_slice(&[9; 16]);
    rt.push(8);
    rt.extend_from_slice(b"wwfzcorp<xml>hi</xml>");
    let mut frame = vec![4u8];
    frame.extend_from_slice(&[0; 16]);
    frame.extend_from_slice(&2u32.to_be_bytes());
    frame.extend_from_slice(b"{}wwfzcorp");
    frame.resize(33, 0x06);
    vec![
        seed(
            t,
            "key",
            [&[0u8][..], crate::WX_AES_KEY.as_bytes()].concat(),
        ),
        seed(
            t,
            "decrypt_garbage",
            b"\x01AAAAAAAAAAAAAAAAAAAAAA==".to_vec(),
        ),
        seed(t, "roundtrip", rt),
        seed(
            t,
            "bitflip",
            b"\x03\x01\x07<xml><Encrypt>x</Encrypt></xml>".to_vec(),
        ),
        seed(t, "raw_frame", frame),
        seed(
            t,
            "feishu_docs_vector",
            b"\x05P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=".to_vec(),
        ),
        seed(
            t,
            "feishu_roundtrip",
            b"\x060123456789abcdef{\"a\":1}".to_vec(),
        ),
    ]
}

/// Each flow against every platform's documented replies, recorded in order.
fn reply_seeds() -> Vec<Seed> {
    use crate::replies::{BY_MOBILE, PLATFORMS, recorded};
    let ops = [
        ("start", 0),
        ("start_by_mobile", BY_MOBILE),
        ("refresh_pending", 1),
        ("refresh_approved", 2),
        ("cancel", 3),
        ("notify_users", 4),
        ("notify_chat", 5),
        ("notify_webhook", 6),
    ];
    PLATFORMS
        .into_iter()
        .flat_map(|p| {
            ops.into_iter().map(move |(name, op)| {
                let name = format!("{}_{name}", p.name());
                seed("platform_replies", &name, recorded(p, op))
            })
        })
        .collect()
}

fn query_seeds() -> Vec<Seed> {
    let t = "query";
    [
        (
            "signed",
            "msg_signature=5c4e&timestamp=1700000000&nonce=n1&echostr=a%2Bb%2F%3D",
        ),
        ("bad_escape", "x=%zz&y=%f"),
        ("latin1", "x=%e9"),
        ("utf8", "x=%C3%A9&%E4%B8%AD=1"),
        ("odd_pairs", "?a=b=c&&=&x&=v"),
    ]
    .into_iter()
    .map(|(n, q)| seed(t, n, q.as_bytes().to_vec()))
    .collect()
}

pub fn all() -> Vec<Seed> {
    [
        feishu_seeds(),
        dingtalk_seeds(),
        wecom_seeds(),
        xml_seeds(),
        wx_seeds(),
        query_seeds(),
        reply_seeds(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    //! The seeds reach what they are named after (so the corpus starts deep in each parser),
    //! and every one passes its target's invariants.
    use super::*;
    use imbridge::error::Error;

    fn outcome(target: &str, name: &str) -> imbridge::error::Result<usize> {
        let s = all()
            .into_iter()
            .find(|s| s.target == target && s.name == name)
            .expect("seed exists");
        match target {
            "feishu_callback" => feishu::run(&s.data),
            "dingtalk_callback" => dingtalk::run(&s.data),
            _ => wecom::run(&s.data),
        }
    }

    #[test]
    fn every_seed_passes_its_target() {
        for s in all() {
            match s.target {
                "feishu_callback" => drop(feishu::run(&s.data)),
                "dingtalk_callback" => drop(dingtalk::run(&s.data)),
                "wecom_callback" => drop(wecom::run(&s.data)),
                "wecom_xml" => wecom::run_xml(&s.data),
                "wx_frame" => crate::wx::run(&s.data),
                "platform_replies" => drop(crate::replies::run(&s.data)),
                _ => {}
            }
        }
    }

    #[test]
    fn valid_seeds_change_the_pending_approval() {
        for (t, n) in [
            ("feishu_callback", "v1_instance_approved"),
            ("feishu_callback", "v1_task_approved"),
            ("feishu_callback", "v2_task_rejected"),
            ("feishu_callback", "plain_v1_token_only"),
            ("feishu_callback", "tamper_upper_sig"),
            ("feishu_callback", "tamper_padded_ts"),
            ("feishu_callback", "raw_signed_request"),
            ("dingtalk_callback", "task_finish_agree"),
            ("dingtalk_callback", "instance_finish_refuse"),
            ("dingtalk_callback", "alt_names_upper_sig"),
            ("dingtalk_callback", "raw_signed_request"),
            ("wecom_callback", "xml_approval_approved"),
            ("wecom_callback", "json_envelope"),
            ("wecom_callback", "json_plaintext"),
            ("wecom_callback", "upper_sig"),
            ("wecom_callback", "outer_envelope"),
            ("wecom_callback", "outer_json"),
            ("wecom_callback", "raw_signed_request"),
            // Decisions are recorded even after a terminal status (the status itself stays;
            // `check` asserts that).
            ("wecom_callback", "xml_terminal_rejected"),
        ] {
            assert_eq!(outcome(t, n), Ok(1), "{t}/{n}");
        }
    }

    #[test]
    fn handshakes_and_ignored_events_change_nothing() {
        for (t, n) in [
            ("feishu_callback", "url_verification_encrypted"),
            ("feishu_callback", "url_verification_plain"),
            ("feishu_callback", "v2_message_ignored"),
            ("feishu_callback", "v2_terminal_instance_rejected"),
            ("dingtalk_callback", "check_url"),
            ("dingtalk_callback", "terminal_terminate"),
            ("wecom_callback", "echo"),
            ("wecom_callback", "xml_text_message"),
        ] {
            assert_eq!(outcome(t, n), Ok(0), "{t}/{n}");
        }
    }

    /// A frame addressed to another app is refused like any other unreadable ciphertext
    /// (`crypto::undecryptable`): one answer, so the error tells an attacker nothing.
    #[test]
    fn forged_seeds_are_refused() {
        for (t, n, kind) in [
            ("feishu_callback", "tamper_stale", "unauthorized"),
            ("feishu_callback", "tamper_dup_sig", "unauthorized"),
            ("feishu_callback", "tamper_wrong_nonce", "unauthorized"),
            ("feishu_callback", "tamper_no_sig", "unauthorized"),
            ("feishu_callback", "tamper_flip_body", "any"),
            ("feishu_callback", "signed_not_json", "invalid-input"),
            ("feishu_callback", "signed_deep_json", "invalid-input"),
            ("feishu_callback", "get_method", "invalid-input"),
            ("dingtalk_callback", "stale", "unauthorized"),
            ("dingtalk_callback", "wrong_sig", "unauthorized"),
            ("dingtalk_callback", "misaddressed", "invalid-input"),
            ("dingtalk_callback", "frame_bad_length", "invalid-input"),
            ("wecom_callback", "stale", "unauthorized"),
            ("wecom_callback", "wrong_sig", "unauthorized"),
            ("wecom_callback", "misaddressed", "invalid-input"),
            ("wecom_callback", "outer_entity_bomb", "invalid-input"),
        ] {
            let e = outcome(t, n).expect_err(n);
            let got = match e {
                Error::Unauthorized(_) => "unauthorized",
                Error::InvalidInput(_) => "invalid-input",
                _ => "other",
            };
            assert!(kind == "any" || got == kind, "{t}/{n}: {e}");
        }
    }

    fn reply_seed(name: &str) -> Vec<u8> {
        all()
            .into_iter()
            .find(|s| s.target == "platform_replies" && s.name == name)
            .expect("seed exists")
            .data
    }

    #[test]
    fn reply_seeds_complete_their_flows() {
        use crate::replies::{Outcome, run};
        use imbridge::model::ApprovalStatus;
        for p in ["feishu", "dingtalk", "wecom"] {
            for op in ["start", "start_by_mobile", "refresh_pending"] {
                let name = format!("{p}_{op}");
                match run(&reply_seed(&name)) {
                    // Each stand-in reports the approval approved, so the read-back of a
                    // start and a refresh both move it.
                    Ok(Outcome::Approval(a)) => {
                        let key = if op == "refresh_pending" {
                            "key-P-1"
                        } else {
                            "deploy-42"
                        };
                        assert_eq!(a.key, key, "{name} ran another flow: {a:?}");
                        assert_eq!(a.status, ApprovalStatus::Approved, "{name}: {a:?}");
                        assert!(!a.decisions.is_empty(), "{name}: {a:?}");
                    }
                    other => panic!("{name}: {other:?}"),
                }
            }
            let name = format!("{p}_refresh_approved");
            assert!(
                matches!(run(&reply_seed(&name)), Ok(Outcome::Approval(a))
                if a.status == ApprovalStatus::Approved),
                "{name}"
            );
            let name = format!("{p}_notify_users");
            assert_eq!(run(&reply_seed(&name)), Ok(Outcome::Sent), "{name}");
        }
        for name in ["feishu_cancel", "dingtalk_cancel"] {
            assert!(
                matches!(run(&reply_seed(name)), Ok(Outcome::Approval(a))
                if a.status == ApprovalStatus::Canceled),
                "{name}"
            );
        }
        // WeCom cannot withdraw; its refusal is followed by one read, and the stand-in says
        // approved, which is then the answer.
        assert!(matches!(
            run(&reply_seed("wecom_cancel")),
            Ok(Outcome::Approval(a)) if a.status == ApprovalStatus::Approved
        ));
        for name in [
            "feishu_notify_chat",
            "wecom_notify_chat",
            "feishu_notify_webhook",
            "dingtalk_notify_webhook",
            "wecom_notify_webhook",
        ] {
            assert_eq!(run(&reply_seed(name)), Ok(Outcome::Sent), "{name}");
        }
        // No API for it: said so instead of pretending.
        assert!(matches!(
            run(&reply_seed("dingtalk_notify_chat")),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn bad_replies_are_typed_errors() {
        use crate::replies::{SEPARATOR, TRANSPORT, run};
        let framed = |platform: u8, op: u8, replies: &[&[u8]]| {
            let mut v = vec![platform, op];
            for (i, r) in replies.iter().enumerate() {
                if i > 0 {
                    v.push(SEPARATOR);
                }
                v.extend_from_slice(r);
            }
            v
        };
        // A refresh whose token request meets an HTML error page (status 500 at index 9).
        let html = framed(0, 1, &[b"\x04<html>bad gateway</html>"]);
        assert!(matches!(run(&html), Err(Error::Platform { .. })));
        // Every attempt reset: the retries give up with a transport error.
        let reset = [TRANSPORT];
        let resets = framed(2, 1, &[&reset, &reset, &reset]);
        assert!(matches!(run(&resets), Err(Error::Transport(_))));
        // A token, then an instance read that is JSON but not an object.
        let mut tok = vec![0u8];
        tok.extend_from_slice(br#"{"errcode":0,"access_token":"t","expires_in":7200}"#);
        let odd = framed(2, 1, &[&tok, b"\x00[1,2,3]"]);
        assert!(
            matches!(run(&odd), Err(Error::Platform { .. })),
            "{:?}",
            run(&odd)
        );
        // No reply at all.
        assert!(matches!(run(&[1, 4]), Err(Error::Transport(_))));
    }
}
