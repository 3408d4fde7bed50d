//! One module per IM platform behind the same few operations; `approval`, `notify` and
//! `callback` dispatch here and never look at platform wire formats themselves.

pub mod dingtalk;
pub mod feishu;
pub mod wecom;

use crate::approval::{Inbound, Record};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{
    ApprovalRequest, HttpResponse, ImApp, Notification, Platform, Receipt, RobotWebhook, SignMode,
    UserRef,
};

/// A new instance on the platform, and what later calls need to address it.
pub struct Created {
    pub instance_id: String,
    pub meta: serde_json::Value,
}

/// Why a create failed, and whether the platform may have created the approval anyway.
#[derive(Debug)]
pub struct CreateError {
    pub error: Error,
    /// The create request went out and its answer does not rule out that the platform acted
    /// on it: the answer was lost or cut off, a 5xx other than 503, or a success without the
    /// new instance's id.
    pub maybe_created: bool,
}

impl From<Error> for CreateError {
    /// Errors before the create request is sent (lookups, forms, tokens): nothing was created.
    fn from(error: Error) -> Self {
        CreateError {
            error,
            maybe_created: false,
        }
    }
}

impl CreateError {
    /// An error from the create request itself.
    pub fn sent(error: Error) -> Self {
        CreateError {
            maybe_created: error.may_have_taken_effect(),
            error,
        }
    }

    /// The platform answered success, but without the new instance's id.
    pub fn without_id(what: &str) -> Self {
        CreateError {
            error: Error::platform(-1, format!("{what} answered without an instance id"), true),
            maybe_created: true,
        }
    }
}

/// A verified, decrypted callback: what to answer and what it says.
pub struct Parsed {
    pub response: HttpResponse,
    pub events: Vec<Inbound>,
}

/// A robot message over its platform's limit, counted as sent, is refused before it is sent:
/// the platform would refuse it for good, with a code of its own.
fn check_robot_body(body: &serde_json::Value, max: usize, limit: &'static str) -> Result<()> {
    if body.to_string().len() > max {
        return Err(Error::input(limit));
    }
    Ok(())
}

/// Feishu and Lark are one API on two hosts; an app of one serves the other's robots.
pub fn family(p: Platform) -> Platform {
    match p {
        Platform::Lark => Platform::Feishu,
        p => p,
    }
}

/// Platforms that reject a second create with the same idempotency token, so a start whose
/// outcome is unknown may safely be retried.
pub fn dedups_creates(p: Platform) -> bool {
    matches!(p, Platform::Feishu | Platform::Lark)
}

/// A start in one step. Feishu's: it deduplicates creates by the token, so a start needs no
/// claim; the other platforms' go through [`prepare`] and [`send`].
pub fn create(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &ApprovalRequest,
    idempotency_token: &str,
) -> Result<Created, CreateError> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::create(env, app, req, idempotency_token),
        Platform::Dingtalk | Platform::Wecom => send(env, app, prepare(env, app, req)?),
    }
}

/// A DingTalk or WeCom create, worked out before the start claims its key: the user lookups
/// and the form or template are reads, or made once, so a start cut off (deadline, crash)
/// while they run holds nothing; only the create request itself runs under the claim.
pub struct Prepared {
    body: serde_json::Value,
    meta: serde_json::Value,
}

impl Prepared {
    /// What the approval record keeps of the create (the form or template it uses, ...).
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }
}

pub fn prepare(env: &(impl Env + ?Sized), app: &ImApp, req: &ApprovalRequest) -> Result<Prepared> {
    match app.platform {
        Platform::Dingtalk => dingtalk::prepare(env, app, req),
        Platform::Wecom => wecom::prepare(env, app, req),
        Platform::Feishu | Platform::Lark => Err(Error::config(FEISHU_IN_ONE_STEP)),
    }
}

pub fn send(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    prepared: Prepared,
) -> Result<Created, CreateError> {
    match app.platform {
        Platform::Dingtalk => dingtalk::send(env, app, prepared),
        Platform::Wecom => wecom::send(env, app, prepared),
        Platform::Feishu | Platform::Lark => Err(Error::config(FEISHU_IN_ONE_STEP).into()),
    }
}

/// A node's mode and its approvers' platform ids.
type Resolved = (SignMode, Vec<String>);

const FEISHU_IN_ONE_STEP: &str = "Feishu starts are created in one step";

/// The initiator, each node's approvers and the cc list as platform ids, looking each
/// distinct person up once: a request may name the same person in several nodes and in cc.
fn resolve_request<'r>(
    req: &'r ApprovalRequest,
    lookup: &dyn Fn(&UserRef) -> Result<String>,
) -> Result<(String, Vec<Resolved>, Vec<String>)> {
    let mut known: Vec<(&'r UserRef, String)> = Vec::new();
    let mut resolve = |users: &'r [UserRef]| -> Result<Vec<String>> {
        users
            .iter()
            .map(|u| {
                if let Some((_, id)) = known.iter().find(|(k, _)| *k == u) {
                    return Ok(id.clone());
                }
                let id = lookup(u)?;
                known.push((u, id.clone()));
                Ok(id)
            })
            .collect()
    };
    let initiator = resolve(core::slice::from_ref(&req.initiator))?.remove(0);
    let nodes = req
        .nodes
        .iter()
        .map(|n| Ok((n.mode, resolve(&n.approvers)?)))
        .collect::<Result<Vec<_>>>()?;
    let cc = resolve(&req.cc)?;
    Ok((initiator, nodes, cc))
}

pub fn poll(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    rec: &Record,
) -> Result<Vec<crate::approval::Event>> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::poll(env, app, rec),
        Platform::Dingtalk => dingtalk::poll(env, app, rec),
        Platform::Wecom => wecom::poll(env, app, rec),
    }
}

pub fn cancel(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    rec: &Record,
    reason: Option<&str>,
) -> Result<()> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::cancel(env, app, rec, reason),
        Platform::Dingtalk => dingtalk::cancel(env, app, rec, reason),
        Platform::Wecom => wecom::cancel(env, app, rec, reason),
    }
}

pub fn parse_callback(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &crate::model::HttpRequest,
) -> Result<Parsed> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::parse_callback(env, app, req),
        Platform::Dingtalk => dingtalk::parse_callback(env, app, req),
        Platform::Wecom => wecom::parse_callback(env, app, req),
    }
}

/// An event the host received over a persistent connection it holds for `app` (Feishu's
/// long connection, DingTalk's Stream mode): plaintext, already authenticated.
pub fn parse_event(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    event: &[u8],
) -> Result<Vec<crate::approval::Inbound>> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::parse_event(env, event),
        Platform::Dingtalk => dingtalk::parse_event(env, event),
        Platform::Wecom => Err(crate::error::Error::input(
            "WeCom has no persistent-connection mode; use HTTP callbacks",
        )),
    }
}

/// A message from the app itself to a chat or to users.
pub fn send_message(env: &(impl Env + ?Sized), app: &ImApp, n: &Notification) -> Result<Receipt> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::send_message(env, app, n),
        Platform::Dingtalk => dingtalk::send_message(env, app, n),
        Platform::Wecom => wecom::send_message(env, app, n),
    }
}

/// A group robot webhook; it carries its own credentials, so `app` is only needed to look up
/// mentioned users.
pub fn send_webhook(
    env: &(impl Env + ?Sized),
    app: Option<&ImApp>,
    hook: &RobotWebhook,
    n: &Notification,
) -> Result<Receipt> {
    let secret = hook.secret.as_deref().filter(|s| !s.is_empty());
    match hook.platform {
        Platform::Feishu | Platform::Lark => feishu::send_webhook(env, app, &hook.url, secret, n),
        Platform::Dingtalk => dingtalk::send_webhook(env, app, &hook.url, secret, n),
        Platform::Wecom => wecom::send_webhook(env, app, &hook.url, secret, n),
    }
}

/// The text every platform's one-field form carries: the fields, then the link.
pub fn form_text(req: &ApprovalRequest) -> String {
    let mut s = String::new();
    for (k, v) in &req.fields {
        s.push_str(k);
        s.push_str(": ");
        s.push_str(v);
        s.push('\n');
    }
    if let Some(url) = &req.detail_url {
        s.push_str(url);
        s.push('\n');
    }
    if s.is_empty() {
        s.push_str(&req.title);
    }
    s.trim_end().to_string()
}

/// Mobile numbers as the platforms' directories look them up: mainland numbers as 11 bare
/// digits, others as `+<country code><number>`. Accepts spaces, dashes, dots, parentheses and `+86` / `0086` /
/// `86` prefixes.
pub fn normalize_mobile(raw: &str) -> Result<String> {
    let t = raw.trim();
    let mut plus = false;
    let mut digits = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '0'..='9' => digits.push(c),
            // "+86 …" and "(+86) …": a plus is only meaningful before the first digit.
            '+' if digits.is_empty() && !plus => plus = true,
            ' ' | '-' | '.' | '(' | ')' | '\u{a0}' => {}
            _ => return Err(Error::input(format!("{raw:?} is not a mobile number"))),
        }
    }
    let mainland = |d: &str| d.len() == 11 && d.starts_with('1');
    let international = digits
        .strip_prefix("00")
        .map(str::to_string)
        .or_else(|| plus.then(|| digits.clone()));
    let out = match international {
        Some(intl) => match intl.strip_prefix("86") {
            Some(d) if mainland(d) => d.to_string(),
            _ => format!("+{intl}"),
        },
        None => match digits.strip_prefix("86") {
            Some(d) if mainland(d) => d.to_string(),
            _ => digits,
        },
    };
    let n = out.trim_start_matches('+').len();
    if !(5..=20).contains(&n) {
        return Err(Error::input(format!("{raw:?} is not a mobile number")));
    }
    Ok(out)
}

/// Where an id the platform hands out once per app (DingTalk's form, WeCom's template) is
/// kept: per app, API base and platform app id, so pointing an app at another base or
/// another platform app never reuses an id that only the old one knows.
fn app_object_key(app: &ImApp, base: &str, kind: &str) -> String {
    let scope = crate::crypto::sha256(&[base.as_bytes(), b"\0", app.app_id.as_bytes()]);
    crate::env::app_key(app, kind, &crate::env::hex(&scope)[..16])
}

/// The id kept under `key`, else the one `make` gets from the platform, kept for next time:
/// so the platform object behind it is made once.
fn cached_id(
    env: &(impl Env + ?Sized),
    key: &str,
    what: &str,
    make: impl FnOnce() -> Result<String>,
) -> Result<String> {
    if let Some(id) = env.kv_get(key)? {
        return String::from_utf8(id).map_err(|_| Error::storage(format!("corrupt {what} cache")));
    }
    let id = make()?;
    env.kv_set(key, id.as_bytes())?;
    Ok(id)
}

/// How long checking whether a refused create's form or template is gone may take: the start
/// has released its key by then, and the check only helps the next one.
pub(crate) const GONE_CHECK_LIMIT_MS: u64 = 2_000;

/// A DingTalk or WeCom create that the platform refused, and that the start has released its
/// key after: when the form or template it was made with (`meta`, as [`prepare`] kept it) is
/// gone from the platform (an admin tidying the console), it is forgotten so that a retry
/// makes it again, and the refusal says so and becomes retryable. Kept for good, a deleted
/// form or template failed every later start of the app until someone cleared the store.
pub fn forget_gone(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    meta: &serde_json::Value,
    error: Error,
) -> Error {
    let id = |name: &str| meta[name].as_str().unwrap_or_default();
    match app.platform {
        Platform::Dingtalk => dingtalk::forget_gone_form(env, app, id("process_code"), error),
        Platform::Wecom => wecom::forget_gone_template(env, app, id("template_id"), error),
        Platform::Feishu | Platform::Lark => error,
    }
}

/// The refusal `e` of a create made with `id`, kept under `key`: when `gone` finds it deleted
/// on the platform, forgets it (only if the store still keeps that id: a concurrent start may
/// have made a new one) and makes the refusal retryable, saying why.
pub(crate) fn forget_if_gone(
    env: &(impl Env + ?Sized),
    key: &str,
    what: &str,
    id: &str,
    e: Error,
    gone: impl FnOnce() -> bool,
) -> Error {
    let kept = || env.kv_get(key).ok().flatten();
    match &e {
        Error::Platform {
            code,
            message,
            retryable: false,
        } if !id.is_empty()
            && kept().as_deref() == Some(id.as_bytes())
            && gone()
            && env.kv_delete(key).is_ok() =>
        {
            Error::platform(
                *code,
                format!(
                    "{message}; the {what} it used is gone from the platform, a retry makes it again"
                ),
                true,
            )
        }
        _ => e,
    }
}

/// How long a part of a notification that failed further on is remembered as delivered.
const PART_KEPT_MS: u64 = 10 * 60 * 1000;
/// How long the request token of a part whose outcome is unknown is kept for the engine's
/// retry: inside the hour Feishu remembers a message `uuid`, so reusing it can only drop a
/// message that did arrive.
const TOKEN_KEPT_MS: u64 = 50 * 60 * 1000;

/// Sends one part: its body and its request token, if any; returns the id the platform gave.
type SendPart<'a> = dyn FnMut(&serde_json::Value, Option<&str>) -> Result<Option<String>> + 'a;

/// What one part's mark says, and what this call did with the part.
enum Part {
    /// Delivered by an earlier call within [`PART_KEPT_MS`]: not sent again.
    Delivered,
    /// Sent by this call.
    Sent,
    /// Sent by this call (or earlier, with the request token kept in its mark) without an
    /// answer: it may have arrived. The mark keeps `(first try, token)`.
    Tried(u64, [u8; 16]),
    /// Failed with nothing to keep: refused by the platform, or sent without a token.
    Failed,
}

/// Sends a notification that goes out as one or more messages (one per user, per batch of
/// users, a card then its mentions), in order, to `dest`; returns the ids the sends gave. When a
/// part fails after others went out with a retryable error, the engine's retry of the whole
/// notification would deliver those others twice. So the parts that went out are then
/// remembered, by a digest of where each went and what it said, for ten minutes; a part
/// remembered is not sent again, and the marks go once the notification has nothing left to
/// retry (it completed, or failed for good). Only that failure writes: a notification that
/// goes out whole, the usual case, costs a read per part. The marks are best effort: without
/// them a retry repeats parts, as before.
///
/// With `tokens` (the platform drops a second request carrying the same token), every part,
/// even a lone one (which then costs a read too), is sent with a request token (32 hex
/// digits), and a part that may have arrived (no answer, a 5xx, an unreadable 2xx:
/// [`Error::may_have_taken_effect`]) keeps its token in its mark, so the engine's retry
/// within [`TOKEN_KEPT_MS`] sends it with the same token: a part whose answer was lost after
/// it arrived is not delivered twice. A part the platform refused keeps no token: nothing
/// arrived, and nothing is left behind.
///
/// With `independent` (each part goes to other people: Feishu's per-user messages, DingTalk's
/// batches), a part the platform refused for good does not keep the later parts from their
/// recipients when the refusal is about that part's recipient alone: its code is the one
/// given (Feishu's "no availability to this user"), or any code of the platform's own once a
/// part went out, which shows the app, its rights and the message are fine. The error is then
/// the first such refusal, saying how many parts were refused. Anything else stops the
/// sending: an app-wide refusal would repeat for every part, a retryable failure likely too,
/// and the retry sends the rest (that error then carries the count).
fn send_parts(
    env: &(impl Env + ?Sized),
    dest: &str,
    bodies: &[serde_json::Value],
    tokens: bool,
    independent: Option<i64>,
    send: &mut SendPart<'_>,
) -> Result<Vec<String>> {
    let now = env.now_ms();
    let mut ids = Vec::new();
    // Each part's mark, whether the store has it, and what this call did with the part.
    let mut marks = Vec::new();
    let mut failure: Option<Error> = None;
    let mut refused = 0;
    let mut went_out = false;
    for body in bodies {
        let mut part = Part::Sent;
        let mut key = String::new();
        let mut present = false;
        if bodies.len() > 1 || tokens {
            let body = body.to_string();
            let digest = crate::crypto::sha256(&[dest.as_bytes(), b"\0", body.as_bytes()]);
            key = "sent/".to_string() + &crate::env::hex(&digest[..16]);
            // Delivered: when, in ms, as 8 little-endian bytes; tried: that and the token.
            let mark = env.kv_get(&key).ok().flatten();
            present = mark.is_some();
            let mark = mark.unwrap_or_default();
            let at = mark
                .get(..8)
                .and_then(|at| at.try_into().ok())
                .map_or(0, u64::from_le_bytes);
            let age = now.saturating_sub(at);
            match mark.get(8..).and_then(|t| <[u8; 16]>::try_from(t).ok()) {
                Some(token) if tokens && age < TOKEN_KEPT_MS => part = Part::Tried(at, token),
                None if mark.len() == 8 && age < PART_KEPT_MS => part = Part::Delivered,
                _ => {}
            }
        }
        if let Part::Delivered = part {
            went_out = true;
            marks.push((key, present, part));
            continue;
        }
        let token = match &part {
            Part::Tried(_, token) => Some(*token),
            _ if tokens => env.random_bytes(16).try_into().ok(),
            _ => None,
        };
        let hex = token.map(|t| crate::env::hex(&t));
        match send(body, hex.as_deref()) {
            Ok(id) => {
                ids.extend(id);
                went_out = true;
                part = Part::Sent;
            }
            Err(e) => {
                part = match (part, token) {
                    (tried @ Part::Tried(..), _) if e.may_have_taken_effect() => tried,
                    (_, Some(token)) if e.may_have_taken_effect() => Part::Tried(now, token),
                    _ => Part::Failed,
                };
                let go_on = match (&e, independent) {
                    (
                        Error::Platform {
                            code,
                            retryable: false,
                            ..
                        },
                        Some(own),
                    ) => *code == own || (*code > 0 && went_out),
                    _ => false,
                };
                refused += usize::from(go_on);
                marks.push((key, present, part));
                if !go_on {
                    failure = Some(e);
                    break;
                }
                failure.get_or_insert(e);
                continue;
            }
        }
        marks.push((key, present, part));
    }
    if let Some(Error::Platform { message, .. }) =
        failure.as_mut().filter(|_| refused > 0 && bodies.len() > 1)
    {
        *message += &format!(" ({refused} of {} messages refused)", bodies.len());
    }
    match failure {
        Some(e) if e.is_retryable() => {
            for (key, _, part) in &marks {
                let _ = match part {
                    Part::Sent if !key.is_empty() => env.kv_set(key, &now.to_le_bytes()),
                    Part::Tried(at, token) => {
                        env.kv_set(key, &[&at.to_le_bytes()[..], &token[..]].concat())
                    }
                    _ => Ok(()),
                };
            }
            Err(e)
        }
        failure => {
            for (key, present, _) in &marks {
                if *present {
                    let _ = env.kv_delete(key);
                }
            }
            failure.map_or(Ok(ids), Err)
        }
    }
}

/// Accepts the platforms' mix of numeric and string timestamps.
pub fn json_u64(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.split('.').next()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::fake::FakeEnv;

    /// Sends parts with `fail_at` (0-based) failing, as a rate limit would (or, with
    /// `for_good`, as a refusal no retry changes); what went out.
    fn parts_failing(
        env: &FakeEnv,
        dest: &str,
        bodies: &[serde_json::Value],
        fail_at: Option<usize>,
        for_good: bool,
    ) -> (Result<Vec<String>>, Vec<serde_json::Value>) {
        let mut sent = Vec::new();
        let r = send_parts(env, dest, bodies, false, None, &mut |b, token| {
            assert_eq!(token, None, "no tokens were asked for");
            if fail_at == Some(sent.len()) {
                sent.push(serde_json::Value::Null);
                return Err(Error::platform(99991400, "refused", !for_good));
            }
            sent.push(b.clone());
            Ok(Some(format!("id-{}", b["n"])))
        });
        sent.retain(|b| !b.is_null());
        (r, sent)
    }

    fn parts_sent(
        env: &FakeEnv,
        dest: &str,
        bodies: &[serde_json::Value],
        fail_at: Option<usize>,
    ) -> (Result<Vec<String>>, Vec<serde_json::Value>) {
        parts_failing(env, dest, bodies, fail_at, false)
    }

    fn marks(env: &FakeEnv) -> usize {
        env.snapshot()
            .keys()
            .filter(|k| k.starts_with("sent/"))
            .count()
    }

    /// The engine retries a notification that failed part-way (its error is retryable): the
    /// parts that went out the first time are not sent again. Before, they were.
    #[test]
    fn a_retried_notification_sends_only_what_did_not_go_out() {
        let env = FakeEnv::offline();
        let bodies: Vec<_> = (1..=3).map(|n| serde_json::json!({"n": n})).collect();
        let (first, sent) = parts_sent(&env, "chat", &bodies, Some(1));
        assert!(matches!(
            first,
            Err(Error::Platform {
                retryable: true,
                ..
            })
        ));
        assert_eq!(sent, bodies[..1]);
        assert_eq!(marks(&env), 1);
        let (retry, sent) = parts_sent(&env, "chat", &bodies, None);
        assert_eq!(retry.unwrap(), ["id-2", "id-3"]);
        assert_eq!(sent, bodies[1..]);
        assert_eq!(marks(&env), 0, "a completed notification is forgotten");
        // One that goes out whole writes nothing at all.
        let before = env.snapshot();
        let (whole, _) = parts_sent(&env, "chat-w", &bodies, None);
        assert_eq!(whole.unwrap().len(), 3);
        assert_eq!(env.snapshot(), before);
        // Sent again later: in full.
        let (again, sent) = parts_sent(&env, "chat", &bodies, None);
        assert_eq!(again.unwrap().len(), 3);
        assert_eq!(sent, bodies);
    }

    /// A part refused for good is not retried by the engine: nothing is remembered, and the
    /// marks of an earlier try are cleared, so the same notification later goes out whole.
    #[test]
    fn a_notification_that_failed_for_good_is_not_remembered() {
        let env = FakeEnv::offline();
        let bodies: Vec<_> = (1..=3).map(|n| serde_json::json!({"n": n})).collect();
        let (_, sent) = parts_failing(&env, "chat", &bodies, Some(2), true);
        assert_eq!(sent.len(), 2);
        assert_eq!(marks(&env), 0);
        let _ = parts_sent(&env, "chat", &bodies, Some(1));
        assert_eq!(marks(&env), 1);
        let (refused, sent) = parts_failing(&env, "chat", &bodies, Some(0), true);
        assert!(matches!(
            refused,
            Err(Error::Platform {
                retryable: false,
                ..
            })
        ));
        assert!(sent.is_empty());
        assert_eq!(marks(&env), 0);
    }

    /// Independent parts (other people each), with Feishu's "no availability" as the
    /// recipient's own refusal: what went out, by `n`, when `fails` refuses some of them.
    fn independent(
        env: &FakeEnv,
        fails: &dyn Fn(u64) -> Option<Error>,
    ) -> (Result<Vec<String>>, Vec<u64>) {
        let bodies: Vec<_> = (1..=5).map(|n| serde_json::json!({"n": n})).collect();
        let mut sent = Vec::new();
        let r = send_parts(env, "users", &bodies, false, Some(230013), &mut |b, _| {
            let n = b["n"].as_u64().unwrap();
            fails(n).map_or(Ok(Some(format!("id-{n}"))), Err)?;
            sent.push(n);
            Ok(None)
        });
        (r, sent)
    }

    /// Before, a Feishu message to five users, the second of them outside the app's
    /// availability, reached only the first.
    #[test]
    fn a_recipient_refused_for_good_keeps_no_one_else_from_the_message() {
        let env = FakeEnv::offline();
        let outside = |n| {
            [2, 4]
                .contains(&n)
                .then(|| Error::platform(230013, "no availability", false))
        };
        let (r, sent) = independent(&env, &outside);
        assert_eq!(sent, [1, 3, 5]);
        assert_eq!(
            r,
            Err(Error::platform(
                230013,
                "no availability (2 of 5 messages refused)",
                false
            ))
        );
        assert_eq!(marks(&env), 0, "failed for good: nothing to retry");

        // A refusal without a code of its own (an HTTP 403) or a retryable one stops there.
        let forbidden = |n| (n == 2).then(|| Error::platform(-403, "forbidden", false));
        assert_eq!(independent(&env, &forbidden).1, [1]);
        let limited = |n| match n {
            2 => Some(Error::platform(230013, "no availability", false)),
            4 => Some(Error::platform(99991400, "rate limited", true)),
            _ => None,
        };
        let (r, sent) = independent(&env, &limited);
        assert_eq!(sent, [1, 3]);
        assert!(r.unwrap_err().is_retryable(), "the engine retries the rest");
        // The retry sends only what did not go out; user 2 is refused again.
        let (r, sent) = independent(&env, &|n| outside(n).filter(|_| n == 2));
        assert_eq!(sent, [4, 5]);
        assert!(matches!(r, Err(Error::Platform { code: 230013, .. })));
        assert_eq!(marks(&env), 0);

        // Another code stops there while nothing went out: likely the app's own (a bot not
        // enabled, a missing right), it would repeat for every user.
        let app_wide = |_| Some(Error::platform(230006, "bot not enabled", false));
        assert_eq!(independent(&env, &app_wide).1, Vec::<u64>::new());
        // Once a part went out, any code of the platform's is about that part's recipient.
        let blocked = |n| (n == 3).then(|| Error::platform(230053, "bot stopped", false));
        let (r, sent) = independent(&env, &blocked);
        assert_eq!(sent, [1, 2, 4, 5]);
        assert!(matches!(r, Err(Error::Platform { code: 230053, .. })));
        // A message of one part says nothing of parts.
        let one = [serde_json::json!({"n": 1})];
        let r = send_parts(&env, "user", &one, false, Some(230013), &mut |_, _| {
            Err(Error::platform(230013, "no availability", false))
        });
        assert_eq!(r, Err(Error::platform(230013, "no availability", false)));
    }

    #[test]
    fn parts_are_remembered_per_destination_for_ten_minutes_and_single_parts_not_at_all() {
        let env = FakeEnv::offline();
        let bodies: Vec<_> = (1..=2).map(|n| serde_json::json!({"n": n})).collect();
        let _ = parts_sent(&env, "chat-a", &bodies, Some(1));
        let (other, sent) = parts_sent(&env, "chat-b", &bodies, None);
        assert_eq!(other.unwrap().len(), 2, "another destination");
        assert_eq!(sent.len(), 2);
        env.now.set(env.now.get() + PART_KEPT_MS);
        let (late, sent) = parts_sent(&env, "chat-a", &bodies, None);
        assert_eq!(late.unwrap().len(), 2, "ten minutes later");
        assert_eq!(marks(&env), 0, "the stale mark is cleared");
        assert_eq!(sent.len(), 2);
        let ops = env.kv_ops();
        let (one, _) = parts_sent(&env, "chat-a", &bodies[..1], None);
        assert_eq!(one.unwrap(), ["id-1"]);
        assert_eq!(env.kv_ops(), ops, "one message needs no marks");
        // A store that fails loses only the marks, never the message.
        env.fail_kv_op(Some(env.kv_ops()));
        let (faulty, sent) = parts_sent(&env, "chat-c", &bodies, None);
        assert_eq!(faulty.unwrap().len(), 2);
        assert_eq!(sent.len(), 2);
    }

    /// With tokens: sends `bodies`, the parts numbered in `fail` failing with `error`; returns
    /// the result and the token each attempted part carried, by its `n`.
    fn tokened(
        env: &FakeEnv,
        bodies: &[serde_json::Value],
        fail: &[u64],
        error: Error,
    ) -> (Result<Vec<String>>, Vec<(u64, String)>) {
        let mut tried = Vec::new();
        let r = send_parts(env, "chat", bodies, true, None, &mut |b, token| {
            let n = b["n"].as_u64().unwrap();
            let token = token.expect("every part carries a token").to_string();
            assert_eq!(token.len(), 32);
            tried.push((n, token));
            if fail.contains(&n) {
                return Err(error.clone());
            }
            Ok(Some(format!("id-{n}")))
        });
        (r, tried)
    }

    /// A part whose answer was lost may have arrived: the engine's retry sends it with the
    /// token of the first try (the platform then drops it if it did), parts that went out are
    /// skipped, and parts never tried get tokens of their own. Without the token kept, the
    /// retry carried a new one and the platform delivered the part again.
    #[test]
    fn a_part_that_may_have_arrived_is_retried_with_its_first_token() {
        let env = FakeEnv::offline();
        let lost = Error::transport("timed out");
        let one = [serde_json::json!({"n": 1})];
        let (r, first) = tokened(&env, &one, &[1], lost.clone());
        assert!(r.unwrap_err().is_retryable());
        assert_eq!(
            marks(&env),
            1,
            "a lone part is remembered when it may have arrived"
        );
        let (r, retry) = tokened(&env, &one, &[], lost.clone());
        assert_eq!(r.unwrap(), ["id-1"]);
        assert_eq!(retry, first, "the same token");
        assert_eq!(marks(&env), 0);
        let (_, again) = tokened(&env, &one, &[], lost.clone());
        assert_ne!(again, first, "a notification sent again is a new message");

        let three: Vec<_> = (1..=3).map(|n| serde_json::json!({"n": n})).collect();
        let (_, first) = tokened(&env, &three, &[2], lost.clone());
        assert_eq!(first.len(), 2);
        assert_eq!(marks(&env), 2);
        let (_, retry) = tokened(&env, &three, &[2, 3], lost.clone());
        assert_eq!(
            retry[0], first[1],
            "part 1 went out; part 2 keeps its token"
        );
        assert_eq!(retry.len(), 1);
        let (r, last) = tokened(&env, &three, &[3], lost.clone());
        assert!(r.is_err());
        assert_eq!(last[0], first[1]);
        assert_eq!(last[1].0, 3);
        let (r, done) = tokened(&env, &three, &[], lost.clone());
        assert_eq!(r.unwrap(), ["id-3"]);
        assert_eq!(
            done,
            [last[1].clone()],
            "part 3 keeps the token it was tried with"
        );
        assert_eq!(marks(&env), 0);

        // A kept token is reused until TOKEN_KEPT_MS after the first try, then replaced; a
        // refusal for good forgets it.
        let (_, kept) = tokened(&env, &one, &[1], lost.clone());
        env.now.set(env.now.get() + TOKEN_KEPT_MS - 1);
        let (_, still) = tokened(&env, &one, &[1], lost.clone());
        assert_eq!(still, kept, "within the window, after more failures");
        env.now.set(env.now.get() + 1);
        let (_, late) = tokened(&env, &one, &[1], lost);
        assert_ne!(late, kept, "a new token once the window has passed");
        let (r, _) = tokened(&env, &one, &[1], Error::platform(230002, "no", false));
        assert!(!r.unwrap_err().is_retryable());
        assert_eq!(marks(&env), 0);
    }

    /// A part the platform refused (rate limit: retryable, but certainly not delivered) keeps
    /// no token and writes no mark of its own; the retry sends it under a new token.
    #[test]
    fn a_refused_part_keeps_no_token() {
        let env = FakeEnv::offline();
        let one = [serde_json::json!({"n": 1})];
        for busy in [
            Error::platform(99991400, "request trigger frequency limit", true),
            Error::platform(-503, "HTTP 503", true),
            Error::platform(-429, "HTTP 429", true),
        ] {
            let (r, first) = tokened(&env, &one, &[1], busy.clone());
            assert!(r.unwrap_err().is_retryable());
            assert_eq!(marks(&env), 0, "{busy}");
            let (_, retry) = tokened(&env, &one, &[], busy);
            assert_ne!(retry, first);
        }
    }

    /// A gateway's 5xx (other than 503) or a 2xx that cannot be read does not say the part
    /// was refused: it may have arrived, so the retry carries its first token, as after a
    /// lost answer. Before, only a lost answer kept it, and a 502 after delivery meant the
    /// message twice.
    #[test]
    fn a_part_answered_by_a_failing_gateway_keeps_its_token() {
        let env = FakeEnv::offline();
        let one = [serde_json::json!({"n": 1})];
        for unclear in [
            Error::platform(-502, "HTTP 502", true),
            Error::platform(-504, "HTTP 504", true),
            Error::platform(-200, "unreadable answer", true),
        ] {
            let (_, first) = tokened(&env, &one, &[1], unclear.clone());
            assert_eq!(marks(&env), 1, "{unclear}");
            let (r, retry) = tokened(&env, &one, &[], unclear.clone());
            assert_eq!(r.unwrap(), ["id-1"]);
            assert_eq!(retry, first, "{unclear}: the same token");
        }
    }

    #[test]
    fn object_keys_stay_put_and_are_scoped() {
        let app = dingtalk::tests::app();
        let key = app_object_key(&app, "https://api.dingtalk.com", "dform");
        // Kept in tenants' stores since the first release: a new layout would make every app
        // look its form or template up again (or create a second one). The digest is
        // `printf 'https://api.dingtalk.com\0dingappkey' | sha256sum`, cut to 16.
        assert_eq!(key, "a/dt1/dform/7f93202f806d2612");
        let other_app = ImApp {
            app_id: format!("{}x", app.app_id),
            ..app.clone()
        };
        assert_ne!(
            key,
            app_object_key(&other_app, "https://api.dingtalk.com", "dform")
        );
        assert_ne!(key, app_object_key(&app, "http://127.0.0.1:1", "dform"));
        assert_ne!(
            key,
            app_object_key(&app, "https://api.dingtalk.com", "wtpl")
        );
    }

    #[test]
    fn mobiles_normalise() {
        for m in [
            "13800000000",
            "+86 138-0000-0000",
            "8613800000000",
            "0086 138 0000 0000",
            "(+86) 138.0000.0000",
        ] {
            assert_eq!(normalize_mobile(m).unwrap(), "13800000000", "{m}");
        }
        assert_eq!(normalize_mobile("+852 9123 4567").unwrap(), "+85291234567");
        assert!(normalize_mobile("call me").is_err());
        assert!(normalize_mobile("12").is_err());
    }

    /// Only a refusal no retry would change by itself asks whether the object is gone, and
    /// only if the store still keeps the id it was made with; only a gone one is forgotten.
    #[test]
    fn only_a_gone_object_behind_a_refusal_is_forgotten() {
        let env = FakeEnv::offline();
        let refused = || Error::platform(-400, "InvalidParameter: x", false);
        let kept = |env: &FakeEnv| env.kv_get("k").unwrap();
        env.kv_set("k", b"PROC-1").unwrap();
        let asked = std::cell::Cell::new(0);
        let gone = |answer: bool| {
            asked.set(asked.get() + 1);
            answer
        };

        let throttled = Error::platform(-429, "Throttling", true);
        let e = forget_if_gone(&env, "k", "form", "PROC-1", throttled.clone(), || {
            gone(true)
        });
        assert_eq!(e, throttled);
        let cut_off = Error::transport("cut off");
        let e = forget_if_gone(&env, "k", "form", "PROC-1", cut_off.clone(), || gone(true));
        assert_eq!(e, cut_off);
        // Another start has made a new one since, or the meta had none.
        for id in ["PROC-0", ""] {
            let e = forget_if_gone(&env, "k", "form", id, refused(), || gone(true));
            assert_eq!(e, refused());
        }
        assert_eq!(asked.get(), 0);

        let e = forget_if_gone(&env, "k", "form", "PROC-1", refused(), || gone(false));
        assert_eq!(e, refused());
        assert_eq!(kept(&env).as_deref(), Some(&b"PROC-1"[..]));

        let e = forget_if_gone(&env, "k", "form", "PROC-1", refused(), || gone(true));
        assert_eq!(asked.get(), 2);
        assert_eq!(kept(&env), None);
        assert_eq!(
            e,
            Error::platform(
                -400,
                "InvalidParameter: x; the form it used is gone from the platform, a retry makes \
                 it again",
                true
            )
        );
    }
}
