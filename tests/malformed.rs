//! Malformed-input suite: thousands of deterministic mutations of real, signed Feishu pushes
//! through the built component in the reference host.
//!
//! For every request: the host call succeeds (the instance never traps), the reply is a typed
//! `unauthorized` / `invalid-input` error or an `ok` with a 2xx response, and the stored state
//! is unchanged — unless the mutation left the push authentic (an oracle re-checks the
//! signature the way the platform defines it), in which case the change is allowed and undone
//! before the next request, so every mutation starts from the same state.
//!
//! Requests go through the typed `Host::handle_callback` (what `imbridge-host serve` uses), not
//! the JSON mapping: bodies are bytes there, so invalid UTF-8 reaches the plugin unaltered.

use imbridge_host::Reply;
use imbridge_host::bindings::types::{HttpRequest, ImApp, Platform};
use imbridge_host::sim::feishu::{FeishuSim, crypto};
use imbridge_tests::{Harness, encrypted_feishu_app, feishu_sim, ok};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

const TENANT: &str = "t1";
const APP_ID: &str = "cli_fz";
const KEY: &str = "fz-encrypt-key";
const TOKEN: &str = "vt-fz";
/// Mirrors the plugin's limits (`src/callback.rs`).
const MAX_BODY: usize = 1 << 20;
const MAX_SKEW_SECS: u64 = 600;
/// Random mutations per run; plus a fixed list of targeted ones (huge bodies, deep nesting,
/// handshakes with wrong tokens).
const N_RANDOM: usize = 2_400;

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

const SIG: &str = "X-Lark-Signature";
const TS: &str = "X-Lark-Request-Timestamp";
const NONCE: &str = "X-Lark-Request-Nonce";

/// Would Feishu's signature rules accept this request? (The first of duplicate headers counts,
/// names are case-insensitive, the signature is hex in any case, the timestamp within 600 s.)
fn authentic(req: &HttpRequest) -> bool {
    let (Some(sig), Some(ts), Some(nonce)) =
        (header(req, SIG), header(req, TS), header(req, NONCE))
    else {
        return false;
    };
    req.method.eq_ignore_ascii_case("POST")
        && req.body.len() <= MAX_BODY
        && sig.trim().to_ascii_lowercase() == crypto::signature(ts, nonce, KEY, &req.body)
        && ts
            .trim()
            .parse::<u64>()
            .is_ok_and(|t| t.abs_diff(now_s()) <= MAX_SKEW_SECS)
}

/// A POST with Feishu's headers, signed over `body` at `ts`.
fn signed(body: Vec<u8>, ts: &str) -> HttpRequest {
    let nonce = "n0nce-fz";
    HttpRequest {
        method: "POST".into(),
        path: "/callback/t1/fs".into(),
        query: String::new(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            ),
            (TS.into(), ts.into()),
            (NONCE.into(), nonce.into()),
            (SIG.into(), crypto::signature(ts, nonce, KEY, &body)),
        ],
        body,
    }
}

fn signed_now(body: Vec<u8>) -> HttpRequest {
    signed(body, &now_s().to_string())
}

fn encrypted(plaintext: &[u8]) -> Vec<u8> {
    json!({"encrypt": crypto::encrypt(KEY, plaintext)})
        .to_string()
        .into_bytes()
}

/// What a case may do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Not authentic: a typed error, nothing stored.
    Reject,
    /// Not authentic, or authentic but meaningless: an error or a 2xx, nothing stored.
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

/// The pushes the mutations start from: real events for the pending approval, one for an
/// unknown instance (accepted, only a dedup mark stored) and the unsigned URL handshake.
struct Bases {
    events: Vec<(Value, HttpRequest)>,
    handshake: HttpRequest,
}

fn bases(sim: &FeishuSim, instance: &str) -> Bases {
    let push = |payload: &Value| {
        let p = sim.build_push(APP_ID, payload).expect("push");
        let req = HttpRequest {
            method: "POST".into(),
            path: "/callback/t1/fs".into(),
            query: String::new(),
            headers: p.headers,
            body: p.body,
        };
        (payload.clone(), req)
    };
    let inst = |code: &str, status: &str| {
        json!({"type": "approval_instance", "approval_code": "C", "instance_code": code,
               "status": status, "operate_time": format!("{}000", now_s())})
    };
    let task = json!({"type": "approval_task", "approval_code": "C", "instance_code": instance,
                      "task_id": "7000000000000000001", "open_id": "ou_bob", "user_id": "u_bob",
                      "status": "APPROVED", "operate_time": format!("{}000", now_s())});
    let events = vec![
        push(
            &sim.envelope_v1(APP_ID, inst(instance, "APPROVED"))
                .expect("v1"),
        ),
        push(&sim.envelope_v2(APP_ID, "approval_task", task).expect("v2")),
        push(
            &sim.envelope_v1(APP_ID, inst("NO-SUCH-INSTANCE", "REJECTED"))
                .expect("v1"),
        ),
    ];
    let hs = json!({"challenge": "ch-1", "token": TOKEN, "type": "url_verification"});
    let handshake = HttpRequest {
        method: "POST".into(),
        path: "/callback/t1/fs".into(),
        query: String::new(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: encrypted(hs.to_string().as_bytes()),
    };
    Bases { events, handshake }
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

/// Flips a bit of a header value; header values are strings, so a flip that breaks UTF-8 is
/// retried on another bit.
fn flip_header(rng: &mut Rng, req: &mut HttpRequest, name: &str) {
    let Some(slot) = req
        .headers
        .iter_mut()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
    else {
        return;
    };
    for _ in 0..16 {
        let mut b = slot.1.clone().into_bytes();
        flip_bits(rng, &mut b, 1);
        if let Ok(s) = String::from_utf8(b) {
            slot.1 = s;
            return;
        }
    }
}

/// Expectation for a mutated copy of an authentic base push.
fn judge(base: &HttpRequest, req: &HttpRequest, base_is_event: bool) -> Expect {
    if !base_is_event {
        // The handshake is unsigned: it may be answered, but never stores anything.
        Expect::NoChange
    } else if authentic(req) && req.body == base.body {
        Expect::Accept
    } else {
        Expect::Reject
    }
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

/// Replaces one field of an event envelope with a wrongly typed value; returns what must
/// happen. Fields the plugin does not need (ids for deduplication, timestamps, the approval
/// code) leave the event effective.
fn wrong_field(rng: &mut Rng, payload: &Value) -> (Value, Expect) {
    let mut p = payload.clone();
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
        "/token" | "/header/token" => Expect::Reject,
        // Without a string schema "2.0" a v2 envelope reads as v1: no top-level token.
        "/schema" => Expect::Reject,
        "/header" => Expect::Reject,
        _ => Expect::Either,
    };
    (p, expect)
}

fn nested(depth: usize, open: &str, close: &str) -> Vec<u8> {
    let mut s = open.repeat(depth);
    s.push_str(&close.repeat(depth));
    s.into_bytes()
}

/// One random mutation of one base push.
fn mutate(rng: &mut Rng, b: &Bases) -> Case {
    let pick = rng.below(b.events.len() + 1);
    let (payload, base, is_event) = match b.events.get(pick) {
        Some((p, r)) => (Some(p), r, true),
        None => (None, &b.handshake, false),
    };
    let mut req = base.clone();
    let kind = rng.below(18);
    let class = match kind {
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
        2 => {
            flip_header(rng, &mut req, SIG);
            "bit flip in signature"
        }
        3 => {
            flip_header(rng, &mut req, TS);
            "bit flip in timestamp"
        }
        4 => {
            flip_header(rng, &mut req, NONCE);
            "bit flip in nonce"
        }
        5 => {
            let name = [SIG, TS, NONCE][rng.below(3)];
            req.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            "missing signing header"
        }
        6 => {
            for (k, _) in req.headers.iter_mut() {
                *k = k
                    .chars()
                    .map(|c| {
                        if rng.below(2) == 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect();
            }
            "header name case"
        }
        7 => {
            let name = [SIG, TS, NONCE][rng.below(3)];
            let junk = (String::from(name).to_lowercase(), "0".repeat(rng.below(80)));
            if rng.below(2) == 0 {
                req.headers.insert(0, junk);
            } else {
                req.headers.push(junk);
            }
            "duplicate signing header"
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
                let name = ["X-Junk", "", "Content-Length", "X-Lark-Request-Id", "é"][rng.below(5)];
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
            for _ in 0..1 + rng.below(3) {
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
            // Re-signed, so only the content is wrong.
            let mut body = req.body.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(body.len());
                body[i] = 0x80 | rng.next() as u8;
            }
            return Case {
                class: "signed invalid UTF-8 body",
                req: signed_now(body),
                expect: Expect::Reject,
            };
        }
        13 => {
            let bodies: [&[u8]; 6] = [
                b"",
                b"not json",
                b"<xml><encrypt>x</encrypt></xml>",
                b"encrypt=abc",
                b"{\"encrypt\":",
                b"\xef\xbb\xbf{}",
            ];
            let body = if rng.below(3) == 0 {
                let n = rng.below(300);
                rng.bytes(n)
            } else {
                bodies[rng.below(bodies.len())].to_vec()
            };
            return Case {
                class: "signed non-JSON body",
                req: signed_now(body),
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
            return Case {
                class: "signed JSON of wrong types",
                req: signed_now(body.to_string().into_bytes()),
                expect: Expect::Reject,
            };
        }
        15 => {
            let Some(p) = payload else {
                return Case {
                    class: "handshake replayed",
                    req,
                    expect: Expect::NoChange,
                };
            };
            let (p, expect) = wrong_field(rng, p);
            return Case {
                class: "event field of wrong type",
                req: signed_now(encrypted(p.to_string().as_bytes())),
                expect,
            };
        }
        16 => {
            // The ciphertext is corrupted but the signature is recomputed: the plugin decrypts
            // authentic garbage. A flip in the first block can still yield valid JSON.
            let v: Value = serde_json::from_slice(&req.body).expect("base is JSON");
            let mut enc = v["encrypt"].as_str().expect("encrypt").as_bytes().to_vec();
            flip_bits(rng, &mut enc, 1);
            let body = json!({"encrypt": String::from_utf8_lossy(&enc)})
                .to_string()
                .into_bytes();
            let expect = if is_event {
                Expect::Either
            } else {
                Expect::NoChange
            };
            // The handshake is unsigned: signing it changes nothing about what it may do.
            let req = if is_event {
                signed_now(body)
            } else {
                HttpRequest { body, ..req }
            };
            return Case {
                class: "corrupted ciphertext",
                req,
                expect,
            };
        }
        _ => {
            let now = now_s();
            let (ts, ok) = match rng.below(8) {
                0 => ((now - 700).to_string(), false),
                1 => ((now + 700).to_string(), false),
                2 => ((now - 100).to_string(), true),
                3 => (format!(" {now} "), true),
                4 => ("abc".to_string(), false),
                5 => ("-5".to_string(), false),
                6 => (format!("{now}.0"), false),
                _ => ("99999999999999999999999".to_string(), false),
            };
            let req = signed(req.body.clone(), &ts);
            let expect = match (is_event, ok) {
                (false, _) => Expect::NoChange,
                (true, true) => Expect::Accept,
                (true, false) => Expect::Reject,
            };
            return Case {
                class: "re-signed timestamp",
                req,
                expect,
            };
        }
    };
    let expect = judge(base, &req, is_event);
    Case { class, req, expect }
}

/// The targeted cases: huge bodies, deep nesting, handshakes with wrong tokens.
fn targeted(b: &Bases) -> Vec<Case> {
    let mut out = Vec::new();
    let event = &b.events[0].1;
    // Over the 1 MiB limit: padding, signed and unsigned, and raw bytes.
    for extra in [1usize, 4096, 1 << 20] {
        let mut body = event.body.clone();
        body.resize(MAX_BODY + extra, b' ');
        out.push(Case {
            class: "huge body (signed)",
            req: signed_now(body.clone()),
            expect: Expect::Reject,
        });
        out.push(Case {
            class: "huge body",
            req: HttpRequest {
                body,
                ..event.clone()
            },
            expect: Expect::Reject,
        });
    }
    let mut rng = Rng(7);
    out.push(Case {
        class: "huge body",
        req: signed_now(rng.bytes(MAX_BODY + 1)),
        expect: Expect::Reject,
    });
    // Just under the limit, still JSON: refused for what it is, not for its size.
    let mut padded = event.body.clone();
    padded.splice(1..1, std::iter::repeat_n(b' ', MAX_BODY - event.body.len()));
    out.push(Case {
        class: "body at the limit",
        req: signed_now(padded),
        expect: Expect::Accept,
    });
    // Deep nesting: serde_json's recursion limit (128) must turn this into an error, not a
    // stack overflow in the guest — in the outer body and in the decrypted plaintext.
    for depth in [127usize, 129, 1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let doc = nested(depth, open, close);
            out.push(Case {
                class: "deeply nested JSON (outer)",
                req: signed_now(doc.clone()),
                expect: Expect::Reject,
            });
            out.push(Case {
                class: "deeply nested JSON (encrypted)",
                req: signed_now(encrypted(&doc)),
                expect: Expect::Reject,
            });
            let mut inside =
                format!("{{\"token\":\"{TOKEN}\",\"type\":\"event_callback\",\"event\":")
                    .into_bytes();
            inside.extend_from_slice(&doc);
            inside.push(b'}');
            out.push(Case {
                class: "deeply nested JSON (event)",
                req: signed_now(encrypted(&inside)),
                expect: if depth < 128 {
                    Expect::NoChange
                } else {
                    Expect::Reject
                },
            });
        }
    }
    // URL handshakes with the wrong token, or none, or no challenge.
    let hs = |token: Value, challenge: Value| {
        json!({"challenge": challenge, "token": token, "type": "url_verification"})
            .to_string()
            .into_bytes()
    };
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
        let body = encrypted(&hs(t.clone(), json!("c")));
        out.push(Case {
            class: "handshake with a wrong token",
            req: HttpRequest {
                body: body.clone(),
                ..b.handshake.clone()
            },
            expect: Expect::Reject,
        });
        out.push(Case {
            class: "handshake with a wrong token",
            req: signed_now(body),
            expect: Expect::Reject,
        });
        out.push(Case {
            class: "handshake in plaintext",
            req: HttpRequest {
                body: hs(t, json!("c")),
                ..b.handshake.clone()
            },
            expect: Expect::Reject,
        });
    }
    for c in [Value::Null, json!(5), json!(["c"])] {
        let body = encrypted(&hs(json!(TOKEN), c));
        out.push(Case {
            class: "handshake without a challenge",
            req: HttpRequest {
                body,
                ..b.handshake.clone()
            },
            expect: Expect::Reject,
        });
    }
    out.push(Case {
        class: "handshake in plaintext",
        req: HttpRequest {
            body: hs(json!(TOKEN), json!("c")),
            ..b.handshake.clone()
        },
        expect: Expect::Reject,
    });
    out
}

fn app(base: &str) -> ImApp {
    ImApp {
        id: "fs".into(),
        platform: Platform::Feishu,
        app_id: APP_ID.into(),
        app_secret: "fz-secret".into(),
        agent_id: None,
        encrypt_key: Some(KEY.into()),
        token: Some(TOKEN.into()),
        api_base: Some(base.into()),
    }
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
    h.host.store().commit(TENANT, writes).expect("restore");
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
        Expect::Reject => {
            assert!(
                result.is_err(),
                "{what}: a forged or malformed push was accepted"
            );
        }
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

#[tokio::test(flavor = "multi_thread")]
async fn mutated_feishu_callbacks_never_trap_and_never_change_state() {
    let sim = feishu_sim(
        encrypted_feishu_app(APP_ID, "fz-secret", KEY, TOKEN),
        &["alice", "bob"],
    )
    .await;
    let base_url = sim.base_url();
    let h = Harness::new(
        &[TENANT],
        &[base_url.trim_start_matches("http://").to_string()],
    )
    .await
    .expect("harness");
    let app_json = json!({
        "id": "fs", "platform": "feishu", "app_id": APP_ID, "app_secret": "fz-secret",
        "encrypt_key": KEY, "token": TOKEN, "api_base": base_url,
    });
    let started = h
        .invoke(
            TENANT,
            "start-approval",
            json!({"app": app_json, "request": {
                "key": "wf-1", "title": "Deploy?", "initiator": {"id": "ou_alice"},
                "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}],
            }}),
        )
        .await;
    let instance = ok(&started)["instance_id"]
        .as_str()
        .expect("id")
        .to_string();
    let app = app(&base_url);
    let baseline = h.kv_dump(TENANT);
    let b = bases(&sim, &instance);

    let t0 = Instant::now();
    let mut counts = BTreeMap::new();
    let mut n = 0;
    // The unmodified pushes first: they must be accepted (the mutations start from valid).
    for (_, req) in &b.events {
        let case = Case {
            class: "unmodified push",
            req: req.clone(),
            expect: Expect::Accept,
        };
        run(&h, &app, &baseline, n, case, &mut counts).await;
        n += 1;
    }
    for case in targeted(&b) {
        run(&h, &app, &baseline, n, case, &mut counts).await;
        n += 1;
    }
    let mut rng = Rng(0x1b2d_3c4e_5f60_7182);
    for _ in 0..N_RANDOM {
        let case = mutate(&mut rng, &b);
        run(&h, &app, &baseline, n, case, &mut counts).await;
        n += 1;
    }
    let status = h
        .invoke(
            TENANT,
            "get-approval",
            json!({"app": app_json, "instance_id": instance, "refresh": false}),
        )
        .await;
    assert_eq!(
        ok(&status)["status"],
        "pending",
        "the approval survived every mutation"
    );
    eprintln!(
        "feishu: {n} callbacks in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    for (k, v) in &counts {
        eprintln!("  {k}: {v}");
    }
}
