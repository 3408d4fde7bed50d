//! Feishu and Lark (the same protocol on another origin): tenant token, approval definitions
//! and instances, contact lookups, app messages, and event callbacks.

use super::{CreateError, Created, Parsed, form_text, json_u64};
use crate::approval::{Event, Inbound, READ_BACK_LIMIT_MS, Record};
use crate::callback::{check_timestamp, header, signature_matches, unsigned};
use crate::crypto::{self, ct_eq};
use crate::env::{Env, app_key, hex};
use crate::error::{Error, Result};
use crate::http::{self, Method, call_checked, call_json};
use crate::model::{
    ApprovalNode, ApprovalRequest, ApprovalStatus, Decision, HttpRequest, HttpResponse, ImApp,
    Notification, Platform, Receipt, SignMode, Target, UserRef,
};
use crate::retry::Repeat;
use crate::token::{self, Issued};
use serde_json::{Value, json};

pub const FEISHU_BASE: &str = "https://open.feishu.cn";
pub const LARK_BASE: &str = "https://open.larksuite.com";

/// The id of the one textarea every definition carries.
const DETAIL_WIDGET: &str = "imbridge_detail";
/// Feishu's answer to a reused instance `uuid`.
const UUID_CONFLICT: i64 = 60012;
/// Feishu's answer for an approval code it does not know.
const DEFINITION_NOT_FOUND: i64 = 1390002;
/// Feishu's answer when a definition is already subscribed.
const ALREADY_SUBSCRIBED: i64 = 1390007;
const BATCH_GET_ID_LIMIT: usize = 50;

/// Codes that mean "this tenant token is no longer valid": refresh and retry once.
const TOKEN_INVALID: &[i64] = &[99991661, 99991663, 99991664, 99991668, 99991671, 99991677];
/// Rate limits and transient internal errors: 99991400 the app's request rate, 11232 a custom
/// robot's, 230020 a chat's message rate. (99991401 is an IP the app's allowlist refuses,
/// which waiting does not change.)
const RETRYABLE: &[i64] = &[99991400, 11232, 230020, 1500, 1501, 1503, 60007, 1395001];
/// Feishu refuses a custom robot's request body over 20 KB.
const MAX_WEBHOOK_BODY: usize = 20 << 10;

fn is_token_invalid(e: &Error) -> bool {
    matches!(e, Error::Platform { code, .. } if TOKEN_INVALID.contains(code))
}

pub fn default_base(p: Platform) -> &'static str {
    if p == Platform::Lark {
        LARK_BASE
    } else {
        FEISHU_BASE
    }
}

/// Feishu's answers: `{code, msg}`, or `{StatusCode, StatusMessage}` from its gateway.
const RESULT: http::ResultCode = http::ResultCode {
    code: &["code", "StatusCode"],
    msg: &["msg", "StatusMessage"],
    retryable: RETRYABLE,
};

/// Turns a Feishu reply into its body, or a typed error carrying Feishu's own code.
fn check(reply: http::JsonReply) -> Result<Value> {
    RESULT.check(reply, |reply, msg| {
        Err(http::status_error(
            reply.status,
            format_args!("without a Feishu result code {msg}"),
        ))
    })
}

struct Client<'a, E: Env + ?Sized> {
    env: &'a E,
    app: &'a ImApp,
    base: String,
    token_key: String,
}

impl<'a, E: Env + ?Sized> Client<'a, E> {
    fn new(env: &'a E, app: &'a ImApp) -> Result<Self> {
        if app.app_id.trim().is_empty() || app.app_secret.trim().is_empty() {
            return Err(Error::config("app-id and app-secret are required"));
        }
        let base = http::api_base(app.api_base.as_deref(), default_base(app.platform))?;
        let token_key = token::cache_key(app, &base);
        Ok(Client {
            env,
            app,
            base,
            token_key,
        })
    }

    fn fetch_token(&self) -> Result<Issued> {
        let url = format!(
            "{}/open-apis/auth/v3/tenant_access_token/internal",
            self.base
        );
        let body = json!({"app_id": self.app.app_id, "app_secret": self.app.app_secret});
        let reply = call_checked(
            self.env,
            Method::Post,
            &url,
            &[],
            Some(&body),
            Repeat::Safe,
            check,
        )?;
        Ok(Issued {
            token: reply
                .get("tenant_access_token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            ttl_secs: reply.get("expire").and_then(Value::as_u64).unwrap_or(0),
        })
    }

    /// Calls an authenticated endpoint that changes something (sent once) and returns its
    /// `data`.
    fn api(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call(Repeat::Never, method, path, body)
    }

    /// Like `api`, for a lookup: retried on rate limits and 5xx.
    fn read(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call(Repeat::Safe, method, path, body)
    }

    fn call(
        &self,
        repeat: Repeat,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        token::with_token(
            self.env,
            &self.token_key,
            &|| self.fetch_token(),
            is_token_invalid,
            &mut |tok| {
                let auth = format!("Bearer {tok}");
                let headers = [("authorization", auth.as_str())];
                let reply = call_checked(self.env, method, &url, &headers, body, repeat, check)?;
                Ok(reply.get("data").cloned().unwrap_or(Value::Null))
            },
        )
    }

    /// Open ids for user references; emails and mobiles go through one contact lookup.
    fn resolve(&self, users: &[UserRef]) -> Result<Vec<String>> {
        let emails: Vec<&str> = users
            .iter()
            .filter_map(|u| match u {
                UserRef::Email(e) => Some(e.trim()),
                _ => None,
            })
            .collect();
        // Feishu wants mainland numbers bare and others with their country code, like the rest.
        let mobiles: Vec<String> = users
            .iter()
            .filter_map(|u| match u {
                UserRef::Mobile(m) => Some(super::normalize_mobile(m)),
                _ => None,
            })
            .collect::<Result<_>>()?;
        let mobiles: Vec<&str> = mobiles.iter().map(String::as_str).collect();
        let mut found: Vec<(String, String)> = Vec::new();
        for (kind, field, list) in [
            ("emails", "email", &emails),
            ("mobiles", "mobile", &mobiles),
        ] {
            for chunk in list.chunks(BATCH_GET_ID_LIMIT) {
                let data = self.read(
                    Method::Post,
                    "/open-apis/contact/v3/users/batch_get_id?user_id_type=open_id",
                    Some(&json!({ kind: chunk })),
                )?;
                for u in data
                    .get("user_list")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let id = u.get("user_id").and_then(Value::as_str);
                    // The field asked by: an item may carry the other one too.
                    let who = u.get(field).and_then(Value::as_str);
                    if let (Some(id), Some(who)) = (id, who) {
                        found.push((who.to_string(), id.to_string()));
                    }
                }
            }
        }
        users
            .iter()
            .map(|u| match u {
                UserRef::Id(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
                UserRef::Id(_) => Err(Error::input("empty user id")),
                UserRef::Email(e) => found
                    .iter()
                    .find(|(who, _)| who.eq_ignore_ascii_case(e.trim()))
                    .map(|(_, id)| id.clone())
                    .ok_or_else(|| Error::input(format!("no Feishu user found for {e}"))),
                UserRef::Mobile(m) => {
                    let want = super::normalize_mobile(m)?;
                    found
                        .iter()
                        .find(|(who, _)| super::normalize_mobile(who).is_ok_and(|w| w == want))
                        .map(|(_, id)| id.clone())
                        .ok_or_else(|| Error::input(format!("no Feishu user found for {m}")))
                }
            })
            .collect()
    }

    /// One definition per sequence of node modes, created on first use and subscribed by
    /// each Feishu app that uses it (an app's events follow its own subscriptions, and the
    /// store's app may be pointed at another Feishu app). The code is kept as soon as Feishu
    /// answers, so a subscribe that fails is tried again by the next start rather than
    /// leaving one more definition in the admin console per attempt.
    fn definition(&self, nodes: &[ApprovalNode]) -> Result<String> {
        let shape = node_shape(nodes);
        let cache = definition_key(self.app, &self.base, &shape);
        let code = super::cached_id(self.env, &cache, "definition", || {
            let data = self.api(
                Method::Post,
                "/open-apis/approval/v4/approvals?user_id_type=open_id",
                Some(&definition_body(nodes, &shape)),
            )?;
            data.get("approval_code")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| Error::platform(-1, "definition created without a code", true))
        })?;
        let subscribed = self.subscribed_key(&code);
        if self.env.kv_get(&subscribed)?.is_none() {
            match self.api(
                Method::Post,
                &format!(
                    "/open-apis/approval/v4/approvals/{}/subscribe",
                    http::percent_encode(&code)
                ),
                None,
            ) {
                Ok(_) => {}
                Err(Error::Platform { code, .. }) if code == ALREADY_SUBSCRIBED => {}
                Err(e) => return Err(e),
            }
            // An increment is durable at once, not at the call's end with its writes: a start
            // cut off after its create (a crash, the deadline, a commit that kept failing)
            // still leaves this, so the retry's uuid conflict recognises the instance as this
            // store's. A write was lost with the call, and every retry answered 60012.
            self.env.kv_increment(&subscribed, 1)?;
        }
        Ok(code)
    }

    /// Set (durably at once) once this app has subscribed to the definition `code`, before any
    /// instance of it is created: so it also records every definition this store's instances
    /// can be on.
    fn subscribed_key(&self, code: &str) -> String {
        format!(
            "{}/{code}",
            super::app_object_key(self.app, &self.base, "fsub")
        )
    }

    /// Forgets a definition Feishu no longer knows (deleted in the admin console, or the
    /// app now points at another company), so the next `definition` creates it again.
    fn forget_definition(&self, nodes: &[ApprovalNode]) -> Result<()> {
        let shape = node_shape(nodes);
        self.env
            .kv_delete(&definition_key(self.app, &self.base, &shape))
    }
}

/// The sequence of node modes a definition serves, e.g. `and-or`.
fn node_shape(nodes: &[ApprovalNode]) -> String {
    let modes: Vec<&str> = nodes
        .iter()
        .map(|n| match n.mode {
            SignMode::And => "and",
            SignMode::Or => "or",
        })
        .collect();
    modes.join("-")
}

fn node_id(i: usize) -> String {
    format!("imbridge_n{}", i + 1)
}

/// Per app and API base; the shape is `and`/`or` joined by `-`, which never needs escaping.
/// `fdef2`: definitions kept under `fdef` had initiator-chosen cc, which Feishu's definition
/// API does not take, and no `approver_chosen_multi`; a store makes its definitions anew.
fn definition_key(app: &ImApp, base: &str, shape: &str) -> String {
    let scope = hex(&crypto::sha256(&[base.as_bytes()]));
    format!("{}/{shape}", app_key(app, "fdef2", &scope[..8]))
}

/// The definition: one textarea, then one node per approval node whose approvers (several
/// allowed) the start chooses, so one definition serves every request of the same shape. No
/// cc: Feishu's definition API refuses initiator-chosen cc ("抄送人类型不支持设置为发起人自选"),
/// so a start copies its approval to the cc list in a request of its own.
pub fn definition_body(nodes: &[ApprovalNode], shape: &str) -> Value {
    // Written as text and parsed: every value in it is the plugin's own (widget and node
    // ids, modes, the shape), so nothing needs escaping, and the text is a fraction of the
    // code `json!` makes for a body built once per app and shape. A test pins the result.
    use core::fmt::Write as _;
    let (mut node_list, mut texts) = (String::new(), String::new());
    for (i, n) in nodes.iter().enumerate() {
        let id = node_id(i);
        let mode = match n.mode {
            SignMode::And => "AND",
            SignMode::Or => "OR",
        };
        let _ = write!(
            node_list,
            r#"{{"id":"{id}","name":"@i18n@{id}","node_type":"{mode}","approver":[{{"type":"Free"}}],"approver_chosen_multi":true}},"#
        );
        let _ = write!(
            texts,
            r#",{{"key":"@i18n@{id}","value":"Approval {}"}}"#,
            i + 1
        );
    }
    let text = format!(
        r#"{{"approval_name":"@i18n@imbridge_name","viewers":[{{"viewer_type":"NONE"}}],
        "form":{{"form_content":"[{{\"id\":\"{DETAIL_WIDGET}\",\"name\":\"@i18n@imbridge_detail\",\"required\":true,\"type\":\"textarea\"}}]"}},
        "node_list":[{{"id":"START"}},{node_list}{{"id":"END"}}],
        "settings":{{"revert_interval":0}},
        "i18n_resources":[{{"locale":"en-US","is_default":true,"texts":[
            {{"key":"@i18n@imbridge_name","value":"imbridge ({shape})"}},
            {{"key":"@i18n@imbridge_detail","value":"Details"}}{texts}]}}]}}"#
    );
    serde_json::from_slice(text.as_bytes()).unwrap_or_default()
}

pub fn instance_body(
    approval_code: &str,
    initiator: &str,
    nodes: &[Vec<String>],
    req: &ApprovalRequest,
    uuid: &str,
) -> Value {
    let form = json!([{"id": DETAIL_WIDGET, "type": "textarea", "value": form_text(req)}]);
    let approvers: Vec<Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, ids)| json!({"key": node_id(i), "value": ids}))
        .collect();
    // Feishu takes the title as an i18n key that the instance's own texts define.
    json!({
        "approval_code": approval_code,
        "open_id": initiator,
        "form": form.to_string(),
        "node_approver_open_id_list": approvers,
        "uuid": uuid,
        "title": TITLE_KEY,
        "title_display_method": 1,
        "i18n_resources": [{"locale": "en-US", "is_default": true,
            "texts": [{"key": TITLE_KEY, "value": req.title}]}],
    })
}

const TITLE_KEY: &str = "@i18n@imbridge_title";

pub fn create(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &ApprovalRequest,
    uuid: &str,
) -> Result<Created, CreateError> {
    let c = Client::new(env, app)?;
    let initiator = c.resolve(core::slice::from_ref(&req.initiator))?.remove(0);
    let nodes = req
        .nodes
        .iter()
        .map(|n| c.resolve(&n.approvers))
        .collect::<Result<Vec<_>>>()?;
    let cc = c.resolve(&req.cc)?;
    let mut definition_renewed = false;
    let (code, data) = loop {
        let code = match c.definition(&req.nodes) {
            // Its subscribe found the kept definition gone.
            Err(Error::Platform {
                code: DEFINITION_NOT_FOUND,
                ..
            }) if !definition_renewed => {
                c.forget_definition(&req.nodes)?;
                definition_renewed = true;
                continue;
            }
            other => other?,
        };
        let body = instance_body(&code, &initiator, &nodes, req, uuid);
        match c.api(
            Method::Post,
            "/open-apis/approval/v4/instances",
            Some(&body),
        ) {
            // The kept definition is gone: refused, so nothing was created; make it again.
            Err(Error::Platform {
                code: DEFINITION_NOT_FOUND,
                ..
            }) if !definition_renewed => {
                c.forget_definition(&req.nodes)?;
                definition_renewed = true;
            }
            // An earlier attempt created the instance but its outcome was lost; Feishu lets
            // us read it back by the same uuid, so the retry adopts it instead of failing.
            Err(Error::Platform {
                code: UUID_CONFLICT,
                ..
            }) => {
                let data = c.read(
                    Method::Get,
                    &format!(
                        "/open-apis/approval/v4/instances/{}",
                        http::percent_encode(uuid)
                    ),
                    None,
                )?;
                // Feishu keeps a uuid unique across the whole company, not per app, so it may
                // be another store's: one that shares this company, app id and key. Adopting
                // that would hand back someone else's approval (perhaps already approved), so
                // only an instance on a definition this store subscribed to is taken. That is
                // not only the kept one: the first attempt may have used a definition since
                // replaced (deleted in the console, or a concurrent first start's kept instead).
                // A start with this key still running has not committed its subscription yet:
                // retryable, so that the retry after it adopts the instance.
                let theirs = data
                    .get("approval_code")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if theirs.is_empty() || c.env.kv_get(&c.subscribed_key(theirs))?.is_none() {
                    return Err(Error::platform(
                        UUID_CONFLICT,
                        "Feishu has an approval with this start's uuid on a definition this \
                         store has not recorded: another start with this key that has not \
                         finished (retry), or another store in the Feishu company with the same \
                         app id and key (give the apps different ids)",
                        true,
                    )
                    .into());
                }
                break (theirs.to_string(), data);
            }
            other => break (code, other.map_err(CreateError::sent)?),
        }
    };
    let instance = data
        .get("instance_code")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CreateError::without_id("instances"))?;
    // An adopted instance (read back after 60012) whose timeline has a copy was copied by
    // the attempt that made it: once is enough.
    let copied = data
        .get("timeline")
        .and_then(Value::as_array)
        .is_some_and(|t| {
            t.iter()
                .any(|e| e.get("type").and_then(Value::as_str) == Some("CC"))
        });
    if !cc.is_empty() && !copied {
        // Best effort, and bounded as the read-back is: the approval exists and its approvers
        // have their tasks; failing the start now, or running it into the host's deadline,
        // would leave it without a record. Those in cc are told only by this.
        let _ = http::bounded(c.env, READ_BACK_LIMIT_MS, || {
            c.api(
                Method::Post,
                "/open-apis/approval/v4/instances/cc?user_id_type=open_id",
                Some(&json!({"approval_code": code, "instance_code": instance,
                    "user_id": initiator, "cc_user_ids": cc})),
            )
        });
    }
    Ok(Created {
        instance_id: instance.to_string(),
        meta: json!({"approval_code": code, "initiator": initiator}),
    })
}

/// Feishu's instance statuses; "CANCELLED" is accepted too because engines have been bitten
/// by the spelling.
pub fn map_status(s: &str) -> Option<ApprovalStatus> {
    Some(match s {
        "PENDING" | "OVERTIME_RECOVER" => ApprovalStatus::Pending,
        "APPROVED" => ApprovalStatus::Approved,
        "REJECTED" => ApprovalStatus::Rejected,
        "CANCELED" | "CANCELLED" | "DELETED" | "REVERTED" | "OVERTIME_CLOSE" | "TERMINATED" => {
            ApprovalStatus::Canceled
        }
        _ => return None,
    })
}

fn meta_str<'r>(rec: &'r Record, field: &str) -> Result<&'r str> {
    rec.meta
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::storage(format!("approval record lacks {field}")))
}

pub fn poll(env: &(impl Env + ?Sized), app: &ImApp, rec: &Record) -> Result<Vec<Event>> {
    let c = Client::new(env, app)?;
    let data = c.read(
        Method::Get,
        &format!(
            "/open-apis/approval/v4/instances/{}?user_id_type=open_id",
            http::percent_encode(&rec.approval.instance_id)
        ),
        None,
    )?;
    Ok(events_from_instance(&data))
}

/// Who decided a task (an event) or a timeline entry (a poll). Feishu leaves the ids empty on
/// tasks it passed itself (auto-approval); those are no one's decision, and the instance's
/// status carries the outcome.
fn decider(v: &Value) -> Option<&str> {
    ["open_id", "user_id"]
        .iter()
        .filter_map(|k| v.get(*k).and_then(Value::as_str))
        .find(|id| !id.is_empty())
}

/// Decisions from the timeline, then the overall status.
pub fn events_from_instance(data: &Value) -> Vec<Event> {
    let mut events = Vec::new();
    for t in data
        .get("timeline")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let approved = match t.get("type").and_then(Value::as_str) {
            Some("PASS") => true,
            Some("REJECT") => false,
            _ => continue,
        };
        let Some(user) = decider(t) else {
            continue;
        };
        events.push(Event::Decision(Decision {
            user: user.to_string(),
            approved,
            comment: t
                .get("comment")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            at_ms: json_u64(t.get("create_time")).unwrap_or(0),
        }));
    }
    if let Some(s) = data
        .get("status")
        .and_then(Value::as_str)
        .and_then(map_status)
    {
        events.push(Event::Status(s));
    }
    events
}

pub fn cancel(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    rec: &Record,
    _reason: Option<&str>,
) -> Result<()> {
    let c = Client::new(env, app)?;
    let body = json!({
        "approval_code": meta_str(rec, "approval_code")?,
        "instance_code": rec.approval.instance_id,
        "user_id": meta_str(rec, "initiator")?,
    });
    c.api(
        Method::Post,
        "/open-apis/approval/v4/instances/cancel?user_id_type=open_id",
        Some(&body),
    )?;
    Ok(())
}

// ---- callbacks ----

const SIG: &str = "x-lark-signature";
const TS: &str = "x-lark-request-timestamp";
/// Base64 characters of the largest unsigned ciphertext read (a handshake's is under 300).
const MAX_UNSIGNED_CIPHERTEXT: usize = 4096;
const NONCE: &str = "x-lark-request-nonce";

pub fn parse_callback(env: &(impl Env + ?Sized), app: &ImApp, req: &HttpRequest) -> Result<Parsed> {
    if !req.method.eq_ignore_ascii_case("POST") {
        return Err(Error::input("Feishu callbacks are POST requests"));
    }
    let outer: Value =
        serde_json::from_slice(&req.body).map_err(|_| Error::input("callback body is not JSON"))?;
    let key = app.encrypt_key.as_deref().filter(|k| !k.is_empty());
    let (inner, signed) = match (outer.get("encrypt").and_then(Value::as_str), key) {
        (Some(_), None) => {
            return Err(Error::config(
                "received an encrypted callback but no Encrypt Key is configured",
            ));
        }
        (Some(enc), Some(key)) => {
            let signed = verify_signature(env, app, key, req)?;
            // Unsigned, only the URL handshake passes, and its ciphertext is a few hundred
            // bytes: a bigger one is refused before any AES work, which an anonymous sender
            // could otherwise have the plugin do on a whole megabyte per request.
            if !signed && enc.len() > MAX_UNSIGNED_CIPHERTEXT {
                return Err(unsigned());
            }
            // Every failure to decrypt and read looks the same (no padding oracle); without a
            // verified signature it is the signature error.
            let inner: Value = crypto::feishu::decrypt(key, enc)
                .ok()
                .and_then(|plain| serde_json::from_slice(&plain).ok())
                .ok_or_else(|| {
                    if signed {
                        crypto::undecryptable()
                    } else {
                        unsigned()
                    }
                })?;
            (inner, signed)
        }
        (None, Some(_)) => {
            return Err(Error::unauthorized(
                "an Encrypt Key is configured but the callback is not encrypted",
            ));
        }
        (None, None) => (outer, false),
    };

    let is_v2 = inner.get("schema").and_then(Value::as_str) == Some("2.0");
    let header_obj = inner.get("header");
    let presented_token = if is_v2 {
        header_obj.and_then(|h| h.get("token"))
    } else {
        inner.get("token")
    }
    .and_then(Value::as_str);
    // Encrypted and unsigned, every refusal is the same one: a distinct "token mismatch"
    // would tell an anonymous sender that its ciphertext decrypted under the key.
    let unsigned_under_key = key.is_some() && !signed;
    check_token(app, presented_token, signed)
        .map_err(|e| if unsigned_under_key { unsigned() } else { e })?;

    if inner.get("type").and_then(Value::as_str) == Some("url_verification") {
        let challenge = inner
            .get("challenge")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::input("url_verification without a challenge"))?;
        return Ok(Parsed {
            response: HttpResponse::json(200, &json!({ "challenge": challenge })),
            events: Vec::new(),
        });
    }
    if unsigned_under_key {
        return Err(unsigned());
    }

    Ok(Parsed {
        response: HttpResponse::json(200, &json!({"code": 0, "msg": "success"})),
        events: envelope_events(env, &inner)?,
    })
}

/// An event delivered over the long connection: the same envelope as a callback's plaintext,
/// already authenticated by the connection the host opened with the app's credentials.
pub fn parse_event(env: &(impl Env + ?Sized), event: &[u8]) -> Result<Vec<Inbound>> {
    let inner: Value =
        serde_json::from_slice(event).map_err(|_| Error::input("event is not JSON"))?;
    envelope_events(env, &inner)
}

/// The approval events in a v1 or v2 envelope; anything else is none.
fn envelope_events(env: &(impl Env + ?Sized), inner: &Value) -> Result<Vec<Inbound>> {
    let (event_type, event) = if inner.get("schema").and_then(Value::as_str) == Some("2.0") {
        let h = inner
            .get("header")
            .ok_or_else(|| Error::input("v2 event without a header"))?;
        (
            h.get("event_type").and_then(Value::as_str),
            inner.get("event"),
        )
    } else {
        let ev = inner.get("event");
        (ev.and_then(|e| e.get("type")).and_then(Value::as_str), ev)
    };
    match (event_type, event) {
        (Some(t), Some(ev)) => approval_event(env, t, ev),
        _ => Ok(Vec::new()),
    }
}

/// Returns whether a valid signature was present. A present but wrong or stale one is an error;
/// an absent one is allowed only for the URL handshake, which Feishu does not sign.
fn verify_signature(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    key: &str,
    req: &HttpRequest,
) -> Result<bool> {
    let (Some(sig), Some(ts), Some(nonce)) =
        (header(req, SIG), header(req, TS), header(req, NONCE))
    else {
        return Ok(false);
    };
    let expected = crypto::feishu::signature(ts, nonce, key, &req.body);
    if !signature_matches(&expected, sig) {
        return Err(unsigned());
    }
    check_timestamp(app, env.now_ms(), ts, 1)?;
    Ok(true)
}

/// The Verification Token is checked whenever it is configured; without it, only a verified
/// signature authenticates the callback.
fn check_token(app: &ImApp, presented: Option<&str>, signed: bool) -> Result<()> {
    match app.token.as_deref().filter(|t| !t.is_empty()) {
        Some(expected) => {
            let ok = presented.is_some_and(|p| ct_eq(p.as_bytes(), expected.as_bytes()));
            if ok {
                Ok(())
            } else {
                Err(Error::unauthorized("verification token mismatch"))
            }
        }
        None if signed || app.encrypt_key.as_deref().is_some_and(|k| !k.is_empty()) => Ok(()),
        None => Err(Error::config(
            "a Verification Token or an Encrypt Key is required to accept callbacks",
        )),
    }
}

fn approval_event(env: &(impl Env + ?Sized), event_type: &str, ev: &Value) -> Result<Vec<Inbound>> {
    let Some(instance) = ev.get("instance_code").and_then(Value::as_str) else {
        return Ok(Vec::new());
    };
    let status = ev.get("status").and_then(Value::as_str).unwrap_or("");
    let at_ms = json_u64(ev.get("operate_time")).unwrap_or_else(|| env.now_ms());
    // Exactly these, v1 and v4 names: another event that happens to carry an
    // `instance_code` and a `status` (another product's "…task…", say) must not move an
    // approval.
    let event = if matches!(
        event_type,
        "approval_instance" | "approval.instance.status_changed_v4"
    ) {
        match map_status(status) {
            Some(s) => Event::Status(s),
            None => return Ok(Vec::new()),
        }
    } else if matches!(
        event_type,
        "approval_task" | "approval.task.status_changed_v4"
    ) {
        let approved = match status {
            "APPROVED" => true,
            "REJECTED" => false,
            _ => return Ok(Vec::new()),
        };
        // v4 names the approver in `assigned_user`.
        let Some(user) = decider(ev).or_else(|| ev.get("assigned_user").and_then(decider)) else {
            return Ok(Vec::new());
        };
        Event::Decision(Decision {
            user: user.to_string(),
            approved,
            comment: None,
            at_ms,
        })
    } else {
        return Ok(Vec::new());
    };
    Ok(vec![Inbound {
        instance_id: instance.to_string(),
        event,
    }])
}

// ---- notifications ----

/// A card for `n`, coloured by level, with `mentions` rendered as Feishu `<at>` tags.
pub fn card(n: &Notification, mentions: &[String]) -> Value {
    let template = match n.level {
        crate::model::Level::Info => "blue",
        crate::model::Level::Success => "green",
        crate::model::Level::Warning => "orange",
        crate::model::Level::Failure => "red",
    };
    let mut md = without_mentions(&n.markdown);
    let mut tags: Vec<String> = mentions.to_vec();
    if n.mention_all {
        tags.push("<at id=all></at>".into());
    }
    if !tags.is_empty() {
        md.push_str("\n\n");
        md.push_str(&tags.join(" "));
    }
    let mut elements = vec![json!({"tag": "markdown", "content": md})];
    if let Some(link) = &n.link {
        elements.push(json!({"tag": "action", "actions": [{
            "tag": "button", "type": "primary", "url": link.url,
            "text": {"tag": "plain_text", "content": link.text},
        }]}));
    }
    json!({
        "config": {"wide_screen_mode": true},
        "header": {"template": template, "title": {"tag": "plain_text", "content": n.title}},
        "elements": elements,
    })
}

/// People are mentioned through `mentions` and `mention_all` only: an `<at …>` in the
/// markdown (a log excerpt, a commit message) would ping them, up to the whole chat with
/// `<at id=all>`, so its `<` is escaped (card markdown reads HTML entities).
fn without_mentions(md: &str) -> String {
    let b = md.as_bytes();
    let mut out = String::with_capacity(md.len());
    let mut done = 0;
    for i in 0..b.len() {
        if b[i] == b'<'
            && b.get(i + 1..i + 3)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"at"))
        {
            out.push_str(&md[done..i]);
            out.push_str("&lt;");
            done = i + 1;
        }
    }
    out.push_str(&md[done..]);
    out
}

fn mention_tag(id: &str) -> String {
    format!("<at id={id}></at>")
}

/// Mentions for a bot webhook: ids and emails go straight into tags; mobiles need the app to
/// look them up.
fn webhook_mentions(
    env: &(impl Env + ?Sized),
    app: Option<&ImApp>,
    n: &Notification,
) -> Result<Vec<String>> {
    let mobiles: Vec<UserRef> = n
        .mentions
        .iter()
        .filter(|u| matches!(u, UserRef::Mobile(_)))
        .cloned()
        .collect();
    let resolved = if mobiles.is_empty() {
        Vec::new()
    } else {
        let app = app.ok_or_else(|| {
            Error::input(
                "mentioning by mobile in a Feishu webhook needs a Feishu or Lark app to look it up",
            )
        })?;
        Client::new(env, app)?.resolve(&mobiles)?
    };
    let mut resolved = resolved.into_iter();
    Ok(n.mentions
        .iter()
        .map(|u| match u {
            UserRef::Id(id) => mention_tag(id),
            UserRef::Email(e) => format!("<at email={e}></at>"),
            UserRef::Mobile(_) => mention_tag(&resolved.next().unwrap_or_default()),
        })
        .collect())
}

pub fn webhook_body(
    n: &Notification,
    mentions: &[String],
    now_secs: u64,
    secret: Option<&str>,
) -> Value {
    let mut body = json!({"msg_type": "interactive", "card": card(n, mentions)});
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        body["timestamp"] = json!(now_secs.to_string());
        body["sign"] = json!(crypto::robot::feishu_sign(now_secs, secret));
    }
    body
}

pub fn send_webhook(
    env: &(impl Env + ?Sized),
    app: Option<&ImApp>,
    url: &str,
    secret: Option<&str>,
    n: &Notification,
) -> Result<Receipt> {
    let mentions = webhook_mentions(env, app, n)?;
    let body = webhook_body(n, &mentions, env.now_ms() / 1000, secret);
    super::check_robot_body(
        &body,
        MAX_WEBHOOK_BODY,
        "a Feishu robot message is limited to 20 KB as sent",
    )?;
    check(call_json(env, Method::Post, url, &[], Some(&body))?)?;
    Ok(Receipt { message_id: None })
}

/// Feishu's refusal of a message to a user outside the app's availability: about that user
/// alone, so the others of a notification still get theirs.
const NO_AVAILABILITY: i64 = 230013;

pub fn send_message(env: &(impl Env + ?Sized), app: &ImApp, n: &Notification) -> Result<Receipt> {
    let c = Client::new(env, app)?;
    let mention_ids = c.resolve(&n.mentions)?;
    let tags: Vec<String> = mention_ids.iter().map(|id| mention_tag(id)).collect();
    let content = card(n, &tags).to_string();
    let (kind, receivers) = match &n.target {
        Target::Chat(chat) => ("chat_id", vec![chat.clone()]),
        Target::Users(users) => {
            if users.is_empty() {
                return Err(Error::input("no users to notify"));
            }
            ("open_id", c.resolve(users)?)
        }
        Target::Webhook(_) => return Err(Error::input("webhooks are not app messages")),
    };
    let path = format!("/open-apis/im/v1/messages?receive_id_type={kind}");
    let bodies: Vec<Value> = receivers
        .into_iter()
        .map(|r| json!({"receive_id": r, "msg_type": "interactive", "content": content}))
        .collect();
    // Feishu sends at most one message per `uuid` within an hour, so a retry whose first try
    // arrived but lost its answer does not message anyone twice.
    let dest = app.app_id.clone() + &path;
    let ids = super::send_parts(
        env,
        &dest,
        &bodies,
        true,
        Some(NO_AVAILABILITY),
        &mut |body, uuid| {
            let mut body = body.clone();
            body["uuid"] = uuid.into();
            let data = c.api(Method::Post, &path, Some(&body))?;
            Ok(data
                .get("message_id")
                .and_then(Value::as_str)
                .map(str::to_string))
        },
    )?;
    Ok(Receipt {
        message_id: (!ids.is_empty()).then(|| ids.join(",")),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::env::fake::{FakeEnv, json_response};

    pub fn app() -> ImApp {
        ImApp {
            id: "app1".into(),
            platform: Platform::Feishu,
            app_id: "cli_1".into(),
            app_secret: "secret".into(),
            agent_id: None,
            encrypt_key: Some("ekey".into()),
            token: Some("vtoken".into()),
            api_base: Some("http://127.0.0.1:1".into()),
            max_clock_skew_secs: None,
        }
    }

    /// A failure notification "Deploy failed" / "wf 42" to `target`, without mentions.
    pub(crate) fn note(target: Target) -> Notification {
        Notification {
            target,
            title: "Deploy failed".into(),
            markdown: "wf 42".into(),
            level: crate::model::Level::Failure,
            link: None,
            mentions: vec![],
            mention_all: false,
        }
    }

    fn signed_request(env: &FakeEnv, key: &str, plain: &Value) -> HttpRequest {
        let body =
            json!({"encrypt": crypto::feishu::encrypt(key, [3; 16], plain.to_string().as_bytes())})
                .to_string()
                .into_bytes();
        let ts = (env.now_ms() / 1000).to_string();
        let sig = crypto::feishu::signature(&ts, "n1", key, &body);
        HttpRequest {
            method: "POST".into(),
            path: "/cb".into(),
            query: String::new(),
            headers: vec![
                ("X-Lark-Signature".into(), sig),
                ("X-Lark-Request-Timestamp".into(), ts),
                ("X-Lark-Request-Nonce".into(), "n1".into()),
            ],
            body,
        }
    }

    /// Without an api-base, Feishu apps call open.feishu.cn and Lark apps open.larksuite.com;
    /// user lookups go out at most 50 emails (or mobiles) per batch_get_id, Feishu's limit.
    #[test]
    fn production_origins_and_lookup_batches() {
        for (platform, origin) in [
            (Platform::Feishu, "https://open.feishu.cn/open-apis/"),
            (Platform::Lark, "https://open.larksuite.com/open-apis/"),
        ] {
            let lookups = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let seen = lookups.clone();
            let env = FakeEnv::new(move |r| {
                let Some(path) = r.url.strip_prefix(origin) else {
                    return json_response(404, json!({"code": 404, "msg": "wrong origin"}));
                };
                let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if path.starts_with("auth/v3/tenant_access_token/internal") {
                    json_response(
                        200,
                        json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                    )
                } else if path.starts_with("contact/v3/users/batch_get_id") {
                    let emails = body["emails"].as_array().cloned().unwrap_or_default();
                    let mobiles = body["mobiles"].as_array().cloned().unwrap_or_default();
                    seen.borrow_mut().push((emails.len(), mobiles.len()));
                    let list: Vec<Value> = emails
                        .iter()
                        .map(|e| json!({"email": e, "user_id": format!("ou_{}", e.as_str().unwrap())}))
                        // An item may carry the user's other contact field too.
                        .chain(mobiles.iter().map(|m| {
                            json!({"mobile": m, "email": "m@x.cn", "user_id": "ou_m"})
                        }))
                        .collect();
                    json_response(200, json!({"code": 0, "data": {"user_list": list}}))
                } else if path.starts_with("im/v1/messages?receive_id_type=open_id") {
                    json_response(200, json!({"code": 0, "data": {"message_id": "om"}}))
                } else {
                    json_response(404, json!({"code": 404, "msg": "no"}))
                }
            });
            let app = ImApp {
                platform,
                api_base: None,
                ..app()
            };
            let mut users: Vec<UserRef> = (0..51)
                .map(|i| UserRef::Email(format!("u{i}@x.cn")))
                .collect();
            users.push(UserRef::Mobile("13800000000".into()));
            let n = note(Target::Users(users));
            let r = send_message(&env, &app, &n).unwrap();
            assert_eq!(r.message_id.unwrap().split(',').count(), 52, "{platform:?}");
            assert_eq!(*lookups.borrow(), [(50, 0), (1, 0), (0, 1)], "{platform:?}");
        }
    }

    /// The body as the `json!` version built it, for three nodes: the definition Feishu makes
    /// from it (and whether an existing app's stays valid) depends on every field.
    #[test]
    fn definition_body_is_unchanged() {
        let node = |mode| ApprovalNode {
            mode,
            approvers: Vec::new(),
        };
        let nodes = [node(SignMode::And), node(SignMode::Or), node(SignMode::And)];
        let expected: Value = serde_json::from_str(concat!(
            r#"{"approval_name":"@i18n@imbridge_name","form":{"form_content":"[{\"id\":\"imbridge_detail\",\"name\":\"@i18n@imbridge_detail\",\"required\":true,\"type\":\"textarea\"}]"},"i18n_resources":[{"is_default":true,"locale":"en-US","texts":[{"key":"@i18n@imbridge_name","value":"imbridge (x-y)"},"#,
            r#"{"key":"@i18n@imbridge_detail","value":"Details"},"#,
            r#"{"key":"@i18n@imbridge_n1","value":"Approval 1"},"#,
            r#"{"key":"@i18n@imbridge_n2","value":"Approval 2"},"#,
            r#"{"key":"@i18n@imbridge_n3","value":"Approval 3"}]}],"node_list":[{"id":"START"},"#,
            r#"{"approver":[{"type":"Free"}],"approver_chosen_multi":true,"id":"imbridge_n1","name":"@i18n@imbridge_n1","node_type":"AND"},"#,
            r#"{"approver":[{"type":"Free"}],"approver_chosen_multi":true,"id":"imbridge_n2","name":"@i18n@imbridge_n2","node_type":"OR"},"#,
            r#"{"approver":[{"type":"Free"}],"approver_chosen_multi":true,"id":"imbridge_n3","name":"@i18n@imbridge_n3","node_type":"AND"},"#,
            r#"{"id":"END"}],"settings":{"revert_interval":0},"viewers":[{"viewer_type":"NONE"}]}"#,
        ))
        .unwrap();
        assert_eq!(definition_body(&nodes, "x-y"), expected);
        // Serialised as the old one was: key order and the form's inner JSON text.
        assert_eq!(
            definition_body(&nodes, "x-y").to_string(),
            expected.to_string()
        );
        assert_ne!(definition_body(&nodes[..1], "x-y"), expected);
    }

    #[test]
    fn definition_keys_stay_put() {
        // Tenants' stores hold definitions under this key since definitions stopped asking
        // for initiator-chosen cc: another layout would create every definition again. The
        // digest is
        // `printf 'http://127.0.0.1:1' | sha256sum`, cut to 8.
        let app = ImApp {
            id: "t/1".into(),
            ..app()
        };
        assert_eq!(
            definition_key(&app, "http://127.0.0.1:1", "and-or"),
            "a/t%2F1/fdef2/10d8eb39/and-or"
        );
    }

    /// Markdown cannot mention anyone: `<at …>` in it is shown, not rendered; the
    /// mentions asked for still are.
    #[test]
    fn markdown_mentions_no_one() {
        let mut n = note(Target::Chat("oc_1".into()));
        n.markdown = "log: <at id=all></at> <AT email=a@b></AT> a<b <a>".into();
        let content = |n: &Notification| {
            card(n, &[mention_tag("ou_1")])["elements"][0]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            content(&n),
            "log: &lt;at id=all></at> &lt;AT email=a@b></AT> a<b <a>\n\n<at id=ou_1></at>"
        );
        n.mention_all = true;
        assert!(content(&n).ends_with("<at id=ou_1></at> <at id=all></at>"));
    }

    #[test]
    fn url_verification_plain_and_encrypted() {
        let env = FakeEnv::offline();
        let mut a = app();
        a.encrypt_key = None;
        let req = HttpRequest {
            method: "POST".into(),
            body: br#"{"challenge":"c1","token":"vtoken","type":"url_verification"}"#.to_vec(),
            ..Default::default()
        };
        let p = parse_callback(&env, &a, &req).unwrap();
        assert_eq!(p.response.body, br#"{"challenge":"c1"}"#);
        let mut bad = req.clone();
        bad.body = br#"{"challenge":"c1","token":"nope","type":"url_verification"}"#.to_vec();
        assert!(matches!(
            parse_callback(&env, &a, &bad),
            Err(Error::Unauthorized(_))
        ));

        // Encrypted, unsigned (as Feishu sends the handshake).
        let a = app();
        let plain = json!({"challenge": "c2", "token": "vtoken", "type": "url_verification"});
        let mut req = signed_request(&env, "ekey", &plain);
        req.headers.clear();
        let p = parse_callback(&env, &a, &req).unwrap();
        assert_eq!(p.response.body, br#"{"challenge":"c2"}"#);
    }

    /// Without a signature, a big ciphertext is not decrypted (it was, whatever its size),
    /// and a wrong token is refused as a missing signature is, not as "token mismatch",
    /// which told the sender that its ciphertext decrypted under the key.
    #[test]
    fn unsigned_ciphertexts_learn_nothing_and_cost_little() {
        let env = FakeEnv::offline();
        let padded = format!(
            r#"{{"challenge":"c3","token":"vtoken","type":"url_verification","pad":"{}"}}"#,
            " ".repeat(8 << 10)
        );
        let mut req = signed_request(&env, "ekey", &serde_json::from_str(&padded).unwrap());
        // Signed, it is read whatever its size.
        assert_eq!(
            parse_callback(&env, &app(), &req).unwrap().response.body,
            br#"{"challenge":"c3"}"#
        );
        req.headers.clear();
        assert_eq!(parse_callback(&env, &app(), &req).err(), Some(unsigned()));

        let refusal = |token: &str| {
            let ev = json!({"uuid": "u1", "token": token, "type": "event_callback",
                "event": {"type": "approval_instance", "instance_code": "I1", "status": "APPROVED"}});
            let mut req = signed_request(&env, "ekey", &ev);
            req.headers.clear();
            parse_callback(&env, &app(), &req).err()
        };
        assert_eq!(refusal("nope"), Some(unsigned()));
        assert_eq!(refusal("vtoken"), Some(unsigned()));
        let handshake = json!({"challenge": "c4", "token": "nope", "type": "url_verification"});
        let mut req = signed_request(&env, "ekey", &handshake);
        req.headers.clear();
        assert_eq!(parse_callback(&env, &app(), &req).err(), Some(unsigned()));
    }

    #[test]
    fn unsigned_events_are_rejected_when_a_key_is_set() {
        let env = FakeEnv::offline();
        let ev = json!({"uuid": "u1", "token": "vtoken", "type": "event_callback",
            "event": {"type": "approval_instance", "instance_code": "I1", "status": "APPROVED"}});
        let mut req = signed_request(&env, "ekey", &ev);
        assert_eq!(parse_callback(&env, &app(), &req).unwrap().events.len(), 1);
        req.headers.clear();
        assert!(matches!(
            parse_callback(&env, &app(), &req),
            Err(Error::Unauthorized(_))
        ));
    }

    #[test]
    fn signature_and_timestamp_are_checked() {
        let env = FakeEnv::offline();
        let ev = json!({"uuid": "u1", "token": "vtoken", "event": {"type": "approval_task",
            "instance_code": "I1", "status": "APPROVED", "open_id": "ou_1", "operate_time": "1700000000000"}});
        let req = signed_request(&env, "ekey", &ev);
        let p = parse_callback(&env, &app(), &req).unwrap();
        assert_eq!(p.events[0].instance_id, "I1");
        assert!(
            matches!(&p.events[0].event, Event::Decision(d) if d.user == "ou_1" && d.approved && d.at_ms == 1_700_000_000_000)
        );

        let mut tampered = req.clone();
        tampered.headers[0].1 = "0".repeat(64);
        assert!(matches!(
            parse_callback(&env, &app(), &tampered),
            Err(Error::Unauthorized(_))
        ));

        // Feishu's default window spans its last retry, 25,515 s after the push.
        env.now.set(env.now.get() + 25_515_000);
        assert!(parse_callback(&env, &app(), &req).is_ok());
        env.now.set(env.now.get() + (8 * 3600 - 25_515 + 1) * 1000);
        assert!(
            matches!(parse_callback(&env, &app(), &req), Err(Error::Unauthorized(m)) if m.contains("window"))
        );
    }

    #[test]
    fn v2_envelope_and_other_events() {
        let env = FakeEnv::offline();
        let ev = json!({"schema": "2.0", "header": {"event_id": "e9", "event_type": "approval_instance",
            "token": "vtoken"}, "event": {"instance_code": "I2", "status": "CANCELED"}});
        let p = parse_callback(&env, &app(), &signed_request(&env, "ekey", &ev)).unwrap();
        assert_eq!(p.events[0].event, Event::Status(ApprovalStatus::Canceled));
        assert_eq!(p.events[0].instance_id, "I2");

        // The v4 names of the same events (the SDKs' `approval.*.status_changed_v4`), whose
        // task names its approver in `assigned_user`.
        let v4 = |kind: &str, event: Value| {
            let ev = json!({"schema": "2.0", "header": {"event_id": "e4", "event_type": kind,
                "token": "vtoken"}, "event": event});
            parse_callback(&env, &app(), &signed_request(&env, "ekey", &ev)).unwrap()
        };
        let p = v4(
            "approval.instance.status_changed_v4",
            json!({"instance_code": "I4", "status": "APPROVED"}),
        );
        assert_eq!(p.events[0].event, Event::Status(ApprovalStatus::Approved));
        let p = v4(
            "approval.task.status_changed_v4",
            json!({"instance_code": "I4", "status": "REJECTED",
                "assigned_user": {"open_id": "ou_9"}, "operate_time": "1700000000000"}),
        );
        assert!(
            matches!(&p.events[0].event, Event::Decision(d) if d.user == "ou_9" && !d.approved)
        );

        // A task Feishu passed itself has empty ids: no one's decision. With only user_id, that.
        for (ids, want) in [
            (json!({"open_id": "", "user_id": ""}), None),
            (json!({}), None),
            (json!({"open_id": "", "user_id": "u7"}), Some("u7")),
        ] {
            let mut ev = json!({"uuid": "u2", "token": "vtoken", "event": {"type": "approval_task",
                "instance_code": "I1", "status": "APPROVED", "operate_time": "1700000000000"}});
            ev["event"]
                .as_object_mut()
                .unwrap()
                .extend(ids.as_object().unwrap().clone());
            let p = parse_callback(&env, &app(), &signed_request(&env, "ekey", &ev)).unwrap();
            let users: Vec<_> = p
                .events
                .iter()
                .map(|e| match &e.event {
                    Event::Decision(d) => d.user.as_str(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(users, want.into_iter().collect::<Vec<_>>(), "{ev}");

            // The same entry in a polled instance's timeline.
            let mut entry = json!({"type": "PASS", "create_time": "1700000000000"});
            entry
                .as_object_mut()
                .unwrap()
                .extend(ids.as_object().unwrap().clone());
            let polled = events_from_instance(&json!({"status": "PENDING", "timeline": [entry]}));
            let users: Vec<_> = polled
                .iter()
                .filter_map(|e| match e {
                    Event::Decision(d) => Some(d.user.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(users, want.into_iter().collect::<Vec<_>>(), "{entry}");
        }

        let other = json!({"schema": "2.0", "header": {"event_id": "e10", "event_type": "im.message.receive_v1",
            "token": "vtoken"}, "event": {"message": {}}});
        let p = parse_callback(&env, &app(), &signed_request(&env, "ekey", &other)).unwrap();
        assert!(p.events.is_empty());
        assert_eq!(p.response.status, 200);
        // Another event with an instance code and a status moves no approval: before, any
        // type naming an "instance" or a "task" did.
        for kind in ["task.task.updated_v1", "workflow_instance"] {
            let ev = json!({"uuid": "u9", "token": "vtoken", "event": {"type": kind,
                "instance_code": "I1", "status": "REJECTED", "open_id": "ou_1"}});
            let p = parse_callback(&env, &app(), &signed_request(&env, "ekey", &ev)).unwrap();
            assert!(p.events.is_empty(), "{kind}");
        }
    }

    #[test]
    fn long_connection_events_use_the_same_envelopes() {
        let env = FakeEnv::offline();
        let ev = json!({"schema": "2.0", "header": {"event_id": "e1", "event_type": "approval_instance"},
            "event": {"instance_code": "I3", "status": "REJECTED"}});
        let got = parse_event(&env, ev.to_string().as_bytes()).unwrap();
        assert_eq!(got[0].event, Event::Status(ApprovalStatus::Rejected));
        assert_eq!(got[0].instance_id, "I3");
        assert!(matches!(
            parse_event(&env, b"{"),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn status_mapping_catches_cancel_spellings() {
        assert_eq!(map_status("CANCELED"), Some(ApprovalStatus::Canceled));
        assert_eq!(map_status("CANCELLED"), Some(ApprovalStatus::Canceled));
        assert_eq!(map_status("DELETED"), Some(ApprovalStatus::Canceled));
        assert_eq!(map_status("WHATEVER"), None);
    }

    #[test]
    fn webhook_is_signed_and_coloured() {
        let n = Notification {
            markdown: "**wf 42**".into(),
            mention_all: true,
            ..note(Target::Chat("x".into()))
        };
        let b = webhook_body(&n, &[], 1_700_000_000, Some("sec"));
        assert_eq!(b["timestamp"], "1700000000");
        // `printf '' | openssl dgst -sha256 -hmac "$(printf '1700000000\nsec')" -binary | base64`
        assert_eq!(b["sign"], "ttGYnPblC3CcNExnS7y5igm57JhpqZJtHpJ+TURiUeg=");
        assert_eq!(b["card"]["header"]["template"], "red");
        assert!(
            b["card"]["elements"][0]["content"]
                .as_str()
                .unwrap()
                .contains("<at id=all></at>")
        );
        assert!(webhook_body(&n, &[], 1, None).get("sign").is_none());
    }

    #[test]
    fn platform_errors_carry_code_and_retryability() {
        let env = FakeEnv::new(|r| {
            if r.url.contains("tenant_access_token") {
                json_response(
                    200,
                    json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                )
            } else {
                json_response(200, json!({"code": 99991400, "msg": "rate limited"}))
            }
        });
        let a = app();
        let c = Client::new(&env, &a).unwrap();
        let e = c.api(Method::Get, "/x", None).unwrap_err();
        assert_eq!(e, Error::platform(99991400, "rate limited", true));
        env.set_responder(|_| json_response(200, json!({"code": 1234, "msg": "no permission"})));
        // The token is cached, so the unknown code comes straight from the call.
        let e = c.api(Method::Get, "/x", None).unwrap_err();
        assert_eq!(e, Error::platform(1234, "no permission", false));
        // An IP the app's allowlist refuses does not go away by retrying.
        let denied = "ip 203.0.113.9 is denied by app setting";
        env.set_responder(move |_| json_response(400, json!({"code": 99991401, "msg": denied})));
        let e = c.api(Method::Get, "/x", None).unwrap_err();
        assert_eq!(e, Error::platform(99991401, denied, false));
    }

    #[test]
    fn robot_rate_limits_are_retryable_and_oversized_messages_never_sent() {
        let env = FakeEnv::new(|_| {
            json_response(200, json!({"code": 11232, "msg": "frequency limited"}))
        });
        let mut n = note(Target::Chat("x".into()));
        let url = "https://open.feishu.cn/open-apis/bot/v2/hook/x";
        let e = send_webhook(&env, None, url, None, &n).unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(env.sent.borrow().len(), 1);
        // Under notify's 20,000-byte markdown cap, but over 20 KB once escaped and wrapped.
        n.markdown = "\n".repeat(19_000);
        let e = send_webhook(&env, None, url, None, &n).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("20 KB")),
            "{e:?}"
        );
        assert_eq!(env.sent.borrow().len(), 1, "nothing sent");
    }
}

#[cfg(test)]
mod uuid_tests {
    use super::tests::app;
    use super::*;
    use crate::env::fake::{FakeEnv, json_response};

    /// Feishu answers "uuid already used" and reads back an instance of a definition this
    /// store did not create: the start refuses it rather than adopt someone else's approval.
    #[test]
    fn a_uuid_conflict_adopts_only_its_own_definitions_instance() {
        for (owner, adopted) in [("DEF1", true), ("OTHER", false)] {
            let env = FakeEnv::new(move |r| {
                let path = r.url.split('?').next().unwrap_or_default();
                let path = path.trim_start_matches("http://127.0.0.1:1");
                match (r.method, path) {
                    (_, "/open-apis/auth/v3/tenant_access_token/internal") => json_response(
                        200,
                        json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                    ),
                    ("POST", "/open-apis/approval/v4/approvals") => {
                        json_response(200, json!({"code": 0, "data": {"approval_code": "DEF1"}}))
                    }
                    ("POST", "/open-apis/approval/v4/instances") => {
                        json_response(400, json!({"code": 60012, "msg": "uuid conflict"}))
                    }
                    ("GET", p) if p.starts_with("/open-apis/approval/v4/instances/") => {
                        json_response(
                            200,
                            json!({"code": 0, "data": {"approval_code": owner,
                                "instance_code": "I9", "status": "APPROVED"}}),
                        )
                    }
                    _ => json_response(200, json!({"code": 0, "data": {}})),
                }
            });
            let mut req = crate::platform::dingtalk::tests::request();
            req.initiator = UserRef::Id("ou_a".into());
            match create(&env, &app(), &req, "uuid-of-key") {
                Ok(c) => assert!(adopted && c.instance_id == "I9"),
                Err(e) => {
                    assert!(!adopted && !e.maybe_created, "{e:?}");
                    // Retryable: it may be a start with this key not finished yet.
                    assert!(matches!(
                        e.error,
                        Error::Platform {
                            code: UUID_CONFLICT,
                            retryable: true,
                            ..
                        }
                    ));
                }
            }
            // The key's token is the uuid: the same for every attempt, however the store's
            // definitions come and go.
            let sent = env.sent.borrow();
            let create = sent
                .iter()
                .find(|r| r.url.ends_with("/open-apis/approval/v4/instances"))
                .unwrap();
            let body: Value = serde_json::from_slice(&create.body).unwrap();
            assert_eq!(body["uuid"], "uuid-of-key");
        }
    }

    /// The first attempt created the instance on a definition, but its answer was lost; an
    /// admin then deleted that definition, so the retry makes a new one and Feishu answers
    /// 60012 for the uuid. The instance is on a definition this store used, not the kept one:
    /// it is adopted, rather than refused on every retry while the approval waits unseen.
    #[test]
    fn a_uuid_conflict_adopts_an_instance_on_a_definition_since_replaced() {
        #[derive(Default)]
        struct Feishu {
            definitions: usize,
            deleted: Vec<String>,
            /// uuid → approval code of its instance
            instances: Vec<(String, String)>,
            /// `instances/cc` requests: each adds a CC entry to the instance's timeline.
            ccs: usize,
        }
        let feishu = std::rc::Rc::new(std::cell::RefCell::new(Feishu::default()));
        let state = feishu.clone();
        let env = FakeEnv::new(move |r| {
            let mut f = state.borrow_mut();
            let path = r.url.split('?').next().unwrap_or_default();
            let path = path.trim_start_matches("http://127.0.0.1:1");
            let body: Value = serde_json::from_slice(&r.body).unwrap_or_default();
            match (r.method, path) {
                (_, "/open-apis/auth/v3/tenant_access_token/internal") => json_response(
                    200,
                    json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                ),
                ("POST", "/open-apis/approval/v4/approvals") => {
                    f.definitions += 1;
                    let code = format!("DEF{}", f.definitions);
                    json_response(200, json!({"code": 0, "data": {"approval_code": code}}))
                }
                ("POST", "/open-apis/approval/v4/instances") => {
                    let code = body["approval_code"].as_str().unwrap().to_string();
                    let uuid = body["uuid"].as_str().unwrap().to_string();
                    if f.deleted.contains(&code) {
                        json_response(400, json!({"code": DEFINITION_NOT_FOUND, "msg": "gone"}))
                    } else if f.instances.iter().any(|(u, _)| *u == uuid) {
                        json_response(400, json!({"code": 60012, "msg": "uuid conflict"}))
                    } else {
                        f.instances.push((uuid, code));
                        // Created, but the answer never reaches the plugin.
                        Err(Error::transport("timed out"))
                    }
                }
                ("POST", "/open-apis/approval/v4/instances/cc") => {
                    f.ccs += 1;
                    json_response(200, json!({"code": 0, "data": {}}))
                }
                ("GET", p) if p.starts_with("/open-apis/approval/v4/instances/") => {
                    let uuid = p.rsplit('/').next().unwrap();
                    let (_, code) = f.instances.iter().find(|(u, _)| u == uuid).unwrap();
                    let timeline = vec![json!({"type": "CC"}); f.ccs.min(1)];
                    json_response(
                        200,
                        json!({"code": 0, "data": {"approval_code": code,
                            "instance_code": "I1", "status": "PENDING", "timeline": timeline}}),
                    )
                }
                _ => json_response(200, json!({"code": 0, "data": {}})),
            }
        });
        let mut req = crate::platform::dingtalk::tests::request();
        req.initiator = UserRef::Id("ou_a".into());
        let Err(lost) = create(&env, &app(), &req, "uuid-of-key") else {
            panic!("the answer was lost")
        };
        assert!(lost.maybe_created, "{lost:?}");
        feishu.borrow_mut().deleted.push("DEF1".into());

        let c = create(&env, &app(), &req, "uuid-of-key").unwrap();
        assert_eq!(c.instance_id, "I1");
        assert_eq!(
            c.meta["approval_code"], "DEF1",
            "the instance's own definition"
        );
        assert_eq!(
            feishu.borrow().ccs,
            1,
            "the attempt that lost its answer sent no cc"
        );
        // Another start with the key (an engine's retry that overlapped) adopts it too; the
        // instance has its copy already.
        let again = create(&env, &app(), &req, "uuid-of-key").unwrap();
        assert_eq!(again.instance_id, c.instance_id);
        let f = feishu.borrow();
        assert_eq!(f.ccs, 1, "cc once");
        assert_eq!(f.definitions, 2, "the retry made a new definition first");
        assert_eq!(f.instances.len(), 1, "one instance");
    }
}

#[cfg(test)]
mod message_uuid_tests {
    use super::tests::{app, note};
    use super::*;
    use crate::env::fake::{FakeEnv, json_response};
    use std::cell::RefCell;
    use std::rc::Rc;

    /// An app message carries a `uuid`; one whose answer was lost (Feishu may have delivered
    /// it) goes out again under the same uuid when the engine retries, so Feishu drops it if
    /// it did. The same notification sent again after it went out is a new message.
    #[test]
    fn a_message_whose_answer_was_lost_is_sent_again_under_its_uuid() {
        let sent: Rc<RefCell<Vec<Value>>> = Rc::default();
        let seen = sent.clone();
        let env = FakeEnv::new(move |r| {
            let path = r.url.trim_start_matches("http://127.0.0.1:1");
            if path.starts_with("/open-apis/auth/v3/tenant_access_token/internal") {
                return json_response(
                    200,
                    json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                );
            }
            assert_eq!(path, "/open-apis/im/v1/messages?receive_id_type=chat_id");
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            seen.borrow_mut().push(body);
            if seen.borrow().len() == 1 {
                return Err(Error::transport("timed out"));
            }
            json_response(200, json!({"code": 0, "data": {"message_id": "om_1"}}))
        });
        let n = note(Target::Chat("oc_ops".into()));
        let lost = send_message(&env, &app(), &n).unwrap_err();
        assert!(lost.is_retryable(), "{lost:?}");
        let receipt = send_message(&env, &app(), &n).unwrap();
        assert_eq!(receipt.message_id.as_deref(), Some("om_1"));
        send_message(&env, &app(), &n).unwrap();
        let sent = sent.borrow();
        let uuids: Vec<&str> = sent.iter().map(|b| b["uuid"].as_str().unwrap()).collect();
        assert_eq!(uuids.len(), 3);
        assert!(uuids.iter().all(|u| u.len() <= 50), "Feishu's limit");
        assert_eq!(uuids[0], uuids[1], "the retry");
        assert_ne!(uuids[1], uuids[2], "sent again");
    }
}

#[cfg(test)]
mod definition_tests {
    use super::tests::app;
    use super::*;
    use crate::env::fake::{FakeEnv, json_response};
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Feishu's definitions and who subscribed to which, per company: enough to see which
    /// definitions a store makes and which app gets their events.
    #[derive(Default)]
    struct Company {
        definitions: Vec<String>,
        /// Definitions ever made, so a re-made one gets a new code.
        made: usize,
        /// (token of the subscribing app, code)
        subscriptions: Vec<(String, String)>,
        failing_subscribes: usize,
        instances: usize,
        /// Bodies of `instances/cc` requests.
        ccs: Vec<Value>,
        failing_ccs: usize,
    }

    fn feishu(company: Rc<RefCell<Company>>) -> FakeEnv {
        FakeEnv::new(move |r| {
            let mut co = company.borrow_mut();
            let path = r.url.split('?').next().unwrap_or_default();
            let path = path.trim_start_matches("http://127.0.0.1:1/open-apis");
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let token = r
                .headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .map(|(_, v)| v.trim_start_matches("Bearer ").to_string())
                .unwrap_or_default();
            let not_found = || json_response(400, json!({"code": 1390002, "msg": "not found"}));
            match path {
                "/auth/v3/tenant_access_token/internal" => json_response(
                    200,
                    json!({"code": 0, "expire": 7200,
                        "tenant_access_token": format!("t-{}", body["app_id"].as_str().unwrap())}),
                ),
                "/approval/v4/approvals" => {
                    co.made += 1;
                    let code = format!("DEF{}", co.made);
                    co.definitions.push(code.clone());
                    json_response(200, json!({"code": 0, "data": {"approval_code": code}}))
                }
                "/approval/v4/instances" => {
                    let code = body["approval_code"].as_str().unwrap().to_string();
                    if !co.definitions.contains(&code) {
                        return not_found();
                    }
                    co.instances += 1;
                    let id = format!("I{}", co.instances);
                    json_response(200, json!({"code": 0, "data": {"instance_code": id}}))
                }
                "/approval/v4/instances/cc" => {
                    assert!(r.url.ends_with("?user_id_type=open_id"), "{}", r.url);
                    if co.failing_ccs > 0 {
                        co.failing_ccs -= 1;
                        return json_response(400, json!({"code": 1390001, "msg": "bad"}));
                    }
                    co.ccs.push(body);
                    json_response(200, json!({"code": 0, "data": {}}))
                }
                p => {
                    let code = p
                        .strip_prefix("/approval/v4/approvals/")
                        .and_then(|p| p.strip_suffix("/subscribe"))
                        .unwrap()
                        .to_string();
                    if co.failing_subscribes > 0 {
                        co.failing_subscribes -= 1;
                        return json_response(
                            400,
                            json!({"code": 1390010, "msg": "no permission"}),
                        );
                    }
                    if !co.definitions.contains(&code) {
                        return not_found();
                    }
                    if co.subscriptions.contains(&(token.clone(), code.clone())) {
                        return json_response(400, json!({"code": 1390007, "msg": "existed"}));
                    }
                    co.subscriptions.push((token, code));
                    json_response(200, json!({"code": 0, "data": {}}))
                }
            }
        })
    }

    fn request() -> ApprovalRequest {
        let mut req = crate::platform::dingtalk::tests::request();
        req.initiator = UserRef::Id("ou_a".into());
        req
    }

    #[test]
    fn a_definition_is_made_once_and_subscribed_by_each_app_that_uses_it() {
        let company = Rc::new(RefCell::new(Company {
            failing_subscribes: 2,
            ..Company::default()
        }));
        let env = feishu(company.clone());
        // The app lacks the subscribe permission for two attempts: the definition is kept,
        // not made again per attempt.
        for _ in 0..2 {
            let Err(e) = create(&env, &app(), &request(), "k") else {
                panic!("a failed subscribe must fail the start")
            };
            assert!(matches!(e.error, Error::Platform { code: 1390010, .. }));
        }
        assert_eq!(
            create(&env, &app(), &request(), "k").unwrap().instance_id,
            "I1"
        );
        create(&env, &app(), &request(), "k2").unwrap();
        // The store's app now points at another Feishu app of the same company: it subscribes
        // the definition itself, or its events would never come.
        let other = ImApp {
            app_id: "cli_2".into(),
            app_secret: "s2".into(),
            ..app()
        };
        create(&env, &other, &request(), "k3").unwrap();
        let co = company.borrow();
        assert_eq!(co.definitions, ["DEF1"]);
        assert_eq!(
            co.subscriptions,
            [
                ("t-cli_1".into(), "DEF1".into()),
                ("t-cli_2".into(), "DEF1".into())
            ]
        );
    }

    /// The title goes as an i18n key the instance's texts define; the cc list, which
    /// Feishu's definitions cannot leave to the start, goes out from the initiator once the
    /// instance exists. A cc Feishu refuses fails nothing: the approval exists.
    #[test]
    fn the_cc_list_follows_the_create_and_the_title_is_an_i18n_key() {
        let company = Rc::new(RefCell::new(Company {
            failing_ccs: 1,
            ..Company::default()
        }));
        let env = feishu(company.clone());
        let first = create(&env, &app(), &request(), "k").unwrap();
        assert!(company.borrow().ccs.is_empty());
        let second = create(&env, &app(), &request(), "k2").unwrap();
        let sent = env.sent.borrow();
        let creates: Vec<Value> = sent
            .iter()
            .filter(|r| r.url.ends_with("/approval/v4/instances"))
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert_eq!(creates.len(), 2);
        let body = &creates[1];
        assert_eq!(body["title"], TITLE_KEY);
        assert_eq!(
            body["i18n_resources"][0]["texts"],
            json!([{"key": TITLE_KEY, "value": "Deploy"}])
        );
        assert!(body.get("node_cc_open_id_list").is_none(), "{body}");
        assert_eq!(
            company.borrow().ccs,
            [
                json!({"approval_code": "DEF1", "instance_code": second.instance_id,
                "user_id": "ou_a", "cc_user_ids": ["d"]})
            ]
        );
        assert_ne!(first.instance_id, second.instance_id);
    }

    #[test]
    fn a_definition_feishu_no_longer_knows_is_made_again() {
        let company = Rc::new(RefCell::new(Company::default()));
        let env = feishu(company.clone());
        create(&env, &app(), &request(), "k").unwrap();
        // Deleted in the admin console: the create is refused and the start makes a new one.
        company.borrow_mut().definitions.clear();
        let c = create(&env, &app(), &request(), "k2").unwrap();
        assert_eq!(c.meta["approval_code"], "DEF2");
        assert_eq!(company.borrow().definitions, ["DEF2"]);
        // Subscribed too, or its events would never come.
        assert!(
            company
                .borrow()
                .subscriptions
                .contains(&("t-cli_1".into(), "DEF2".into()))
        );
        // The app moved to another company, where the kept code is unknown to its subscribe.
        let moved = feishu(Rc::new(RefCell::new(Company {
            definitions: vec!["X".into()],
            made: 5,
            ..Company::default()
        })));
        *moved.kv.borrow_mut() = env.snapshot();
        let other = ImApp {
            app_id: "cli_9".into(),
            ..app()
        };
        let c = create(&moved, &other, &request(), "k3").unwrap();
        assert_eq!(c.meta["approval_code"], "DEF6");
    }
}
