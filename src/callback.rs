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

/// Whether a hex signature as presented matches the expected one (case-insensitive, in
/// constant time).
pub fn signature_matches(expected_hex: &str, presented: &str) -> bool {
    crate::crypto::ct_eq(
        expected_hex.as_bytes(),
        presented.trim().to_ascii_lowercase().as_bytes(),
    )
}

/// Rejects a signed timestamp that is not a number or is more than `MAX_SKEW_SECS` from our
/// clock. `units_per_sec` is 1 for platforms that sign seconds, 1000 for milliseconds.
pub fn check_timestamp(now_ms: u64, ts: &str, units_per_sec: u64) -> Result<()> {
    let ts: u64 = ts
        .trim()
        .parse()
        .map_err(|_| Error::unauthorized("callback timestamp is not a number"))?;
    if (now_ms / 1000).abs_diff(ts / units_per_sec) > MAX_SKEW_SECS {
        return Err(Error::unauthorized(
            "callback timestamp is outside the allowed window",
        ));
    }
    Ok(())
}
