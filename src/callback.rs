//! Entry point for platform callbacks: size limits, dispatch to the platform's parser (which
//! verifies and decrypts), then the approval state machine.

use crate::approval;
use crate::crypto::sorted_sha1_hex;
use crate::crypto::wx::WxKey;
use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{CallbackOutcome, HttpRequest, ImApp, Platform};
use crate::platform;

/// Real callbacks are a few KiB; anything near this is hostile or broken.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How far a signed timestamp may be from our clock unless the app configures its own
/// `max-clock-skew-secs`; replays inside the window are caught by deduplication.
pub const DEFAULT_MAX_SKEW_SECS: u32 = 600;
/// Feishu's default instead: it retries a failed push 15 s, 5 min, 1 h and 6 h after the
/// try before, the last about 7.1 hours after the push, and whether a retry is signed anew
/// is not documented (lark-oapi does not bound the age at all), so eight hours keep its last
/// retry from being refused as stale.
pub const FEISHU_MAX_SKEW_SECS: u32 = 8 * 3600;

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

/// The one answer to a callback whose signature is absent or wrong: which of the two, or what
/// was wrong with it, is not the sender's business.
pub fn unsigned() -> Error {
    Error::unauthorized("callback signature is missing or invalid")
}

/// Whether a hex signature as presented matches the expected one (case-insensitive, in
/// constant time).
pub fn signature_matches(expected_hex: &str, presented: &str) -> bool {
    crate::crypto::ct_eq(
        expected_hex.as_bytes(),
        presented.trim().to_ascii_lowercase().as_bytes(),
    )
}

/// Rejects a signed timestamp that is not a number or is further from our clock than the app's
/// window. `units_per_sec` is 1 for platforms that sign seconds, 1000 for milliseconds.
pub fn check_timestamp(app: &ImApp, now_ms: u64, ts: &str, units_per_sec: u64) -> Result<()> {
    let ts: u64 = ts
        .trim()
        .parse()
        .map_err(|_| Error::unauthorized("callback timestamp is not a number"))?;
    let window =
        app.max_clock_skew_secs
            .unwrap_or(if platform::family(app.platform) == Platform::Feishu {
                FEISHU_MAX_SKEW_SECS
            } else {
                DEFAULT_MAX_SKEW_SECS
            });
    if window == 0 {
        // A push takes time to arrive, so a window of 0 would refuse most callbacks; it is
        // more likely meant as "no check", which the signature's replay protection does not
        // allow.
        return Err(Error::config(
            "max-clock-skew-secs must be at least 1 (0 would refuse nearly every callback)",
        ));
    }
    if (now_ms / 1000).abs_diff(ts / units_per_sec) > u64::from(window) {
        return Err(Error::unauthorized(
            "callback timestamp is outside the allowed window",
        ));
    }
    Ok(())
}

/// What a callback in the WX frame (DingTalk, WeCom) is checked and decrypted with: the
/// app's Token and EncodingAESKey, and the receive id the frame must name (its AppKey or
/// CorpID, `app_id`).
pub struct WxSecrets<'a> {
    pub token: &'a str,
    pub key: WxKey,
    pub receive_id: &'a str,
}

impl<'a> WxSecrets<'a> {
    /// `app_id_is` names what `app_id` holds on this platform, for the error.
    pub fn of(app: &'a ImApp, platform: &str, app_id_is: &str) -> Result<Self> {
        let token = app
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::config(format!("{platform} callbacks need the app's Token (token)"))
            })?;
        let key = app
            .encrypt_key
            .as_deref()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| {
                Error::config(format!(
                    "{platform} callbacks need the app's EncodingAESKey (encrypt-key)"
                ))
            })?;
        let key = WxKey::new(key)?;
        let receive_id = app.app_id.trim();
        if receive_id.is_empty() {
            return Err(Error::config(format!("app-id ({app_id_is}) is required")));
        }
        Ok(WxSecrets {
            token,
            key,
            receive_id,
        })
    }

    /// Checks `msg_signature`, the SHA-1 of the sorted [token, timestamp, nonce, ciphertext],
    /// in constant time, then the timestamp's age (`units_per_sec` as in
    /// [`check_timestamp`]). Run before anything touches the ciphertext, so nothing is
    /// learnt from decryption errors without the token.
    pub fn verify(
        &self,
        env: &(impl Env + ?Sized),
        app: &ImApp,
        signed: [Option<&str>; 3],
        encrypted: &str,
        units_per_sec: u64,
    ) -> Result<()> {
        let [Some(sig), Some(ts), Some(nonce)] = signed else {
            return Err(unsigned());
        };
        let expected = sorted_sha1_hex(&[self.token, ts, nonce, encrypted]);
        if !signature_matches(&expected, sig) {
            return Err(unsigned());
        }
        check_timestamp(app, env.now_ms(), ts, units_per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(window: Option<u32>) -> ImApp {
        ImApp {
            id: "a".into(),
            platform: Platform::Dingtalk,
            app_id: "x".into(),
            app_secret: "s".into(),
            agent_id: None,
            encrypt_key: None,
            token: None,
            api_base: None,
            max_clock_skew_secs: window,
        }
    }

    /// Feishu's last retry comes about 7.1 hours (25,515 s) after the push; its default
    /// window takes it.
    #[test]
    fn feishus_default_window_spans_its_retries() {
        let now_ms = 1_700_000_000_000;
        let now = now_ms / 1000;
        for (platform, window) in [
            (Platform::Feishu, 8 * 3600),
            (Platform::Lark, 8 * 3600),
            (Platform::Dingtalk, 600),
        ] {
            let a = ImApp {
                platform,
                ..app(None)
            };
            for (age, ok) in [(window, true), (window + 1, false), (600, true)] {
                let r = check_timestamp(&a, now_ms, &(now - age).to_string(), 1);
                assert_eq!(r.is_ok(), ok, "{platform:?} {age}");
            }
        }
    }

    #[test]
    fn timestamp_window_is_the_apps_or_600_seconds() {
        let now_ms = 1_700_000_000_000;
        let now = now_ms / 1000;
        let ok = |a: &ImApp, ts: u64, units: u64| {
            check_timestamp(a, now_ms, &(ts * units).to_string(), units).is_ok()
        };
        let default = app(None);
        for units in [1, 1000] {
            assert!(ok(&default, now - 600, units));
            assert!(ok(&default, now + 600, units));
            assert!(!ok(&default, now - 601, units));
            assert!(!ok(&default, now + 601, units));
        }
        let narrow = app(Some(30));
        assert!(ok(&narrow, now - 30, 1));
        assert!(!ok(&narrow, now - 31, 1));
        assert!(!ok(&narrow, now + 31, 1000));
        let wide = app(Some(3600));
        assert!(ok(&wide, now - 3600, 1000));
        assert!(!ok(&wide, now + 3601, 1));
        let zero = check_timestamp(&app(Some(0)), now_ms, &now.to_string(), 1).unwrap_err();
        assert!(matches!(zero, Error::InvalidConfig(_)), "{zero}");
        assert!(ok(&app(Some(1)), now - 1, 1));
        for bad in ["", "abc", "-5", "1.0", "99999999999999999999999"] {
            let e = check_timestamp(&default, now_ms, bad, 1).unwrap_err();
            assert!(matches!(e, Error::Unauthorized(_)), "{bad:?}: {e}");
        }
    }
}
