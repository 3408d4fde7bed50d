//! Malformed-input suite: thousands of deterministic mutations of real, signed pushes of all
//! three platforms through the built component in the reference host.
//!
//! One mechanism, three platform specs (`Spec`): each gives the authentic pushes mutations
//! start from, how to sign and encrypt its wire format, an oracle that re-checks authenticity
//! the way the platform defines it, and its own targeted cases (Feishu handshakes, WeCom XML
//! entity bombs and GET URL checks, DingTalk misaddressed ciphertexts).
//!
//! For every request: the host call succeeds (the instance never traps), the reply is a typed
//! `unauthorized` / `invalid-input` error or an `ok` with a 2xx response, and the stored state
//! is unchanged — unless the oracle says the push is still authentic, in which case the change
//! is allowed and undone before the next request, so every mutation starts from the same state.
//!
//! Requests go through the typed `Host::handle_callback` (what `imbridge-host serve` uses), not
//! the JSON mapping: bodies are bytes there, so invalid UTF-8 reaches the plugin unaltered.

use imbridge::crypto::{b64_decode, b64_encode};
use imbridge::http::{parse_query, percent_encode};
use imbridge_host::Reply;
use imbridge_host::bindings::types::{HttpRequest, ImApp, Platform};
use imbridge_host::sim::dingtalk::{self, DingtalkApp, DingtalkSim};
use imbridge_host::sim::feishu::{self, FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::wecom::{self, WecomApp, WecomConfig, WecomSim, WecomUser};
use imbridge_tests::{Harness, dingtalk_sim, ok};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const TENANT: &str = "t1";
/// Mirrors the plugin's limits (`src/callback.rs`): the body, and the default timestamp
/// windows (Feishu's spans its retries, the last about 7.1 hours after the push).
const MAX_BODY: usize = 1 << 20;
const MAX_SKEW_SECS: u64 = 600;
const FEISHU_MAX_SKEW_SECS: u64 = 8 * 3600;
/// Random mutations per platform, on top of each platform's targeted cases.
const N_RANDOM: usize = 4_000;

/// xorshift64*: deterministic, so a failure names a reproducible case number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header<'r>(req: &'r HttpRequest, name: &str) -> Option<&'r str> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn fresh_ts(ts: &str, units_per_sec: u64, window: u64) -> bool {
    ts.trim()
        .parse::<u64>()
        .is_ok_and(|t| (t / units_per_sec).abs_diff(now_s()) <= window)
}

fn request(
    method: &str,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        path: "/callback/t1/app".into(),
        query,
        headers,
        body,
    }
}

/// What a case may do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Not authentic: a typed error, nothing stored.
    Reject,
    /// The authentic body and method with a signature, timestamp or nonce that does not
    /// hold: the plugin can read the push and must refuse it as `unauthorized`.
    Forged,
    /// An error or a 2xx, nothing stored.
    NoChange,
    /// Authentic (per the oracle): must be accepted; may change state (undone afterwards).
    Accept,
    /// Authentic with altered content: either outcome, and it may change state.
    Either,
}

struct Case {
    class: &'static str,
    req: HttpRequest,
    expect: Expect,
}

/// An authentic push the mutations start from.
struct Base {
    req: HttpRequest,
    /// The base64 ciphertext the signature covers (WX) or the body carries (Feishu).
    enc: String,
    /// The decrypted content, for pushes whose fields are mutated.
    plaintext: Vec<u8>,
    /// Whether accepting it may change state (events); handshakes and URL checks never do.
    effectful: bool,
}

/// Where a platform carries its signing fields.
#[derive(Clone, Copy)]
enum Place {
    Header,
    Query,
}

/// One platform's wire format, as the mutations need it.
trait Spec {
    fn name(&self) -> &'static str;
    fn app(&self) -> ImApp;
    fn place(&self) -> Place;
    /// Signature, timestamp and nonce field names, in that order.
    fn fields(&self) -> [&'static str; 3];
    /// 1 when timestamps are seconds, 1000 for milliseconds.
    fn ts_units(&self) -> u64;
    /// The default timestamp window, in seconds.
    fn max_skew(&self) -> u64 {
        MAX_SKEW_SECS
    }
    /// A request with `body`, signed at `ts` over `enc` (WX) or over the body (Feishu).
    fn signed(&self, method: &str, body: Vec<u8>, enc: &str, ts: &str) -> HttpRequest;
    /// The envelope that carries the ciphertext `enc`.
    fn envelope(&self, enc: &str) -> Vec<u8>;
    fn encrypt(&self, plaintext: &[u8]) -> String;
    /// Would the platform's rules accept this request as `base`, signed and fresh?
    fn authentic(&self, req: &HttpRequest, base: &Base) -> bool;
    /// Can the plugin still find `base`'s ciphertext in a body whose bytes changed? (Feishu's
    /// signature covers the body, so never; WX signatures cover only the ciphertext.)
    fn may_find(&self, req: &HttpRequest, base: &Base) -> bool;
    /// A plaintext with one field of the wrong type or shape, and what must happen.
    fn wrong_field(&self, rng: &mut Rng, base: &Base) -> (Vec<u8>, Expect);
    fn targeted(&self, bases: &[Base]) -> Vec<Case>;
    /// Three ciphertexts of `base`'s app that fail for different reasons: bad padding, good
    /// padding but unreadable content, and (WX) addressed to another app.
    fn corrupt_ciphertexts(&self, base: &Base) -> [(&'static str, String); 3];

    fn now_ts(&self) -> String {
        (now_s() * self.ts_units()).to_string()
    }
    /// An authentic push of `plaintext`, encrypted and signed now.
    fn seal(&self, plaintext: &[u8]) -> HttpRequest {
        let enc = self.encrypt(plaintext);
        self.signed("POST", self.envelope(&enc), &enc, &self.now_ts())
    }
}

// ---- where signing fields live: headers or the query string ----

fn get_field(place: Place, req: &HttpRequest, name: &str) -> Option<String> {
    match place {
        Place::Header => header(req, name).map(str::to_string),
        Place::Query => req.query.split('&').find_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k == name).then(|| v.to_string())
        }),
    }
}

fn set_field(place: Place, req: &mut HttpRequest, name: &str, value: String) {
    match place {
        Place::Header => {
            if let Some(slot) = req
                .headers
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
            {
                slot.1 = value;
            }
        }
        Place::Query => {
            let mut done = false;
            let parts: Vec<String> = req
                .query
                .split('&')
                .map(|p| {
                    let k = p.split_once('=').map_or(p, |(k, _)| k);
                    if k == name && !done {
                        done = true;
                        format!("{k}={value}")
                    } else {
                        p.to_string()
                    }
                })
                .collect();
            req.query = parts.join("&");
        }
    }
}

fn remove_field(place: Place, req: &mut HttpRequest, name: &str) {
    match place {
        Place::Header => req.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
        Place::Query => {
            let kept: Vec<&str> = req
                .query
                .split('&')
                .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != name)
                .collect();
            req.query = kept.join("&");
        }
    }
}

fn add_field(place: Place, req: &mut HttpRequest, name: &str, value: String, front: bool) {
    match place {
        Place::Header => {
            let h = (name.to_lowercase(), value);
            if front {
                req.headers.insert(0, h);
            } else {
                req.headers.push(h);
            }
        }
        Place::Query => {
            let p = format!("{name}={value}");
            req.query = match (req.query.is_empty(), front) {
                (true, _) => p,
                (false, true) => format!("{p}&{}", req.query),
                (false, false) => format!("{}&{p}", req.query),
            };
        }
    }
}

/// First value per name, percent-decoded the way the plugin does; `None` if the query does not
/// decode (the plugin rejects it whole).
fn query_param(req: &HttpRequest, names: &[&str]) -> Option<Option<String>> {
    let q = parse_query(&req.query).ok()?;
    Some(
        names
            .iter()
            .find_map(|n| q.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())),
    )
}

fn flip_bits(rng: &mut Rng, s: &mut [u8], n: usize) {
    if s.is_empty() {
        return;
    }
    for _ in 0..n {
        let i = rng.below(s.len());
        s[i] ^= 1 << rng.below(8);
    }
}

/// A bit flip that keeps the string UTF-8 (header values and queries are strings).
fn flip_str(rng: &mut Rng, s: &str) -> String {
    for _ in 0..16 {
        let mut b = s.as_bytes().to_vec();
        flip_bits(rng, &mut b, 1);
        if let Ok(s) = String::from_utf8(b) {
            return s;
        }
    }
    s.to_string()
}

/// A JSON value of the wrong type for any field the plugin reads.
fn wrong_type(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!(12345),
        1 => json!(["x"]),
        2 => json!({"x": 1}),
        3 => Value::Null,
        4 => json!(true),
        _ => json!(-1.5e300),
    }
}

fn nested(depth: usize, open: &str, close: &str) -> Vec<u8> {
    let mut s = open.repeat(depth);
    s.push_str(&close.repeat(depth));
    s.into_bytes()
}

/// Expectation for a copy of `base` mutated without re-signing.
fn judge(spec: &dyn Spec, base: &Base, req: &HttpRequest) -> Expect {
    if !base.effectful {
        Expect::NoChange
    } else if !spec.authentic(req, base) {
        // A query the plugin cannot decode (as `query_param` reads it) may be invalid-input.
        if req.body == base.req.body
            && req.method == base.req.method
            && parse_query(&req.query).is_ok()
        {
            Expect::Forged
        } else {
            Expect::Reject
        }
    } else if req.body == base.req.body {
        Expect::Accept
    } else if spec.may_find(req, base) {
        Expect::Either
    } else {
        Expect::Reject
    }
}

/// One random mutation of one base push.
fn mutate(spec: &dyn Spec, rng: &mut Rng, bases: &[Base]) -> Case {
    let base = &bases[rng.below(bases.len())];
    let place = spec.place();
    let fields = spec.fields();
    let mut req = base.req.clone();
    let re_sign_expect = |e: Expect| if base.effectful { e } else { Expect::NoChange };
    let class = match rng.below(18) {
        0 => {
            let cut = rng.below(req.body.len());
            req.body.truncate(cut);
            "truncated body"
        }
        1 => {
            let n = 1 + rng.below(3);
            flip_bits(rng, &mut req.body, n);
            "bit flips in body"
        }
        k @ 2..=4 => {
            let name = fields[k - 2];
            if let Some(v) = get_field(place, &req, name) {
                let flipped = flip_str(rng, &v);
                set_field(place, &mut req, name, flipped);
            }
            [
                "bit flip in signature",
                "bit flip in timestamp",
                "bit flip in nonce",
            ][k - 2]
        }
        5 => {
            remove_field(place, &mut req, fields[rng.below(3)]);
            "missing signing field"
        }
        6 => {
            let mut case = |s: &str| -> String {
                s.chars()
                    .map(|c| {
                        if rng.below(2) == 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            };
            match place {
                Place::Header => {
                    let names: Vec<String> = req.headers.iter().map(|(k, _)| case(k)).collect();
                    for ((k, _), n) in req.headers.iter_mut().zip(names) {
                        *k = n;
                    }
                }
                Place::Query => {
                    let parts: Vec<String> = req
                        .query
                        .split('&')
                        .map(|p| match p.split_once('=') {
                            Some((k, v)) => format!("{}={v}", case(k)),
                            None => case(p),
                        })
                        .collect();
                    req.query = parts.join("&");
                }
            }
            "field name case"
        }
        7 => {
            let name = fields[rng.below(3)];
            let junk = "0".repeat(rng.below(80));
            let front = rng.below(2) == 0;
            add_field(place, &mut req, name, junk, front);
            "duplicate signing field"
        }
        8 => {
            for _ in 0..1 + rng.below(4) {
                let len = if rng.below(8) == 0 {
                    64 * 1024
                } else {
                    rng.below(40)
                };
                let value: String = (0..len)
                    .map(|_| (b' ' + rng.below(95) as u8) as char)
                    .collect();
                let name = ["X-Junk", "", "Content-Length", "X-Request-Id", "é"][rng.below(5)];
                req.headers.push((name.into(), value));
            }
            "extra headers"
        }
        9 => {
            let ct = [
                "text/xml",
                "",
                "application/x-www-form-urlencoded",
                "application/json; charset=gbk",
            ];
            req.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
            if rng.below(4) != 0 {
                req.headers
                    .push(("Content-Type".into(), ct[rng.below(ct.len())].into()));
            }
            "wrong content type"
        }
        10 => {
            for _ in 0..(1 + rng.below(3)) * usize::from(!req.body.is_empty()) {
                let i = rng.below(req.body.len());
                req.body[i] = 0x80 | rng.next() as u8;
            }
            "invalid UTF-8 body"
        }
        11 => {
            req.method = [
                "GET", "PUT", "", "post", "Post", " POST", "POST\0", "DELETE",
            ][rng.below(8)]
            .into();
            "method"
        }
        12 => {
            // Re-signed (over the body or the unchanged ciphertext), so only the bytes are wrong.
            let mut body = req.body.clone();
            for _ in 0..(1 + rng.below(4)) * usize::from(!body.is_empty()) {
                let i = rng.below(body.len());
                body[i] = 0x80 | rng.next() as u8;
            }
            let req = spec.signed(&base.req.method, body, &base.enc, &spec.now_ts());
            let expect = judge(spec, base, &req);
            return Case {
                class: "signed invalid UTF-8 body",
                req,
                expect,
            };
        }
        13 => {
            let bodies: [&[u8]; 7] = [
                b"",
                b"not json",
                b"<xml><Encrypt>x</Encrypt></xml>",
                b"encrypt=abc",
                b"{\"encrypt\":",
                b"\xef\xbb\xbf{}",
                b"<xml><Encrypt><![CDATA[",
            ];
            let body = if rng.below(3) == 0 {
                let n = rng.below(300);
                rng.bytes(n)
            } else {
                bodies[rng.below(bodies.len())].to_vec()
            };
            // Signed over whatever ciphertext the junk would claim to carry.
            return Case {
                class: "signed garbage body",
                req: spec.signed("POST", body, "x", &spec.now_ts()),
                expect: Expect::Reject,
            };
        }
        14 => {
            let w = wrong_type(rng);
            let body = match rng.below(3) {
                0 => json!({"encrypt": w}),
                1 => json!([{"encrypt": "x"}]),
                _ => w,
            };
            let enc = body.to_string();
            return Case {
                class: "signed JSON of wrong types",
                req: spec.signed("POST", body.to_string().into_bytes(), &enc, &spec.now_ts()),
                expect: Expect::Reject,
            };
        }
        15 => {
            if !base.effectful || base.plaintext.is_empty() {
                return Case {
                    class: "non-event push replayed",
                    req,
                    expect: Expect::NoChange,
                };
            }
            let (plaintext, expect) = spec.wrong_field(rng, base);
            return Case {
                class: "event field of wrong type",
                req: spec.seal(&plaintext),
                expect,
            };
        }
        16 => {
            // The ciphertext is corrupted but the signature recomputed: the plugin decrypts
            // authentic garbage. A flip in the first block can still yield valid content.
            let mut enc = base.enc.as_bytes().to_vec();
            flip_bits(rng, &mut enc, 1);
            let enc = String::from_utf8_lossy(&enc).into_owned();
            let req = if base.req.method == "GET" {
                let mut r = spec.signed("GET", Vec::new(), &enc, &spec.now_ts());
                r.query = format!("{}&echostr={}", r.query, percent_encode(&enc));
                r
            } else {
                spec.signed("POST", spec.envelope(&enc), &enc, &spec.now_ts())
            };
            return Case {
                class: "corrupted ciphertext (re-signed)",
                req,
                expect: re_sign_expect(Expect::Either),
            };
        }
        _ => {
            let now = now_s();
            let u = spec.ts_units();
            let late = spec.max_skew() + 100;
            let (ts, fresh) = match rng.below(8) {
                0 => (((now - late) * u).to_string(), false),
                1 => (((now + late) * u).to_string(), false),
                2 => (((now - 100) * u).to_string(), true),
                3 => (format!(" {} ", now * u), true),
                4 => ("abc".to_string(), false),
                5 => ("-5".to_string(), false),
                6 => (format!("{}.0", now * u), false),
                _ => ("99999999999999999999999".to_string(), false),
            };
            let mut req = spec.signed(&base.req.method, base.req.body.clone(), &base.enc, &ts);
            if base.req.method == "GET" {
                req.query = format!("{}&echostr={}", req.query, percent_encode(&base.enc));
            }
            return Case {
                class: "re-signed timestamp",
                req,
                expect: re_sign_expect(if fresh {
                    Expect::Accept
                } else {
                    Expect::Reject
                }),
            };
        }
    };
    let expect = judge(spec, base, &req);
    Case { class, req, expect }
}

/// Cases every platform gets: bodies over the limit, deep nesting outside and inside.
fn common_targeted(spec: &dyn Spec, bases: &[Base]) -> Vec<Case> {
    let mut out = Vec::new();
    let event = bases.iter().find(|b| b.effectful).expect("an event base");
    for extra in [1usize, 4096, 1 << 20] {
        let mut body = event.req.body.clone();
        body.resize(MAX_BODY + extra, b' ');
        out.push(Case {
            class: "huge body (signed)",
            req: spec.signed("POST", body.clone(), &event.enc, &spec.now_ts()),
            expect: Expect::Reject,
        });
        out.push(Case {
            class: "huge body",
            req: HttpRequest {
                body,
                ..event.req.clone()
            },
            expect: Expect::Reject,
        });
    }
    let mut rng = Rng(7);
    out.push(Case {
        class: "huge body",
        req: spec.signed("POST", rng.bytes(MAX_BODY + 1), "x", &spec.now_ts()),
        expect: Expect::Reject,
    });
    // serde_json's recursion limit (128) must turn deep nesting into an error, not a stack
    // overflow in the guest — in the outer body and in the decrypted plaintext.
    for depth in [127usize, 129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let doc = nested(depth, open, close);
            out.push(Case {
                class: "deeply nested JSON (outer)",
                req: spec.signed("POST", doc.clone(), "x", &spec.now_ts()),
                expect: Expect::Reject,
            });
            out.push(Case {
                class: "deeply nested JSON (encrypted)",
                req: spec.seal(&doc),
                expect: if depth < 128 {
                    Expect::NoChange
                } else {
                    Expect::Reject
                },
            });
        }
    }
    out
}

// ---- Feishu ----

const FS_APP: &str = "cli_fz";
const FS_KEY: &str = "fz-encrypt-key";
const FS_TOKEN: &str = "vt-fz";

struct Feishu {
    base_url: String,
}

impl Feishu {
    fn handshake_body(token: Value, challenge: Value) -> Vec<u8> {
        json!({"challenge": challenge, "token": token, "type": "url_verification"})
            .to_string()
            .into_bytes()
    }
    fn unsigned(body: Vec<u8>) -> HttpRequest {
        request(
            "POST",
            String::new(),
            vec![("Content-Type".into(), "application/json".into())],
            body,
        )
    }
}

impl Spec for Feishu {
    fn name(&self) -> &'static str {
        "feishu"
    }
    fn app(&self) -> ImApp {
        ImApp {
            id: "fs".into(),
            platform: Platform::Feishu,
            app_id: FS_APP.into(),
            app_secret: "fz-secret".into(),
            agent_id: None,
            encrypt_key: Some(FS_KEY.into()),
            token: Some(FS_TOKEN.into()),
            api_base: Some(self.base_url.clone()),
            max_clock_skew_secs: None,
        }
    }
    fn place(&self) -> Place {
        Place::Header
    }
    fn fields(&self) -> [&'static str; 3] {
        [
            "X-Lark-Signature",
            "X-Lark-Request-Timestamp",
            "X-Lark-Request-Nonce",
        ]
    }
    fn ts_units(&self) -> u64 {
        1
    }
    fn max_skew(&self) -> u64 {
        FEISHU_MAX_SKEW_SECS
    }
    fn signed(&self, method: &str, body: Vec<u8>, _enc: &str, ts: &str) -> HttpRequest {
        let nonce = "n0nce-fz";
        let [sig, ts_h, nonce_h] = self.fields();
        request(
            method,
            String::new(),
            vec![
                (
                    "Content-Type".into(),
                    "application/json; charset=utf-8".into(),
                ),
                (ts_h.into(), ts.into()),
                (nonce_h.into(), nonce.into()),
                (
                    sig.into(),
                    feishu::crypto::signature(ts, nonce, FS_KEY, &body),
                ),
            ],
            body,
        )
    }
    fn envelope(&self, enc: &str) -> Vec<u8> {
        json!({ "encrypt": enc }).to_string().into_bytes()
    }
    fn encrypt(&self, plaintext: &[u8]) -> String {
        feishu::crypto::encrypt(FS_KEY, plaintext)
    }
    /// The first of duplicate headers counts, names are case-insensitive, the signature is
    /// hex in any case.
    fn authentic(&self, req: &HttpRequest, _base: &Base) -> bool {
        let [sig, ts, nonce] = self.fields();
        let (Some(sig), Some(ts), Some(nonce)) =
            (header(req, sig), header(req, ts), header(req, nonce))
        else {
            return false;
        };
        req.method.eq_ignore_ascii_case("POST")
            && req.body.len() <= MAX_BODY
            && sig.trim().to_ascii_lowercase()
                == feishu::crypto::signature(ts, nonce, FS_KEY, &req.body)
            && fresh_ts(ts, 1, FEISHU_MAX_SKEW_SECS)
    }
    fn may_find(&self, _req: &HttpRequest, _base: &Base) -> bool {
        false
    }
    /// Fields the plugin does not need (event ids, timestamps, the approval
    /// code) leave the event effective; a wrong token or envelope refuses it.
    fn wrong_field(&self, rng: &mut Rng, base: &Base) -> (Vec<u8>, Expect) {
        let mut p: Value = serde_json::from_slice(&base.plaintext).expect("plaintext is JSON");
        let v2 = p.get("schema").is_some();
        let fields: &[&str] = if v2 {
            &[
                "/header/token",
                "/header/event_id",
                "/header/event_type",
                "/header",
                "/event",
                "/event/instance_code",
                "/event/status",
                "/event/open_id",
                "/event/operate_time",
                "/schema",
            ]
        } else {
            &[
                "/token",
                "/uuid",
                "/ts",
                "/type",
                "/event",
                "/event/type",
                "/event/instance_code",
                "/event/status",
                "/event/operate_time",
                "/event/approval_code",
            ]
        };
        let f = fields[rng.below(fields.len())];
        *p.pointer_mut(f).expect("field exists") = wrong_type(rng);
        let expect = match f {
            // Without a string schema "2.0" a v2 envelope reads as v1: no top-level token.
            "/token" | "/header/token" | "/schema" | "/header" => Expect::Reject,
            _ => Expect::Either,
        };
        (p.to_string().into_bytes(), expect)
    }
    fn corrupt_ciphertexts(&self, base: &Base) -> [(&'static str, String); 3] {
        // Without its last block, the new last block ends in a JSON character: bad PKCS#7.
        let raw = b64_decode(&base.enc).expect("base64");
        let truncated = b64_encode(&raw[..raw.len() - 16]);
        [
            ("bad padding", truncated),
            ("good padding, not JSON", self.encrypt(b"not json <")),
            ("good padding, binary", self.encrypt(&[0xff; 40])),
        ]
    }
    fn targeted(&self, bases: &[Base]) -> Vec<Case> {
        let mut out = Vec::new();
        let event = &bases[0];
        // Just under the limit, still JSON: refused for what it is, not for its size.
        let mut padded = event.req.body.clone();
        padded.splice(
            1..1,
            std::iter::repeat_n(b' ', MAX_BODY - event.req.body.len()),
        );
        out.push(Case {
            class: "body at the limit",
            req: self.signed("POST", padded, "", &self.now_ts()),
            expect: Expect::Accept,
        });
        for depth in [127usize, 129, 1_000] {
            let mut inside =
                format!("{{\"token\":\"{FS_TOKEN}\",\"type\":\"event_callback\",\"event\":")
                    .into_bytes();
            inside.extend_from_slice(&nested(depth, "[", "]"));
            inside.push(b'}');
            out.push(Case {
                class: "deeply nested JSON (event)",
                req: self.seal(&inside),
                expect: if depth < 128 {
                    Expect::NoChange
                } else {
                    Expect::Reject
                },
            });
        }
        // URL handshakes (unsigned) with the wrong token, or none, or no challenge.
        let tokens = [
            json!("vt-fz "),
            json!("VT-FZ"),
            json!(""),
            json!("vt-f"),
            json!("vt-fzz"),
            Value::Null,
            json!(1),
            json!(["vt-fz"]),
            json!({"t": "vt-fz"}),
        ];
        for t in tokens {
            let body = self.envelope(&self.encrypt(&Self::handshake_body(t.clone(), json!("c"))));
            out.push(Case {
                class: "handshake with a wrong token",
                req: Self::unsigned(body.clone()),
                expect: Expect::Reject,
            });
            out.push(Case {
                class: "handshake with a wrong token",
                req: self.signed("POST", body, "", &self.now_ts()),
                expect: Expect::Reject,
            });
            out.push(Case {
                class: "handshake in plaintext",
                req: Self::unsigned(Self::handshake_body(t, json!("c"))),
                expect: Expect::Reject,
            });
        }
        for c in [Value::Null, json!(5), json!(["c"])] {
            let body = self.envelope(&self.encrypt(&Self::handshake_body(json!(FS_TOKEN), c)));
            out.push(Case {
                class: "handshake without a challenge",
                req: Self::unsigned(body),
                expect: Expect::Reject,
            });
        }
        out.push(Case {
            class: "handshake in plaintext",
            req: Self::unsigned(Self::handshake_body(json!(FS_TOKEN), json!("c"))),
            expect: Expect::Reject,
        });
        out
    }
}

async fn feishu_world() -> (FeishuSim, Feishu, Harness, Vec<Base>) {
    let mut fa = FeishuApp::new(FS_APP, "fz-secret");
    fa.encrypt_key = Some(FS_KEY.into());
    fa.verification_token = FS_TOKEN.into();
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![fa],
        users: ["alice", "bob"].into_iter().map(FeishuUser::new).collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let spec = Feishu {
        base_url: sim.base_url(),
    };
    let h = harness(&spec.base_url).await;
    let instance = start(
        &h,
        &spec,
        json!({"key": "wf-1", "title": "Deploy?", "initiator": {"id": "ou_alice"},
               "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}),
    )
    .await;
    let push = |payload: Value| {
        let p = sim.build_push(FS_APP, &payload).expect("push");
        let body: Value = serde_json::from_slice(&p.body).expect("JSON push");
        Base {
            req: request("POST", String::new(), p.headers, p.body),
            enc: body["encrypt"].as_str().expect("encrypt").to_string(),
            plaintext: payload.to_string().into_bytes(),
            effectful: true,
        }
    };
    let inst = |code: &str, status: &str| {
        json!({"type": "approval_instance", "approval_code": "C", "instance_code": code,
               "status": status, "operate_time": format!("{}000", now_s())})
    };
    let task = json!({"type": "approval_task", "approval_code": "C", "instance_code": instance,
                      "task_id": "7000000000000000001", "open_id": "ou_bob", "user_id": "u_bob",
                      "status": "APPROVED", "operate_time": format!("{}000", now_s())});
    let mut bases = vec![
        push(
            sim.envelope_v1(FS_APP, inst(&instance, "APPROVED"))
                .expect("v1"),
        ),
        push(sim.envelope_v2(FS_APP, "approval_task", task).expect("v2")),
        push(
            sim.envelope_v1(FS_APP, inst("NO-SUCH-INSTANCE", "REJECTED"))
                .expect("v1"),
        ),
    ];
    let hs = Feishu::handshake_body(json!(FS_TOKEN), json!("ch-1"));
    let enc = spec.encrypt(&hs);
    bases.push(Base {
        req: Feishu::unsigned(spec.envelope(&enc)),
        enc,
        plaintext: Vec::new(),
        effectful: false,
    });
    (sim, spec, h, bases)
}

// ---- DingTalk and WeCom: the WXBizMsgCrypt frame, signatures in the query ----

/// DingTalk and WeCom sign and encrypt the same way (SHA-1 over the sorted token, timestamp,
/// nonce and ciphertext, in the query; the WX frame with the AppKey / CorpID as receive id);
/// a dialect holds what differs.
struct Dialect {
    name: &'static str,
    /// Signature, timestamp and nonce as the simulators send them.
    fields: [&'static str; 3],
    /// The names the plugin accepts for each, the first present one counting.
    accepted: [&'static [&'static str]; 3],
    ts_units: u64,
    content_type: &'static str,
    /// Each simulator's own crypto (independent of the plugin's).
    encrypt: fn(&str, &[u8], &str) -> String,
    signature: fn(&str, &str, &str, &str) -> String,
    envelope: fn(&Wx, &str) -> Vec<u8>,
    /// A plaintext that decrypts fine but cannot be read.
    unreadable: &'static [u8],
    wrong_field: fn(&mut Rng, &Base) -> (Vec<u8>, Expect),
    targeted: fn(&Wx, &[Base]) -> Vec<Case>,
}

struct Wx {
    dialect: &'static Dialect,
    app: ImApp,
    agent_id: u64,
}

impl Wx {
    fn token(&self) -> &str {
        self.app.token.as_deref().expect("token")
    }
    fn key(&self) -> &str {
        self.app.encrypt_key.as_deref().expect("key")
    }
    fn owner(&self) -> &str {
        &self.app.app_id
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Spec for Wx {
    fn name(&self) -> &'static str {
        self.dialect.name
    }
    fn app(&self) -> ImApp {
        self.app.clone()
    }
    fn place(&self) -> Place {
        Place::Query
    }
    fn fields(&self) -> [&'static str; 3] {
        self.dialect.fields
    }
    fn ts_units(&self) -> u64 {
        self.dialect.ts_units
    }
    fn signed(&self, method: &str, body: Vec<u8>, enc: &str, ts: &str) -> HttpRequest {
        let nonce = "n0nce";
        let sig = (self.dialect.signature)(self.token(), ts, nonce, enc);
        let [sig_name, ts_name, nonce_name] = self.dialect.fields;
        let query = format!(
            "{sig_name}={sig}&{ts_name}={}&{nonce_name}={nonce}",
            percent_encode(ts)
        );
        request(
            method,
            query,
            vec![("Content-Type".into(), self.dialect.content_type.into())],
            body,
        )
    }
    fn envelope(&self, enc: &str) -> Vec<u8> {
        (self.dialect.envelope)(self, enc)
    }
    fn encrypt(&self, plaintext: &[u8]) -> String {
        (self.dialect.encrypt)(self.key(), plaintext, self.owner())
    }
    fn authentic(&self, req: &HttpRequest, base: &Base) -> bool {
        let [sig, ts, nonce] = self.dialect.accepted.map(|names| query_param(req, names));
        let (Some(Some(sig)), Some(Some(ts)), Some(Some(nonce))) = (sig, ts, nonce) else {
            return false;
        };
        req.method.eq_ignore_ascii_case(&base.req.method)
            && req.body.len() <= MAX_BODY
            && sig.trim().to_ascii_lowercase()
                == (self.dialect.signature)(self.token(), &ts, &nonce, &base.enc)
            && fresh_ts(&ts, self.dialect.ts_units, MAX_SKEW_SECS)
            && (base.req.method != "GET"
                || query_param(req, &["echostr"]) == Some(Some(base.enc.clone())))
    }
    /// The signature covers only the ciphertext: changed bytes elsewhere may still carry it.
    fn may_find(&self, req: &HttpRequest, base: &Base) -> bool {
        contains(&req.body, base.enc.as_bytes())
    }
    fn wrong_field(&self, rng: &mut Rng, base: &Base) -> (Vec<u8>, Expect) {
        (self.dialect.wrong_field)(rng, base)
    }
    fn corrupt_ciphertexts(&self, base: &Base) -> [(&'static str, String); 3] {
        [
            // The WX frame pads to 32 bytes; a last byte of 0 is never valid.
            (
                "bad padding",
                dingtalk::crypto::encrypt_raw(self.key(), &[0u8; 32]),
            ),
            (
                "good padding, unreadable",
                self.encrypt(self.dialect.unreadable),
            ),
            (
                "another app's",
                (self.dialect.encrypt)(self.key(), &base.plaintext, "someone-else"),
            ),
        ]
    }
    fn targeted(&self, bases: &[Base]) -> Vec<Case> {
        (self.dialect.targeted)(self, bases)
    }
}

static DINGTALK: Dialect = Dialect {
    name: "dingtalk",
    fields: ["signature", "timestamp", "nonce"],
    accepted: [
        &["msg_signature", "signature"],
        &["timestamp", "timeStamp"],
        &["nonce"],
    ],
    ts_units: 1000,
    content_type: "application/json",
    encrypt: dingtalk::crypto::encrypt,
    signature: dingtalk::crypto::signature,
    envelope: |_, enc| json!({ "encrypt": enc }).to_string().into_bytes(),
    unreadable: b"not json <",
    wrong_field: dingtalk_wrong_field,
    targeted: dingtalk_targeted,
};

fn dingtalk_wrong_field(rng: &mut Rng, base: &Base) -> (Vec<u8>, Expect) {
    let mut p: Value = serde_json::from_slice(&base.plaintext).expect("plaintext is JSON");
    let fields = [
        "EventType",
        "processInstanceId",
        "type",
        "result",
        "staffId",
        "taskId",
        "finishTime",
        "remark",
    ];
    p[fields[rng.below(fields.len())]] = wrong_type(rng);
    (p.to_string().into_bytes(), Expect::Either)
}

fn dingtalk_targeted(wx: &Wx, bases: &[Base]) -> Vec<Case> {
    let event = &bases[0];
    let mut padded = event.req.body.clone();
    padded.splice(
        1..1,
        std::iter::repeat_n(b' ', MAX_BODY - event.req.body.len()),
    );
    let ts = wx.now_ts();
    let mut out = vec![Case {
        class: "body at the limit",
        req: wx.signed("POST", padded, &event.enc, &ts),
        expect: Expect::Accept,
    }];
    // Authentic frames addressed to another app, and frames with broken padding.
    let other = dingtalk::crypto::encrypt(wx.key(), &event.plaintext, "otherapp");
    let raw = dingtalk::crypto::encrypt_raw(wx.key(), &[7u8; 64]);
    for enc in [other, raw] {
        out.push(Case {
            class: "misaddressed or unframed ciphertext",
            req: wx.signed("POST", wx.envelope(&enc), &enc, &ts),
            expect: Expect::Reject,
        });
    }
    out
}

async fn dingtalk_world() -> (DingtalkSim, Wx, Harness, Vec<Base>) {
    let app = DingtalkApp::new("dingfz");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let spec = Wx {
        dialect: &DINGTALK,
        app: im_app(
            json!({"id": "dt", "platform": "dingtalk", "app_id": app.app_key,
            "app_secret": app.app_secret, "agent_id": app.agent_id.to_string(),
            "encrypt_key": app.aes_key, "token": app.token, "api_base": sim.base_url()}),
        ),
        agent_id: app.agent_id,
    };
    let h = harness(&sim.base_url()).await;
    let instance = start(
        &h,
        &spec,
        json!({"key": "wf-1", "title": "Deploy?", "initiator": {"id": "orig"},
               "nodes": [{"approvers": [{"id": "a"}], "mode": "and"}]}),
    )
    .await;
    let now_ms = now_s() * 1000;
    let push = |event: Value, effectful: bool| {
        let p = sim.build_push(&app.app_key, &event).expect("push");
        let body: Value = serde_json::from_slice(&p.body).expect("JSON push");
        Base {
            req: request(
                "POST",
                p.query,
                vec![("Content-Type".into(), "application/json".into())],
                p.body,
            ),
            enc: body["encrypt"].as_str().expect("encrypt").to_string(),
            plaintext: event.to_string().into_bytes(),
            effectful,
        }
    };
    let bases = vec![
        push(
            json!({"EventType": "bpms_instance_change", "processInstanceId": instance,
                   "type": "finish", "result": "agree", "finishTime": now_ms}),
            true,
        ),
        push(
            json!({"EventType": "bpms_task_change", "processInstanceId": instance,
                   "type": "finish", "result": "agree", "staffId": "a", "taskId": 51,
                   "remark": "ok", "finishTime": now_ms}),
            true,
        ),
        push(
            json!({"EventType": "bpms_instance_change", "processInstanceId": "NO-SUCH",
                   "type": "finish", "result": "refuse", "finishTime": now_ms}),
            true,
        ),
        push(json!({"EventType": "check_url"}), false),
    ];
    (sim, spec, h, bases)
}

const BOMB: &str = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">\
    <!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\
    <!ENTITY lol2 \"&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;\">]>";

static WECOM: Dialect = Dialect {
    name: "wecom",
    fields: ["msg_signature", "timestamp", "nonce"],
    accepted: [&["msg_signature"], &["timestamp"], &["nonce"]],
    ts_units: 1,
    content_type: "text/xml",
    encrypt: wecom::crypto::encrypt,
    signature: wecom::crypto::signature,
    envelope: wecom_xml_envelope,
    unreadable: b"not xml <",
    wrong_field: wecom_wrong_field,
    targeted: wecom_targeted,
};

fn wecom_xml_envelope(wx: &Wx, enc: &str) -> Vec<u8> {
    format!(
        "<xml><ToUserName><![CDATA[{}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt>\
         <AgentID><![CDATA[{}]]></AgentID></xml>",
        wx.owner(),
        wx.agent_id
    )
    .into_bytes()
}

fn wecom_json_envelope(wx: &Wx, enc: &str) -> Vec<u8> {
    json!({"tousername": wx.owner(), "encrypt": enc, "agentid": wx.agent_id})
        .to_string()
        .into_bytes()
}

fn sealed_case(wx: &Wx, class: &'static str, plaintext: &str, expect: Expect) -> Case {
    Case {
        class,
        req: wx.seal(plaintext.as_bytes()),
        expect,
    }
}

/// One element's content replaced by something of the wrong shape: nested markup, empty,
/// text where a number belongs, a huge number, an entity, CDATA.
fn wecom_wrong_field(rng: &mut Rng, base: &Base) -> (Vec<u8>, Expect) {
    let xml = String::from_utf8(base.plaintext.clone()).expect("plaintext is UTF-8");
    let names = [
        "Event",
        "SpNo",
        "SpStatus",
        "UserId",
        "SpTime",
        "MsgType",
        "CreateTime",
        "ApprovalInfo",
    ];
    let name = names[rng.below(names.len())];
    let junk = [
        "",
        "<a/>",
        "abc",
        "99999999999999999999999",
        "&amp;",
        "<![CDATA[]]>",
    ][rng.below(6)];
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let out = match (xml.find(&open), xml.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{open}{junk}{}", &xml[..a], &xml[b..])
        }
        _ => xml,
    };
    (out.into_bytes(), Expect::Either)
}

fn wecom_targeted(wx: &Wx, bases: &[Base]) -> Vec<Case> {
    let ts = wx.now_ts();
    let event = &bases[0];
    let mut out = Vec::new();
    // Entity bombs, DOCTYPEs and undeclared entities: outside (the envelope, signed over
    // the real ciphertext) and inside (the decrypted message).
    let outer_bomb = format!(
        "{BOMB}<xml><Encrypt><![CDATA[{}]]></Encrypt><X>&lol2;</X></xml>",
        event.enc
    );
    let outer_doctype = format!(
        "<!DOCTYPE xml SYSTEM \"http://169.254.169.254/x.dtd\"><xml><Encrypt><![CDATA[{}]]></Encrypt></xml>",
        event.enc
    );
    let outer_undeclared = format!(
        "<xml><Encrypt><![CDATA[{}]]></Encrypt><X>&lol2;</X></xml>",
        event.enc
    );
    for body in [outer_bomb, outer_doctype, outer_undeclared] {
        out.push(Case {
            class: "XML entity bomb / DOCTYPE (envelope)",
            req: wx.signed("POST", body.into_bytes(), &event.enc, &ts),
            expect: Expect::Reject,
        });
    }
    let inner = String::from_utf8(event.plaintext.clone()).expect("UTF-8");
    let inner_body = inner.trim_start_matches("<xml>");
    for (class, plaintext) in [
        (
            "XML entity bomb / DOCTYPE (message)",
            format!("{BOMB}<xml><Event>&lol2;</Event>{inner_body}"),
        ),
        (
            "XML entity bomb / DOCTYPE (message)",
            format!(
                "<!DOCTYPE xml [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><xml><Event>&x;</Event>{inner_body}"
            ),
        ),
        (
            "undeclared entity (message)",
            format!("<xml><Event>&lol2;</Event>{inner_body}"),
        ),
        ("deep XML (message)", {
            let mut s = "<a>".repeat(10_000);
            s.push_str(&"</a>".repeat(10_000));
            s
        }),
        (
            "wide XML (message)",
            // Over the element bound (65,536: one per 16 bytes of the body limit).
            format!("<xml>{}</xml>", "<a/>".repeat(70_000)),
        ),
        ("unclosed XML (message)", inner.replace("</xml>", "")),
        ("two roots (message)", format!("{inner}{inner}")),
    ] {
        out.push(sealed_case(wx, class, &plaintext, Expect::Reject));
    }
    // The envelope's limit: the callback body limit (1 MiB).
    let mut padded = wecom_xml_envelope(wx, &event.enc);
    padded.splice(5..5, std::iter::repeat_n(b' ', (1 << 20) - padded.len()));
    out.push(Case {
        class: "XML envelope at its limit",
        req: wx.signed("POST", padded.clone(), &event.enc, &ts),
        expect: Expect::Accept,
    });
    padded.insert(5, b' ');
    out.push(Case {
        class: "XML envelope over its limit",
        req: wx.signed("POST", padded, &event.enc, &ts),
        expect: Expect::Reject,
    });
    // URL checks: no echostr, an echostr the signature does not cover, a misaddressed one.
    let get = &bases[bases.len() - 1];
    let mut no_echo = get.req.clone();
    remove_field(Place::Query, &mut no_echo, "echostr");
    let other = wecom::crypto::encrypt(wx.key(), b"123", "wwother");
    let mut misaddressed = wx.signed("GET", Vec::new(), &other, &ts);
    misaddressed.query = format!("{}&echostr={}", misaddressed.query, percent_encode(&other));
    let mut swapped = get.req.clone();
    set_field(
        Place::Query,
        &mut swapped,
        "echostr",
        percent_encode(&other),
    );
    for (class, req) in [
        ("URL check without echostr", no_echo),
        ("URL check for another corp", misaddressed),
        ("URL check with a swapped echostr", swapped),
    ] {
        out.push(Case {
            class,
            req,
            expect: Expect::Reject,
        });
    }
    out
}

async fn wecom_world() -> (WecomSim, Wx, Harness, Vec<Base>) {
    let app = WecomApp::new("wwfz0001", "secret-fz", 1000002);
    let users = ["zhangsan", "u1"]
        .iter()
        .map(|u| WecomUser::new(u))
        .collect();
    let sim = WecomSim::start(WecomConfig {
        apps: vec![app.clone()],
        users,
        ..Default::default()
    })
    .await
    .expect("sim");
    let spec = Wx {
        dialect: &WECOM,
        app: im_app(
            json!({"id": "wa", "platform": "wecom", "app_id": app.corp_id,
            "app_secret": app.secret, "agent_id": app.agent_id.to_string(),
            "encrypt_key": app.encoding_aes_key, "token": app.token, "api_base": sim.base_url()}),
        ),
        agent_id: app.agent_id,
    };
    let h = harness(&sim.base_url()).await;
    let sp_no = start(
        &h,
        &spec,
        json!({"key": "wf-1", "title": "Deploy?", "initiator": {"id": "zhangsan"},
               "nodes": [{"approvers": [{"id": "u1"}], "mode": "and"}]}),
    )
    .await;
    let approved = sim.approval_event_xml(&sp_no, 2).expect("event").replace(
        "<SpStatus>1</SpStatus><TemplateId>",
        "<SpStatus>2</SpStatus><TemplateId>",
    );
    let unknown = json!({"ToUserName": app.corp_id, "FromUserName": "sys", "CreateTime": now_s(),
        "MsgType": "event", "Event": "sys_approval_change", "AgentID": app.agent_id,
        "ApprovalInfo": {"SpNo": "NO-SUCH", "SpStatus": 3, "SpRecord": [{"SpStatus": 3,
            "Details": [{"Approver": {"UserId": "u1"}, "Speech": "no", "SpStatus": 3,
                         "SpTime": now_s()}]}]}})
    .to_string();
    let ts = spec.now_ts();
    let base = |plaintext: &str, envelope: fn(&Wx, &str) -> Vec<u8>| {
        let enc = spec.encrypt(plaintext.as_bytes());
        Base {
            req: spec.signed("POST", envelope(&spec, &enc), &enc, &ts),
            enc,
            plaintext: plaintext.as_bytes().to_vec(),
            effectful: true,
        }
    };
    let mut bases = vec![
        base(&approved, wecom_xml_envelope),
        base(&approved, wecom_json_envelope),
        base(&unknown, wecom_xml_envelope),
    ];
    // The GET URL check last (`targeted` relies on it).
    let echo = spec.encrypt(b"1234567890123456789");
    let mut get = spec.signed("GET", Vec::new(), &echo, &ts);
    get.query = format!("{}&echostr={}", get.query, percent_encode(&echo));
    bases.push(Base {
        req: get,
        enc: echo,
        plaintext: Vec::new(),
        effectful: false,
    });
    (sim, spec, h, bases)
}

/// An app as the plugin is configured with it, from the JSON mapping engines use.
fn im_app(app: Value) -> ImApp {
    use imbridge_host::json::Json;
    ImApp::from_json(&app, "app").expect("app")
}

// ---- the runner ----

async fn harness(base_url: &str) -> Harness {
    Harness::new(
        &[TENANT],
        &[base_url.trim_start_matches("http://").to_string()],
    )
    .await
    .expect("harness")
}

fn app_json(app: &ImApp) -> Value {
    use imbridge_host::json::Json;
    app.to_json()
}

async fn start(h: &Harness, spec: &dyn Spec, request: Value) -> String {
    let r = h
        .invoke(
            TENANT,
            "start-approval",
            json!({"app": app_json(&spec.app()), "request": request}),
        )
        .await;
    ok(&r)["instance_id"].as_str().expect("id").to_string()
}

type Dump = Vec<(String, Vec<u8>)>;

/// Puts the tenant's store back to `baseline` (after an authentic push was accepted).
fn restore(h: &Harness, baseline: &Dump) {
    let now: BTreeMap<String, Vec<u8>> = h.kv_dump(TENANT).into_iter().collect();
    let base: BTreeMap<String, Vec<u8>> = baseline.iter().cloned().collect();
    let mut writes: Vec<(String, Option<Vec<u8>>)> = now
        .keys()
        .filter(|k| !base.contains_key(*k))
        .map(|k| (k.clone(), None))
        .collect();
    for (k, v) in &base {
        if now.get(k) != Some(v) {
            writes.push((k.clone(), Some(v.clone())));
        }
    }
    h.host.store().put(TENANT, writes).expect("restore");
    assert_eq!(&h.kv_dump(TENANT), baseline);
}

async fn run(
    h: &Harness,
    app: &ImApp,
    baseline: &Dump,
    n: usize,
    case: Case,
    counts: &mut BTreeMap<String, usize>,
) {
    let Case { class, req, expect } = case;
    let what = format!("case {n} ({class}, {} byte body)", req.body.len());
    let query = req.query.clone();
    let reply = h
        .host
        .handle_callback(TENANT, app.clone(), req)
        .await
        .unwrap_or_else(|e| panic!("{what}: the host call failed (trap?): {e:#}"));
    let Reply::Callback(result) = reply else {
        panic!("{what}: not a callback reply")
    };
    let changed = h.kv_dump(TENANT) != *baseline;
    let outcome = match &result {
        Ok(out) => {
            let status = out.response.status;
            assert!(
                (200..300).contains(&status),
                "{what}: ok with HTTP {status}"
            );
            if changed {
                "ok, state changed"
            } else {
                "ok, nothing changed"
            }
        }
        Err(e) => {
            let kind = e.kind();
            assert!(
                matches!(kind, "unauthorized" | "invalid-input"),
                "{what}: unexpected error kind {kind}: {}",
                e.message()
            );
            assert!(
                !changed,
                "{what}: an error ({kind}: {}) changed state",
                e.message()
            );
            if kind == "unauthorized" {
                "err unauthorized"
            } else {
                "err invalid-input"
            }
        }
    };
    match expect {
        Expect::Reject => assert!(
            result.is_err(),
            "{what}: a forged or malformed push was accepted"
        ),
        Expect::Forged => assert_eq!(
            result.as_ref().err().map(|e| e.kind()),
            Some("unauthorized"),
            "{what}: a push with a wrong signature, timestamp or nonce: {:?} {:?}",
            result.as_ref().err().map(|e| e.message().to_string()),
            query
        ),
        Expect::NoChange => assert!(!changed, "{what}: state changed"),
        Expect::Accept => assert!(
            result.is_ok(),
            "{what}: an authentic push was refused: {:?}",
            result.err().map(|e| e.message().to_string())
        ),
        Expect::Either => {}
    }
    if changed {
        restore(h, baseline);
    }
    *counts.entry(outcome.to_string()).or_default() += 1;
    *counts.entry(format!("  {class}: {outcome}")).or_default() += 1;
}

/// Runs the unmodified bases, the targeted cases and `N_RANDOM` mutations; checks the approval
/// survived and prints the counts per outcome.
async fn suite(spec: &dyn Spec, h: &Harness, bases: &[Base], seed: u64) {
    let app = spec.app();
    let baseline = h.kv_dump(TENANT);
    let t0 = Instant::now();
    let mut counts = BTreeMap::new();
    let mut n = 0;
    let mut cases: Vec<Case> = bases
        .iter()
        .map(|b| Case {
            class: "unmodified push",
            req: b.req.clone(),
            expect: if b.effectful {
                Expect::Accept
            } else {
                Expect::NoChange
            },
        })
        .collect();
    cases.extend(common_targeted(spec, bases));
    cases.extend(spec.targeted(bases));
    for case in cases {
        run(h, &app, &baseline, n, case, &mut counts).await;
        n += 1;
    }
    let mut rng = Rng(seed);
    for _ in 0..N_RANDOM {
        let case = mutate(spec, &mut rng, bases);
        run(h, &app, &baseline, n, case, &mut counts).await;
        n += 1;
    }
    assert_eq!(
        h.kv_dump(TENANT),
        baseline,
        "the state survived every mutation"
    );
    // Every outcome class was reached: authentic pushes were accepted, forgeries refused.
    for outcome in ["ok, state changed", "err unauthorized", "err invalid-input"] {
        assert!(counts.contains_key(outcome), "no case ended in {outcome}");
    }
    eprintln!(
        "{}: {n} callbacks in {:.1}s",
        spec.name(),
        t0.elapsed().as_secs_f64()
    );
    for (k, v) in &counts {
        eprintln!("  {k}: {v}");
    }
}

/// Signed pushes whose ciphertext fails in different ways all get the same answer, so the
/// answer says nothing about the plaintext (no padding oracle).
async fn no_padding_oracle(spec: &dyn Spec, h: &Harness, bases: &[Base]) {
    let app = spec.app();
    let before = h.kv_dump(TENANT);
    let mut answers = Vec::new();
    for (what, enc) in spec.corrupt_ciphertexts(&bases[0]) {
        let req = spec.signed("POST", spec.envelope(&enc), &enc, &spec.now_ts());
        let Reply::Callback(result) = h
            .host
            .handle_callback(TENANT, app.clone(), req)
            .await
            .expect("host")
        else {
            panic!("not a callback reply")
        };
        let e = result.expect_err(what);
        answers.push((what, e.kind().to_string(), e.message().to_string()));
    }
    assert_eq!(h.kv_dump(TENANT), before);
    let (_, kind, message) = &answers[0];
    for (what, k, m) in &answers {
        assert_eq!(
            (k, m),
            (kind, message),
            "{}: {what} is distinguishable: {answers:?}",
            spec.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_feishu_callbacks_never_trap_and_never_change_state() {
    let (_sim, spec, h, bases) = feishu_world().await;
    suite(&spec, &h, &bases, 0x1b2d_3c4e_5f60_7182).await;
    no_padding_oracle(&spec, &h, &bases).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_dingtalk_callbacks_never_trap_and_never_change_state() {
    let (_sim, spec, h, bases) = dingtalk_world().await;
    suite(&spec, &h, &bases, 0x2c3d_4e5f_6071_8293).await;
    no_padding_oracle(&spec, &h, &bases).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_wecom_callbacks_never_trap_and_never_change_state() {
    let (_sim, spec, h, bases) = wecom_world().await;
    suite(&spec, &h, &bases, 0x3d4e_5f60_7182_93a4).await;
    no_padding_oracle(&spec, &h, &bases).await;
}

/// The app's `max_clock_skew_secs` is the window for all three platforms: a push signed 120 s
/// ago is fine by the default 600 s, refused with a 60 s window, and a push 30 s old is
/// accepted by it. Once through the typed call, once through the JSON mapping (`invoke`).
#[tokio::test(flavor = "multi_thread")]
async fn the_timestamp_window_is_configurable_per_app() {
    let (_f, feishu, hf, bf) = feishu_world().await;
    let (_d, dingtalk, hd, bd) = dingtalk_world().await;
    let (_w, wecom, hw, bw) = wecom_world().await;
    let worlds: [(&dyn Spec, &Harness, &Vec<Base>); 3] = [
        (&feishu, &hf, &bf),
        (&dingtalk, &hd, &bd),
        (&wecom, &hw, &bw),
    ];
    for (spec, h, bases) in worlds {
        let base = &bases[0];
        let at = |ago: u64| ((now_s() - ago) * spec.ts_units()).to_string();
        let push = |ago: u64| spec.signed("POST", base.req.body.clone(), &base.enc, &at(ago));
        let call = |window: Option<u32>, req: HttpRequest| async move {
            let mut app = spec.app();
            app.max_clock_skew_secs = window;
            match h
                .host
                .handle_callback(TENANT, app, req)
                .await
                .expect("host")
            {
                Reply::Callback(r) => r.map(|_| ()).map_err(|e| e.kind().to_string()),
                _ => panic!("not a callback reply"),
            }
        };
        let baseline = h.kv_dump(TENANT);
        assert_eq!(
            call(Some(60), push(120)).await,
            Err("unauthorized".into()),
            "{}",
            spec.name()
        );
        assert_eq!(h.kv_dump(TENANT), baseline);
        assert_eq!(call(Some(60), push(30)).await, Ok(()), "{}", spec.name());
        restore(h, &baseline);
        assert_eq!(call(None, push(120)).await, Ok(()), "{}", spec.name());
        restore(h, &baseline);
        assert_eq!(
            call(Some(3600), push(1800)).await,
            Ok(()),
            "{}",
            spec.name()
        );
        restore(h, &baseline);

        // The same through the JSON mapping `invoke` and `serve` use.
        let mut app = app_json(&spec.app());
        app["max_clock_skew_secs"] = json!(60);
        let req = push(120);
        let request = json!({
            "method": req.method, "path": req.path, "query": req.query,
            "headers": req.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "body": String::from_utf8(req.body.clone()).expect("UTF-8 push"),
        });
        let r = h
            .invoke(
                TENANT,
                "handle-callback",
                json!({"app": app, "request": request}),
            )
            .await;
        assert_eq!(r["err"]["kind"], "unauthorized", "{}: {r}", spec.name());
        assert_eq!(h.kv_dump(TENANT), baseline);
    }
}
