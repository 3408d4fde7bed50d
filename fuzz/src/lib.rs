//! Shared pieces of the fuzz targets: an in-memory `Env`, the apps under test, the framing that
//! lets the fuzzer choose between raw bytes and a correctly signed and encrypted envelope (so it
//! gets past the signature check and reaches the decrypted-payload parsers), and the invariants
//! every callback must keep.
//!
//! Every target's input starts with a few control bytes (see each module) followed by a
//! payload. `seeds` builds real-format samples in the same framing for `fuzz/corpus/`.

use imbridge::approval::Record;
use imbridge::error::Result;
use imbridge::model::{Approval, ApprovalStatus, CallbackOutcome, HttpRequest, ImApp, Platform};
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub mod dingtalk;
pub mod feishu;
pub mod replies;
pub mod seeds;
pub mod wecom;
pub mod wx;

/// The fixed clock every target runs at; signed timestamps are derived from it.
pub const NOW_MS: u64 = 1_700_000_000_000;
pub const NOW_S: u64 = NOW_MS / 1000;

/// The app id every target's app uses; records live under `a/fz/…`.
pub const APP_ID: &str = "fz";
pub const APP_SECRET: &str = "fz-app-secret-never-in-output";
/// A valid 43-character EncodingAESKey (DingTalk and WeCom).
pub const WX_AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

/// A pending approval with a local node layout (AND of u1, u2; DingTalk-style) and a terminal
/// one: events may move the first, never the second.
pub const PENDING: &str = "I1";
pub const APPROVED: &str = "I2";

pub type Kv = BTreeMap<String, Vec<u8>>;

/// The guest crate's in-memory `Env`, offline (every request fails with a transport error, so
/// no callback path may depend on one succeeding), at a fixed clock.
pub type MemEnv = imbridge::env::fake::FakeEnv;

/// A store holding the two seeded approvals of `APP_ID`.
pub fn seeded_env() -> MemEnv {
    static BASE: OnceLock<Kv> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let nodes = serde_json::json!({"nodes": [{"mode": "and", "approvers": ["u1", "u2"]}]});
        store_of(&[
            (PENDING, ApprovalStatus::Pending, nodes),
            (APPROVED, ApprovalStatus::Approved, serde_json::Value::Null),
        ])
    });
    MemEnv::with_store(base.clone(), NOW_MS)
}

/// A store with one record of `APP_ID` per (instance id, status, meta), last changed a
/// minute before `NOW_MS`, without decisions.
pub fn store_of(records: &[(&str, ApprovalStatus, serde_json::Value)]) -> Kv {
    let mut kv = Kv::new();
    for (id, status, meta) in records {
        let rec = Record {
            approval: Approval {
                instance_id: (*id).into(),
                key: format!("key-{id}"),
                status: *status,
                decisions: vec![],
                updated_at_ms: NOW_MS - 60_000,
            },
            meta: meta.clone(),
        };
        kv.insert(
            instance_key(id),
            serde_json::to_vec(&rec).expect("record serializes"),
        );
    }
    kv
}

/// Mirrors `approval::instance_key` (private) for ids without '/' or '%'.
pub fn instance_key(id: &str) -> String {
    format!("a/{APP_ID}/i/{id}")
}

pub fn app(
    platform: Platform,
    app_id: &str,
    encrypt_key: Option<&str>,
    token: Option<&str>,
) -> ImApp {
    ImApp {
        id: APP_ID.into(),
        platform,
        app_id: app_id.into(),
        app_secret: APP_SECRET.into(),
        agent_id: Some("1000002".into()),
        encrypt_key: encrypt_key.map(str::to_string),
        token: token.map(str::to_string),
        // Never contacted: MemEnv has no network.
        api_base: Some("http://127.0.0.1:9".into()),
        max_clock_skew_secs: None,
    }
}

/// Reads the control bytes at the start of an input; a short input reads as zeros.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader(data)
    }
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// Splits a raw payload at the first blank line into a head and a body (no blank line: an
/// empty head). Raw modes use the head as header lines or as the query string.
pub fn split_head(raw: &[u8]) -> (&[u8], &[u8]) {
    match raw.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&raw[..i], &raw[i + 2..]),
        None => (&[], raw),
    }
}

/// `Name: value` lines, as a fuzzer would most easily produce them.
pub fn header_lines(head: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(head)
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(':') {
            Some((k, v)) => (k.to_string(), v.trim_start().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

pub fn request(
    method: &str,
    query: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path: "/callback/fz".into(),
        query: query.into(),
        headers,
        body,
    }
}

/// What the framing knows about an input, beyond the generic invariants.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Expect {
    /// Anything typed is fine.
    Any,
    /// Forged, stale or misaddressed: must be an error.
    Reject,
    /// Not authenticated (no or unverifiable signature): may answer a handshake, but must not
    /// change any state.
    NoStateChange,
}

/// Runs one callback and checks the invariants every platform shares:
/// - no panic (libFuzzer reports one as a crash);
/// - `Ok` carries a 2xx response, every reported update is what is stored, and a terminal
///   approval never changes status;
/// - `Err` leaves the store exactly as it was, and its message carries no secret;
/// - what the framing knows (`expect`) holds;
/// - replaying an accepted request changes nothing (events are applied idempotently).
///
/// Returns the number of approvals the first delivery changed, or its error.
pub fn run_callback(
    app: &ImApp,
    req: &HttpRequest,
    expect: Expect,
    secrets: &[&str],
) -> Result<usize> {
    let env = seeded_env();
    let before = env.snapshot();
    let result = imbridge::callback::handle(&env, app, req);
    check(&env, &before, &result, secrets);
    match expect {
        Expect::Any => {}
        Expect::Reject => assert!(result.is_err(), "forged callback accepted: {result:?}"),
        Expect::NoStateChange => {
            assert_eq!(
                *env.kv.borrow(),
                before,
                "unauthenticated callback changed state"
            );
        }
    }
    if result.is_ok() {
        let after = env.snapshot();
        let again = imbridge::callback::handle(&env, app, req);
        check(&env, &after, &again, secrets);
        assert_eq!(*env.kv.borrow(), after, "a replayed callback changed state");
        if let Ok(out) = again {
            assert!(
                out.updates.is_empty(),
                "a replay reported updates: {:?}",
                out.updates
            );
        }
    }
    result.map(|out| out.updates.len())
}

pub fn check(env: &MemEnv, before: &Kv, result: &Result<CallbackOutcome>, secrets: &[&str]) {
    let after = env.kv.borrow();
    match result {
        Ok(out) => {
            let status = out.response.status;
            assert!((200..300).contains(&status), "Ok with HTTP {status}");
            for (k, v) in before {
                let Some(old) = as_record(k, v) else { continue };
                if old.approval.status.is_terminal() {
                    let new = after
                        .get(k)
                        .and_then(|v| as_record(k, v))
                        .expect("record kept");
                    assert_eq!(
                        new.approval.status, old.approval.status,
                        "terminal state moved"
                    );
                }
            }
            for a in &out.updates {
                let stored = after
                    .get(&instance_key(&a.instance_id))
                    .and_then(|v| serde_json::from_slice::<Record>(v).ok())
                    .expect("an update for a stored approval");
                assert_eq!(
                    &stored.approval, a,
                    "reported update differs from the stored one"
                );
            }
        }
        Err(e) => {
            assert_eq!(*after, *before, "an error left state behind: {e}");
            let msg = e.to_string();
            for s in secrets {
                assert!(!msg.contains(s), "secret in error message: {msg}");
            }
        }
    }
}

fn as_record(key: &str, v: &[u8]) -> Option<Record> {
    key.starts_with(&format!("a/{APP_ID}/i/"))
        .then(|| serde_json::from_slice(v).ok())
        .flatten()
}
