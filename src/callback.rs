//! Entry point for platform callbacks: size limits, dispatch to the platform's parser (which
//! verifies and decrypts), then the approval state machine.

use crate::approval;
use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{CallbackOutcome, HttpRequest, ImApp};
use crate::platform;

/// Real callbacks are a few KiB; anything near this is hostile or broken.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How far a signed timestamp may be from our clock. Platforms sign each delivery (retries
/// included) when it is sent; replays inside the window are caught by deduplication.
pub const MAX_SKEW_SECS: u64 = 600;

pub fn handle(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &HttpRequest,
) -> Result<CallbackOutcome> {
    if req.body.len() > MAX_BODY_BYTES {
        return Err(Error::input(format!(
            "callback body of {} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
            req.body.len()
        )));
    }
    let parsed = platform::parse_callback(env, app, req)?;
    let updates = approval::apply_inbound(env, app, &parsed.events)?;
    Ok(CallbackOutcome {
        response: parsed.response,
        updates,
    })
}

/// An event from a persistent connection the host holds; returns the approvals it changed.
pub fn handle_event(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    event: &[u8],
) -> Result<Vec<crate::model::Approval>> {
    if event.len() > MAX_BODY_BYTES {
        return Err(Error::input(format!(
            "event of {} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
            event.len()
        )));
    }
    let events = platform::parse_event(env, app, event)?;
    approval::apply_inbound(env, app, &events)
}

/// First value of a header, by case-insensitive name.
pub fn header<'r>(req: &'r HttpRequest, name: &str) -> Option<&'r str> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub fn max_skew_ok(now_secs: u64, ts_secs: u64) -> bool {
    now_secs.abs_diff(ts_secs) <= MAX_SKEW_SECS
}
