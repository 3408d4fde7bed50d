//! Access-token cache in the key-value store, shared by all platforms: honours the expiry the
//! platform returned and refreshes once when the platform says a token is invalid.

use crate::crypto::sha256;
use crate::env::{Env, EnvExt, hex, key_segment};
use crate::error::{Error, Result};
use crate::model::ImApp;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Cached {
    token: String,
    expires_at_ms: u64,
}

/// A fresh token and its lifetime in seconds, as the platform reported it.
pub struct Issued {
    pub token: String,
    pub ttl_secs: u64,
}

/// One cache entry per credential set and API origin: two apps, two agents of one corp, or
/// a rotated secret never share a token.
pub fn cache_key(app: &ImApp, base: &str) -> String {
    let fp = sha256(&[
        app.app_secret.as_bytes(),
        b"\0",
        base.as_bytes(),
        b"\0",
        app.agent_id.as_deref().unwrap_or("").as_bytes(),
    ]);
    format!(
        "tok/{}/{}/{}",
        app.platform.name(),
        key_segment(&app.app_id),
        &hex(&fp)[..16]
    )
}

/// Refresh ahead of expiry so a token never dies mid-request: 5 minutes early, or at half
/// its life for short-lived tokens.
fn usable_until(now_ms: u64, ttl_secs: u64) -> u64 {
    let ttl_ms = ttl_secs.saturating_mul(1000);
    let margin = (5 * 60 * 1000).min(ttl_ms / 2);
    now_ms.saturating_add(ttl_ms - margin)
}

pub fn get(
    env: &(impl Env + ?Sized),
    key: &str,
    force_refresh: bool,
    fetch: &dyn Fn() -> Result<Issued>,
) -> Result<String> {
    let now = env.now_ms();
    if !force_refresh
        && let Some(c) = env.kv_get_json::<Cached>(key).ok().flatten()
        && c.expires_at_ms > now
    {
        return Ok(c.token);
    }
    let issued = fetch()?;
    if issued.token.is_empty() {
        return Err(Error::platform(
            -1,
            "platform returned an empty token",
            true,
        ));
    }
    // The token works whether or not it is cached: a store fault here costs the next call a
    // fetch, where failing would lose a notification or a start that has all it needs.
    let _ = env.kv_set_json(
        key,
        &Cached {
            token: issued.token.clone(),
            expires_at_ms: usable_until(now, issued.ttl_secs),
        },
    );
    Ok(issued.token)
}

/// Runs `call` with a cached token; if it fails with a token-invalid error, fetches a new
/// token and tries exactly once more. Errors getting a token arrive through `From<Error>`,
/// so a caller whose `call` wraps its own errors can tell the two apart: a create whose
/// token could not be had was never sent.
pub fn with_token<T, E: From<Error>>(
    env: &(impl Env + ?Sized),
    key: &str,
    fetch: &dyn Fn() -> Result<Issued>,
    is_token_invalid: fn(&E) -> bool,
    call: &mut dyn FnMut(&str) -> Result<T, E>,
) -> Result<T, E> {
    let token = get(env, key, false, fetch)?;
    match call(&token) {
        Err(e) if is_token_invalid(&e) => {
            let token = get(env, key, true, fetch)?;
            call(&token)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::fake::FakeEnv;
    use std::cell::Cell;

    fn invalid(e: &Error) -> bool {
        matches!(e, Error::Platform { code: 401, .. })
    }

    /// Issues `t1`, `t2`, … for two hours, counting in `n`.
    fn numbered(n: &Cell<u32>) -> impl Fn() -> Result<Issued> + '_ {
        move || {
            n.set(n.get() + 1);
            Ok(Issued {
                token: format!("t{}", n.get()),
                ttl_secs: 7200,
            })
        }
    }

    #[test]
    fn caches_until_expiry_margin() {
        let env = FakeEnv::offline();
        let fetched = Cell::new(0);
        let fetch = numbered(&fetched);
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t1");
        env.now.set(env.now.get() + 6_000_000);
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t1");
        // 7200 s minus the 5-minute margin has passed.
        env.now.set(env.now.get() + 900_001);
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t2");
    }

    #[test]
    fn a_token_that_could_not_be_cached_is_still_used() {
        let env = FakeEnv::offline();
        let fetched = Cell::new(0);
        let fetch = numbered(&fetched);
        // Operation 0 is the cache read, 1 the write.
        env.fail_kv_op(Some(1));
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t1");
        env.fail_kv_op(None);
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t2");
        assert_eq!(get(&env, "k", false, &fetch).unwrap(), "t2");
    }

    #[test]
    fn short_ttl_uses_half_life() {
        assert_eq!(usable_until(0, 60), 30_000);
        assert_eq!(usable_until(0, 0), 0);
    }

    #[test]
    fn refreshes_once_on_invalid_token() {
        let env = FakeEnv::offline();
        let n = Cell::new(0);
        let fetch = numbered(&n);
        let mut seen = Vec::new();
        let r = with_token(&env, "k", &fetch, invalid, &mut |t| {
            seen.push(t.to_string());
            if t == "t1" {
                Err(Error::platform(401, "expired", false))
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), 7);
        assert_eq!(seen, ["t1", "t2"]);
        // A second invalid answer is returned, not looped on.
        let r: Result<()> = with_token(&env, "k", &fetch, invalid, &mut |_| {
            Err(Error::platform(401, "expired", false))
        });
        assert!(r.is_err());
        assert_eq!(n.get(), 3);
    }

    #[test]
    fn keys_differ_per_agent_and_secret() {
        let mut a = ImApp {
            id: "a".into(),
            platform: crate::model::Platform::Wecom,
            app_id: "corp".into(),
            app_secret: "s1".into(),
            agent_id: Some("1".into()),
            encrypt_key: None,
            token: None,
            api_base: None,
            max_clock_skew_secs: None,
        };
        let k1 = cache_key(&a, "https://x");
        a.agent_id = Some("2".into());
        let k2 = cache_key(&a, "https://x");
        a.app_secret = "s2".into();
        let k3 = cache_key(&a, "https://x");
        assert!(k1 != k2 && k2 != k3 && k1 != k3);
        assert!(!k1.contains("s1"));
    }
}
