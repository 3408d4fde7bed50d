//! A small JSON-over-HTTP client on top of `Env::send`, plus URL helpers. Platform modules
//! turn the reply's own error codes into `Error::Platform`.

use crate::env::{Env, Request, Response};
use crate::error::{Error, Result};
use crate::retry::{self, Attempt, Repeat};
use serde_json::Value;
use std::cell::Cell;

/// Platforms answer in well under a second; 10 s leaves room for a slow network without
/// letting one call eat the host's per-call deadline.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MAX_ERROR_SNIPPET: usize = 200;

thread_local! {
    /// While `bounded` runs: when its requests must be over (`Env::now_ms`).
    static UNTIL_MS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` with every request it makes ending within `limit_ms` from now, each tried once:
/// for optional reads inside a call, which must not stretch the call towards the host's
/// deadline when a platform is slow (a request's own timeout and the retry budget allow
/// far more than such a read is worth).
pub fn bounded<T>(env: &(impl Env + ?Sized), limit_ms: u64, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNTIL_MS.set(self.0);
        }
    }
    let until = env.now_ms().saturating_add(limit_ms);
    let outer = UNTIL_MS.get();
    let _restore = Restore(outer);
    UNTIL_MS.set(Some(outer.map_or(until, |o| o.min(until))));
    f()
}

/// `timeout_ms`, cut to what a `bounded` caller has left; an error once nothing is left.
fn cap_timeout(env: &(impl Env + ?Sized), timeout_ms: u64) -> Result<u64> {
    match UNTIL_MS.get() {
        None => Ok(timeout_ms),
        Some(until) => match until.saturating_sub(env.now_ms()) {
            0 => Err(Error::transport("no time left for this optional request")),
            left => Ok(timeout_ms.min(left)),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

#[derive(Debug)]
pub struct JsonReply {
    pub status: u16,
    pub body: Value,
}

/// 429 and 5xx are worth retrying later; other statuses need a change first.
pub fn status_is_retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// An answer that failed by its HTTP status alone: the status, negated, stands in for the
/// platform's code (`CreateError::sent` reads it back).
pub fn status_error(status: u16, what: impl core::fmt::Display) -> Error {
    Error::platform(
        -i64::from(status),
        format!("HTTP {status} {what}"),
        status_is_retryable(status),
    )
}

/// Where a platform's JSON answers report their outcome: a numeric code, 0 for success, and
/// a message, each under the first of its field names the body has.
pub struct ResultCode {
    pub code: &'static [&'static str],
    pub msg: &'static [&'static str],
    /// The platform's codes for "busy, try again later".
    pub retryable: &'static [i64],
}

impl ResultCode {
    /// The body of a success (code 0 and a non-error status); a typed error carrying the
    /// platform's own code for any other code. An answer that no code settles (none at all,
    /// or 0 with an error status) goes to `uncoded` with the message, if any: what that
    /// means differs by platform.
    pub fn check(
        &self,
        reply: JsonReply,
        uncoded: fn(JsonReply, String) -> Result<Value>,
    ) -> Result<Value> {
        let field = |names: &[&str]| names.iter().find_map(|n| reply.body.get(*n));
        let code = field(self.code).and_then(Value::as_i64);
        let msg = field(self.msg)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match code {
            Some(0) if reply.status < 400 => Ok(reply.body),
            Some(c) if c != 0 => Err(Error::platform(
                c,
                msg,
                self.retryable.contains(&c) || status_is_retryable(reply.status),
            )),
            _ => uncoded(reply, msg),
        }
    }
}

pub fn call_json(
    env: &(impl Env + ?Sized),
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Result<JsonReply> {
    let timeout_ms = cap_timeout(env, DEFAULT_TIMEOUT_MS)?;
    parse_reply(env.send(&json_request(method, url, headers, body, timeout_ms))?)
}

/// `call_json` followed by the platform's `check` of the reply; a call that is safe to
/// repeat is retried on retryable errors with backoff (`retry::run`), honouring the pause the
/// platform asks for.
pub fn call_checked(
    env: &(impl Env + ?Sized),
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    repeat: Repeat,
    check: fn(JsonReply) -> Result<Value>,
) -> Result<Value> {
    let repeat = if UNTIL_MS.get().is_some() {
        Repeat::Never
    } else {
        repeat
    };
    retry::run(
        env,
        repeat,
        DEFAULT_TIMEOUT_MS,
        &mut |timeout_ms| match cap_timeout(env, timeout_ms)
            .and_then(|timeout_ms| env.send(&json_request(method, url, headers, body, timeout_ms)))
        {
            Ok(response) => Attempt {
                retry_after_ms: retry::requested_pause_ms(&response.headers),
                result: parse_reply(response).and_then(check),
            },
            Err(e) => Attempt {
                result: Err(e),
                retry_after_ms: None,
            },
        },
    )
}

fn json_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
    timeout_ms: u64,
) -> Request {
    let mut hs: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    hs.push(("accept".into(), "application/json".into()));
    let body = match body {
        Some(v) => {
            hs.push((
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            ));
            crate::model::json_bytes(v)
        }
        None => Vec::new(),
    };
    Request {
        method: match method {
            Method::Get => "GET",
            Method::Post => "POST",
        },
        url: url.to_string(),
        headers: hs,
        body,
        timeout_ms,
    }
}

fn parse_reply(response: Response) -> Result<JsonReply> {
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(body) => Ok(JsonReply {
            status: response.status,
            body,
        }),
        Err(_) => {
            let snippet: String = String::from_utf8_lossy(&response.body)
                .chars()
                .take(MAX_ERROR_SNIPPET)
                .collect();
            Err(status_error(
                response.status,
                format_args!("with a non-JSON body: {snippet}"),
            ))
        }
    }
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `%XX` escapes exactly once. `+` stays `+`: these values are base64, where a
/// form-style `+`→space would corrupt them.
pub fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                // from_str_radix would also take a sign ("%+f").
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| core::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::input("malformed %-escape in query string"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::input("query string is not UTF-8"))
}

/// Parses a raw query string (without `?`). Later duplicates are kept; callers take the first.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>> {
    query
        .trim_start_matches('?')
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// An http(s) URL as whether it is https, its authority, and its path with query (`/` when
/// empty); `None` without an http(s) scheme or a host. Each caller says whose fault that is:
/// an app's base is configuration, a webhook in a notification is input.
pub fn split_url(url: &str) -> Option<(bool, &str, &str)> {
    let (https, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://")?),
    };
    let cut = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    (!authority.is_empty()).then_some((https, authority, if path.is_empty() { "/" } else { path }))
}

/// The origin (`scheme://host[:port]`) of an app's API, with the platform default when unset.
pub fn api_base(configured: Option<&str>, default: &str) -> Result<String> {
    let base = configured.unwrap_or(default).trim().trim_end_matches('/');
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        return Err(Error::config(format!(
            "api-base must start with https:// or http://, got {base:?}"
        )));
    }
    Ok(base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        assert_eq!(split_url("https://h:8/a?b"), Some((true, "h:8", "/a?b")));
        assert_eq!(split_url("http://h?x=1"), Some((false, "h", "?x=1")));
        assert_eq!(split_url("http://h"), Some((false, "h", "/")));
        for bad in [
            "ftp://h/",
            "https://",
            "https:///a",
            "http://?a",
            "http://#f",
            "h/a",
        ] {
            assert_eq!(split_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn result_codes_settle_or_hand_over() {
        const R: ResultCode = ResultCode {
            code: &["code", "StatusCode"],
            msg: &["msg", "StatusMessage"],
            retryable: &[7],
        };
        let reply = |status, body: Value| JsonReply { status, body };
        let uncoded = |r: JsonReply, msg: String| -> Result<Value> {
            Err(Error::input(format!("uncoded {} {msg}", r.status)))
        };
        let body = serde_json::json!({"code": 0, "data": 1});
        assert_eq!(R.check(reply(200, body.clone()), uncoded).unwrap(), body);
        // The second field name counts when the first is absent; the platform's code is kept.
        let e = R
            .check(
                reply(
                    200,
                    serde_json::json!({"StatusCode": 7, "StatusMessage": "busy"}),
                ),
                uncoded,
            )
            .unwrap_err();
        assert!(
            matches!(&e, Error::Platform { code: 7, message, retryable: true } if message == "busy"),
            "{e:?}"
        );
        let e = R
            .check(
                reply(200, serde_json::json!({"code": 9, "msg": "no"})),
                uncoded,
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Platform {
                    code: 9,
                    retryable: false,
                    ..
                }
            ),
            "{e:?}"
        );
        // An error status makes any code retryable that the status says is.
        let e = R
            .check(reply(503, serde_json::json!({"code": 9})), uncoded)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Platform {
                    code: 9,
                    retryable: true,
                    ..
                }
            ),
            "{e:?}"
        );
        // Code 0 under an error status, or no code at all, is the platform's to judge.
        for (status, body) in [
            (500, serde_json::json!({"code": 0, "msg": "odd"})),
            (200, serde_json::json!({"msg": "odd"})),
            (200, serde_json::json!({"code": "0", "msg": "odd"})),
        ] {
            let e = R.check(reply(status, body), uncoded).unwrap_err();
            assert_eq!(
                e.to_string(),
                Error::input(format!("uncoded {status} odd")).to_string()
            );
        }
        let e = status_error(429, "slow");
        assert!(
            matches!(&e, Error::Platform { code: -429, message, retryable: true } if message == "HTTP 429 slow"),
            "{e:?}"
        );
    }

    #[test]
    fn query_decoding_keeps_plus_and_decodes_once() {
        let q = parse_query("echostr=a%2Bb+c%253D&timestamp=1").unwrap();
        assert_eq!(q[0], ("echostr".into(), "a+b+c%3D".into()));
        assert_eq!(q[1], ("timestamp".into(), "1".into()));
        assert!(parse_query("x=%zz").is_err());
        assert!(parse_query("x=%f").is_err());
        assert!(parse_query("x=%+f").is_err());
    }

    #[test]
    fn percent_encoding_roundtrips() {
        let s = "a b+c/=é";
        assert_eq!(percent_encode(s), "a%20b%2Bc%2F%3D%C3%A9");
        assert_eq!(percent_decode(&percent_encode(s)).unwrap(), s);
    }

    #[test]
    fn api_base_validation() {
        assert_eq!(
            api_base(None, "https://open.feishu.cn").unwrap(),
            "https://open.feishu.cn"
        );
        assert_eq!(
            api_base(Some("http://127.0.0.1:9/"), "x").unwrap(),
            "http://127.0.0.1:9"
        );
        assert!(api_base(Some("ftp://x"), "x").is_err());
    }

    #[test]
    fn bounded_requests_end_within_the_limit_and_are_tried_once() {
        use crate::env::fake::{FakeEnv, json_response};
        let env = FakeEnv::new(|_| json_response(503, serde_json::json!({})));
        env.set_latency(|_| 1_500);
        let get = || {
            call_checked(
                &env,
                Method::Get,
                "http://x/a",
                &[],
                None,
                Repeat::Safe,
                |r| Err(Error::platform(-i64::from(r.status), "down", true)),
            )
        };
        let t0 = env.now_ms();
        assert!(bounded(&env, 2_000, get).is_err());
        assert_eq!(env.now_ms() - t0, 1_500);
        assert!(
            bounded(&env, 2_000, || {
                env.now.set(env.now.get() + 1_000);
                get()
            })
            .is_err()
        );
        let timeouts: Vec<u64> = env.sent.borrow().iter().map(|r| r.timeout_ms).collect();
        assert_eq!(
            timeouts,
            [2_000, 1_000],
            "one attempt each, cut to what was left"
        );
        // The second request outlived its 1 s: a transport error exactly when the bound ended.
        assert_eq!(env.now_ms() - t0, 1_500 + 2_000);
        let nothing_left = bounded(&env, 0, || {
            call_json(&env, Method::Get, "http://x/b", &[], None)
        });
        assert!(matches!(nothing_left, Err(Error::Transport(_))));
        assert_eq!(
            env.sent.borrow().len(),
            2,
            "nothing sent once no time is left"
        );
        // Outside `bounded`, requests have their own timeout and retries again.
        assert!(get().is_err());
        let sent = env.sent.borrow();
        assert_eq!(sent.len(), 2 + retry::MAX_ATTEMPTS as usize);
        assert_eq!(sent[2].timeout_ms, DEFAULT_TIMEOUT_MS);
    }
}
