//! One module per IM platform behind the same few operations; `approval`, `notify` and
//! `callback` dispatch here and never look at platform wire formats themselves.

pub mod feishu;

use crate::approval::{Inbound, Record};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{ApprovalRequest, HttpResponse, ImApp, Notification, Platform, Receipt};

/// A new instance on the platform, and what later calls need to address it.
pub struct Created {
    pub instance_id: String,
    pub meta: serde_json::Value,
}

/// A verified, decrypted callback: what to answer and what it says.
pub struct Parsed {
    pub response: HttpResponse,
    pub events: Vec<Inbound>,
}

fn unsupported(p: Platform) -> Error {
    Error::config(format!(
        "{} is not supported by this build of imbridge yet",
        p.name()
    ))
}

/// Platforms that reject a second create with the same idempotency token, so a start whose
/// outcome is unknown may safely be retried.
pub fn dedups_creates(p: Platform) -> bool {
    matches!(p, Platform::Feishu | Platform::Lark)
}

pub fn create(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &ApprovalRequest,
    idempotency_token: &str,
) -> Result<Created> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::create(env, app, req, idempotency_token),
        p => Err(unsupported(p)),
    }
}

pub fn poll(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    rec: &Record,
) -> Result<Vec<crate::approval::Event>> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::poll(env, app, rec),
        p => Err(unsupported(p)),
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
        p => Err(unsupported(p)),
    }
}

pub fn parse_callback(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &crate::model::HttpRequest,
) -> Result<Parsed> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::parse_callback(env, app, req),
        p => Err(unsupported(p)),
    }
}

/// A message from the app itself to a chat or to users.
pub fn send_message(env: &(impl Env + ?Sized), app: &ImApp, n: &Notification) -> Result<Receipt> {
    match app.platform {
        Platform::Feishu | Platform::Lark => feishu::send_message(env, app, n),
        p => Err(unsupported(p)),
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

/// Accepts the platforms' mix of numeric and string timestamps.
pub fn json_u64(v: Option<&serde_json::Value>) -> Option<u64> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.split('.').next()?.parse().ok(),
        _ => None,
    }
}
