//! Bounded retries with backoff for platform calls that are safe to repeat (reads, status
//! polls, token fetches). Creates, sends and cancels are never repeated here: a lost answer
//! could mean the platform acted, so the engine gets a retryable error and decides.

use crate::env::Env;
use crate::error::{Error, Result};

/// Whether a call may be repeated without effects beyond the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    Safe,
    Never,
}

/// At most this many attempts of one call.
pub const MAX_ATTEMPTS: u32 = 3;
/// No retry starts once this much time has passed since the first attempt began, and a
/// retry's own timeout ends by then: together with the first attempt's timeout this keeps a
/// call far inside the host's 30 s deadline.
pub const BUDGET_MS: u64 = 8_000;
/// A platform asking for a longer pause than this gets its answer passed on instead.
pub const MAX_WAIT_MS: u64 = 2_000;
/// The first backoff; it doubles per retry.
const FIRST_BACKOFF_MS: u64 = 250;
/// A retry with less time than this for its request is not worth starting.
const MIN_ATTEMPT_MS: u64 = 1_000;

/// What one attempt produced: its result and the pause the server asked for, if any.
pub struct Attempt<T> {
    pub result: Result<T>,
    pub retry_after_ms: Option<u64>,
}

/// Errors the platform says may go away unchanged: 5xx, 429, rate-limit codes. Transport
/// errors are not retried: a timeout has used up the budget already, and a refusal by the
/// host will not change.
fn worth_retrying(e: &Error) -> bool {
    matches!(
        e,
        Error::Platform {
            retryable: true,
            ..
        }
    )
}

/// Runs `attempt` (given the timeout it may use) until it succeeds, fails for good, or the
/// attempts, the budget or the platform's requested pause run out; then returns the last
/// result unchanged.
pub fn run<T>(
    env: &(impl Env + ?Sized),
    repeat: Repeat,
    default_timeout_ms: u64,
    attempt: &mut dyn FnMut(u64) -> Attempt<T>,
) -> Result<T> {
    let start = env.now_ms();
    let mut timeout_ms = default_timeout_ms;
    let mut n = 0;
    loop {
        n += 1;
        let Attempt {
            result,
            retry_after_ms,
        } = attempt(timeout_ms);
        let e = match result {
            Err(e) if repeat == Repeat::Safe && n < MAX_ATTEMPTS && worth_retrying(&e) => e,
            done => return done,
        };
        let wait = retry_after_ms.unwrap_or(FIRST_BACKOFF_MS << (n - 1));
        let elapsed = env.now_ms().saturating_sub(start);
        let left = BUDGET_MS.saturating_sub(elapsed.saturating_add(wait));
        if wait > MAX_WAIT_MS || left < MIN_ATTEMPT_MS {
            return Err(e);
        }
        env.sleep_ms(wait);
        timeout_ms = default_timeout_ms.min(left);
    }
}

/// The pause a reply asks for, in ms: `Retry-After` in seconds (the HTTP-date form is not
/// used by these platforms and is ignored), or Feishu's `x-ogw-ratelimit-reset` (seconds).
pub fn requested_pause_ms(headers: &[(String, String)]) -> Option<u64> {
    ["retry-after", "x-ogw-ratelimit-reset"]
        .iter()
        .find_map(|name| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        })
        .map(|secs| secs.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::fake::FakeEnv;
    use std::cell::RefCell;

    fn busy() -> Error {
        Error::platform(-503, "HTTP 503", true)
    }

    /// Runs `run` over scripted attempt results; returns the result, the timeouts each attempt
    /// was given, and the pauses taken.
    fn script(
        repeat: Repeat,
        results: Vec<(Result<u8>, Option<u64>, u64)>,
    ) -> (Result<u8>, Vec<u64>, Vec<u64>) {
        let env = FakeEnv::offline();
        let results = RefCell::new(results.into_iter());
        let mut timeouts = Vec::new();
        let r = run(&env, repeat, 10_000, &mut |t| {
            timeouts.push(t);
            let (result, retry_after_ms, takes_ms) = results.borrow_mut().next().expect("scripted");
            env.now.set(env.now.get() + takes_ms);
            Attempt {
                result,
                retry_after_ms,
            }
        });
        let slept = env.slept.borrow().clone();
        (r, timeouts, slept)
    }

    #[test]
    fn retries_safe_calls_with_doubling_backoff() {
        let (r, timeouts, slept) = script(
            Repeat::Safe,
            vec![
                (Err(busy()), None, 10),
                (Err(busy()), None, 10),
                (Ok(7), None, 10),
            ],
        );
        assert_eq!(r, Ok(7));
        assert_eq!(slept, [250, 500]);
        assert_eq!(timeouts[0], 10_000);
        // Retries end inside the budget.
        assert_eq!(timeouts[1], BUDGET_MS - 10 - 250);
        assert_eq!(timeouts[2], BUDGET_MS - 10 - 250 - 10 - 500);
    }

    #[test]
    fn gives_up_after_max_attempts_with_the_last_error() {
        let (r, timeouts, slept) = script(
            Repeat::Safe,
            vec![
                (Err(busy()), None, 1),
                (Err(busy()), None, 1),
                (Err(busy()), None, 1),
            ],
        );
        assert_eq!(r, Err(busy()));
        assert_eq!(timeouts.len(), MAX_ATTEMPTS as usize);
        assert_eq!(slept.len(), 2);
    }

    #[test]
    fn never_repeats_unsafe_calls_or_final_errors() {
        let (r, timeouts, _) = script(Repeat::Never, vec![(Err(busy()), None, 1)]);
        assert_eq!((r, timeouts.len()), (Err(busy()), 1));
        for final_error in [
            Error::platform(60001, "bad id", false),
            Error::transport("request to x: timed out"),
            Error::input("x"),
        ] {
            let (r, timeouts, _) = script(Repeat::Safe, vec![(Err(final_error.clone()), None, 1)]);
            assert_eq!((r, timeouts.len()), (Err(final_error), 1));
        }
    }

    #[test]
    fn honours_the_requested_pause_but_not_a_long_one() {
        let (r, _, slept) = script(
            Repeat::Safe,
            vec![(Err(busy()), Some(1_000), 1), (Ok(1), None, 1)],
        );
        assert_eq!((r, slept), (Ok(1), vec![1_000]));
        let (r, timeouts, slept) = script(Repeat::Safe, vec![(Err(busy()), Some(30_000), 1)]);
        assert_eq!((r, timeouts.len(), slept.len()), (Err(busy()), 1, 0));
    }

    #[test]
    fn a_slow_first_attempt_leaves_no_budget() {
        let (r, timeouts, slept) = script(Repeat::Safe, vec![(Err(busy()), None, 7_000)]);
        assert_eq!((r, timeouts.len(), slept.len()), (Err(busy()), 1, 0));
    }

    #[test]
    fn pause_headers() {
        let h = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(requested_pause_ms(&h("Retry-After", " 2 ")), Some(2_000));
        assert_eq!(
            requested_pause_ms(&h("x-ogw-ratelimit-reset", "52")),
            Some(52_000)
        );
        assert_eq!(
            requested_pause_ms(&h("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
        assert_eq!(requested_pause_ms(&[]), None);
    }
}
