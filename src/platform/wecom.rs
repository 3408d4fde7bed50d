//! WeCom (WeChat Work): access token per app, approval template + `applyevent` instances,
//! `getapprovaldetail` polling, WXBizMsgCrypt callbacks (GET URL check, POST XML or JSON), group
//! robot webhooks and app messages.
//!
//! WeCom reports the overall `sp_status` of an approval, so this module emits `Event::Status`
//! (plus the individual decisions for the record) and never evaluates nodes locally.

use super::{CreateError, Created, Parsed, Prepared, form_text, normalize_mobile};
use crate::approval::{Event, Inbound, Record};
use crate::callback::WxSecrets;
use crate::crypto;
use crate::env::{Env, EnvExt};
use crate::error::{Error, Result};
use crate::http::{self, Method, call_checked, call_json, parse_query, percent_encode};
use crate::model::{
    ApprovalRequest, ApprovalStatus, Decision, HttpRequest, HttpResponse, ImApp, Level,
    Notification, Receipt, SignMode, Target, UserRef,
};
use crate::retry::Repeat;
use crate::token::{self, Issued};
use quick_xml::events::Event as XmlEvent;
use serde_json::{Value, json};
use std::borrow::Cow;

pub const WECOM_BASE: &str = "https://qyapi.weixin.qq.com";

/// The one control of the template every imbridge approval uses ("control-number" ids are
/// what `create_template` requires).
const DETAIL_CONTROL: &str = "Textarea-01";
/// Codes that mean the access token is invalid or expired: refresh once and retry.
/// 40014 invalid token, 42001 expired, 40001 invalid credential, 41001 token missing.
const TOKEN_INVALID: &[i64] = &[40014, 42001, 40001, 41001];
/// WeCom's answer for an approval template id it does not know.
const TEMPLATE_UNKNOWN: i64 = 301025;
/// -1 "system busy", 45009 / 45011 call-frequency limits, 45033 too many concurrent calls.
const RETRYABLE: &[i64] = &[-1, 45009, 45011, 45033];
/// Robot markdown content limit (WeCom: 4096 bytes); text content is 2048.
const MAX_ROBOT_MARKDOWN: usize = 4096;
const MAX_ROBOT_TEXT: usize = 2048;
/// App and group-chat markdown (`message/send`, `appchat/send`): 2048 bytes.
const MAX_APP_MARKDOWN: usize = 2048;
/// `message/send` takes at most this many users in `touser`.
const MAX_MESSAGE_USERS: usize = 1000;
/// WeCom summary lines are short; longer ones are rejected by `applyevent`.
const MAX_SUMMARY_CHARS: usize = 20;

/// Real WeCom callbacks are a few KiB, but each carries every approver of its approval twice
/// (`SpRecord` and `ProcessList`, a dozen elements per approver) and every comment, which
/// nothing bounds but the callback body limit. So the element bound follows the bytes: a
/// genuine callback's elements average well over 16 bytes each (an approver's run about 30).
const MAX_XML_BYTES: usize = crate::callback::MAX_BODY_BYTES;
const MAX_XML_DEPTH: usize = 16;
const MAX_XML_ELEMENTS: usize = MAX_XML_BYTES / 16;

fn is_token_invalid(e: &Error) -> bool {
    matches!(e, Error::Platform { code, .. } if TOKEN_INVALID.contains(code))
}

const RESULT: http::ResultCode = http::ResultCode {
    code: &["errcode"],
    msg: &["errmsg"],
    retryable: RETRYABLE,
};

/// Turns a WeCom reply into its body, or a typed error with WeCom's own `errcode`.
fn check(reply: http::JsonReply) -> Result<Value> {
    RESULT.check(reply, |reply, msg| {
        // Every WeCom JSON answer carries errcode; one without it is not WeCom's (a wrong URL
        // behind a 200), and its "success" would hide that nothing was done.
        if reply.status < 400 {
            return Err(Error::platform(
                -i64::from(reply.status),
                "the answer has no errcode: not a WeCom API (check the URL)",
                false,
            ));
        }
        Err(http::status_error(
            reply.status,
            format_args!("from WeCom {msg}"),
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
            return Err(Error::config(
                "app-id (the CorpID) and app-secret (the app's Secret) are required",
            ));
        }
        let base = http::api_base(app.api_base.as_deref(), WECOM_BASE)?;
        // `cache_key` covers corp id, agent id and secret: two apps of one corp never share.
        let token_key = token::cache_key(app, &base);
        Ok(Client {
            env,
            app,
            base,
            token_key,
        })
    }

    fn fetch_token(&self) -> Result<Issued> {
        // The secret travels in the query (WeCom's only form); errors never echo the URL.
        let url = format!(
            "{}/cgi-bin/gettoken?corpid={}&corpsecret={}",
            self.base,
            percent_encode(self.app.app_id.trim()),
            percent_encode(self.app.app_secret.trim())
        );
        let reply = call_checked(self.env, Method::Get, &url, &[], None, Repeat::Safe, check)?;
        Ok(Issued {
            token: reply
                .get("access_token")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            ttl_secs: reply
                .get("expires_in")
                .and_then(Value::as_u64)
                .unwrap_or(7200),
        })
    }

    /// POSTs `body` to an authenticated endpoint that changes something (sent once) and
    /// returns the whole reply.
    fn api(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(path, body, Repeat::Never)
    }

    /// Like `api`, for a lookup (WeCom's reads are POSTs too): retried on rate limits and 5xx.
    fn read(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(path, body, Repeat::Safe)
    }

    /// A create: the request's own errors are `CreateError::sent`, while failing to get a
    /// token (before it, or after WeCom refused the one it carried) sent nothing.
    fn create(&self, path: &str, body: &Value) -> Result<Value, CreateError> {
        let invalid = |e: &CreateError| is_token_invalid(&e.error);
        self.call_as(path, body, Repeat::Never, CreateError::sent, invalid)
    }

    fn call(&self, path: &str, body: &Value, repeat: Repeat) -> Result<Value> {
        self.call_as(path, body, repeat, |e| e, is_token_invalid)
    }

    fn call_as<R: From<Error>>(
        &self,
        path: &str,
        body: &Value,
        repeat: Repeat,
        wrap: fn(Error) -> R,
        is_invalid: fn(&R) -> bool,
    ) -> Result<Value, R> {
        token::with_token(
            self.env,
            &self.token_key,
            &|| self.fetch_token(),
            is_invalid,
            &mut |tok| {
                let url = format!("{}{}?access_token={}", self.base, path, percent_encode(tok));
                call_checked(self.env, Method::Post, &url, &[], Some(body), repeat, check)
                    .map_err(wrap)
            },
        )
    }

    fn resolve_one(&self, u: &UserRef) -> Result<String> {
        let (path, body, what) = match u {
            UserRef::Id(id) => {
                let id = id.trim();
                if id.is_empty() {
                    return Err(Error::input("empty user id"));
                }
                return Ok(id.to_string());
            }
            UserRef::Mobile(m) => (
                "/cgi-bin/user/getuserid",
                json!({"mobile": normalize_mobile(m)?}),
                m,
            ),
            UserRef::Email(e) => (
                "/cgi-bin/user/get_userid_by_email",
                // email_type 1: the corporate mailbox; WeCom also knows personal ones (2).
                json!({"email": e.trim(), "email_type": 1}),
                e,
            ),
        };
        let reply = match self.read(path, &body) {
            // 46004 "user not found" / 60111 "userid not found": say who.
            Err(Error::Platform { code, .. }) if code == 46004 || code == 60111 => {
                return Err(Error::input(format!("no WeCom user found for {what}")));
            }
            other => other?,
        };
        reply
            .get("userid")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Error::input(format!("no WeCom user found for {what}")))
    }

    fn resolve(&self, users: &[UserRef]) -> Result<Vec<String>> {
        users.iter().map(|u| self.resolve_one(u)).collect()
    }

    /// The app's one approval template, created on first use and cached in KV.
    fn template(&self) -> Result<String> {
        super::cached_id(self.env, &self.template_key(), "template", || {
            // Template names must be unique in the corp; a random suffix keeps two apps (or
            // two racing first starts) from colliding forever on the same name.
            let name = format!("imbridge {}", &self.env.random_hex(3));
            let reply = self.api(
                "/cgi-bin/oa/approval/create_template",
                &template_body(&name),
            )?;
            reply
                .get("template_id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| Error::platform(-1, "template created without a template_id", true))
        })
    }

    fn template_key(&self) -> String {
        super::app_object_key(self.app, &self.base, "wtpl")
    }

    /// Whether WeCom says the template `id` no longer exists: its details are 301025, the
    /// answer for a template id it does not know (the request's only parameter).
    fn template_gone(&self, id: &str) -> bool {
        let body = json!({"template_id": id});
        matches!(
            self.read("/cgi-bin/oa/gettemplatedetail", &body),
            Err(Error::Platform {
                code: TEMPLATE_UNKNOWN,
                ..
            })
        )
    }
}

pub fn template_body(name: &str) -> Value {
    let zh = |t: &str| json!([{"text": t, "lang": "zh_CN"}]);
    json!({
        "template_name": zh(name),
        "template_content": {"controls": [{
            "property": {
                "control": "Textarea",
                "id": DETAIL_CONTROL,
                "title": zh("Details"),
                "placeholder": zh("Filled in by imbridge"),
                "require": 1,
            },
            "config": {},
        }]},
    })
}

pub fn applyevent_body(
    template_id: &str,
    creator: &str,
    nodes: &[(SignMode, Vec<String>)],
    cc: &[String],
    req: &ApprovalRequest,
) -> Value {
    let mut node_list: Vec<Value> = nodes
        .iter()
        .map(|(mode, ids)| {
            json!({
                "type": 1,
                "apv_rel": match mode { SignMode::And => 1, SignMode::Or => 2 },
                "userid": ids,
            })
        })
        .collect();
    if !cc.is_empty() {
        node_list.push(json!({"type": 2, "userid": cc}));
    }
    let summary: String = req.title.chars().take(MAX_SUMMARY_CHARS).collect();
    let mut text = req.title.clone();
    let body = form_text(req);
    if body != req.title {
        text.push_str("\n\n");
        text.push_str(&body);
    }
    json!({
        "creator_userid": creator,
        "template_id": template_id,
        "use_template_approver": 0,
        "process": {"node_list": node_list},
        "apply_data": {"contents": [{
            "control": "Textarea", "id": DETAIL_CONTROL, "value": {"text": text},
        }]},
        "summary_list": [{"summary_info": [{"text": summary, "lang": "zh_CN"}]}],
    })
}

pub fn prepare(env: &(impl Env + ?Sized), app: &ImApp, req: &ApprovalRequest) -> Result<Prepared> {
    let c = Client::new(env, app)?;
    let (creator, nodes, cc) = super::resolve_request(req, &|u| c.resolve_one(u))?;
    let template_id = c.template()?;
    Ok(Prepared {
        body: applyevent_body(&template_id, &creator, &nodes, &cc, req),
        meta: json!({"template_id": template_id, "creator": creator}),
    })
}

pub fn send(env: &(impl Env + ?Sized), app: &ImApp, p: Prepared) -> Result<Created, CreateError> {
    let reply = Client::new(env, app)?.create("/cgi-bin/oa/applyevent", &p.body)?;
    let sp_no = reply
        .get("sp_no")
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_u64().map(|n| n.to_string()))
        })
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CreateError::without_id("applyevent"))?;
    Ok(Created {
        instance_id: sp_no,
        meta: p.meta,
    })
}

/// [`super::forget_gone`] for the template a refused create was made with.
pub fn forget_gone_template(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    id: &str,
    error: Error,
) -> Error {
    let Ok(c) = Client::new(env, app) else {
        return error;
    };
    super::forget_if_gone(env, &c.template_key(), "template", id, error, || {
        http::bounded(env, super::GONE_CHECK_LIMIT_MS, || c.template_gone(id))
    })
}

/// WeCom's `sp_status` of a whole approval. 10 ("paid") follows an approval.
pub fn map_status(code: i64) -> Option<ApprovalStatus> {
    Some(match code {
        1 => ApprovalStatus::Pending,
        2 | 10 => ApprovalStatus::Approved,
        3 => ApprovalStatus::Rejected,
        4 | 6 | 7 => ApprovalStatus::Canceled,
        _ => return None,
    })
}

/// An approver's decision from a detail's `sp_status`: 2 agreed, 13 agreed and added an
/// approver (已同意并加签), 3 rejected; anything else (1 pending, 4 forwarded, 11 returned,
/// 12 added an approver without deciding) is not a decision.
fn decision(user: &str, status: i64, speech: &str, sptime_secs: u64) -> Option<Decision> {
    let approved = match status {
        2 | 13 => true,
        3 => false,
        _ => return None,
    };
    if user.is_empty() {
        return None;
    }
    Some(Decision {
        user: user.to_string(),
        approved,
        comment: (!speech.trim().is_empty()).then(|| speech.to_string()),
        at_ms: sptime_secs.saturating_mul(1000),
    })
}

fn json_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Decisions from `info.sp_record[].details[]`, then the overall status.
pub fn events_from_detail(info: &Value) -> Vec<Event> {
    let mut events = Vec::new();
    for rec in info
        .get("sp_record")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for d in rec
            .get("details")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let user = d
                .get("approver")
                .and_then(|a| a.get("userid"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let status = json_i64(d.get("sp_status")).unwrap_or(0);
            let speech = d.get("speech").and_then(Value::as_str).unwrap_or("");
            let at = super::json_u64(d.get("sptime")).unwrap_or(0);
            if let Some(dec) = decision(user, status, speech, at) {
                events.push(Event::Decision(dec));
            }
        }
    }
    if let Some(s) = json_i64(info.get("sp_status")).and_then(map_status) {
        events.push(Event::Status(s));
    }
    events
}

pub fn poll(env: &(impl Env + ?Sized), app: &ImApp, rec: &Record) -> Result<Vec<Event>> {
    let c = Client::new(env, app)?;
    let reply = c.read(
        "/cgi-bin/oa/getapprovaldetail",
        &json!({"sp_no": rec.approval.instance_id}),
    )?;
    let info = reply
        .get("info")
        .ok_or_else(|| Error::platform(-1, "getapprovaldetail answered without info", true))?;
    Ok(events_from_detail(info))
}

/// WeCom's approval API has no call to withdraw an application (only the creator can, in the
/// WeCom client, and an admin can delete it); so the state is left as it is and the caller is
/// told how to do it. The withdrawal then arrives as a callback (sp_status 4) or on refresh.
pub fn cancel(
    _env: &(impl Env + ?Sized),
    _app: &ImApp,
    rec: &Record,
    _reason: Option<&str>,
) -> Result<()> {
    Err(Error::platform(
        -501,
        format!(
            "WeCom offers no API to withdraw approval {}: its creator must withdraw it in WeCom \
             (or an admin delete it); the approval becomes canceled when WeCom reports that",
            rec.approval.instance_id
        ),
        false,
    ))
}

// ---- callbacks ----

/// A parsed XML element: its name, its text (CDATA included) and its child elements. Names
/// and text borrow from the document wherever it holds them verbatim (no entity or character
/// reference inside), so parsing a callback allocates little more than the child lists.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Node<'a> {
    pub name: Cow<'a, str>,
    pub text: Cow<'a, str>,
    pub children: Vec<Node<'a>>,
}

impl<'a> Node<'a> {
    fn named(name: Cow<'a, str>) -> Self {
        Node {
            name,
            ..Node::default()
        }
    }
    pub fn child(&self, name: &str) -> Option<&Node<'a>> {
        self.children.iter().find(|c| c.name == name)
    }
    pub fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s Node<'a>> + 's {
        self.children.iter().filter(move |c| c.name == name)
    }
    /// Trimmed text of a child element, "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.child(name).map(|c| c.text.trim()).unwrap_or("")
    }
    fn push_text(&mut self, piece: Cow<'a, str>) {
        if self.text.is_empty() {
            self.text = piece;
        } else {
            self.text.to_mut().push_str(&piece);
        }
    }
}

fn bad_xml() -> Error {
    Error::input("callback payload is not well-formed WeCom XML")
}

/// `piece` as a slice of `doc` when that is where it lives (quick-xml hands out borrowed
/// slices of a `&str` input), so the text needs neither a copy nor a second UTF-8 check;
/// otherwise a checked copy.
fn text_of<'a>(doc: &'a str, piece: &[u8]) -> Result<Cow<'a, str>> {
    let at = (piece.as_ptr() as usize).wrapping_sub(doc.as_ptr() as usize);
    if let Some(s) = at.checked_add(piece.len()).and_then(|end| doc.get(at..end)) {
        return Ok(Cow::Borrowed(s));
    }
    core::str::from_utf8(piece)
        .map(|s| Cow::Owned(s.to_string()))
        .map_err(|_| bad_xml())
}

/// Parses XML without DTD processing: a DOCTYPE is refused outright, only the five predefined
/// entities and character references are resolved (quick-xml never expands declared ones), and
/// size, depth and element count are bounded.
pub fn parse_xml(bytes: &[u8]) -> Result<Node<'_>> {
    if bytes.len() > MAX_XML_BYTES {
        return Err(Error::input(format!(
            "XML payload exceeds {MAX_XML_BYTES} bytes"
        )));
    }
    let s = core::str::from_utf8(bytes).map_err(|_| bad_xml())?;
    let mut reader = quick_xml::Reader::from_str(s);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Node<'_>> = Vec::new();
    let mut root: Option<Node<'_>> = None;
    let mut elements = 0usize;
    loop {
        let ev = reader.read_event().map_err(|_| bad_xml())?;
        match ev {
            XmlEvent::DocType(_) => {
                return Err(Error::input("XML with a DOCTYPE is refused"));
            }
            XmlEvent::Start(_) | XmlEvent::Empty(_) if root.is_some() => {
                return Err(bad_xml());
            }
            XmlEvent::Start(ref e) | XmlEvent::Empty(ref e) => {
                elements += 1;
                if elements > MAX_XML_ELEMENTS || stack.len() >= MAX_XML_DEPTH {
                    return Err(Error::input("XML payload is too deep or too large"));
                }
                let node = Node::named(text_of(s, e.local_name().into_inner())?);
                if matches!(ev, XmlEvent::Start(_)) {
                    stack.push(node);
                } else {
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                }
            }
            XmlEvent::End(_) => {
                let node = stack.pop().ok_or_else(bad_xml)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            XmlEvent::Text(t) => {
                let text = text_of(s, &t[..])?;
                match stack.last_mut() {
                    Some(n) => n.push_text(text),
                    None if text.trim().is_empty() => {}
                    None => return Err(bad_xml()),
                }
            }
            XmlEvent::CData(t) => {
                let text = text_of(s, &t[..])?;
                stack.last_mut().ok_or_else(bad_xml)?.push_text(text);
            }
            XmlEvent::GeneralRef(r) => {
                let name = r.decode().map_err(|_| bad_xml())?;
                let resolved = resolve_reference(&name).ok_or_else(|| {
                    Error::input("XML refers to an undeclared entity (entities are not expanded)")
                })?;
                stack
                    .last_mut()
                    .ok_or_else(bad_xml)?
                    .push_text(Cow::Owned(resolved));
            }
            XmlEvent::Decl(_) | XmlEvent::PI(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(bad_xml());
    }
    root.ok_or_else(bad_xml)
}

fn resolve_reference(name: &str) -> Option<String> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
            Some(h) => u32::from_str_radix(h, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code)
            .filter(|c| *c != '\0')
            .map(String::from);
    }
    quick_xml::escape::resolve_predefined_entity(name).map(str::to_string)
}

/// The JSON variant's plaintext mapped onto the same tree: object keys become elements, arrays
/// repeat their key, scalars become text.
fn json_to_node<'a>(name: &str, v: &Value, depth: usize) -> Result<Node<'a>> {
    if depth > MAX_XML_DEPTH {
        return Err(Error::input("JSON payload is too deep"));
    }
    let mut node = Node::named(Cow::Owned(name.to_string()));
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::Array(items) => {
                        for item in items {
                            node.children.push(json_to_node(k, item, depth + 1)?);
                        }
                    }
                    v => node.children.push(json_to_node(k, v, depth + 1)?),
                }
            }
        }
        Value::String(s) => node.text = Cow::Owned(s.clone()),
        Value::Null => {}
        other => node.text = Cow::Owned(other.to_string()),
    }
    Ok(node)
}

struct Callback<'q> {
    query: &'q [(String, String)],
}

impl Callback<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The signed parameters, in the order `WxSecrets::verify` takes them.
    fn signed(&self) -> [Option<&str>; 3] {
        [
            self.param("msg_signature"),
            self.param("timestamp"),
            self.param("nonce"),
        ]
    }
}

/// WeCom only needs HTTP 200; an empty body is the documented "nothing to reply" and is safe
/// in encrypted mode, where a plaintext body would be shown to users as an error.
fn ack() -> HttpResponse {
    HttpResponse::text(200, Vec::new())
}

pub fn parse_callback(env: &(impl Env + ?Sized), app: &ImApp, req: &HttpRequest) -> Result<Parsed> {
    let wx = WxSecrets::of(app, "WeCom", "the CorpID")?;
    let query = parse_query(&req.query)?;
    let cb = Callback { query: &query };

    if req.method.eq_ignore_ascii_case("GET") {
        // URL verification: echostr was decoded exactly once by parse_query, '+' kept.
        let echostr = cb
            .param("echostr")
            .ok_or_else(|| Error::input("GET callback without echostr"))?;
        wx.verify(env, app, cb.signed(), echostr, 1)?;
        let plain = wx
            .key
            .decrypt(echostr, wx.receive_id)
            .map_err(|_| crypto::undecryptable())?;
        return Ok(Parsed {
            response: HttpResponse::text(200, plain),
            events: Vec::new(),
        });
    }
    if !req.method.eq_ignore_ascii_case("POST") {
        return Err(Error::input("WeCom callbacks are GET or POST requests"));
    }
    let body = trim_ascii(&req.body);
    let (outer_json, outer_xml): (Value, Node<'_>);
    let encrypted = if body.first() == Some(&b'{') {
        outer_json =
            serde_json::from_slice(body).map_err(|_| Error::input("callback body is not JSON"))?;
        outer_json
            .get("encrypt")
            .or_else(|| outer_json.get("Encrypt"))
            .and_then(Value::as_str)
    } else {
        outer_xml = parse_xml(body)?;
        outer_xml.child("Encrypt").map(|n| n.text.trim())
    }
    .filter(|e| !e.is_empty())
    .ok_or_else(|| Error::input("callback without an encrypted payload"))?;
    // The signature is checked before any decryption: unauthenticated bytes never reach AES.
    wx.verify(env, app, cb.signed(), encrypted, 1)?;
    let plain = wx
        .key
        .decrypt(encrypted, wx.receive_id)
        .map_err(|_| crypto::undecryptable())?;
    let msg = read_message(trim_ascii(&plain)).map_err(|_| crypto::undecryptable())?;
    Ok(Parsed {
        response: ack(),
        events: inbound_events(&msg),
    })
}

/// The decrypted message, XML or its JSON variant.
fn read_message(plain: &[u8]) -> Result<Node<'_>> {
    match plain.first() {
        Some(b'{') => {
            let v: Value = serde_json::from_slice(plain)?;
            json_to_node("xml", &v, 0)
        }
        Some(b'<') => parse_xml(plain),
        _ => Err(Error::input("decrypted callback is neither XML nor JSON")),
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// `sys_approval_change` → decisions and status; any other message or event → nothing.
pub fn inbound_events(msg: &Node<'_>) -> Vec<Inbound> {
    if msg.get("Event") != "sys_approval_change" {
        return Vec::new();
    }
    let Some(info) = msg.child("ApprovalInfo") else {
        return Vec::new();
    };
    // SpNoStr is the number as a string; WeCom leaves SpNo out for some (school) approvals.
    let sp_no = match info.get("SpNoStr") {
        "" => info.get("SpNo"),
        s => s,
    };
    if sp_no.is_empty() {
        return Vec::new();
    }
    let sp_status = info.get("SpStatus");
    let mut events = Vec::new();
    for rec in info.all("SpRecord") {
        for d in rec.all("Details") {
            let user = d.child("Approver").map(|a| a.get("UserId")).unwrap_or("");
            let status = d.get("SpStatus").parse().unwrap_or(0);
            let at = d.get("SpTime").parse().unwrap_or(0);
            if let Some(dec) = decision(user, status, d.get("Speech"), at) {
                events.push(Event::Decision(dec));
            }
        }
    }
    if let Some(s) = sp_status.parse().ok().and_then(map_status) {
        events.push(Event::Status(s));
    }
    events
        .into_iter()
        .map(|event| Inbound {
            instance_id: sp_no.to_string(),
            event,
        })
        .collect()
}

// ---- notifications ----

fn font_color(level: Level) -> &'static str {
    match level {
        Level::Info => "comment",
        Level::Success => "info",
        Level::Warning | Level::Failure => "warning",
    }
}

fn level_word(level: Level) -> &'static str {
    match level {
        Level::Info => "Info",
        Level::Success => "Success",
        Level::Warning => "Warning",
        Level::Failure => "Failure",
    }
}

/// Title coloured by level, the body, then `<@userid>` mentions.
pub fn markdown_content(n: &Notification, mention_ids: &[String]) -> String {
    let mut s = format!(
        "<font color=\"{}\">**{}**</font>\n\n{}",
        font_color(n.level),
        n.title,
        n.markdown
    );
    if let Some(link) = &n.link {
        s.push_str(&format!("\n\n[{}]({})", link.text, link.url));
    }
    if !mention_ids.is_empty() {
        s.push_str("\n\n");
        let tags: Vec<String> = mention_ids.iter().map(|id| format!("<@{id}>")).collect();
        s.push_str(&tags.join(" "));
    }
    s
}

/// Robot mentions: user ids for `<@id>` / `mentioned_list`, mobiles for
/// `mentioned_mobile_list`. Emails need the app to look them up.
fn robot_mentions(
    env: &(impl Env + ?Sized),
    app: Option<&ImApp>,
    n: &Notification,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut ids = Vec::new();
    let mut mobiles = Vec::new();
    for u in &n.mentions {
        match u {
            UserRef::Id(id) if !id.trim().is_empty() => ids.push(id.trim().to_string()),
            UserRef::Id(_) => return Err(Error::input("empty user id in mentions")),
            UserRef::Mobile(m) => mobiles.push(normalize_mobile(m)?),
            UserRef::Email(_) => {
                let app = app.ok_or_else(|| {
                    Error::input("mentioning by email in a WeCom robot message needs a WeCom app to look it up")
                })?;
                ids.push(Client::new(env, app)?.resolve_one(u)?);
            }
        }
    }
    Ok((ids, mobiles))
}

/// The robot message(s) for `n`: a `template_card` when there is a link (plus a `text` carrying
/// the mentions, which cards cannot), `text` when mentions need mobiles or @all (only text
/// supports them), `markdown` otherwise.
pub fn robot_bodies(n: &Notification, ids: &[String], mobiles: &[String]) -> Result<Vec<Value>> {
    let mut mentioned: Vec<String> = ids.to_vec();
    if n.mention_all {
        mentioned.push("@all".into());
    }
    let text_body = |content: String| -> Result<Value> {
        if content.len() > MAX_ROBOT_TEXT {
            return Err(Error::input(format!(
                "WeCom robot text messages are limited to {MAX_ROBOT_TEXT} bytes"
            )));
        }
        let mut text = json!({"content": content});
        if !mentioned.is_empty() {
            text["mentioned_list"] = json!(mentioned);
        }
        if !mobiles.is_empty() {
            text["mentioned_mobile_list"] = json!(mobiles);
        }
        Ok(json!({"msgtype": "text", "text": text}))
    };
    if let Some(link) = &n.link {
        let card = json!({"msgtype": "template_card", "template_card": {
            "card_type": "text_notice",
            "main_title": {"title": n.title, "desc": level_word(n.level)},
            "sub_title_text": n.markdown,
            "jump_list": [{"type": 1, "url": link.url, "title": link.text}],
            "card_action": {"type": 1, "url": link.url},
        }});
        let mut out = vec![card];
        if !mentioned.is_empty() || !mobiles.is_empty() {
            out.push(text_body(n.title.clone())?);
        }
        return Ok(out);
    }
    if n.mention_all || !mobiles.is_empty() {
        return Ok(vec![text_body(format!("{}\n\n{}", n.title, n.markdown))?]);
    }
    let content = markdown_content(n, ids);
    if content.len() > MAX_ROBOT_MARKDOWN {
        return Err(Error::input(format!(
            "WeCom robot markdown is limited to {MAX_ROBOT_MARKDOWN} bytes"
        )));
    }
    Ok(vec![
        json!({"msgtype": "markdown", "markdown": {"content": content}}),
    ])
}

/// Group robots authenticate by the `key` in their URL; WeCom has no signing secret for them,
/// so `secret` is not used.
pub fn send_webhook(
    env: &(impl Env + ?Sized),
    app: Option<&ImApp>,
    url: &str,
    _secret: Option<&str>,
    n: &Notification,
) -> Result<Receipt> {
    let (ids, mobiles) = robot_mentions(env, app, n)?;
    super::send_parts(
        env,
        url,
        &robot_bodies(n, &ids, &mobiles)?,
        false,
        None,
        &mut |body, _| check(call_json(env, Method::Post, url, &[], Some(body))?).map(|_| None),
    )?;
    Ok(Receipt { message_id: None })
}

/// WeCom answers errcode 0 when only some recipients got an app message and names the rest.
/// Not retryable: the others have it, and a repeat would reach them twice.
fn undelivered(reply: &Value) -> Result<()> {
    let mut missed = String::new();
    // invaliduser: unknown or outside the app's visible range; unlicenseduser: no license.
    for field in [
        "invaliduser",
        "invalidparty",
        "invalidtag",
        "unlicenseduser",
    ] {
        let who = reply
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim();
        if !who.is_empty() {
            missed.push_str(if missed.is_empty() { "" } else { "; " });
            missed.push_str(field);
            missed.push('=');
            missed.push_str(who);
        }
    }
    if missed.is_empty() {
        return Ok(());
    }
    Err(Error::input(format!(
        "WeCom delivered the message to the other recipients, but not to: {missed}"
    )))
}

pub fn send_message(env: &(impl Env + ?Sized), app: &ImApp, n: &Notification) -> Result<Receipt> {
    let c = Client::new(env, app)?;
    let too_long = |content: &str| {
        (content.len() > MAX_APP_MARKDOWN).then(|| {
            Error::input(format!(
                "WeCom app messages are limited to {MAX_APP_MARKDOWN} bytes of markdown"
            ))
        })
    };
    // Before the lookups, so a message that cannot go out costs none.
    if let Some(e) = too_long(&markdown_content(n, &[])) {
        return Err(e);
    }
    let mention_ids = c.resolve(&n.mentions)?;
    let content = markdown_content(n, &mention_ids);
    if let Some(e) = too_long(&content) {
        return Err(e);
    }
    match &n.target {
        Target::Users(users) => {
            if users.is_empty() || users.len() > MAX_MESSAGE_USERS {
                return Err(Error::input(format!(
                    "WeCom app messages go to 1-{MAX_MESSAGE_USERS} users"
                )));
            }
            let agent_id: u64 = app
                .agent_id
                .as_deref()
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| Error::config("WeCom app messages need the app's agent-id"))?
                .parse()
                .map_err(|_| Error::config("agent-id must be a number"))?;
            let to = c.resolve(users)?.join("|");
            let reply = c.api(
                "/cgi-bin/message/send",
                &json!({"touser": to, "msgtype": "markdown", "agentid": agent_id,
                        "markdown": {"content": content}}),
            )?;
            undelivered(&reply)?;
            Ok(Receipt {
                message_id: reply
                    .get("msgid")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            })
        }
        Target::Chat(chat) => {
            if chat.trim().is_empty() {
                return Err(Error::input("empty chat id"));
            }
            c.api(
                "/cgi-bin/appchat/send",
                &json!({"chatid": chat.trim(), "msgtype": "markdown",
                        "markdown": {"content": content}}),
            )?;
            Ok(Receipt { message_id: None })
        }
        Target::Webhook(_) => Err(Error::input("webhooks are not app messages")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::{sorted_sha1_hex, wx::WxKey};
    use crate::env::fake::{FakeEnv, json_response};
    use crate::model::{ApprovalNode, Link, Platform};
    use crate::platform::create;

    const AES: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
    const CORP: &str = "ww_corp";

    pub(crate) fn app() -> ImApp {
        ImApp {
            id: "w1".into(),
            platform: Platform::Wecom,
            app_id: CORP.into(),
            app_secret: "sec".into(),
            agent_id: Some("1000002".into()),
            encrypt_key: Some(AES.into()),
            token: Some("tok".into()),
            api_base: Some("http://127.0.0.1:1".into()),
            max_clock_skew_secs: None,
        }
    }

    fn signed(env: &FakeEnv, method: &str, plain: &str, xml: bool) -> HttpRequest {
        let enc = WxKey::new(AES)
            .unwrap()
            .encrypt([7; 16], plain.as_bytes(), CORP);
        let ts = (env.now_ms() / 1000).to_string();
        let sig = sorted_sha1_hex(&["tok", &ts, "n1", &enc]);
        let (query, body) = if method == "GET" {
            (
                format!(
                    "msg_signature={sig}&timestamp={ts}&nonce=n1&echostr={}",
                    percent_encode(&enc)
                ),
                Vec::new(),
            )
        } else if xml {
            (
                format!("msg_signature={sig}&timestamp={ts}&nonce=n1"),
                format!(
                    "<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt><AgentID><![CDATA[1000002]]></AgentID></xml>"
                )
                .into_bytes(),
            )
        } else {
            (
                format!("msg_signature={sig}&timestamp={ts}&nonce=n1"),
                json!({"encrypt": enc}).to_string().into_bytes(),
            )
        };
        HttpRequest {
            method: method.into(),
            path: "/cb".into(),
            query,
            headers: vec![],
            body,
        }
    }

    fn approval_xml(sp_status: u8, details: &str) -> String {
        format!(
            "<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>\
             <CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[sys_approval_change]]></Event><AgentID>1000002</AgentID>\
             <ApprovalInfo><SpNo>202401010001</SpNo><SpName><![CDATA[imbridge]]></SpName>\
             <SpStatus>{sp_status}</SpStatus><SpRecord><SpStatus>1</SpStatus><ApproverAttr>1</ApproverAttr>\
             {details}</SpRecord></ApprovalInfo></xml>"
        )
    }

    fn detail(user: &str, st: u8, speech: &str) -> String {
        format!(
            "<Details><Approver><UserId><![CDATA[{user}]]></UserId></Approver>\
             <Speech><![CDATA[{speech}]]></Speech><SpStatus>{st}</SpStatus><SpTime>1700000001</SpTime></Details>"
        )
    }

    #[test]
    fn xml_text_is_borrowed_unless_a_reference_was_resolved() {
        let doc = "<xml><A><![CDATA[x<y]]></A><B>a &amp; b&#x4E2D;</B><C/><D>plain</D></xml>";
        let n = parse_xml(doc.as_bytes()).unwrap();
        assert!(matches!(n.name, Cow::Borrowed("xml")));
        assert!(matches!(n.child("A").unwrap().text, Cow::Borrowed("x<y")));
        assert!(matches!(n.child("D").unwrap().text, Cow::Borrowed("plain")));
        assert_eq!(n.get("B"), "a & b\u{4e2d}");
        assert!(matches!(n.child("B").unwrap().text, Cow::Owned(_)));
        assert_eq!(n.get("C"), "");
        assert!(n.child("C").unwrap().children.is_empty());
        assert_eq!(n.children.len(), 4);
    }

    #[test]
    fn url_verification_replies_bare_plaintext() {
        let env = FakeEnv::offline();
        let p = parse_callback(
            &env,
            &app(),
            &signed(&env, "GET", "1616140317555161061", true),
        )
        .unwrap();
        assert_eq!(p.response.status, 200);
        assert_eq!(p.response.body, b"1616140317555161061");
        assert!(p.events.is_empty());
    }

    #[test]
    fn approval_event_xml_and_json() {
        let env = FakeEnv::offline();
        let xml = approval_xml(
            2,
            &(detail("alice", 2, "ok &amp; fine") + &detail("bob", 1, "")),
        );
        for as_xml in [true, false] {
            let p = parse_callback(&env, &app(), &signed(&env, "POST", &xml, as_xml)).unwrap();
            assert_eq!(p.response.status, 200);
            assert!(p.response.body.is_empty());
            assert_eq!(p.events.len(), 2);
            assert_eq!(p.events[0].instance_id, "202401010001");
            match &p.events[0].event {
                Event::Decision(d) => {
                    assert_eq!(d.user, "alice");
                    assert!(d.approved);
                    assert_eq!(d.comment.as_deref(), Some("ok &amp; fine"));
                    assert_eq!(d.at_ms, 1_700_000_001_000);
                }
                e => panic!("{e:?}"),
            }
            assert_eq!(p.events[1].event, Event::Status(ApprovalStatus::Approved));
            assert_eq!(p.events[1].instance_id, "202401010001");
        }
        for (code, want) in [
            (4, ApprovalStatus::Canceled),
            (6, ApprovalStatus::Canceled),
            (7, ApprovalStatus::Canceled),
            (3, ApprovalStatus::Rejected),
        ] {
            let p = parse_callback(
                &env,
                &app(),
                &signed(&env, "POST", &approval_xml(code, ""), true),
            )
            .unwrap();
            assert_eq!(p.events.last().unwrap().event, Event::Status(want));
        }
    }

    /// The callback about the largest approval a start may create parses: 20 nodes of 100
    /// approvers with comments and attachments, 100 cc recipients.
    #[test]
    fn the_largest_approvals_callback_is_accepted() {
        use crate::approval::{MAX_APPROVERS_PER_NODE, MAX_CC, MAX_NODES};
        let env = FakeEnv::offline();
        let mut records = String::new();
        for n in 0..MAX_NODES {
            records += "<SpRecord><SpStatus>2</SpStatus><ApproverAttr>1</ApproverAttr>";
            for a in 0..MAX_APPROVERS_PER_NODE {
                records += &format!(
                    "<Details><Approver><UserId><![CDATA[user{n}x{a}]]></UserId></Approver>\
                     <Speech><![CDATA[fine]]></Speech><SpStatus>2</SpStatus>\
                     <SpTime>1700000001</SpTime><MediaId><![CDATA[m]]></MediaId></Details>"
                );
            }
            records += "</SpRecord>";
        }
        for c in 0..MAX_CC {
            records += &format!("<Notifyer><UserId><![CDATA[cc{c}]]></UserId></Notifyer>");
        }
        // Every approver once more in the process list, then comments.
        records += "<ProcessList>";
        for n in 0..MAX_NODES {
            records += "<NodeList><NodeType>1</NodeType><SpStatus>2</SpStatus><ApvRel>1</ApvRel>";
            for a in 0..MAX_APPROVERS_PER_NODE {
                records += &format!(
                    "<SubNodeList><UserInfo><UserId><![CDATA[user{n}x{a}]]></UserId></UserInfo>\
                     <Speech><![CDATA[]]></Speech><SpYj>2</SpYj><Sptime>1700000001</Sptime>\
                     </SubNodeList>"
                );
            }
            records += "</NodeList>";
        }
        records += "</ProcessList>";
        for c in 0..200 {
            records += &format!(
                "<Comments><CommentUserInfo><UserId><![CDATA[u{c}]]></UserId></CommentUserInfo>\
                 <CommentTime>1700000002</CommentTime><CommentContent><![CDATA[ok]]></CommentContent>\
                 <CommentId><![CDATA[{c}]]></CommentId></Comments>"
            );
        }
        let xml = approval_xml(2, "").replace(
            "<SpRecord><SpStatus>1</SpStatus><ApproverAttr>1</ApproverAttr></SpRecord>",
            &records,
        );
        // More elements than the bound this test held before the process list was counted.
        assert!(
            xml.matches("</").count() > 20_544 + 5_000,
            "{}",
            xml.matches("</").count()
        );
        assert!(
            xml.len() < MAX_XML_BYTES * 3 / 4,
            "fits the body limit once encrypted"
        );
        let p = parse_callback(&env, &app(), &signed(&env, "POST", &xml, true)).unwrap();
        assert_eq!(p.events.len(), MAX_NODES * MAX_APPROVERS_PER_NODE + 1);
        assert_eq!(
            p.events.last().unwrap().event,
            Event::Status(ApprovalStatus::Approved)
        );
    }

    #[test]
    fn the_approval_number_is_read_from_sp_no_str_too() {
        let env = FakeEnv::offline();
        for (from, to) in [
            (
                "<SpNo>202401010001</SpNo>",
                "<SpNoStr>202401010001</SpNoStr>",
            ),
            (
                "<SpNo>202401010001</SpNo>",
                "<SpNo>202401010001</SpNo><SpNoStr>202401010001</SpNoStr>",
            ),
        ] {
            let xml = approval_xml(2, "").replace(from, to);
            let p = parse_callback(&env, &app(), &signed(&env, "POST", &xml, true)).unwrap();
            assert!(!p.events.is_empty(), "{xml}");
            assert!(
                p.events.iter().all(|e| e.instance_id == "202401010001"),
                "{:?}",
                p.events
            );
        }
    }

    #[test]
    fn json_inner_payload_is_understood() {
        let env = FakeEnv::offline();
        let inner = json!({"Event": "sys_approval_change", "CreateTime": 1, "ApprovalInfo": {
            "SpNo": "9", "SpStatus": 3, "SpRecord": [{"Details": [{"Approver": {"UserId": "u"},
            "SpStatus": 3, "SpTime": 5, "Speech": "no"}]}]}});
        let p = parse_callback(
            &env,
            &app(),
            &signed(&env, "POST", &inner.to_string(), false),
        )
        .unwrap();
        assert_eq!(p.events.len(), 2);
        assert_eq!(p.events[1].event, Event::Status(ApprovalStatus::Rejected));
    }

    #[test]
    fn other_messages_are_acknowledged() {
        let env = FakeEnv::offline();
        let msg = "<xml><ToUserName>x</ToUserName><MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId></xml>";
        let p = parse_callback(&env, &app(), &signed(&env, "POST", msg, true)).unwrap();
        assert_eq!(p.response.status, 200);
        assert!(p.events.is_empty());
    }

    #[test]
    fn bad_callbacks_are_typed_errors() {
        let env = FakeEnv::offline();
        let good = signed(&env, "POST", &approval_xml(2, ""), true);
        // Wrong signature.
        let mut r = good.clone();
        r.query = r.query.replacen("msg_signature=", "msg_signature=0", 1);
        assert!(matches!(
            parse_callback(&env, &app(), &r),
            Err(Error::Unauthorized(_))
        ));
        // Stale timestamp.
        env.now.set(env.now.get() + 3_600_000);
        assert!(matches!(
            parse_callback(&env, &app(), &good),
            Err(Error::Unauthorized(_))
        ));
        env.now.set(1_700_000_000_000);
        // Wrong CorpID: the same answer as any other unreadable ciphertext.
        let mut a = app();
        a.app_id = "other".into();
        assert_eq!(
            parse_callback(&env, &a, &good).err(),
            Some(crypto::undecryptable())
        );
        // Missing config.
        let mut a = app();
        a.token = None;
        assert!(matches!(
            parse_callback(&env, &a, &good),
            Err(Error::InvalidConfig(_))
        ));
        // Non-XML plaintext.
        let r = signed(&env, "POST", "hello", true);
        assert!(matches!(
            parse_callback(&env, &app(), &r),
            Err(Error::InvalidInput(_))
        ));
        // DOCTYPE and undeclared entities.
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]><xml><Event>&lol2;</Event></xml>";
        assert!(
            matches!(parse_xml(bomb.as_bytes()), Err(Error::InvalidInput(m)) if m.contains("DOCTYPE"))
        );
        // Inside a signed message it is refused like any unreadable plaintext (no oracle).
        let r = signed(&env, "POST", bomb, true);
        assert_eq!(
            parse_callback(&env, &app(), &r).err(),
            Some(crypto::undecryptable())
        );
        assert!(parse_xml(b"<xml><a>&lol;</a></xml>").is_err());
        assert!(parse_xml(b"<xml><a></b></xml>").is_err());
        assert!(parse_xml(b"<xml><a>").is_err());
        assert!(parse_xml(b"<a/><b/>").is_err());
        let deep = "<a>".repeat(40) + &"</a>".repeat(40);
        assert!(parse_xml(deep.as_bytes()).is_err());
        assert_eq!(
            parse_xml(b"<xml><a>&#65;&lt;</a></xml>").unwrap().get("a"),
            "A<"
        );
    }

    pub(crate) fn req() -> ApprovalRequest {
        ApprovalRequest {
            key: "k1".into(),
            title: "Deploy".into(),
            initiator: UserRef::Mobile("+86 138 0000 0000".into()),
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

    fn fake_wecom() -> FakeEnv {
        FakeEnv::new(scripted_reply)
    }

    /// A scripted WeCom: token, user lookup, template, create, detail, messages.
    pub(crate) fn scripted_reply(r: &crate::env::Request) -> Result<crate::env::Response> {
        let path = r.url.split('?').next().unwrap_or("");
        let path = &path[path.find("/cgi-bin").unwrap_or(0)..];
        match path {
            "/cgi-bin/gettoken" => json_response(
                200,
                json!({"errcode": 0, "access_token": "T1", "expires_in": 7200}),
            ),
            "/cgi-bin/user/getuserid" => {
                json_response(200, json!({"errcode": 0, "userid": "zhang"}))
            }
            "/cgi-bin/oa/approval/create_template" => {
                json_response(200, json!({"errcode": 0, "template_id": "TPL"}))
            }
            "/cgi-bin/oa/applyevent" => {
                json_response(200, json!({"errcode": 0, "sp_no": "202401010001"}))
            }
            "/cgi-bin/oa/getapprovaldetail" => json_response(
                200,
                json!({"errcode": 0, "info": {
                "sp_no": "202401010001", "sp_status": 4, "sp_record": [{"details": [
                    {"approver": {"userid": "a"}, "sp_status": 2, "speech": "", "sptime": 10}]}]}}),
            ),
            _ => json_response(200, json!({"errcode": 0, "errmsg": "ok", "msgid": "m1"})),
        }
    }

    #[test]
    fn create_builds_applyevent() {
        let env = fake_wecom();
        let c = create(&env, &app(), &req(), "").unwrap();
        assert_eq!(c.instance_id, "202401010001");
        let sent = env.sent.borrow();
        assert!(
            sent[0]
                .url
                .contains("/cgi-bin/gettoken?corpid=ww_corp&corpsecret=sec")
        );
        let getuid: Value = serde_json::from_slice(&sent[1].body).unwrap();
        assert_eq!(getuid, json!({"mobile": "13800000000"}));
        let apply = sent.iter().find(|r| r.url.contains("applyevent")).unwrap();
        assert!(apply.url.ends_with("?access_token=T1"));
        let b: Value = serde_json::from_slice(&apply.body).unwrap();
        assert_eq!(b["creator_userid"], "zhang");
        assert_eq!(b["template_id"], "TPL");
        assert_eq!(b["use_template_approver"], 0);
        assert_eq!(
            b["process"]["node_list"],
            json!([
                {"type": 1, "apv_rel": 1, "userid": ["a", "b"]},
                {"type": 1, "apv_rel": 2, "userid": ["c"]},
                {"type": 2, "userid": ["d"]},
            ])
        );
        assert_eq!(
            b["apply_data"]["contents"][0]["value"]["text"],
            "Deploy\n\nenv: prod"
        );
        drop(sent);
        // The template is created once.
        create(&env, &app(), &req(), "").unwrap();
        let n = env
            .sent
            .borrow()
            .iter()
            .filter(|r| r.url.contains("create_template"))
            .count();
        assert_eq!(n, 1);
    }

    #[test]
    fn poll_maps_detail_and_cancel_is_refused() {
        let env = fake_wecom();
        let rec = Record {
            approval: crate::model::Approval {
                instance_id: "202401010001".into(),
                key: "k".into(),
                status: ApprovalStatus::Pending,
                decisions: vec![],
                updated_at_ms: 0,
            },
            meta: Value::Null,
        };
        let ev = poll(&env, &app(), &rec).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1], Event::Status(ApprovalStatus::Canceled));
        assert!(matches!(
            cancel(&env, &app(), &rec, None),
            Err(Error::Platform {
                code: -501,
                retryable: false,
                ..
            })
        ));
    }

    #[test]
    fn approver_statuses_that_are_decisions() {
        let approved = |status| decision("a", status, "", 1).map(|d| d.approved);
        assert_eq!(approved(2), Some(true));
        assert_eq!(approved(13), Some(true), "agreed and added an approver");
        assert_eq!(approved(3), Some(false));
        for undecided in [1, 4, 11, 12] {
            assert_eq!(approved(undecided), None, "{undecided}");
        }
    }

    #[test]
    fn errors_carry_codes_and_token_is_refreshed_once() {
        let env = FakeEnv::new(|r| {
            if r.url.contains("gettoken") {
                json_response(
                    200,
                    json!({"errcode": 0, "access_token": "T", "expires_in": 7200}),
                )
            } else {
                json_response(
                    200,
                    json!({"errcode": 42001, "errmsg": "access_token expired"}),
                )
            }
        });
        let a = app();
        let c = Client::new(&env, &a).unwrap();
        let e = c.api("/x", &json!({})).unwrap_err();
        assert!(matches!(e, Error::Platform { code: 42001, .. }));
        assert_eq!(
            env.sent
                .borrow()
                .iter()
                .filter(|r| r.url.contains("gettoken"))
                .count(),
            2
        );
        env.set_responder(|_| json_response(200, json!({"errcode": 45009, "errmsg": "freq"})));
        assert_eq!(
            c.api("/x", &json!({})).unwrap_err(),
            Error::platform(45009, "freq", true)
        );
        env.set_responder(|_| json_response(200, json!({"errcode": 60020, "errmsg": "ip"})));
        assert_eq!(
            c.api("/x", &json!({})).unwrap_err(),
            Error::platform(60020, "ip", false)
        );
        let mut a = app();
        a.app_secret = String::new();
        assert!(matches!(
            create(&env, &a, &req(), ""),
            Err(CreateError {
                error: Error::InvalidConfig(_),
                maybe_created: false
            })
        ));
    }

    fn note(link: bool, mentions: Vec<UserRef>, all: bool) -> Notification {
        Notification {
            target: Target::Users(vec![UserRef::Id("u1".into())]),
            title: "Build".into(),
            markdown: "**ok**".into(),
            level: Level::Failure,
            link: link.then(|| Link {
                text: "Open".into(),
                url: "https://x/1".into(),
            }),
            mentions,
            mention_all: all,
        }
    }

    #[test]
    fn robot_message_shapes() {
        let n = note(false, vec![UserRef::Id("zhang".into())], false);
        let b = robot_bodies(&n, &["zhang".into()], &[]).unwrap();
        assert_eq!(b[0]["msgtype"], "markdown");
        let c = b[0]["markdown"]["content"].as_str().unwrap();
        assert!(c.contains("<font color=\"warning\">**Build**</font>") && c.contains("<@zhang>"));

        let n = note(false, vec![], true);
        let b = robot_bodies(&n, &[], &["13800000000".into()]).unwrap();
        assert_eq!(b[0]["msgtype"], "text");
        assert_eq!(b[0]["text"]["mentioned_list"], json!(["@all"]));
        assert_eq!(
            b[0]["text"]["mentioned_mobile_list"],
            json!(["13800000000"])
        );

        let n = note(true, vec![], false);
        let b = robot_bodies(&n, &[], &[]).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0]["template_card"]["card_type"], "text_notice");
        assert_eq!(b[0]["template_card"]["card_action"]["url"], "https://x/1");
    }

    #[test]
    fn app_message_needs_agent_id() {
        let env = fake_wecom();
        let r = send_message(&env, &app(), &note(false, vec![], false)).unwrap();
        assert_eq!(r.message_id.as_deref(), Some("m1"));
        let sent = env.sent.borrow();
        let b: Value = serde_json::from_slice(&sent.last().unwrap().body).unwrap();
        assert_eq!(b["agentid"], 1000002);
        assert_eq!(b["touser"], "u1");
        drop(sent);
        let mut a = app();
        a.agent_id = None;
        assert!(matches!(
            send_message(&env, &a, &note(false, vec![], false)),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn app_markdown_over_2048_bytes_is_refused_before_any_request() {
        let env = fake_wecom();
        let mut n = note(false, vec![], false);
        n.markdown = "x".repeat(2100);
        let e = send_message(&env, &app(), &n).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("2048")),
            "{e:?}"
        );
        assert!(env.sent.borrow().is_empty());
        // Mentions count too: they are part of the content.
        n.markdown = "x".repeat(2000);
        n.mentions = (0..20).map(|i| UserRef::Id(format!("user{i}"))).collect();
        let e = send_message(&env, &app(), &n).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("2048")),
            "{e:?}"
        );
        n.mentions.clear();
        send_message(&env, &app(), &n).unwrap();
        // `touser` takes at most 1,000 users.
        let sent = env.sent.borrow().len();
        n.target = Target::Users(
            (0..=MAX_MESSAGE_USERS)
                .map(|i| UserRef::Id(format!("u{i}")))
                .collect(),
        );
        let e = send_message(&env, &app(), &n).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("1-1000 users")),
            "{e:?}"
        );
        assert_eq!(env.sent.borrow().len(), sent);
    }

    #[test]
    fn partly_undelivered_app_messages_are_errors() {
        let env = fake_wecom();
        env.set_responder(|r| {
            if r.url.contains("/cgi-bin/gettoken") {
                return json_response(
                    200,
                    json!({"errcode": 0, "access_token": "T1", "expires_in": 7200}),
                );
            }
            json_response(
                200,
                json!({"errcode": 0, "errmsg": "ok", "invaliduser": "alcie|bobb",
                       "invalidparty": "", "unlicenseduser": "carl", "msgid": "m1"}),
            )
        });
        let e = send_message(&env, &app(), &note(false, vec![], false)).unwrap_err();
        let Error::InvalidInput(msg) = &e else {
            panic!("{e:?}")
        };
        assert!(
            msg.ends_with("invaliduser=alcie|bobb; unlicenseduser=carl"),
            "{msg}"
        );
        assert!(!e.is_retryable());
        // Empty lists are WeCom's normal success.
        env.set_responder(|_| {
            json_response(
                200,
                json!({"errcode": 0, "invaliduser": "", "invalidparty": "", "msgid": "m2"}),
            )
        });
        let r = send_message(&env, &app(), &note(false, vec![], false)).unwrap();
        assert_eq!(r.message_id.as_deref(), Some("m2"));
    }

    #[test]
    fn an_answer_without_errcode_is_not_success() {
        // A robot URL that points somewhere else, answering 200 in its own format.
        let env = FakeEnv::new(|_| json_response(200, json!({"code": 19002, "msg": "params"})));
        let n = note(false, vec![], false);
        let e = send_webhook(&env, None, "https://open.feishu.cn/hook/x", None, &n).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Platform {
                    retryable: false,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
