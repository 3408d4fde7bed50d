//! The platforms' replies to the plugin's own requests: token, user lookups, definitions and
//! templates, creates, instance reads, cancels and messages. The callback targets reach only
//! what a callback sender controls; these bytes come from the platform (or whatever answers
//! in its place: a proxy, a captive portal, a misconfigured `api-base`). Input:
//! `[platform, op, reply (0xFF reply)*]`.
//!
//! `platform % 3`: Feishu, DingTalk, WeCom. `op` without its top bit, `% 7`, runs one export's
//! flow on a store holding a pending and an approved approval of that platform: 0
//! start-approval (the top bit, [`BY_MOBILE`]: approvers and initiator by mobile, so they are
//! looked up first), 1 get with refresh on the pending
//! approval, 2 the same on the approved one, 3 cancel the pending one, 4 notify users, 5
//! notify a chat, 6 notify through the platform's signed robot webhook.
//!
//! Every request the flow sends, token requests included, takes the next reply in order:
//! its first byte picks the status ([`STATUS`], by the low 4 bits), bit 4 adds a
//! `Retry-After` header, bit 5 makes the exchange a transport error instead; the rest is the
//! body. 0xFF never occurs in UTF-8, so JSON bodies cannot contain the separator. Once the
//! replies run out, every request fails as unreachable.
//!
//! Invariants, beyond "no panic": the flow sends a bounded number of requests and never
//! sleeps longer than the retry policy's longest wait; an approval it returns is the one
//! stored; the approved approval never changes status; a failed get or cancel leaves every
//! approval record as it was; and no error carries the app secret, the webhook's token or its
//! signing secret unless a reply did.

use crate::{APP_ID, APP_SECRET, NOW_MS, Reader};
use imbridge::approval::Record;
use imbridge::env::{Request, Response, fake::FakeEnv};
use imbridge::error::{Error, Result};
use imbridge::model::{
    Approval, ApprovalNode, ApprovalRequest, ApprovalStatus, ImApp, Level, Notification, Platform,
    RobotWebhook, SignMode, Target, UserRef,
};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

pub const SEPARATOR: u8 = 0xFF;
pub const STATUS: [u16; 16] = [
    200, 200, 200, 200, 400, 401, 403, 404, 429, 500, 502, 503, 504, 302, 204, 201,
];
pub const RETRY_AFTER: u8 = 0x10;
pub const TRANSPORT: u8 = 0x20;
pub const BY_MOBILE: u8 = 0x80;

pub const PLATFORMS: [Platform; 3] = [Platform::Feishu, Platform::Dingtalk, Platform::Wecom];
pub const PENDING: &str = "P-1";
pub const APPROVED: &str = "A-1";
/// More than any flow needs with every retry taken (start on DingTalk with three lookups,
/// template pages and a read-back, each retried); a loop would exceed it.
pub const MAX_REQUESTS: usize = 80;
/// The robot webhook's credentials: the token in its URL and its signing secret.
pub const HOOK_TOKEN: &str = "fzhooktoken0123456789";
pub const HOOK_SECRET: &str = "SECfzrobotsigningsecret";

pub fn app(platform: Platform) -> ImApp {
    crate::app(
        platform,
        "fzcorp",
        Some(crate::WX_AES_KEY),
        Some("fz-token"),
    )
}

/// The meta each platform's create stores, so get and cancel reach their requests.
fn meta(platform: Platform) -> Value {
    match platform {
        Platform::Dingtalk => json!({
            "nodes": [{"mode": "and", "approvers": ["u1", "u2"]}],
            "originator": "u0", "process_code": "PC-fz",
        }),
        Platform::Wecom => json!({"template_id": "TPL-fz", "creator": "u0"}),
        _ => json!({"approval_code": "AC-fz", "initiator": "ou_0"}),
    }
}

pub fn seeded(platform: Platform) -> FakeEnv {
    let kv = crate::store_of(&[
        (PENDING, ApprovalStatus::Pending, meta(platform)),
        (APPROVED, ApprovalStatus::Approved, meta(platform)),
    ]);
    FakeEnv::with_store(kv, NOW_MS)
}

fn user(by_mobile: bool, n: u8) -> UserRef {
    if by_mobile {
        UserRef::Mobile(format!("1380000000{n}"))
    } else {
        UserRef::Id(format!("u{n}"))
    }
}

pub fn approval_request(by_mobile: bool) -> ApprovalRequest {
    ApprovalRequest {
        key: "deploy-42".into(),
        title: "Deploy to prod?".into(),
        initiator: user(by_mobile, 0),
        nodes: vec![
            ApprovalNode {
                approvers: vec![user(by_mobile, 1), user(false, 2)],
                mode: SignMode::And,
            },
            ApprovalNode {
                approvers: vec![user(false, 3)],
                mode: SignMode::Or,
            },
        ],
        cc: vec![],
        fields: vec![("Workflow".into(), "#42".into())],
        detail_url: Some("https://ci.example/runs/42".into()),
    }
}

pub fn notification(target: Target) -> Notification {
    Notification {
        target,
        title: "Workflow #42 failed".into(),
        markdown: "**build** failed".into(),
        level: Level::Failure,
        link: None,
        mentions: vec![UserRef::Id("u1".into())],
        mention_all: false,
    }
}

/// One reply as the framing carries it.
pub struct Reply {
    pub control: u8,
    pub body: Vec<u8>,
}

pub fn split_replies(raw: &[u8]) -> VecDeque<Reply> {
    if raw.is_empty() {
        return VecDeque::new();
    }
    raw.split(|b| *b == SEPARATOR)
        .map(|seg| match seg.split_first() {
            Some((c, body)) => Reply {
                control: *c,
                body: body.to_vec(),
            },
            None => Reply {
                control: 0,
                body: Vec::new(),
            },
        })
        .collect()
}

fn answer(reply: Reply) -> Result<Response> {
    if reply.control & TRANSPORT != 0 {
        return Err(Error::transport("connection reset by peer"));
    }
    let mut headers = vec![("content-type".into(), "application/json".into())];
    if reply.control & RETRY_AFTER != 0 {
        headers.push(("retry-after".into(), (reply.control >> 6).to_string()));
    }
    Ok(Response {
        status: STATUS[usize::from(reply.control & 15)],
        headers,
        body: reply.body,
    })
}

pub fn hook_url(platform: Platform) -> String {
    match platform {
        Platform::Dingtalk => {
            format!("https://oapi.dingtalk.com/robot/send?access_token={HOOK_TOKEN}")
        }
        Platform::Wecom => {
            format!("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={HOOK_TOKEN}")
        }
        _ => format!("https://open.feishu.cn/open-apis/bot/v2/hook/{HOOK_TOKEN}"),
    }
}

/// What a flow returned, reduced to what the invariants compare.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Approval(Approval),
    Sent,
}

/// Runs the flow `op` on `env` for `platform`.
pub fn flow(env: &FakeEnv, platform: Platform, op: u8) -> Result<Outcome> {
    let app = app(platform);
    let target = match flow_of(op) {
        0 => {
            let req = approval_request(op & BY_MOBILE != 0);
            return imbridge::approval::start(env, &app, &req).map(Outcome::Approval);
        }
        1 => return imbridge::approval::get(env, &app, PENDING, true).map(Outcome::Approval),
        2 => return imbridge::approval::get(env, &app, APPROVED, true).map(Outcome::Approval),
        3 => {
            let canceled = imbridge::approval::cancel(env, &app, PENDING, Some("done"));
            return canceled.map(Outcome::Approval);
        }
        4 => Target::Users(vec![UserRef::Id("u1".into()), UserRef::Id("u2".into())]),
        5 => Target::Chat("oc_fz".into()),
        _ => Target::Webhook(RobotWebhook {
            platform,
            url: hook_url(platform),
            secret: Some(HOOK_SECRET.into()),
        }),
    };
    imbridge::notify::notify(env, Some(&app), &notification(target)).map(|_| Outcome::Sent)
}

/// Which flow `op` picks; its top bit is a flag of the start flow.
pub fn flow_of(op: u8) -> u8 {
    (op & !BY_MOBILE) % 7
}

fn records(env: &FakeEnv) -> Vec<(String, Vec<u8>)> {
    let prefix = format!("a/{APP_ID}/i/");
    env.kv
        .borrow()
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Through the plugin's own lookup: instance ids from a reply may need escaping in keys.
fn stored(env: &FakeEnv, platform: Platform, id: &str) -> Option<Record> {
    imbridge::approval::load(env, &app(platform), id).expect("the plugin reads what it stored")
}

pub fn run(data: &[u8]) -> Result<Outcome> {
    let mut r = Reader::new(data);
    let platform = PLATFORMS[usize::from(r.byte() % 3)];
    let op = r.byte();
    let raw = r.rest();
    let queue = RefCell::new(split_replies(raw));
    let env = seeded(platform);
    env.set_responder(move |_: &Request| match queue.borrow_mut().pop_front() {
        Some(reply) => answer(reply),
        None => Err(Error::transport("unreachable")),
    });
    let before = records(&env);
    let result = flow(&env, platform, op);

    let sent = env.sent.borrow().len();
    assert!(sent <= MAX_REQUESTS, "{sent} requests for one call");
    for ms in env.slept.borrow().iter() {
        assert!(
            *ms <= imbridge::retry::MAX_WAIT_MS,
            "slept {ms} ms, beyond the retry policy's longest wait"
        );
    }
    let approved = stored(&env, platform, APPROVED).expect("the approved record is kept");
    assert_eq!(
        approved.approval.status,
        ApprovalStatus::Approved,
        "a terminal approval changed status"
    );
    match &result {
        Ok(Outcome::Approval(a)) => {
            let rec =
                stored(&env, platform, &a.instance_id).expect("a returned approval is stored");
            assert_eq!(
                &rec.approval, a,
                "returned approval differs from the stored one"
            );
        }
        Ok(Outcome::Sent) => {}
        Err(e) => {
            if matches!(flow_of(op), 1..=3) {
                assert_eq!(records(&env), before, "a failed {op} changed a record: {e}");
            }
            let msg = e.to_string();
            for secret in [APP_SECRET, HOOK_TOKEN, HOOK_SECRET] {
                let echoed = raw.windows(secret.len()).any(|w| w == secret.as_bytes());
                assert!(
                    echoed || !msg.contains(secret),
                    "a secret in an error: {msg}"
                );
            }
        }
    }
    result
}

/// A stand-in for each platform that answers every request the flows send the way the
/// platform documents it; `seeds` records its replies to start the corpus deep in each flow.
pub fn valid_reply(platform: Platform, req: &Request) -> Response {
    let url = req.url.as_str();
    let sent: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let mobile = sent.get("mobile").and_then(Value::as_str).unwrap_or("");
    let body = match platform {
        Platform::Feishu | Platform::Lark => {
            let data = if url.contains("tenant_access_token") {
                return ok(json!({"code": 0, "msg": "ok",
                                 "tenant_access_token": "t-fz", "expire": 7200}));
            } else if url.contains("batch_get_id") {
                let users: Vec<Value> = sent
                    .get("mobiles")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|m| json!({"user_id": format!("ou_{m}"), "mobile": m}))
                    .collect();
                json!({"user_list": users})
            } else if url.contains("/subscribe") {
                json!({})
            } else if url.contains("/approval/v4/approvals") {
                json!({"approval_code": "AC-fz"})
            } else if url.contains("/instances/cancel") {
                json!({})
            } else if url.contains("/approval/v4/instances") && req.method == "POST" {
                json!({"instance_code": "IC-new"})
            } else if url.contains("/approval/v4/instances/") {
                json!({"status": "APPROVED", "timeline": [
                    {"type": "START", "open_id": "ou_0", "create_time": "1699999990000"},
                    {"type": "PASS", "open_id": "u1", "create_time": "1700000000000",
                     "comment": "lgtm"},
                ]})
            } else {
                json!({"message_id": "om_fz"})
            };
            json!({"code": 0, "msg": "success", "data": data})
        }
        Platform::Dingtalk => {
            if url.contains("/oauth2/accessToken") {
                json!({"accessToken": "t-fz", "expireIn": 7200})
            } else if url.contains("getbymobile") {
                json!({"errcode": 0, "errmsg": "ok", "result": {"userid": format!("u_{mobile}")}})
            } else if url.contains("/templates?") {
                json!({"result": {"processList": [{"name": "other", "processCode": "PC-x"}]}})
            } else if url.contains("/workflow/forms") {
                json!({"success": true, "result": {"processCode": "PC-fz"}})
            } else if url.contains("/terminate") {
                json!({"success": true, "result": true})
            } else if url.contains("processInstances?processInstanceId") {
                json!({"success": true, "result": {
                    "status": "COMPLETED", "result": "agree",
                    "tasks": [
                        {"userId": "u1", "result": "AGREE", "status": "COMPLETED",
                         "finishTime": "2023-11-14T22:13Z"},
                        {"userId": "u2", "result": "AGREE", "status": "COMPLETED",
                         "finishTime": "2023-11-14T22:13:20+08:00"},
                    ],
                    "operationRecords": [{"userId": "u1", "result": "AGREE", "remark": "ok"}],
                }})
            } else if url.contains("/processInstances") {
                json!({"instanceId": "IN-new"})
            } else {
                json!({"errcode": 0, "errmsg": "ok", "task_id": 42, "request_id": "r"})
            }
        }
        Platform::Wecom => {
            if url.contains("/gettoken") {
                json!({"errcode": 0, "errmsg": "ok", "access_token": "t-fz", "expires_in": 7200})
            } else if url.contains("getuserid") || url.contains("get_userid_by_email") {
                json!({"errcode": 0, "errmsg": "ok", "userid": format!("u_{mobile}")})
            } else if url.contains("create_template") {
                json!({"errcode": 0, "errmsg": "ok", "template_id": "TPL-fz"})
            } else if url.contains("applyevent") {
                json!({"errcode": 0, "errmsg": "ok", "sp_no": "202311150001"})
            } else if url.contains("getapprovaldetail") {
                json!({"errcode": 0, "errmsg": "ok", "info": {
                    "sp_no": "202311150001", "sp_status": 2,
                    "sp_record": [{"sp_status": 2, "approverattr": 1, "details": [
                        {"approver": {"userid": "u1"}, "speech": "ok", "sp_status": 2,
                         "sptime": 1_700_000_000u64},
                        {"approver": {"userid": "u2"}, "speech": "", "sp_status": 2,
                         "sptime": "1700000010"},
                    ]}],
                }})
            } else {
                json!({"errcode": 0, "errmsg": "ok", "msgid": "m-fz"})
            }
        }
    };
    ok(body)
}

fn ok(body: Value) -> Response {
    Response {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

/// The input that replays `flow(op)` against [`valid_reply`]: the flow is run once against it
/// and its replies are recorded in order.
pub fn recorded(platform: Platform, op: u8) -> Vec<u8> {
    let env = seeded(platform);
    let log = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
    let l = log.clone();
    env.set_responder(move |req: &Request| {
        let reply = valid_reply(platform, req);
        l.borrow_mut().push(reply.body.clone());
        Ok(reply)
    });
    let _ = flow(&env, platform, op);
    let index = PLATFORMS
        .iter()
        .position(|p| *p == platform)
        .expect("a fuzzed platform") as u8;
    let mut input = vec![index, op];
    for (i, body) in log.borrow().iter().enumerate() {
        if i > 0 {
            input.push(SEPARATOR);
        }
        input.push(0);
        input.extend_from_slice(body);
    }
    input
}
