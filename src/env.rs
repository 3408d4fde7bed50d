//! What the sandbox lends the plugin: outbound HTTP, key-value storage, a wall clock and
//! randomness. `wasi_env.rs` implements it over WASI imports; unit tests use an in-memory fake.

use crate::error::{Error, Result};
use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bounds connect, first byte and the gap between body chunks.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub trait Env {
    /// Transport failures (refused, timed out, denied by the host) are `Error::Transport`,
    /// marked unsent when the request certainly never left; any HTTP status is a successful
    /// exchange.
    fn send(&self, request: &Request) -> Result<Response>;
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<()>;
    fn kv_delete(&self, key: &str) -> Result<()>;
    /// Atomic across concurrent calls; returns the new value (a missing key counts as 0).
    fn kv_increment(&self, key: &str, delta: u64) -> Result<u64>;
    fn now_ms(&self) -> u64;
    /// Blocks for `ms` (retry backoff); the host's call deadline still applies.
    fn sleep_ms(&self, ms: u64);
    fn random_bytes(&self, len: usize) -> Vec<u8>;
}

/// JSON convenience over any `Env`.
pub trait EnvExt: Env {
    fn kv_get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.kv_get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::storage(format!("corrupt record {key}: {e}"))),
        }
    }

    fn kv_set_json<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::storage(e.to_string()))?;
        self.kv_set(key, &bytes)
    }

    fn random_hex(&self, bytes: usize) -> String {
        hex(&self.random_bytes(bytes))
    }
}

impl<E: Env + ?Sized> EnvExt for E {}

/// Lowercase hex. A table, not `write!("{:02x}")`: every callback hex-encodes a signature or
/// digest, and the formatting machinery was ~3% of a callback inside the component.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// A key segment that cannot forge another key's structure ('/' separates segments).
pub fn key_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// `a/{app}/{kind}/{id}`: where every record of one app lives (approvals, claims, cached
/// platform objects), so apps never share a key and `/` inside an app id or `id` stays one
/// segment.
pub fn app_key(app: &crate::model::ImApp, kind: &str, id: &str) -> String {
    format!("a/{}/{kind}/{}", key_segment(&app.id), key_segment(id))
}

pub mod fake {
    //! An in-memory `Env` whose HTTP side is a scripted responder: for unit tests, fuzzing
    //! and benchmarks (which must not each grow their own copy).
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;

    type Responder = Box<dyn Fn(&Request) -> Result<Response>>;
    type Latency = Box<dyn Fn(&Request) -> u64>;

    pub struct FakeEnv {
        pub kv: RefCell<BTreeMap<String, Vec<u8>>>,
        pub sent: RefCell<Vec<Request>>,
        pub now: Cell<u64>,
        /// Every `sleep_ms`, in order; sleeping advances `now` instead of waiting.
        pub slept: RefCell<Vec<u64>>,
        responder: RefCell<Responder>,
        latency: RefCell<Option<Latency>>,
        counter: Cell<u8>,
        /// Key-value operations so far (get, set, delete and increment alike), and the one
        /// that is to fail, if any: a host whose store has a transient fault.
        kv_ops: Cell<usize>,
        fail_kv_op: Cell<Option<usize>>,
        /// The key of an increment that is to fail after it applied (a store whose answer
        /// was lost), once it has.
        pub lost_answer: RefCell<Option<String>>,
        lose_answers: Cell<bool>,
    }

    impl FakeEnv {
        pub fn new(responder: impl Fn(&Request) -> Result<Response> + 'static) -> Self {
            FakeEnv {
                kv: RefCell::default(),
                sent: RefCell::default(),
                now: Cell::new(1_700_000_000_000),
                slept: RefCell::default(),
                responder: RefCell::new(Box::new(responder)),
                latency: RefCell::new(None),
                counter: Cell::new(0),
                kv_ops: Cell::new(0),
                fail_kv_op: Cell::new(None),
                lost_answer: RefCell::default(),
                lose_answers: Cell::new(false),
            }
        }

        /// How many key-value operations have been made so far.
        pub fn kv_ops(&self) -> usize {
            self.kv_ops.get()
        }

        /// Makes the key-value operation numbered `op` (counting from 0 as [`Self::kv_ops`]
        /// does) fail with a storage error, or, with `None`, none.
        pub fn fail_kv_op(&self, op: Option<usize>) {
            self.fail_kv_op.set(op);
        }

        /// Makes the failing operation, when it is an increment that adds, apply before it fails.
        pub fn lose_answers(&self, lose: bool) {
            self.lose_answers.set(lose);
        }

        fn kv_op(&self) -> Result<()> {
            let n = self.kv_ops.get();
            self.kv_ops.set(n + 1);
            if self.fail_kv_op.get() == Some(n) {
                return Err(Error::storage(format!("injected fault at operation {n}")));
            }
            Ok(())
        }

        pub fn offline() -> Self {
            Self::new(|_| Err(Error::transport("offline")))
        }

        /// Answers with `reply`, counting the POSTs to `path` (a URL's path ends with it):
        /// `reply` gets such a request's number (from 1), and the count is returned, so a test
        /// can script and count a platform's creates.
        pub fn counting(
            path: &'static str,
            reply: impl Fn(&Request, Option<usize>) -> Result<Response> + 'static,
        ) -> (Self, std::rc::Rc<Cell<usize>>) {
            let count = std::rc::Rc::new(Cell::new(0));
            let counter = count.clone();
            let env = Self::new(move |r: &Request| {
                let url = r.url.split('?').next().unwrap_or_default();
                if r.method == "POST" && url.ends_with(path) {
                    counter.set(counter.get() + 1);
                    return reply(r, Some(counter.get()));
                }
                reply(r, None)
            });
            (env, count)
        }

        pub fn set_responder(&self, f: impl Fn(&Request) -> Result<Response> + 'static) {
            *self.responder.borrow_mut() = Box::new(f);
        }

        /// How long each request takes, in ms of `now`: one slower than its timeout uses the
        /// timeout up and fails as a `transport` error without an answer.
        pub fn set_latency(&self, f: impl Fn(&Request) -> u64 + 'static) {
            *self.latency.borrow_mut() = Some(Box::new(f));
        }

        pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
            self.kv.borrow().clone()
        }

        /// An offline environment whose store starts as `kv`, at `now_ms`.
        pub fn with_store(kv: BTreeMap<String, Vec<u8>>, now_ms: u64) -> Self {
            let env = Self::offline();
            *env.kv.borrow_mut() = kv;
            env.now.set(now_ms);
            env
        }
    }

    pub fn json_response(status: u16, body: serde_json::Value) -> Result<Response> {
        Ok(Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        })
    }

    impl Env for FakeEnv {
        fn send(&self, request: &Request) -> Result<Response> {
            self.sent.borrow_mut().push(request.clone());
            let took = self.latency.borrow().as_ref().map_or(0, |f| f(request));
            if took > request.timeout_ms {
                self.now.set(self.now.get() + request.timeout_ms);
                return Err(Error::transport("timed out"));
            }
            self.now.set(self.now.get() + took);
            (self.responder.borrow())(request)
        }
        fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            self.kv_op()?;
            Ok(self.kv.borrow().get(key).cloned())
        }
        fn kv_set(&self, key: &str, value: &[u8]) -> Result<()> {
            self.kv_op()?;
            self.kv.borrow_mut().insert(key.into(), value.into());
            Ok(())
        }
        fn kv_delete(&self, key: &str) -> Result<()> {
            self.kv_op()?;
            self.kv.borrow_mut().remove(key);
            Ok(())
        }
        fn kv_increment(&self, key: &str, delta: u64) -> Result<u64> {
            let lose = delta != 0
                && self.lose_answers.get()
                && self.fail_kv_op.get() == Some(self.kv_ops.get());
            if lose {
                self.fail_kv_op.set(None);
                self.kv_increment(key, delta)?;
                *self.lost_answer.borrow_mut() = Some(key.to_string());
                return Err(Error::storage("injected fault after the increment applied"));
            }
            self.kv_op()?;
            let mut kv = self.kv.borrow_mut();
            let cur = kv
                .get(key)
                .map(|v| String::from_utf8_lossy(v).parse::<u64>().unwrap_or(0))
                .unwrap_or(0);
            let new = cur + delta;
            kv.insert(key.into(), new.to_string().into_bytes());
            Ok(new)
        }
        fn now_ms(&self) -> u64 {
            self.now.get()
        }
        fn sleep_ms(&self, ms: u64) {
            self.slept.borrow_mut().push(ms);
            self.now.set(self.now.get() + ms);
        }
        fn random_bytes(&self, len: usize) -> Vec<u8> {
            let c = self.counter.get().wrapping_add(1);
            self.counter.set(c);
            (0..len)
                .map(|i| c.wrapping_mul(31).wrapping_add(i as u8))
                .collect()
        }
    }
}
