//! DingTalk: app token, the one-field approval form, process instances (AND / OR / single
//! approver nodes), event callbacks in the WX frame, custom robots and work notifications.
//!
//! Two API generations are in use: the "new" API (`api.dingtalk.com`, token in the
//! `x-acs-dingtalk-access-token` header, HTTP status + `{code, message}` errors) and the legacy
//! one (`oapi.dingtalk.com`, `?access_token=`, `{errcode, errmsg}`). For self-built (internal)
//! apps both accept the same app access token, so one token from `/v1.0/oauth2/accessToken`
//! serves both and is cached once.

use super::{CreateError, Created, Parsed, Prepared, form_text, json_u64};
use crate::approval::{Event, Inbound, Record};
use crate::callback::{WxSecrets, unsigned};
use crate::crypto::undecryptable;
use crate::crypto::wx::WxKey;
use crate::crypto::{self, sorted_sha1_hex};
use crate::env::{Env, hex};
use crate::error::{Error, Result};
use crate::http::{self, Method, call_checked, call_json, percent_encode, status_is_retryable};
use crate::model::{
    ApprovalRequest, ApprovalStatus, Decision, HttpRequest, HttpResponse, ImApp, Level,
    Notification, Receipt, SignMode, Target, UserRef,
};
use crate::retry::Repeat;
use crate::token::{self, Issued};
use serde_json::{Value, json};

pub const NEW_BASE: &str = "https://api.dingtalk.com";
pub const LEGACY_BASE: &str = "https://oapi.dingtalk.com";

/// Name and label of the one form every instance uses; the request's fields go in as text.
const FORM_NAME: &str = "imbridge 审批";
const FIELD_LABEL: &str = "详情";
const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";
/// `asyncsend_v2` accepts at most 100 user ids per call.
const NOTICE_BATCH: usize = 100;
/// DingTalk's caps: a work notification's `msg` in bytes, an instance's `ccList`.
const MAX_NOTICE_MSG: usize = 2048;
/// DingTalk refuses a longer robot message (460101, "message too long, exceed 20000 bytes").
const MAX_ROBOT_BODY: usize = 20_000;
const MAX_CC_LIST: usize = 50;
/// A form value's limit (`formComponentValues[].value`), in characters as DingTalk (Java)
/// counts them: UTF-16 units, two for an emoji.
const MAX_FIELD_CHARS: usize = 65_535;
/// A terminate's `remark` limit, counted the same way.
const MAX_REMARK_CHARS: usize = 1024;

/// The longest start of `s` within `max` UTF-16 units, cut between characters.
fn utf16_prefix(s: &str, max: usize) -> &str {
    let mut units = 0;
    for (i, c) in s.char_indices() {
        units += c.len_utf16();
        if units > max {
            return &s[..i];
        }
    }
    s
}
/// The terminate API's code both in an approval's first 15 s and once it has ended.
const STATUS_EXCEPTION: &str = "aflowProcessInstStatusException:";

/// String code the new API answers for an expired or unknown access token.
const NEW_TOKEN_INVALID: &str = "InvalidAuthentication";
/// Legacy errcodes for a bad or expired access token.
const LEGACY_TOKEN_INVALID: &[i64] = &[40014, 42001];
/// Legacy errcodes worth retrying: system busy, API throttling, robot rate limits (410100 is
/// the robot's documented "sending too fast", throttled for 10 minutes; 130101 an older one).
const LEGACY_RETRYABLE: &[i64] = &[-1, 90002, 90018, 130101, 410100];
/// Stand-in code for new-API errors, whose codes are strings (kept in the message).
fn new_api_code(status: u16) -> i64 {
    -i64::from(status)
}

fn is_token_invalid(e: &Error) -> bool {
    match e {
        Error::Platform { code, message, .. } => {
            LEGACY_TOKEN_INVALID.contains(code) || message.starts_with(NEW_TOKEN_INVALID)
        }
        _ => false,
    }
}

/// A new-API reply: any 2xx is success; otherwise `{code, message, requestid}`.
fn check_new(reply: http::JsonReply) -> Result<Value> {
    if (200..300).contains(&reply.status) {
        return Ok(reply.body);
    }
    let code = reply
        .body
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("Unknown");
    let msg = reply
        .body
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("");
    // DingTalk's per-second and per-minute limits answer 403 with
    // `Forbidden.AccessDenied.QpsLimitForAppkeyAndApi` (…ForApi, …QpmLimit…); its monthly
    // quota, `Forbidden.AccessDenied.ApiCountLimitForOrg`, does not go away by waiting.
    let throttled = code.contains("Throttling")
        || code.contains("ServiceUnavailable")
        || code.starts_with("Forbidden.AccessDenied.Qps")
        || code.starts_with("Forbidden.AccessDenied.Qpm");
    Err(Error::platform(
        new_api_code(reply.status),
        format!("{code}: {msg} (HTTP {})", reply.status),
        throttled || status_is_retryable(reply.status),
    ))
}

const LEGACY_RESULT: http::ResultCode = http::ResultCode {
    code: &["errcode"],
    msg: &["errmsg"],
    retryable: LEGACY_RETRYABLE,
};

/// A legacy reply: `errcode` 0 is success, anything else (or its absence) an error.
fn check_legacy(mut reply: http::JsonReply) -> Result<Value> {
    unwrap_sub_code(&mut reply.body);
    LEGACY_RESULT.check(reply, |reply, msg| {
        // Gateways in front of oapi answer some failures in the new-API shape.
        if reply.status >= 400 && reply.body.get("code").is_some() {
            return check_new(reply);
        }
        Err(http::status_error(
            reply.status,
            format_args!("without a DingTalk errcode {msg}"),
        ))
    })
}

/// `/topapi` wraps its errors: `errcode` 88 with the real code in `sub_code` ("40014" for a
/// bad token, "90018" for throttling; the message names both). The real code is what decides
/// a token refresh or a retry, so it takes the wrapper's place.
fn unwrap_sub_code(body: &mut Value) {
    if body.get("errcode").and_then(Value::as_i64) != Some(88) {
        return;
    }
    // A sub_code of 0 must not turn the error into a success.
    if let Some(code) = body
        .get("sub_code")
        .and_then(|c| c.as_i64().or_else(|| c.as_str()?.parse().ok()))
        .filter(|&c| c != 0)
    {
        body["errcode"] = code.into();
    }
}

struct Client<'a, E: Env + ?Sized> {
    env: &'a E,
    app: &'a ImApp,
    base: String,
    legacy: String,
    token_key: String,
}

impl<'a, E: Env + ?Sized> Client<'a, E> {
    fn new(env: &'a E, app: &'a ImApp) -> Result<Self> {
        if app.app_id.trim().is_empty() || app.app_secret.trim().is_empty() {
            return Err(Error::config(
                "app-id (AppKey) and app-secret (AppSecret) are required",
            ));
        }
        // A configured api-base (a private gateway or the simulator) serves both generations.
        let base = http::api_base(app.api_base.as_deref(), NEW_BASE)?;
        let legacy = http::api_base(app.api_base.as_deref(), LEGACY_BASE)?;
        let token_key = token::cache_key(app, &base);
        Ok(Client {
            env,
            app,
            base,
            legacy,
            token_key,
        })
    }

    fn fetch_token(&self) -> Result<Issued> {
        let url = format!("{}/v1.0/oauth2/accessToken", self.base);
        let body = json!({"appKey": self.app.app_id, "appSecret": self.app.app_secret});
        let reply = call_checked(
            self.env,
            Method::Post,
            &url,
            &[],
            Some(&body),
            Repeat::Safe,
            check_new,
        )?;
        Ok(Issued {
            token: reply
                .get("accessToken")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            ttl_secs: json_u64(reply.get("expireIn")).unwrap_or(0),
        })
    }

    /// A new-API call; `path` may carry a query string. The new API's GETs are all reads,
    /// retried on throttling and 5xx; its POSTs create or change something and are sent once.
    fn api(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        self.api_as(method, path, body, |e| e, is_token_invalid)
    }

    /// A create: the request's own errors are `CreateError::sent`, while failing to get a
    /// token (before it, or after the platform refused the one it carried) sent nothing.
    fn create(&self, path: &str, body: &Value) -> Result<Value, CreateError> {
        let invalid = |e: &CreateError| is_token_invalid(&e.error);
        self.api_as(Method::Post, path, Some(body), CreateError::sent, invalid)
    }

    fn api_as<R: From<Error>>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        wrap: fn(Error) -> R,
        is_invalid: fn(&R) -> bool,
    ) -> Result<Value, R> {
        let url = format!("{}{}", self.base, path);
        let repeat = match method {
            Method::Get => Repeat::Safe,
            Method::Post => Repeat::Never,
        };
        token::with_token(
            self.env,
            &self.token_key,
            &|| self.fetch_token(),
            is_invalid,
            &mut |tok| {
                let headers = [(TOKEN_HEADER, tok)];
                call_checked(self.env, method, &url, &headers, body, repeat, check_new)
                    .map_err(wrap)
            },
        )
    }

    /// A legacy (oapi) POST with the same app token in the query; oapi reads are POSTs too,
    /// so the caller says whether it may be repeated.
    fn legacy_post(&self, path: &str, body: &Value, repeat: Repeat) -> Result<Value> {
        token::with_token(
            self.env,
            &self.token_key,
            &|| self.fetch_token(),
            is_token_invalid,
            &mut |tok| {
                let url = format!(
                    "{}{}?access_token={}",
                    self.legacy,
                    path,
                    percent_encode(tok)
                );
                call_checked(
                    self.env,
                    Method::Post,
                    &url,
                    &[],
                    Some(body),
                    repeat,
                    check_legacy,
                )
            },
        )
    }

    /// DingTalk userIds; mobiles are looked up one by one (the only lookup DingTalk offers).
    fn resolve(&self, users: &[UserRef]) -> Result<Vec<String>> {
        users.iter().map(|u| self.resolve_one(u)).collect()
    }

    fn resolve_one(&self, user: &UserRef) -> Result<String> {
        match user {
            UserRef::Id(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
            UserRef::Id(_) => Err(Error::input("empty user id")),
            UserRef::Email(_) => Err(Error::input(
                "DingTalk has no user lookup by email; use a user id or a mobile",
            )),
            UserRef::Mobile(m) => {
                let reply = match self.legacy_post(
                    "/topapi/v2/user/getbymobile",
                    &json!({"mobile": super::normalize_mobile(m)?}),
                    Repeat::Safe,
                ) {
                    // 60121: no such user in this organisation.
                    Err(Error::Platform { code: 60121, .. }) => {
                        return Err(Error::input(format!("no DingTalk user found for {m}")));
                    }
                    other => other?,
                };
                reply
                    .get("result")
                    .and_then(|r| r.get("userid"))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| Error::input(format!("no DingTalk user found for {m}")))
            }
        }
    }

    /// The process code of our one-textarea form: from the KV cache, else found among the
    /// templates the originator can see (a previous install of the plugin made it), else
    /// created. Cached per app so this costs API calls once.
    fn process_code(&self, originator: &str) -> Result<String> {
        super::cached_id(self.env, &self.form_key(), "form", || {
            // One deleted since may still be listed a while: adopting it would only be
            // refused and forgotten again on every start.
            if let Some(code) = self.find_form(originator)?.filter(|c| !self.form_gone(c)) {
                return Ok(code);
            }
            let body = json!({
                "name": FORM_NAME,
                "description": "Created by imbridge for workflow-engine approvals",
                "formComponents": [{
                    "componentType": "TextareaField",
                    "props": {"componentId": "TextareaField_imbridge", "label": FIELD_LABEL,
                              "required": true},
                }],
            });
            let reply = self.api(Method::Post, "/v1.0/workflow/forms", Some(&body))?;
            reply
                .get("result")
                .and_then(|r| r.get("processCode"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| Error::platform(-1, "form created without a processCode", true))
        })
    }

    fn form_key(&self) -> String {
        super::app_object_key(self.app, &self.base, "dform")
    }

    /// Whether DingTalk says the form `code` no longer exists: its schema is `formNotExist`,
    /// or `aflowProcessCodeIsError` ("failed to get the template, or it was deleted").
    fn form_gone(&self, code: &str) -> bool {
        let path = format!(
            "/v1.0/workflow/forms/schemas/processCodes?processCode={}",
            percent_encode(code)
        );
        match self.api(Method::Get, &path, None) {
            Err(Error::Platform { message, .. }) => ["formNotExist:", "aflowProcessCodeIsError:"]
                .iter()
                .any(|c| message.starts_with(c)),
            _ => false,
        }
    }

    fn find_form(&self, user_id: &str) -> Result<Option<String>> {
        let mut next = "0".to_string();
        // Organisations rarely have more than a few hundred templates; stop after 10 pages.
        for _ in 0..10 {
            let reply = self.api(
                Method::Get,
                &format!(
                    "/v1.0/workflow/processes/userVisibilities/templates?userId={}&maxResults=100&nextToken={}",
                    percent_encode(user_id),
                    percent_encode(&next)
                ),
                None,
            )?;
            let result = reply.get("result");
            for p in result
                .and_then(|r| r.get("processList"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if p.get("name").and_then(Value::as_str) == Some(FORM_NAME)
                    && let Some(code) = p.get("processCode").and_then(Value::as_str)
                {
                    return Ok(Some(code.to_string()));
                }
            }
            match result.and_then(|r| r.get("nextToken")) {
                Some(Value::String(s)) if !s.is_empty() => next = s.clone(),
                Some(Value::Number(n)) => next = n.to_string(),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

fn mode_name(m: SignMode) -> &'static str {
    match m {
        SignMode::And => "and",
        SignMode::Or => "or",
    }
}

/// One approver entry per node; a single approver is `NONE` (DingTalk rejects AND/OR there).
pub fn approvers_body(nodes: &[(SignMode, Vec<String>)]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|(mode, ids)| {
                let action = match (ids.len(), mode) {
                    (1, _) => "NONE",
                    (_, SignMode::And) => "AND",
                    (_, SignMode::Or) => "OR",
                };
                json!({"actionType": action, "userIds": ids})
            })
            .collect(),
    )
}

/// The text of the one form field: title first (DingTalk titles instances itself), then the
/// request's fields and link.
fn field_text(req: &ApprovalRequest) -> String {
    let body = form_text(req);
    if body == req.title {
        body
    } else {
        format!("{}\n{}", req.title, body)
    }
}

pub fn prepare(env: &(impl Env + ?Sized), app: &ImApp, req: &ApprovalRequest) -> Result<Prepared> {
    let c = Client::new(env, app)?;
    // Before the lookups, which would be wasted.
    if req.cc.len() > MAX_CC_LIST {
        return Err(Error::input(format!(
            "DingTalk takes at most {MAX_CC_LIST} cc recipients"
        )));
    }
    let text = field_text(req);
    if text.encode_utf16().count() > MAX_FIELD_CHARS {
        return Err(Error::input(format!(
            "DingTalk's form field holds at most {MAX_FIELD_CHARS} characters of title, \
             fields and link"
        )));
    }
    let (originator, nodes, cc) = super::resolve_request(req, &|u| c.resolve_one(u))?;
    let code = c.process_code(&originator)?;
    let mut body = json!({
        "processCode": code,
        "originatorUserId": originator,
        "approvers": approvers_body(&nodes),
        "formComponentValues": [{"name": FIELD_LABEL, "value": text}],
    });
    if !cc.is_empty() {
        body["ccList"] = json!(cc);
        body["ccPosition"] = json!("FINISH");
    }
    let layout: Vec<Value> = nodes
        .iter()
        .map(|(m, ids)| json!({"mode": mode_name(*m), "approvers": ids}))
        .collect();
    Ok(Prepared {
        body,
        meta: json!({"nodes": layout, "originator": originator, "process_code": code}),
    })
}

pub fn send(env: &(impl Env + ?Sized), app: &ImApp, p: Prepared) -> Result<Created, CreateError> {
    let reply = Client::new(env, app)?.create("/v1.0/workflow/processInstances", &p.body)?;
    let instance = reply
        .get("instanceId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CreateError::without_id("processInstances"))?;
    Ok(Created {
        instance_id: instance.to_string(),
        meta: p.meta,
    })
}

/// [`super::forget_gone`] for the form a refused create was made with.
pub fn forget_gone_form(env: &(impl Env + ?Sized), app: &ImApp, code: &str, error: Error) -> Error {
    let Ok(c) = Client::new(env, app) else {
        return error;
    };
    super::forget_if_gone(env, &c.form_key(), "form", code, error, || {
        http::bounded(env, super::GONE_CHECK_LIMIT_MS, || c.form_gone(code))
    })
}

/// DingTalk's new API writes times like `2024-03-01T08:05Z` or `2024-03-01T08:05:09Z`
/// (sometimes with a `+08:00` offset); legacy payloads use epoch milliseconds.
pub fn parse_time_ms(v: Option<&Value>) -> Option<u64> {
    if let Some(ms) = json_u64(v) {
        return Some(ms);
    }
    let s = v?.as_str()?.trim();
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset_min) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':').unwrap_or((&off[1..], "0"));
        let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
        if !(0..=23).contains(&oh) || !(0..=59).contains(&om) {
            return None;
        }
        (c, sign * (oh * 60 + om))
    } else {
        (time, 0)
    };
    let mut t = clock.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec_ms = match t.next() {
        Some(s) => seconds_ms(s)?,
        None => 0,
    };
    // Bounding every field also keeps the arithmetic below from overflowing: the input is
    // the platform's (a poll reply or an authenticated event), but a wrapped time would be a
    // wrong decision time.
    if !(1..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&mi)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 - offset_min * 60;
    let ms = secs * 1000 + sec_ms;
    u64::try_from(ms).ok()
}

/// `09` or `09.5` or `09.123456` as milliseconds, without a float parser (~5 KB of wasm).
fn seconds_ms(s: &str) -> Option<i64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let ms = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |acc, d| acc * 10 + i64::from(d - b'0'));
    (0..=60).contains(&whole).then_some(whole * 1000 + ms)
}

fn lower(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or("").to_ascii_lowercase()
}

/// Decisions from finished tasks, then the instance status.
pub fn events_from_instance(result: &Value) -> Vec<Event> {
    let mut events = Vec::new();
    for t in result
        .get("tasks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let approved = match lower(t.get("result")).as_str() {
            "agree" => true,
            "refuse" => false,
            _ => continue,
        };
        let Some(user) = t.get("userId").and_then(Value::as_str) else {
            continue;
        };
        let comment = result
            .get("operationRecords")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|r| {
                r.get("userId").and_then(Value::as_str) == Some(user)
                    && lower(r.get("result")) == lower(t.get("result"))
            })
            .and_then(|r| r.get("remark"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        events.push(Event::Decision(Decision {
            user: user.to_string(),
            approved,
            comment,
            at_ms: parse_time_ms(t.get("finishTime")).unwrap_or(0),
        }));
    }
    let status = match (
        result
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_uppercase()
            .as_str(),
        lower(result.get("result")).as_str(),
    ) {
        ("COMPLETED", "agree") => Some(ApprovalStatus::Approved),
        ("COMPLETED", "refuse") => Some(ApprovalStatus::Rejected),
        ("TERMINATED" | "CANCELED", _) => Some(ApprovalStatus::Canceled),
        _ => None,
    };
    events.extend(status.map(Event::Status));
    events
}

pub fn poll(env: &(impl Env + ?Sized), app: &ImApp, rec: &Record) -> Result<Vec<Event>> {
    let c = Client::new(env, app)?;
    let reply = c.api(
        Method::Get,
        &format!(
            "/v1.0/workflow/processInstances?processInstanceId={}",
            percent_encode(&rec.approval.instance_id)
        ),
        None,
    )?;
    let result = reply
        .get("result")
        .ok_or_else(|| Error::platform(-1, "instance reply without a result", true))?;
    Ok(events_from_instance(result))
}

pub fn cancel(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    rec: &Record,
    reason: Option<&str>,
) -> Result<()> {
    let c = Client::new(env, app)?;
    let mut body = json!({
        "processInstanceId": rec.approval.instance_id,
        "isSystem": true,
        // Cut rather than refused: a long reason must not keep the approval open.
        "remark": utf16_prefix(
            reason
                .filter(|r| !r.trim().is_empty())
                .unwrap_or("canceled by the workflow"),
            MAX_REMARK_CHARS,
        ),
    });
    if let Some(o) = rec.meta.get("originator").and_then(Value::as_str) {
        body["operatingUserId"] = json!(o);
    }
    let reply = c
        .api(
            Method::Post,
            "/v1.0/workflow/processInstances/terminate",
            Some(&body),
        )
        .map_err(|e| match e {
            // DingTalk's answer both in an approval's first 15 s and once it has ended; the
            // caller reads the approval to tell the second apart, so this is the first.
            Error::Platform { code, message, .. } if message.starts_with(STATUS_EXCEPTION) => {
                Error::platform(
                    code,
                    format!("{message}; DingTalk withdraws no approval in its first 15 s: retry"),
                    true,
                )
            }
            e => e,
        })?;
    // A 2xx is not enough: the reply says whether the instance was terminated, and a record
    // marked canceled is final, while approvers could still decide the live instance.
    if reply.get("result").and_then(Value::as_bool) != Some(true) {
        return Err(Error::platform(
            -1,
            "DingTalk did not terminate the instance (no `result: true` in its reply)",
            false,
        ));
    }
    Ok(())
}

// ---- callbacks ----

fn first<'q>(q: &'q [(String, String)], names: &[&str]) -> Option<&'q str> {
    names
        .iter()
        .find_map(|n| q.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()))
}

pub fn parse_callback(env: &(impl Env + ?Sized), app: &ImApp, req: &HttpRequest) -> Result<Parsed> {
    let wx = WxSecrets::of(app, "DingTalk", "AppKey")?;
    if !req.method.eq_ignore_ascii_case("POST") {
        return Err(Error::input("DingTalk callbacks are POST requests"));
    }
    let q = http::parse_query(&req.query)?;
    let signed = [
        first(&q, &["msg_signature", "signature"]),
        first(&q, &["timestamp", "timeStamp"]),
        first(&q, &["nonce"]),
    ];
    // An unsigned push is refused before its body is looked at.
    if signed.contains(&None) {
        return Err(unsigned());
    }
    let outer: Value =
        serde_json::from_slice(&req.body).map_err(|_| Error::input("callback body is not JSON"))?;
    let encrypt = outer
        .get("encrypt")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::input("callback body has no `encrypt` field"))?;
    wx.verify(env, app, signed, encrypt, 1000)?;
    let event: Value = wx
        .key
        .decrypt(encrypt, wx.receive_id)
        .ok()
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .ok_or_else(undecryptable)?;
    Ok(Parsed {
        response: success_reply(env, &wx.key, wx.token, wx.receive_id),
        events: approval_events(env, &event),
    })
}

/// An event delivered over Stream mode, as the plaintext a callback would decrypt to
/// (`{"EventType": …, …}`), already authenticated by the connection the host opened.
pub fn parse_event(env: &(impl Env + ?Sized), event: &[u8]) -> Result<Vec<Inbound>> {
    let event: Value =
        serde_json::from_slice(event).map_err(|_| Error::input("event is not JSON"))?;
    Ok(approval_events(env, &event))
}

fn approval_events(env: &(impl Env + ?Sized), event: &Value) -> Vec<Inbound> {
    match event.get("EventType").and_then(Value::as_str) {
        Some("bpms_task_change") => task_event(env, event),
        Some("bpms_instance_change") => instance_event(event),
        // check_url and every other subscription are acknowledged and ignored.
        _ => Vec::new(),
    }
}

/// The encrypted "success" every accepted push must be answered with; DingTalk treats any
/// other answer as a failed delivery (and disables callbacks that keep failing).
fn success_reply(
    env: &(impl Env + ?Sized),
    key: &WxKey,
    token: &str,
    app_key: &str,
) -> HttpResponse {
    // The frame's random prefix and the nonce from one host call.
    let bytes = env.random_bytes(24);
    let (prefix, nonce) = bytes.split_at(16);
    let mut random = [0u8; 16];
    random.copy_from_slice(prefix);
    let encrypt = key.encrypt(random, b"success", app_key);
    let ts = env.now_ms().to_string();
    let nonce = hex(nonce);
    let sig = sorted_sha1_hex(&[token, &ts, &nonce, &encrypt]);
    HttpResponse::json(
        200,
        &json!({"msg_signature": sig, "timeStamp": ts, "nonce": nonce, "encrypt": encrypt}),
    )
}

fn instance_id_of(ev: &Value) -> Option<String> {
    ev.get("processInstanceId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `type: finish` with `result: agree|refuse` is a decision; start, redirect and cancel
/// (a task withdrawn, e.g. the other OR approvers) say nothing about the outcome.
fn task_event(env: &(impl Env + ?Sized), ev: &Value) -> Vec<Inbound> {
    let Some(instance) = instance_id_of(ev) else {
        return Vec::new();
    };
    if lower(ev.get("type")) != "finish" {
        return Vec::new();
    }
    let result = lower(ev.get("result"));
    let approved = match result.as_str() {
        "agree" => true,
        "refuse" => false,
        _ => return Vec::new(),
    };
    let Some(user) = ev.get("staffId").and_then(Value::as_str) else {
        return Vec::new();
    };
    vec![Inbound {
        instance_id: instance,
        event: Event::Decision(Decision {
            user: user.to_string(),
            approved,
            comment: ev
                .get("remark")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            at_ms: parse_time_ms(ev.get("finishTime"))
                .or_else(|| parse_time_ms(ev.get("createTime")))
                .unwrap_or_else(|| env.now_ms()),
        }),
    }]
}

/// `finish` carries the outcome; `terminate` is a revoke (in the app or through the API),
/// `delete` an instance an admin deleted, which no one can decide any more (as Feishu's
/// `DELETED`).
fn instance_event(ev: &Value) -> Vec<Inbound> {
    let Some(instance) = instance_id_of(ev) else {
        return Vec::new();
    };
    let kind = lower(ev.get("type"));
    let result = lower(ev.get("result"));
    let status = match (kind.as_str(), result.as_str()) {
        ("finish", "agree") => ApprovalStatus::Approved,
        ("finish", "refuse") => ApprovalStatus::Rejected,
        ("terminate" | "delete", _) => ApprovalStatus::Canceled,
        _ => return Vec::new(),
    };
    vec![Inbound {
        instance_id: instance,
        event: Event::Status(status),
    }]
}

// ---- notifications ----

fn level_style(level: Level) -> (&'static str, &'static str) {
    match level {
        Level::Info => ("ℹ️", "#1677FF"),
        Level::Success => ("✅", "#52C41A"),
        Level::Warning => ("⚠️", "#FA8C16"),
        Level::Failure => ("❌", "#F5222D"),
    }
}

/// Markdown for robots and work notices: a coloured title line, the body, then `@` mentions
/// (DingTalk only highlights mentions that also appear in the text).
pub fn markdown_text(n: &Notification, mentions: &[String]) -> String {
    let (emoji, colour) = level_style(n.level);
    let mut s = format!(
        "### {emoji} <font color={colour}>{}</font>\n\n{}",
        n.title, n.markdown
    );
    if let Some(link) = &n.link {
        s.push_str(&format!("\n\n[{}]({})", link.text, link.url));
    }
    let mut tags: Vec<String> = mentions.iter().map(|m| format!("@{m}")).collect();
    if n.mention_all {
        tags.push("@all".into());
    }
    if !tags.is_empty() {
        s.push_str("\n\n");
        s.push_str(&tags.join(" "));
    }
    s
}

pub fn robot_body(n: &Notification, mobiles: &[String], user_ids: &[String]) -> Value {
    let all: Vec<String> = mobiles.iter().chain(user_ids).cloned().collect();
    let text = markdown_text(n, &all);
    // `at` is documented for text and markdown only, so a message that mentions someone stays
    // markdown and carries its link in the text (`markdown_text` adds it); a button card
    // could arrive without pinging anyone.
    let mentions = !all.is_empty() || n.mention_all;
    let mut body = match &n.link {
        Some(link) if !mentions => json!({"msgtype": "actionCard", "actionCard": {
            "title": n.title, "text": text, "singleTitle": link.text, "singleURL": link.url,
            "btnOrientation": "0",
        }}),
        _ => json!({"msgtype": "markdown", "markdown": {"title": n.title, "text": text}}),
    };
    body["at"] = json!({"atMobiles": mobiles, "atUserIds": user_ids, "isAtAll": n.mention_all});
    body
}

/// The robot URL with 加签 parameters appended when a secret is set.
pub fn signed_url(url: &str, secret: Option<&str>, now_ms: u64) -> String {
    match secret.filter(|s| !s.is_empty()) {
        None => url.to_string(),
        Some(secret) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!(
                "{url}{sep}timestamp={now_ms}&sign={}",
                percent_encode(&crypto::robot::dingtalk_sign(now_ms, secret))
            )
        }
    }
}

pub fn send_webhook(
    env: &(impl Env + ?Sized),
    _app: Option<&ImApp>,
    url: &str,
    secret: Option<&str>,
    n: &Notification,
) -> Result<Receipt> {
    let mut mobiles = Vec::new();
    let mut ids = Vec::new();
    for m in &n.mentions {
        match m {
            // The text's "@138…" must match the member's number exactly to ping them.
            UserRef::Mobile(x) => mobiles.push(super::normalize_mobile(x)?),
            UserRef::Id(x) => ids.push(x.trim().to_string()),
            UserRef::Email(_) => {
                return Err(Error::input(
                    "DingTalk robots mention by mobile or user id, not by email",
                ));
            }
        }
    }
    let body = robot_body(n, &mobiles, &ids);
    super::check_robot_body(
        &body,
        MAX_ROBOT_BODY,
        "a DingTalk robot message is limited to 20,000 bytes as sent",
    )?;
    let url = signed_url(url, secret, env.now_ms());
    check_legacy(call_json(env, Method::Post, &url, &[], Some(&body))?)?;
    Ok(Receipt { message_id: None })
}

/// Work notification from the app (`asyncsend_v2`); returns the task ids DingTalk assigned.
pub fn send_message(env: &(impl Env + ?Sized), app: &ImApp, n: &Notification) -> Result<Receipt> {
    let users = match &n.target {
        Target::Users(users) if !users.is_empty() => users,
        Target::Users(_) => return Err(Error::input("no users to notify")),
        Target::Chat(_) => {
            return Err(Error::input(
                "DingTalk chat targets are not supported; use a robot webhook or users",
            ));
        }
        Target::Webhook(_) => return Err(Error::input("webhooks are not app messages")),
    };
    let agent = app
        .agent_id
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::config("agent-id is required for DingTalk work notifications"))?;
    let agent: Value = agent
        .parse::<u64>()
        .map(Value::from)
        .map_err(|_| Error::config("agent-id must be the app's numeric AgentId"))?;
    let c = Client::new(env, app)?;
    let ids = c.resolve(users)?;
    let mentions = c.resolve(&n.mentions)?;
    let msg = json!({"msgtype": "markdown", "markdown": {
        "title": n.title, "text": markdown_text(n, &mentions),
    }});
    if msg.to_string().len() > MAX_NOTICE_MSG {
        return Err(Error::input(format!(
            "DingTalk work notifications are limited to {MAX_NOTICE_MSG} bytes"
        )));
    }
    let bodies: Vec<Value> = ids
        .chunks(NOTICE_BATCH)
        .map(|chunk| json!({"agent_id": agent, "userid_list": chunk.join(","), "msg": msg}))
        .collect();
    let tasks = super::send_parts(env, &app.app_id, &bodies, false, Some(0), &mut |body, _| {
        let reply = c.legacy_post(
            "/topapi/message/corpconversation/asyncsend_v2",
            body,
            Repeat::Never,
        )?;
        Ok(reply.get("task_id").map(|t| match t {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }))
    })?;
    Ok(Receipt {
        message_id: (!tasks.is_empty()).then(|| tasks.join(",")),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::env::fake::{FakeEnv, json_response};

    #[test]
    fn topapi_errors_are_judged_by_their_sub_code() {
        let check = |body: Value| check_legacy(http::JsonReply { status: 200, body });
        let wrapped =
            |sub: Value| json!({"errcode": 88, "errmsg": "ding talk error", "sub_code": sub});
        for (sub, code, retryable) in [
            (json!("40014"), 40014, false),
            (json!(90018), 90018, true),
            (json!("isv.invalid-parameter"), 88, false),
            // Never a success, whatever the wrapper holds.
            (json!("0"), 88, false),
            (Value::Null, 88, false),
        ] {
            match check(wrapped(sub.clone())) {
                Err(Error::Platform {
                    code: c,
                    retryable: r,
                    ..
                }) => {
                    assert_eq!((c, r), (code, retryable), "{sub}")
                }
                other => panic!("{sub}: {other:?}"),
            }
        }
        let bad_token = check(wrapped(json!("40014"))).unwrap_err();
        assert!(is_token_invalid(&bad_token));
        // A robot over its 20 messages a minute: DingTalk's documented code, to retry later.
        let throttled = check(json!({"errcode": 410100, "errmsg": "send too fast"})).unwrap_err();
        assert!(throttled.is_retryable(), "{throttled:?}");
        let refused = check(json!({"errcode": 310000, "errmsg": "sign not match"})).unwrap_err();
        assert!(!refused.is_retryable(), "{refused:?}");
    }
    use crate::env::{Request, Response};
    use crate::model::{ApprovalNode, Link, Platform};
    use crate::platform::create;
    use std::cell::RefCell;
    use std::rc::Rc;

    const AES: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

    pub(crate) fn app() -> ImApp {
        ImApp {
            id: "dt1".into(),
            platform: Platform::Dingtalk,
            app_id: "dingappkey".into(),
            app_secret: "appsecret".into(),
            agent_id: Some("12345".into()),
            encrypt_key: Some(AES.into()),
            token: Some("cbtoken".into()),
            api_base: Some("http://127.0.0.1:1".into()),
            max_clock_skew_secs: None,
        }
    }

    pub(crate) fn push(env: &FakeEnv, plain: &Value, receive_id: &str) -> HttpRequest {
        let enc =
            WxKey::new(AES)
                .unwrap()
                .encrypt([7; 16], plain.to_string().as_bytes(), receive_id);
        let ts = env.now_ms().to_string();
        let sig = sorted_sha1_hex(&["cbtoken", &ts, "nonce1", &enc]);
        HttpRequest {
            method: "POST".into(),
            path: "/cb".into(),
            query: format!("signature={sig}&timestamp={ts}&nonce=nonce1&encrypt_type=aes"),
            headers: vec![],
            body: json!({ "encrypt": enc }).to_string().into_bytes(),
        }
    }

    pub(crate) fn request() -> ApprovalRequest {
        ApprovalRequest {
            key: "k1".into(),
            title: "Deploy".into(),
            initiator: UserRef::Mobile("13800000000".into()),
            nodes: vec![
                ApprovalNode {
                    approvers: vec![UserRef::Id("a".into()), UserRef::Id("b".into())],
                    mode: SignMode::And,
                },
                ApprovalNode {
                    approvers: vec![UserRef::Id("c".into())],
                    mode: SignMode::Or,
                },
            ],
            cc: vec![UserRef::Id("d".into())],
            fields: vec![("env".into(), "prod".into())],
            detail_url: None,
        }
    }

    /// A scripted DingTalk: token, mobile lookup, empty template list, form, instance.
    fn scripted(log: Rc<RefCell<Vec<(String, Value)>>>) -> FakeEnv {
        FakeEnv::new(move |r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            log.borrow_mut().push((r.url.clone(), body));
            scripted_reply(r)
        })
    }

    pub(crate) fn scripted_reply(r: &Request) -> Result<Response> {
        let path = r.url.split('?').next().unwrap_or("");
        match path.trim_start_matches("http://127.0.0.1:1") {
            "/v1.0/oauth2/accessToken" => {
                json_response(200, json!({"accessToken": "tok", "expireIn": 7200}))
            }
            "/topapi/v2/user/getbymobile" => {
                json_response(200, json!({"errcode": 0, "result": {"userid": "orig"}}))
            }
            "/v1.0/workflow/processes/userVisibilities/templates" => {
                json_response(200, json!({"result": {"processList": []}}))
            }
            "/v1.0/workflow/forms" => {
                json_response(200, json!({"result": {"processCode": "PROC-1"}}))
            }
            "/v1.0/workflow/processInstances" => {
                json_response(200, json!({"instanceId": "inst-1"}))
            }
            _ => json_response(404, json!({"code": "NotFound", "message": "no"})),
        }
    }

    /// Without an api-base, each call goes to the origin DingTalk serves it from: the new API
    /// (api.dingtalk.com) for tokens and workflows, the legacy one (oapi.dingtalk.com) for
    /// `topapi` (user lookups, work notices). The simulator serves both on one address, so
    /// only this test would see them swapped. Work notices go out 100 users per request.
    #[test]
    fn production_origins_and_notice_batches() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let seen = log.clone();
        let env = FakeEnv::new(move |r| {
            seen.borrow_mut().push(r.url.clone());
            let served = [
                ("https://api.dingtalk.com/v1.0/", "/v1.0/"),
                ("https://oapi.dingtalk.com/topapi/", "/topapi/"),
            ]
            .into_iter()
            .find_map(|(origin, path)| {
                r.url
                    .strip_prefix(origin)
                    .map(|rest| path.to_string() + rest)
            });
            match served.as_deref() {
                Some(p) if p.starts_with("/topapi/message/corpconversation/asyncsend_v2") => {
                    json_response(200, json!({"errcode": 0, "task_id": 7}))
                }
                Some(p) => scripted_reply(&Request {
                    url: format!("http://127.0.0.1:1{p}"),
                    ..r.clone()
                }),
                None => json_response(404, json!({"code": "NotFound", "message": "wrong origin"})),
            }
        });
        let app = ImApp {
            api_base: None,
            ..app()
        };
        let c = create(&env, &app, &request(), "x").unwrap();
        assert_eq!(c.instance_id, "inst-1");
        let n = note(Target::Users(
            (0..101).map(|i| UserRef::Id(format!("u{i}"))).collect(),
        ));
        assert_eq!(
            send_message(&env, &app, &n).unwrap().message_id.as_deref(),
            Some("7,7")
        );
        let urls = log.borrow();
        let origin = |u: &String| u.split('/').take(3).collect::<Vec<_>>().join("/");
        for u in urls.iter() {
            let want = if u.contains("/topapi/") {
                "https://oapi.dingtalk.com"
            } else {
                "https://api.dingtalk.com"
            };
            assert_eq!(origin(u), want, "{u}");
        }
        assert!(
            urls.iter()
                .any(|u| u.contains("/topapi/v2/user/getbymobile"))
        );
        assert_eq!(
            urls.iter().filter(|u| u.contains("asyncsend_v2")).count(),
            2
        );
    }

    #[test]
    fn create_builds_nodes_and_caches_the_form() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let env = scripted(log.clone());
        let c = create(&env, &app(), &request(), "x").unwrap();
        assert_eq!(c.instance_id, "inst-1");
        assert_eq!(c.meta["originator"], "orig");
        assert_eq!(c.meta["nodes"][0]["mode"], "and");
        assert_eq!(c.meta["nodes"][1]["approvers"], json!(["c"]));
        let (_, body) = log
            .borrow()
            .iter()
            .find(|(u, _)| u.ends_with("/v1.0/workflow/processInstances"))
            .cloned()
            .unwrap();
        assert_eq!(body["processCode"], "PROC-1");
        assert_eq!(body["originatorUserId"], "orig");
        assert_eq!(
            body["approvers"],
            json!([{"actionType": "AND", "userIds": ["a", "b"]},
                   {"actionType": "NONE", "userIds": ["c"]}])
        );
        assert_eq!(body["ccList"], json!(["d"]));
        assert_eq!(body["formComponentValues"][0]["name"], FIELD_LABEL);
        assert_eq!(body["formComponentValues"][0]["value"], "Deploy\nenv: prod");
        // Token header on new-API calls, access_token query on legacy ones.
        let sent = env.sent.borrow();
        let inst = sent
            .iter()
            .find(|r| r.url.ends_with("/processInstances"))
            .unwrap();
        assert!(
            inst.headers
                .iter()
                .any(|(k, v)| k == TOKEN_HEADER && v == "tok")
        );
        assert!(
            sent.iter()
                .any(|r| r.url.contains("getbymobile?access_token=tok"))
        );
        drop(sent);
        // Second start: the form comes from KV, the token from the cache.
        log.borrow_mut().clear();
        create(&env, &app(), &request(), "x").unwrap();
        let urls: Vec<String> = log.borrow().iter().map(|(u, _)| u.clone()).collect();
        assert!(
            !urls
                .iter()
                .any(|u| u.contains("forms") || u.contains("accessToken"))
        );
    }

    #[test]
    fn errors_map_with_codes_and_retryability() {
        let env = FakeEnv::new(|r| {
            if r.url.contains("accessToken") {
                json_response(200, json!({"accessToken": "t", "expireIn": 7200}))
            } else {
                json_response(
                    429,
                    json!({"code": "Throttling.Api", "message": "slow down", "requestid": "r"}),
                )
            }
        });
        let a = app();
        let c = Client::new(&env, &a).unwrap();
        let e = c.api(Method::Get, "/x", None).unwrap_err();
        assert!(
            matches!(&e, Error::Platform { code: -429, message, retryable: true } if message.starts_with("Throttling.Api"))
        );
        env.set_responder(|_| {
            json_response(400, json!({"code": "InvalidParameter", "message": "bad"}))
        });
        let e = c.api(Method::Get, "/x", None).unwrap_err();
        assert!(matches!(
            e,
            Error::Platform {
                code: -400,
                retryable: false,
                ..
            }
        ));
        env.set_responder(|_| json_response(200, json!({"errcode": 90018, "errmsg": "limit"})));
        let e = c.legacy_post("/x", &json!({}), Repeat::Never).unwrap_err();
        assert_eq!(e, Error::platform(90018, "limit", true));
        env.set_responder(|_| json_response(200, json!({"errcode": 33012, "errmsg": "no"})));
        let e = c.legacy_post("/x", &json!({}), Repeat::Never).unwrap_err();
        assert_eq!(e, Error::platform(33012, "no", false));
    }

    #[test]
    fn token_is_refreshed_once_on_invalid_authentication() {
        let tokens = Rc::new(RefCell::new(0));
        let t2 = tokens.clone();
        let env = FakeEnv::new(move |r| {
            if r.url.contains("accessToken") {
                *t2.borrow_mut() += 1;
                return json_response(
                    200,
                    json!({"accessToken": format!("t{}", t2.borrow()), "expireIn": 7200}),
                );
            }
            let tok = r
                .headers
                .iter()
                .find(|(k, _)| k == TOKEN_HEADER)
                .map(|(_, v)| v.clone());
            if tok.as_deref() == Some("t2") {
                json_response(200, json!({"result": {"ok": true}}))
            } else {
                json_response(
                    401,
                    json!({"code": "InvalidAuthentication", "message": "不合法的access_token"}),
                )
            }
        });
        let a = app();
        let c = Client::new(&env, &a).unwrap();
        assert_eq!(
            c.api(Method::Get, "/x", None).unwrap()["result"]["ok"],
            true
        );
        assert_eq!(*tokens.borrow(), 2);
    }

    #[test]
    fn instance_states_become_events() {
        let r = json!({"status": "COMPLETED", "result": "agree", "tasks": [
            {"userId": "a", "status": "COMPLETED", "result": "AGREE", "finishTime": "2024-03-01T08:05Z"},
            {"userId": "b", "status": "CANCELED", "result": "NONE"},
        ], "operationRecords": [{"userId": "a", "result": "AGREE", "remark": "ok"}]});
        let ev = events_from_instance(&r);
        assert_eq!(ev.len(), 2);
        assert!(
            matches!(&ev[0], Event::Decision(d) if d.user == "a" && d.approved && d.comment.as_deref() == Some("ok") && d.at_ms == 1_709_280_300_000)
        );
        assert_eq!(ev[1], Event::Status(ApprovalStatus::Approved));
        let ev = events_from_instance(&json!({"status": "TERMINATED"}));
        assert_eq!(ev, vec![Event::Status(ApprovalStatus::Canceled)]);
        let ev = events_from_instance(&json!({"status": "COMPLETED", "result": "refuse"}));
        assert_eq!(ev, vec![Event::Status(ApprovalStatus::Rejected)]);
        assert!(events_from_instance(&json!({"status": "RUNNING"})).is_empty());
    }

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time_ms(Some(&json!("1970-01-01T00:00Z"))), Some(0));
        assert_eq!(
            parse_time_ms(Some(&json!("2024-03-01T16:05:00+08:00"))),
            Some(1_709_280_300_000)
        );
        assert_eq!(
            parse_time_ms(Some(&json!(1_700_000_000_000u64))),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_time_ms(Some(&json!("garbage"))), None);
        // Fractional seconds keep their milliseconds; anything else in the seconds is refused.
        let at = |s: &str| parse_time_ms(Some(&json!(format!("2024-03-01T08:05:{s}Z"))));
        assert_eq!(at("09"), Some(1_709_280_309_000));
        assert_eq!(at("09.5"), Some(1_709_280_309_500));
        assert_eq!(at("09.1239"), Some(1_709_280_309_123));
        assert_eq!(at("09."), Some(1_709_280_309_000));
        for bad in ["", "x", "-1", "61", "09.x", "09.-5", "1e1", "inf"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
        // Out-of-range fields are refused rather than overflowing or wrapping into another
        // time (they panicked in debug builds).
        for bad in [
            "2024-01-01T00:00+999999999999999999:00",
            "2024-01-01T00:00+08:-30",
            "2024-01-01T00:00+24:00",
            "9223372036854775807-01-01T00:00Z",
            "10000-01-01T00:00Z",
            "0-01-01T00:00Z",
            "2024-01-01T-5:00Z",
            "2024-01-01T05:-3Z",
        ] {
            assert_eq!(parse_time_ms(Some(&json!(bad))), None, "{bad:?}");
        }
        assert_eq!(
            parse_time_ms(Some(&json!("2024-03-01T02:35-05:30"))),
            Some(1_709_280_300_000)
        );
    }

    #[test]
    fn callbacks_verify_decrypt_and_reply_encrypted_success() {
        let env = FakeEnv::offline();
        let ev = json!({"EventType": "bpms_task_change", "processInstanceId": "inst-1",
            "type": "finish", "result": "agree", "staffId": "a", "taskId": 11,
            "finishTime": 1_700_000_000_000u64, "remark": "fine"});
        let p = parse_callback(&env, &app(), &push(&env, &ev, "dingappkey")).unwrap();
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].instance_id, "inst-1");
        assert!(
            matches!(&p.events[0].event, Event::Decision(d) if d.user == "a" && d.approved && d.comment.as_deref() == Some("fine"))
        );
        // The reply: signed over its own fields, decrypting to "success" for our AppKey.
        let r: Value = serde_json::from_slice(&p.response.body).unwrap();
        let (ts, nonce, enc) = (
            r["timeStamp"].as_str().unwrap(),
            r["nonce"].as_str().unwrap(),
            r["encrypt"].as_str().unwrap(),
        );
        assert_eq!(
            r["msg_signature"],
            sorted_sha1_hex(&["cbtoken", ts, nonce, enc])
        );
        assert_eq!(
            WxKey::new(AES).unwrap().decrypt(enc, "dingappkey").unwrap(),
            b"success"
        );

        // Alternate parameter spellings.
        let mut alt = push(&env, &json!({"EventType": "check_url"}), "dingappkey");
        alt.query = alt
            .query
            .replace("signature=", "msg_signature=")
            .replace("timestamp=", "timeStamp=");
        let p = parse_callback(&env, &app(), &alt).unwrap();
        assert!(p.events.is_empty());
        assert_eq!(p.response.status, 200);
    }

    #[test]
    fn instance_events_and_ignored_ones() {
        let env = FakeEnv::offline();
        let a = app();
        let cases = [
            (
                json!({"type": "finish", "result": "agree"}),
                Some(ApprovalStatus::Approved),
            ),
            (
                json!({"type": "finish", "result": "refuse"}),
                Some(ApprovalStatus::Rejected),
            ),
            (json!({"type": "terminate"}), Some(ApprovalStatus::Canceled)),
            (json!({"type": "delete"}), Some(ApprovalStatus::Canceled)),
            (json!({"type": "start"}), None),
        ];
        for (mut ev, want) in cases {
            ev["EventType"] = json!("bpms_instance_change");
            ev["processInstanceId"] = json!("inst-1");
            let p = parse_callback(&env, &a, &push(&env, &ev, "dingappkey")).unwrap();
            assert_eq!(
                p.events.first().map(|e| e.event.clone()),
                want.map(Event::Status)
            );
        }
        for ev in [
            json!({"EventType": "bpms_task_change", "processInstanceId": "i", "type": "redirect", "staffId": "a"}),
            // A transfer may also come as a finished task whose result is the transfer.
            json!({"EventType": "bpms_task_change", "processInstanceId": "i", "type": "finish", "result": "redirect", "staffId": "a"}),
            json!({"EventType": "bpms_task_change", "processInstanceId": "i", "type": "start", "staffId": "a"}),
            json!({"EventType": "user_add_org", "UserId": ["x"]}),
        ] {
            let p = parse_callback(&env, &a, &push(&env, &ev, "dingappkey")).unwrap();
            assert!(p.events.is_empty());
        }
    }

    #[test]
    fn bad_callbacks_are_typed_errors() {
        let env = FakeEnv::offline();
        let a = app();
        let ev = json!({"EventType": "check_url"});
        let good = push(&env, &ev, "dingappkey");

        let mut tampered = good.clone();
        tampered.query = tampered.query.replacen("signature=", "signature=0", 1);
        assert!(matches!(
            parse_callback(&env, &a, &tampered),
            Err(Error::Unauthorized(_))
        ));

        let mut unsigned = good.clone();
        unsigned.query = String::new();
        assert!(matches!(
            parse_callback(&env, &a, &unsigned),
            Err(Error::Unauthorized(_))
        ));

        // Addressed to another app: the same answer as any other unreadable ciphertext.
        let other_owner = push(&env, &ev, "someone-else");
        assert_eq!(
            parse_callback(&env, &a, &other_owner).err(),
            Some(undecryptable())
        );

        let mut not_json = good.clone();
        not_json.body = b"<xml/>".to_vec();
        assert!(matches!(
            parse_callback(&env, &a, &not_json),
            Err(Error::InvalidInput(_))
        ));

        // Signed but undecryptable ciphertext.
        let enc = "not base64!";
        let ts = env.now_ms().to_string();
        let sig = sorted_sha1_hex(&["cbtoken", &ts, "n", enc]);
        let bad_b64 = HttpRequest {
            method: "POST".into(),
            query: format!("signature={sig}&timestamp={ts}&nonce=n"),
            body: json!({ "encrypt": enc }).to_string().into_bytes(),
            ..Default::default()
        };
        assert!(matches!(
            parse_callback(&env, &a, &bad_b64),
            Err(Error::InvalidInput(_))
        ));

        let plain_text = {
            let enc = WxKey::new(AES)
                .unwrap()
                .encrypt([1; 16], b"not json", "dingappkey");
            let sig = sorted_sha1_hex(&["cbtoken", &ts, "n", &enc]);
            HttpRequest {
                method: "POST".into(),
                query: format!("signature={sig}&timestamp={ts}&nonce=n"),
                body: json!({ "encrypt": enc }).to_string().into_bytes(),
                ..Default::default()
            }
        };
        assert!(matches!(
            parse_callback(&env, &a, &plain_text),
            Err(Error::InvalidInput(_))
        ));

        env.now.set(env.now.get() + 3_600_000);
        assert!(
            matches!(parse_callback(&env, &a, &good), Err(Error::Unauthorized(m)) if m.contains("window"))
        );

        let mut no_token = app();
        no_token.token = None;
        assert!(matches!(
            parse_callback(&env, &no_token, &good),
            Err(Error::InvalidConfig(_))
        ));
        let mut no_key = app();
        no_key.encrypt_key = None;
        assert!(matches!(
            parse_callback(&env, &no_key, &good),
            Err(Error::InvalidConfig(_))
        ));
    }

    fn note(target: Target) -> Notification {
        Notification {
            target,
            title: "Build failed".into(),
            markdown: "**wf 42**".into(),
            level: Level::Failure,
            link: None,
            mentions: vec![
                UserRef::Mobile("+86 138-0000-0000".into()),
                UserRef::Id("u9".into()),
            ],
            mention_all: false,
        }
    }

    #[test]
    fn robot_is_signed_and_mentions_rendered() {
        let env = FakeEnv::new(|_| json_response(200, json!({"errcode": 0, "errmsg": "ok"})));
        let n = note(Target::Chat("x".into()));
        send_webhook(
            &env,
            None,
            "http://h/robot/send?access_token=abc",
            Some("sec"),
            &n,
        )
        .unwrap();
        let sent = env.sent.borrow();
        let url = &sent[0].url;
        // `printf '1700000000000\nsec' | openssl dgst -sha256 -hmac sec -binary | base64`,
        // then percent-encoded (`+` and `=` included).
        assert_eq!(env.now_ms(), 1_700_000_000_000);
        assert_eq!(
            *url,
            "http://h/robot/send?access_token=abc&timestamp=1700000000000\
             &sign=2Bn%2B1b9JMbAnwLtaHqn8F5V8vOWoUG9M7qcsi2p%2Bu90%3D"
        );
        let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
        assert_eq!(body["msgtype"], "markdown");
        // Normalised, so "@13800000000" in the text matches the member's number.
        assert_eq!(body["at"]["atMobiles"], json!(["13800000000"]));
        assert_eq!(body["at"]["atUserIds"], json!(["u9"]));
        let text = body["markdown"]["text"].as_str().unwrap();
        assert!(
            text.contains("@13800000000 ") || text.ends_with("@13800000000"),
            "{text}"
        );
        assert!(text.contains("@u9") && text.contains("#F5222D"));
        drop(sent);

        let mut with_link = n.clone();
        with_link.link = Some(Link {
            text: "Open".into(),
            url: "https://x/1".into(),
        });
        let b = robot_body(&with_link, &[], &[]);
        assert_eq!(b["msgtype"], "actionCard");
        assert_eq!(b["actionCard"]["singleURL"], "https://x/1");
        // With mentions, markdown (where `at` works) with the link in the text.
        for (mobiles, all) in [(vec!["13800000000".to_string()], false), (vec![], true)] {
            with_link.mention_all = all;
            let b = robot_body(&with_link, &mobiles, &[]);
            assert_eq!(b["msgtype"], "markdown");
            assert!(
                b["markdown"]["text"]
                    .as_str()
                    .unwrap()
                    .contains("[Open](https://x/1)")
            );
            assert_eq!(b["at"]["isAtAll"], all);
        }
        with_link.mention_all = false;

        env.set_responder(|_| {
            json_response(200, json!({"errcode": 310000, "errmsg": "sign not match"}))
        });
        assert_eq!(
            send_webhook(&env, None, "http://h/robot/send", None, &n).unwrap_err(),
            Error::platform(310000, "sign not match", false)
        );
        let mut email = n.clone();
        email.mentions = vec![UserRef::Email("a@b".into())];
        assert!(matches!(
            send_webhook(&env, None, "http://h/r", None, &email),
            Err(Error::InvalidInput(_))
        ));

        // Under notify's 20,000-byte markdown cap, over DingTalk's once title and link are
        // added: refused before anything is sent, not as DingTalk's final 460101.
        let sent = env.sent.borrow().len();
        let mut long = n;
        long.markdown = "x".repeat(19_990);
        let e = send_webhook(&env, None, "http://h/r", None, &long).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("20,000 bytes")),
            "{e:?}"
        );
        assert_eq!(env.sent.borrow().len(), sent, "nothing sent");
    }

    #[test]
    fn work_notice_needs_agent_and_users() {
        let env = FakeEnv::new(|r| {
            if r.url.contains("accessToken") {
                json_response(200, json!({"accessToken": "t", "expireIn": 7200}))
            } else if r.url.contains("getbymobile") {
                json_response(200, json!({"errcode": 0, "result": {"userid": "m1"}}))
            } else {
                json_response(
                    200,
                    json!({"errcode": 0, "task_id": 256, "request_id": "r"}),
                )
            }
        });
        let mut n = note(Target::Users(vec![UserRef::Id("u1".into())]));
        n.mentions.clear();
        let r = send_message(&env, &app(), &n).unwrap();
        assert_eq!(r.message_id.as_deref(), Some("256"));
        let sent = env.sent.borrow();
        let last = sent.last().unwrap();
        assert!(last.url.contains("asyncsend_v2?access_token=t"));
        let body: Value = serde_json::from_slice(&last.body).unwrap();
        assert_eq!(body["agent_id"], 12345);
        assert_eq!(body["userid_list"], "u1");
        assert_eq!(body["msg"]["msgtype"], "markdown");
        drop(sent);

        let mut no_agent = app();
        no_agent.agent_id = None;
        assert!(matches!(
            send_message(&env, &no_agent, &n),
            Err(Error::InvalidConfig(_))
        ));
        let chat = note(Target::Chat("c".into()));
        assert!(matches!(
            send_message(&env, &app(), &chat),
            Err(Error::InvalidInput(_))
        ));

        // DingTalk caps `msg` at 2,048 bytes; over it, nothing is sent.
        let sent = env.sent.borrow().len();
        n.markdown = "x".repeat(MAX_NOTICE_MSG);
        let e = send_message(&env, &app(), &n).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("2048 bytes")),
            "{e:?}"
        );
        assert!(
            !env.sent.borrow()[sent..]
                .iter()
                .any(|r| r.url.contains("asyncsend"))
        );
        n.markdown = "x".repeat(1900);
        send_message(&env, &app(), &n).unwrap();
    }

    /// DingTalk takes at most 50 cc recipients: more is refused before a form or an instance
    /// is asked for.
    #[test]
    fn over_fifty_cc_is_refused_before_the_create() {
        let (env, creates) =
            FakeEnv::counting("/v1.0/workflow/processInstances", |r, _| scripted_reply(r));
        let mut req = request();
        req.cc = (0..=MAX_CC_LIST)
            .map(|i| UserRef::Id(format!("cc{i}")))
            .collect();
        let e = crate::approval::start(&env, &app(), &req).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("at most 50 cc")),
            "{e:?}"
        );
        assert_eq!(creates.get(), 0);
        req.cc.pop();
        crate::approval::start(&env, &app(), &req).unwrap();
        assert_eq!(creates.get(), 1);
    }

    /// A form value over DingTalk's 65,535 characters is the engine's input error, found
    /// before any lookup; it used to go out and come back as a platform error.
    #[test]
    fn an_oversized_form_value_is_refused_before_the_create() {
        let (env, creates) =
            FakeEnv::counting("/v1.0/workflow/processInstances", |r, _| scripted_reply(r));
        let mut req = request();
        req.fields = vec![("log".into(), "é".repeat(MAX_FIELD_CHARS))];
        let e = crate::approval::start(&env, &app(), &req).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("65535 characters")),
            "{e:?}"
        );
        assert!(env.sent.borrow().is_empty(), "nothing was asked");
        // An emoji is two of DingTalk's characters.
        req.fields = vec![("log".into(), "🚨".repeat(MAX_FIELD_CHARS / 2))];
        assert!(crate::approval::start(&env, &app(), &req).is_err());
        req.fields = vec![("log".into(), "é".repeat(60_000))];
        crate::approval::start(&env, &app(), &req).unwrap();
        assert_eq!(creates.get(), 1);
    }

    #[test]
    fn remarks_are_cut_between_characters_by_utf16_units() {
        assert_eq!(utf16_prefix("abc", 2), "ab");
        assert_eq!(utf16_prefix("abc", 3), "abc");
        assert_eq!(
            utf16_prefix("a🚨b", 2),
            "a",
            "the emoji would not fit whole"
        );
        assert_eq!(utf16_prefix("a🚨b", 3), "a🚨");
        assert_eq!(
            utf16_prefix(&"日".repeat(2000), MAX_REMARK_CHARS)
                .chars()
                .count(),
            1024
        );
    }
}
