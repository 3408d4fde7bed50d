//! A Feishu / Lark open platform simulator.
//!
//! Speaks the open-apis wire formats the component uses (tenant token, approval v4 definitions,
//! subscriptions and instances, contact batch_get_id, im v1 messages, custom bot webhooks) and
//! plays the platform's side of event delivery: approver decisions produce the `approval_task` /
//! `approval_instance` events Feishu sends, encrypted with the app's Encrypt Key, signed with
//! `X-Lark-Signature`, POSTed to the app's callback URL and retried on failure.
//!
//! Simplifications (documented so tests do not rely on them): one user directory shared by all
//! apps (real open_ids differ per app); approvers must be "Free" (chosen by the initiator);
//! resources are isolated per tenant (`FeishuApp::tenant_key`), not per app.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use rand::Rng;
use serde_json::{Value, json};

use super::http::{self, Reply, Request, Response, Shared, Sim};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Which envelope approval events are delivered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventSchema {
    /// `{uuid, token, ts, type: "event_callback", event}`: what Feishu really uses for the
    /// approval events.
    #[default]
    V1,
    /// `{schema: "2.0", header, event}`: Feishu uses it for newer events; offered so the v2
    /// parsing path can be exercised with approval payloads too.
    V2,
}

/// What a second `instances` create with an already used `uuid` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UuidReplay {
    /// Code 60012, as the API reference states ("the same uuid can only create one instance; on
    /// conflict error 60012 is returned"). The instance stays readable by GET with the uuid.
    #[default]
    Conflict,
    /// The first instance's code again (the approval FAQ says duplicate submits "only update").
    ReturnExisting,
}

/// One self-built app.
#[derive(Debug, Clone)]
pub struct FeishuApp {
    pub app_id: String,
    pub app_secret: String,
    /// Encrypt Key: when set, pushes are encrypted and signed.
    pub encrypt_key: Option<String>,
    /// Verification Token, carried in every pushed event.
    pub verification_token: String,
    /// Request URL events are pushed to (can be changed later with
    /// [`FeishuSim::set_callback_url`]).
    pub callback_url: Option<String>,
    pub schema: EventSchema,
    /// Tenant the app is installed in; definitions and instances are only visible to apps of
    /// the same tenant.
    pub tenant_key: String,
}

impl FeishuApp {
    /// An app with no Encrypt Key, a derived verification token and its own tenant.
    pub fn new(app_id: &str, app_secret: &str) -> Self {
        FeishuApp {
            app_id: app_id.into(),
            app_secret: app_secret.into(),
            encrypt_key: None,
            verification_token: format!("vt-{app_id}"),
            callback_url: None,
            schema: EventSchema::V1,
            tenant_key: format!("tenant-{app_id}"),
        }
    }
}

/// A directory user.
#[derive(Debug, Clone, Default)]
pub struct FeishuUser {
    pub open_id: String,
    pub user_id: String,
    pub union_id: Option<String>,
    pub email: Option<String>,
    pub mobile: Option<String>,
    pub name: String,
}

impl FeishuUser {
    /// `ou_<name>` / `u_<name>` ids with `<name>@example.com`.
    pub fn new(name: &str) -> Self {
        FeishuUser {
            open_id: format!("ou_{name}"),
            user_id: format!("u_{name}"),
            union_id: Some(format!("on_{name}")),
            email: Some(format!("{name}@example.com")),
            mobile: None,
            name: name.into(),
        }
    }
}

/// A custom (group) bot webhook `/open-apis/bot/v2/hook/{token}`.
#[derive(Debug, Clone, Default)]
pub struct BotHook {
    pub token: String,
    /// Signature secret; when set, `timestamp` + `sign` are required in the body.
    pub secret: Option<String>,
    /// Custom keywords; when non-empty a message must contain one of them.
    pub keywords: Vec<String>,
}

/// Everything the simulator is started with.
#[derive(Debug, Clone)]
pub struct FeishuConfig {
    pub apps: Vec<FeishuApp>,
    pub users: Vec<FeishuUser>,
    /// Group chat ids (`oc_…`) the apps' bots are members of.
    pub chats: Vec<String>,
    pub hooks: Vec<BotHook>,
    /// Lifetime of tenant tokens (Feishu: 2 h).
    pub token_ttl: Duration,
    /// Delays between push attempts after a non-200 reply (Feishu: 15 s, 5 min, 1 h, 6 h;
    /// shortened so tests stay fast). The number of entries is the number of retries.
    pub retry_delays: Vec<Duration>,
    /// How long a push waits for the reply (Feishu expects one within 3 s).
    pub push_timeout: Duration,
    /// Accepted age of a bot webhook `timestamp` (Feishu: one hour).
    pub bot_max_skew: Duration,
    pub uuid_replay: UuidReplay,
}

impl Default for FeishuConfig {
    fn default() -> Self {
        FeishuConfig {
            apps: Vec::new(),
            users: Vec::new(),
            chats: Vec::new(),
            hooks: Vec::new(),
            token_ttl: Duration::from_secs(7200),
            retry_delays: vec![
                Duration::from_millis(20),
                Duration::from_millis(50),
                Duration::from_millis(100),
                Duration::from_millis(200),
            ],
            push_timeout: Duration::from_secs(3),
            bot_max_skew: Duration::from_secs(3600),
            uuid_replay: UuidReplay::Conflict,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inspectable state
// ---------------------------------------------------------------------------------------------

/// A request that reached the simulator's handler (an injected fault answers before it, so
/// faulted requests are not recorded).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Path with ids replaced by placeholders, e.g.
    /// `POST /open-apis/approval/v4/approvals/{approval_code}/subscribe`.
    pub route: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An approval node of a definition.
#[derive(Debug, Clone)]
pub struct DefinitionNode {
    /// The custom id the client gave (`START`, `END`, or its own key).
    pub id: String,
    /// Platform-generated node id (also accepted as a key in approver lists).
    pub node_id: String,
    pub name: String,
    /// `AND` / `OR` for approval nodes, empty for START/END.
    pub node_type: String,
    /// `approver_chosen_multi`: whether the initiator may choose more than one approver.
    pub multi: bool,
}

/// An approval definition.
#[derive(Debug, Clone)]
pub struct Definition {
    pub approval_code: String,
    pub tenant_key: String,
    pub approval_name: String,
    pub form_content: String,
    pub nodes: Vec<DefinitionNode>,
    /// The apps that subscribed to it: Feishu sends a definition's events only to those.
    pub subscribers: Vec<String>,
}

/// One approver's task.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    /// The definition node's custom id.
    pub node_key: String,
    pub node_id: String,
    pub node_name: String,
    /// `AND` / `OR`.
    pub mode: String,
    pub open_id: String,
    pub user_id: String,
    /// `PENDING` / `APPROVED` / `REJECTED` / `DONE`.
    pub status: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// An approval instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub instance_code: String,
    pub approval_code: String,
    pub tenant_key: String,
    pub uuid: Option<String>,
    pub open_id: String,
    pub user_id: String,
    pub form: String,
    /// `PENDING` / `APPROVED` / `REJECTED` / `CANCELED` / `DELETED`.
    pub status: String,
    /// Approver open_ids per approval node, in definition order.
    pub node_approvers: Vec<(DefinitionNode, Vec<String>)>,
    /// The title's text in the default locale, when the create gave one.
    pub title: Option<String>,
    pub cc: Vec<String>,
    /// Index into `node_approvers` of the node being decided.
    pub current_node: usize,
    pub tasks: Vec<Task>,
    pub timeline: Vec<Value>,
    pub comments: Vec<Value>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub serial_number: String,
    fingerprint: String,
}

/// An `im/v1/messages` message.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub app_id: String,
    pub message_id: String,
    pub receive_id_type: String,
    pub receive_id: String,
    pub msg_type: String,
    /// The `content` string exactly as sent (itself JSON).
    pub content: String,
    /// The request's `uuid`, if it had one: Feishu sends at most one message per uuid within
    /// an hour and answers a repeat with that message.
    pub uuid: Option<String>,
    pub chat_id: String,
    pub create_ms: u64,
}

/// How long Feishu remembers a message's `uuid`.
const MESSAGE_UUID_KEPT_MS: u64 = 3_600_000;

/// A custom bot webhook message (accepted or not).
#[derive(Debug, Clone)]
pub struct BotMessage {
    pub hook_token: String,
    pub body: Value,
    /// 0 when accepted, else the Feishu code returned.
    pub code: i64,
}

/// An event the platform generated.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub app_id: String,
    /// Full plaintext envelope (v1 or v2).
    pub payload: Value,
    /// False when the app had not subscribed to the definition, so Feishu would not have sent it.
    pub delivered_to_outbox: bool,
}

/// The simulator's state; read it through [`FeishuSim::state`].
#[derive(Debug, Default)]
pub struct FeishuState {
    pub requests: Vec<RecordedRequest>,
    pub definitions: BTreeMap<String, Definition>,
    pub instances: BTreeMap<String, Instance>,
    pub messages: Vec<SentMessage>,
    pub bot_messages: Vec<BotMessage>,
    pub events: Vec<EventRecord>,
    /// Events waiting for [`FeishuSim::flush_events`]: `(app_id, envelope)`.
    pub outbox: VecDeque<(String, Value)>,
    pub callback_urls: HashMap<String, String>,
    /// Apps whose events go to a persistent-connection simulator instead of a callback URL.
    event_sinks: HashMap<String, super::ws_hub::EventSink>,
    tokens: HashMap<String, IssuedToken>,
}

impl FeishuState {
    /// How many requests matched `route` (see [`RecordedRequest::route`]).
    pub fn calls(&self, route: &str) -> usize {
        self.requests.iter().filter(|r| r.route == route).count()
    }
}

#[derive(Debug, Clone)]
struct IssuedToken {
    app_id: String,
    expires_ms: u64,
}

/// A fully built push, byte for byte what goes on the wire.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The JSON before encryption (equal to `body` when the app has no Encrypt Key).
    pub plaintext: String,
}

/// What happened to one push, including retries.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub url: String,
    pub request: PushRequest,
    /// One entry per attempt, in order.
    pub attempts: Vec<Reply>,
    /// True when an attempt got HTTP 200.
    pub delivered: bool,
}

/// Outcome of [`FeishuSim::url_verification`].
#[derive(Debug, Clone)]
pub struct VerificationReport {
    pub challenge: String,
    pub request: PushRequest,
    pub reply: Reply,
    /// True when the reply was HTTP 200 with JSON `{"challenge": <the same challenge>}`.
    pub echoed: bool,
}

/// Outcome of [`FeishuSim::decide`].
#[derive(Debug, Clone)]
pub struct Decision {
    /// Events the decision produced (plaintext envelopes).
    pub events: Vec<Value>,
    /// Deliveries made by the call: earlier queued events first, then these.
    pub reports: Vec<PushReport>,
}

// ---------------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------------

type Inner = Shared<FeishuConfig, FeishuState>;

impl Inner {
    fn app(&self, app_id: &str) -> anyhow::Result<&FeishuApp> {
        self.config
            .apps
            .iter()
            .find(|a| a.app_id == app_id)
            .ok_or_else(|| anyhow!("unknown app {app_id}"))
    }
}

/// A running Feishu simulator on 127.0.0.1; stops when dropped. Its `base_url` is the app's
/// `api-base`; bot webhooks live at `{base_url}/open-apis/bot/v2/hook/{token}`.
pub type FeishuSim = Sim<FeishuConfig, FeishuState>;

impl FeishuSim {
    /// Starts the simulator on an ephemeral loopback port.
    pub async fn start(config: FeishuConfig) -> anyhow::Result<FeishuSim> {
        let mut state = FeishuState::default();
        for app in &config.apps {
            if let Some(url) = &app.callback_url {
                state.callback_urls.insert(app.app_id.clone(), url.clone());
            }
        }
        Sim::launch("Feishu", config, state, handle).await
    }

    /// Shorthand for `state().calls(route)`.
    pub fn calls(&self, route: &str) -> usize {
        self.inner.lock().calls(route)
    }

    /// Sets (or clears) the app's event Request URL.
    pub fn set_callback_url(&self, app_id: &str, url: Option<&str>) {
        let mut state = self.inner.lock();
        match url {
            Some(u) => state.callback_urls.insert(app_id.into(), u.into()),
            None => state.callback_urls.remove(app_id),
        };
    }

    /// Sends the app's events to `sink` (a persistent-connection simulator) instead of its
    /// callback URL; `None` goes back to the URL.
    pub fn set_event_sink(&self, app_id: &str, sink: Option<super::ws_hub::EventSink>) {
        let mut state = self.inner.lock();
        match sink {
            Some(s) => state.event_sinks.insert(app_id.into(), s),
            None => state.event_sinks.remove(app_id),
        };
    }

    /// Makes every issued tenant token invalid, as if they had all expired.
    pub fn expire_all_tokens(&self) {
        for t in self.inner.lock().tokens.values_mut() {
            t.expires_ms = 0;
        }
    }

    /// The next `n` requests to `path` (exact, no query) get HTTP `status` with Feishu body
    /// `{"code": code, "msg": msg}` and change nothing. HTTP 429 also carries the
    /// `x-ogw-ratelimit-*` headers Feishu adds on rate limiting (code 99991400).
    pub fn fail_next(&self, path: &str, n: usize, status: u16, code: i64, msg: &str) {
        let mut response = Response::json(status, &json!({"code": code, "msg": msg}));
        if status == 429 {
            response = response
                .with_header("x-ogw-ratelimit-limit", "100")
                .with_header("x-ogw-ratelimit-reset", "1");
        }
        self.faults().fail_next(path, n, response);
    }

    /// An approver acts on their pending task: AND nodes need every approver, OR nodes the
    /// first one; a rejection ends the instance. Queues the events Feishu sends and delivers
    /// everything queued to the app's callback URL (when one is set).
    pub async fn decide(
        &self,
        instance_code: &str,
        approver_open_id: &str,
        approve: bool,
        comment: Option<&str>,
    ) -> anyhow::Result<Decision> {
        let events = {
            let mut state = self.inner.lock();
            decide_locked(
                &self.inner,
                &mut state,
                instance_code,
                approver_open_id,
                approve,
                comment,
            )?
        };
        let reports = self.flush_events().await;
        Ok(Decision { events, reports })
    }

    /// The initiator (or an admin) withdraws a pending instance outside the API, e.g. in the
    /// Feishu client: status CANCELED, remaining tasks DONE, events queued and delivered.
    pub async fn withdraw(&self, instance_code: &str) -> anyhow::Result<Vec<PushReport>> {
        {
            let mut state = self.inner.lock();
            cancel_locked(&self.inner, &mut state, instance_code)?;
        }
        Ok(self.flush_events().await)
    }

    /// Delivers every queued event (instance creation, cancellation, decisions) to its app's
    /// callback URL, in order. Events of apps without a URL are dropped, as Feishu would.
    pub async fn flush_events(&self) -> Vec<PushReport> {
        let mut reports = Vec::new();
        loop {
            let next = {
                let mut state = self.inner.lock();
                state.outbox.pop_front().map(|(app_id, payload)| {
                    let url = state.callback_urls.get(&app_id).cloned();
                    let sink = state.event_sinks.get(&app_id).cloned();
                    (app_id, payload, url, sink)
                })
            };
            let Some((app_id, payload, url, sink)) = next else {
                break;
            };
            if let Some(sink) = sink {
                sink.send(payload);
                continue;
            }
            let Some(url) = url else { continue };
            if let Ok(report) = self.push_json(&app_id, &url, &payload).await {
                reports.push(report);
            }
        }
        reports
    }

    /// Wraps `event` in a v1 envelope for the app (`uuid`, `token`, `ts`,
    /// `type: "event_callback"`).
    pub fn envelope_v1(&self, app_id: &str, event: Value) -> anyhow::Result<Value> {
        Ok(envelope_v1(self.inner.app(app_id)?, event))
    }

    /// Wraps `event` in a v2 envelope for the app (`schema: "2.0"`, `header{event_id,
    /// event_type, create_time, token, app_id, tenant_key}`).
    pub fn envelope_v2(
        &self,
        app_id: &str,
        event_type: &str,
        event: Value,
    ) -> anyhow::Result<Value> {
        Ok(envelope_v2(self.inner.app(app_id)?, event_type, event))
    }

    /// Builds the exact request Feishu would send for `payload`: encrypted and signed when the
    /// app has an Encrypt Key, plain JSON otherwise. Useful to tamper with in negative tests.
    pub fn build_push(&self, app_id: &str, payload: &Value) -> anyhow::Result<PushRequest> {
        Ok(build_push(self.inner.app(app_id)?, payload, true))
    }

    /// Builds, sends and (on non-200) retries a push of any event envelope, e.g. an
    /// `im.message.receive_v1` the plugin must acknowledge and ignore.
    pub async fn push_json(
        &self,
        app_id: &str,
        url: &str,
        payload: &Value,
    ) -> anyhow::Result<PushReport> {
        let request = self.build_push(app_id, payload)?;
        Ok(self.send(url, request).await)
    }

    /// Sends a prepared request with Feishu's retry behaviour (same bytes every attempt).
    pub async fn send(&self, url: &str, request: PushRequest) -> PushReport {
        let config = &self.inner.config;
        let (attempts, delivered) = http::deliver(
            url,
            &request.headers,
            &request.body,
            &config.retry_delays,
            config.push_timeout,
            |reply| reply.status == Some(200),
        )
        .await;
        PushReport {
            url: url.into(),
            request,
            attempts,
            delivered,
        }
    }

    /// Sends the Request URL handshake (`type: "url_verification"`, encrypted when the app has
    /// an Encrypt Key, never signed) once, and checks the reply echoes the challenge.
    pub async fn url_verification(
        &self,
        app_id: &str,
        url: &str,
    ) -> anyhow::Result<VerificationReport> {
        let app = self.inner.app(app_id)?;
        let challenge = uuid_like();
        let payload = json!({
            "challenge": challenge,
            "token": app.verification_token,
            "type": "url_verification",
        });
        let request = build_push(app, &payload, false);
        let reply = http::post(
            url,
            &request.headers,
            request.body.clone(),
            self.inner.config.push_timeout,
        )
        .await;
        let echoed = reply.status == Some(200)
            && serde_json::from_slice::<Value>(&reply.body)
                .ok()
                .and_then(|v| v.get("challenge").and_then(Value::as_str).map(String::from))
                .as_deref()
                == Some(challenge.as_str());
        Ok(VerificationReport {
            challenge,
            request,
            reply,
            echoed,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Crypto (independent of the guest crate on purpose)
// ---------------------------------------------------------------------------------------------

/// Feishu event and bot-webhook cryptography.
pub mod crypto {
    use aes::Aes256;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use cbc::cipher::block_padding::Pkcs7;
    use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
    use hmac::{Hmac, Mac};
    use rand::RngCore;
    use sha2::{Digest, Sha256};

    fn key(encrypt_key: &str) -> [u8; 32] {
        Sha256::digest(encrypt_key.as_bytes()).into()
    }

    /// `base64(IV ‖ AES-256-CBC(sha256(encrypt_key), IV, PKCS#7(plaintext)))`, random IV.
    pub fn encrypt(encrypt_key: &str, plaintext: &[u8]) -> String {
        let mut iv = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut iv);
        encrypt_with_iv(encrypt_key, &iv, plaintext)
    }

    /// [`encrypt`] with a chosen IV (for known-answer tests).
    pub fn encrypt_with_iv(encrypt_key: &str, iv: &[u8; 16], plaintext: &[u8]) -> String {
        let ct = cbc::Encryptor::<Aes256>::new(&key(encrypt_key).into(), &(*iv).into())
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    /// Inverse of [`encrypt`]; `None` on bad base64, length or padding.
    pub fn decrypt(encrypt_key: &str, encrypted: &str) -> Option<Vec<u8>> {
        let raw = B64.decode(encrypted.trim()).ok()?;
        if raw.len() < 32 || raw.len() % 16 != 0 {
            return None;
        }
        let (iv, ct) = raw.split_at(16);
        cbc::Decryptor::<Aes256>::new_from_slices(&key(encrypt_key), iv)
            .ok()?
            .decrypt_padded_vec_mut::<Pkcs7>(ct)
            .ok()
    }

    /// `X-Lark-Signature`: hex(sha256(timestamp ‖ nonce ‖ encrypt_key ‖ body)).
    pub fn signature(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(timestamp.as_bytes());
        h.update(nonce.as_bytes());
        h.update(encrypt_key.as_bytes());
        h.update(body);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Custom bot `sign`: base64(HMAC-SHA256(key = `timestamp + "\n" + secret`, message = "")).
    pub fn bot_sign(timestamp: &str, secret: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = Hmac::<Sha256>::new_from_slice(format!("{timestamp}\n{secret}").as_bytes())
            .expect("HMAC takes any key length");
        B64.encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of a bot `sign`.
    pub fn bot_sign_ok(timestamp: &str, secret: &str, sign: &str) -> bool {
        let Ok(given) = B64.decode(sign) else {
            return false;
        };
        let Ok(mac) = Hmac::<Sha256>::new_from_slice(format!("{timestamp}\n{secret}").as_bytes())
        else {
            return false;
        };
        mac.verify_slice(&given).is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex32() -> String {
    let v: u128 = rand::thread_rng().r#gen();
    format!("{v:032x}")
}

/// Feishu's approval and instance codes look like upper-case UUIDs.
fn uuid_like() -> String {
    let h = hex32().to_uppercase();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn numeric_id() -> String {
    // Task ids are 19-digit numbers on the wire (as strings).
    rand::thread_rng()
        .gen_range(7_000_000_000_000_000_000u64..7_999_999_999_999_999_999u64)
        .to_string()
}

fn envelope_v1(app: &FeishuApp, event: Value) -> Value {
    let now = now_ms();
    json!({
        "uuid": hex32(),
        "token": app.verification_token,
        "ts": format!("{}.{:03}0000", now / 1000, now % 1000),
        "type": "event_callback",
        "event": event,
    })
}

fn envelope_v2(app: &FeishuApp, event_type: &str, event: Value) -> Value {
    json!({
        "schema": "2.0",
        "header": {
            "event_id": hex32(),
            "event_type": event_type,
            "create_time": now_ms().to_string(),
            "token": app.verification_token,
            "app_id": app.app_id,
            "tenant_key": app.tenant_key,
        },
        "event": event,
    })
}

fn build_push(app: &FeishuApp, payload: &Value, sign: bool) -> PushRequest {
    let plaintext = payload.to_string();
    let mut headers = vec![
        (
            "Content-Type".to_string(),
            "application/json; charset=utf-8".to_string(),
        ),
        ("X-Request-Id".to_string(), hex32()),
    ];
    let body = match &app.encrypt_key {
        Some(key) if !key.is_empty() => {
            let body = json!({"encrypt": crypto::encrypt(key, plaintext.as_bytes())})
                .to_string()
                .into_bytes();
            if sign {
                let timestamp = (now_ms() / 1000).to_string();
                let nonce = hex32();
                let signature = crypto::signature(&timestamp, &nonce, key, &body);
                headers.push(("X-Lark-Request-Timestamp".into(), timestamp));
                headers.push(("X-Lark-Request-Nonce".into(), nonce));
                headers.push(("X-Lark-Signature".into(), signature));
            }
            body
        }
        _ => plaintext.clone().into_bytes(),
    };
    PushRequest {
        headers,
        body,
        plaintext,
    }
}

/// A Feishu API error: HTTP status, code, msg.
struct ApiError(u16, i64, String);

type ApiResult = Result<Value, ApiError>;

fn bad(code: i64, msg: impl Into<String>) -> ApiError {
    ApiError(400, code, msg.into())
}

fn param_invalid(detail: &str) -> ApiError {
    bad(1390001, format!("param is invalid: {detail}"))
}

fn field_validation(detail: &str) -> ApiError {
    bad(99992402, format!("field validation failed: {detail}"))
}

fn ok(data: Value) -> Value {
    json!({"code": 0, "msg": "success", "data": data})
}

fn parse_json(req: &Request) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| bad(9499, "Bad Request"))
}

fn str_field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

fn route_of(method: &str, path: &str) -> String {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let templated: Vec<&str> = match segs.as_slice() {
        ["open-apis", "approval", "v4", "approvals", _, "subscribe"] => {
            vec![
                "open-apis",
                "approval",
                "v4",
                "approvals",
                "{approval_code}",
                "subscribe",
            ]
        }
        ["open-apis", "approval", "v4", "instances", code] if *code != "cancel" => {
            vec![
                "open-apis",
                "approval",
                "v4",
                "instances",
                "{instance_code}",
            ]
        }
        ["open-apis", "bot", "v2", "hook", _] => vec!["open-apis", "bot", "v2", "hook", "{token}"],
        _ => segs.clone(),
    };
    format!("{method} /{}", templated.join("/"))
}

fn handle(inner: &Inner, req: Request) -> Response {
    let route = route_of(&req.method, &req.path);
    let mut state = inner.lock();
    state.requests.push(RecordedRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        route: route.clone(),
        headers: req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: req.body.to_vec(),
    });
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();

    // The token endpoint answers at top level (not under `data`), even for errors.
    if route == "POST /open-apis/auth/v3/tenant_access_token/internal" {
        let body = issue_token(inner, &mut state, &req);
        return Response::json(200, &body);
    }
    if let ["open-apis", "bot", "v2", "hook", token] = segs.as_slice() {
        if req.method != "POST" {
            return Response::json(405, &json!({"code": 9499, "msg": "Bad Request"}));
        }
        let (code, msg) = bot_hook(inner, &mut state, token, &req);
        // The bot gateway answers 200 and reports problems in the body; it also still sends
        // the legacy StatusCode/StatusMessage pair next to code/msg.
        let body = if code == 0 {
            json!({"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"})
        } else {
            json!({"code": code, "data": {}, "msg": msg})
        };
        return Response::json(200, &body);
    }

    let result = authenticate(inner, &state, &req).and_then(|app| {
        match (req.method.as_str(), segs.as_slice()) {
            ("POST", ["open-apis", "approval", "v4", "approvals"]) => {
                create_definition(&mut state, app, &req)
            }
            (
                "POST",
                [
                    "open-apis",
                    "approval",
                    "v4",
                    "approvals",
                    code,
                    "subscribe",
                ],
            ) => subscribe(&mut state, app, code),
            ("POST", ["open-apis", "approval", "v4", "instances", "cancel"]) => {
                cancel_instance(inner, &mut state, app, &req)
            }
            ("POST", ["open-apis", "approval", "v4", "instances", "cc"]) => {
                cc_instance(inner, &mut state, app, &req)
            }
            ("POST", ["open-apis", "approval", "v4", "instances"]) => {
                create_instance(inner, &mut state, app, &req)
            }
            ("GET", ["open-apis", "approval", "v4", "instances", code]) => {
                get_instance(&state, app, code, &req)
            }
            ("POST", ["open-apis", "contact", "v3", "users", "batch_get_id"]) => {
                batch_get_id(inner, &req)
            }
            ("POST", ["open-apis", "im", "v1", "messages"]) => {
                send_message(inner, &mut state, app, &req)
            }
            _ => Err(ApiError(404, 404, "404 page not found".into())),
        }
    });
    match result {
        Ok(body) => Response::json(200, &body),
        Err(ApiError(status, code, msg)) => {
            Response::json(status, &json!({"code": code, "msg": msg}))
        }
    }
}

fn issue_token(inner: &Inner, state: &mut FeishuState, req: &Request) -> Value {
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return json!({"code": 9499, "msg": "Bad Request"});
    };
    let (Some(app_id), Some(secret)) = (str_field(&body, "app_id"), str_field(&body, "app_secret"))
    else {
        return json!({"code": 10003, "msg": "invalid param"});
    };
    let Some(app) = inner.config.apps.iter().find(|a| a.app_id == app_id) else {
        return json!({"code": 10003, "msg": "invalid param"});
    };
    if app.app_secret != secret {
        return json!({"code": 10014, "msg": "app secret invalid"});
    }
    let now = now_ms();
    let ttl_ms = inner.config.token_ttl.as_millis() as u64;
    // Feishu hands out the current token again while it has at least 30 minutes left, and a
    // new one (the old one staying valid) once it has less.
    let reuse = state
        .tokens
        .iter()
        .filter(|(_, t)| t.app_id == app_id && t.expires_ms > now + 30 * 60 * 1000)
        .max_by_key(|(_, t)| t.expires_ms)
        .map(|(k, t)| (k.clone(), t.expires_ms));
    let (token, expires_ms) = reuse.unwrap_or_else(|| {
        let token = format!("t-{}", hex32());
        state.tokens.insert(
            token.clone(),
            IssuedToken {
                app_id: app_id.into(),
                expires_ms: now + ttl_ms,
            },
        );
        (token, now + ttl_ms)
    });
    json!({
        "code": 0,
        "msg": "ok",
        "tenant_access_token": token,
        "expire": (expires_ms.saturating_sub(now)) / 1000,
    })
}

fn authenticate<'a>(
    inner: &'a Inner,
    state: &FeishuState,
    req: &Request,
) -> Result<&'a FeishuApp, ApiError> {
    let header = req.header("authorization").unwrap_or("").trim();
    let token = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(bad(
            99991661,
            "Missing access token for authorization. Please make a request with token attached.",
        ));
    };
    let invalid = || {
        bad(
            99991663,
            "Invalid access token for authorization. Please make a request with token attached.",
        )
    };
    let issued = state.tokens.get(token).ok_or_else(invalid)?;
    if issued.expires_ms <= now_ms() {
        return Err(invalid());
    }
    inner
        .config
        .apps
        .iter()
        .find(|a| a.app_id == issued.app_id)
        .ok_or_else(invalid)
}

// ---------------------------------------------------------------------------------------------
// Approval definitions
// ---------------------------------------------------------------------------------------------

/// The keys the default locale of `i18n_resources` defines. Feishu takes every display name
/// of a definition (approval, widgets, nodes) as such a key.
fn i18n_keys(body: &Value) -> Result<Vec<String>, ApiError> {
    Ok(default_texts(body)?
        .iter()
        .filter_map(|t| t.get("key").and_then(Value::as_str).map(str::to_string))
        .collect())
}

/// The `{key, value}` texts of the default locale of `i18n_resources`.
fn default_texts(body: &Value) -> Result<&[Value], ApiError> {
    let default = body
        .get("i18n_resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|r| r.get("is_default") == Some(&Value::Bool(true)))
        .ok_or_else(|| param_invalid("i18n_resources needs a default locale"))?;
    Ok(default
        .get("texts")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice))
}

fn check_i18n(keys: &[String], name: &str, what: &str) -> Result<(), ApiError> {
    if name.starts_with("@i18n@") && name.len() >= 9 && keys.iter().any(|k| k == name) {
        Ok(())
    } else {
        Err(param_invalid(&format!(
            "{what} must be an @i18n@ key the default locale defines"
        )))
    }
}

/// A definition's widgets: (id, required).
fn widgets(form_content: &str) -> Vec<(String, bool)> {
    serde_json::from_str::<Value>(form_content)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|w| {
            let id = w.get("id").and_then(Value::as_str)?;
            Some((
                id.to_string(),
                w.get("required") == Some(&Value::Bool(true)),
            ))
        })
        .collect()
}

fn create_definition(state: &mut FeishuState, app: &FeishuApp, req: &Request) -> ApiResult {
    let body = parse_json(req)?;
    let keys = i18n_keys(&body)?;
    let name = str_field(&body, "approval_name").ok_or_else(|| param_invalid("approval_name"))?;
    check_i18n(&keys, name, "approval_name")?;
    if body
        .get("viewers")
        .and_then(Value::as_array)
        .is_none_or(|v| v.is_empty())
    {
        return Err(param_invalid("viewers is required"));
    }
    let form_content = body
        .get("form")
        .and_then(|f| f.get("form_content"))
        .and_then(Value::as_str)
        .ok_or_else(|| param_invalid("form.form_content is required"))?;
    let Ok(Value::Array(form)) = serde_json::from_str::<Value>(form_content) else {
        return Err(param_invalid(
            "form.form_content must be a JSON array string",
        ));
    };
    for w in &form {
        if str_field(w, "id").is_none() || str_field(w, "type").is_none() {
            return Err(param_invalid("every widget needs an id and a type"));
        }
        check_i18n(&keys, str_field(w, "name").unwrap_or(""), "a widget's name")?;
    }
    let node_list = body
        .get("node_list")
        .and_then(Value::as_array)
        .ok_or_else(|| param_invalid("node_list"))?;
    let ids: Vec<&str> = node_list
        .iter()
        .map(|n| n.get("id").and_then(Value::as_str).unwrap_or(""))
        .collect();
    if ids.len() < 3 || ids.first() != Some(&"START") || ids.last() != Some(&"END") {
        return Err(param_invalid(
            "node_list must start with START, end with END and contain an approval node",
        ));
    }
    let mut nodes = Vec::new();
    for (i, node) in node_list.iter().enumerate() {
        let id = ids[i];
        let name = node
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(id)
            .to_string();
        if i == 0 || i == node_list.len() - 1 {
            nodes.push(DefinitionNode {
                id: id.into(),
                node_id: hex32(),
                name,
                node_type: String::new(),
                multi: false,
            });
            continue;
        }
        if id.is_empty()
            || id == "START"
            || id == "END"
            || ids.iter().filter(|x| **x == id).count() > 1
        {
            return Err(param_invalid("every approval node needs a unique id"));
        }
        if let Some(name) = node.get("name").and_then(Value::as_str) {
            check_i18n(&keys, name, "a node's name")?;
        }
        let node_type = node.get("node_type").and_then(Value::as_str).unwrap_or("");
        if node_type != "AND" && node_type != "OR" {
            return Err(param_invalid("node_type must be AND or OR"));
        }
        let approvers = node
            .get("approver")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| param_invalid("approval nodes need an approver"))?;
        // Only initiator-chosen approvers can be routed without an org chart.
        if approvers
            .iter()
            .any(|a| a.get("type").and_then(Value::as_str) != Some("Free"))
        {
            return Err(param_invalid("simulator supports approver type Free only"));
        }
        // Feishu's definition API: "抄送人类型不支持设置为发起人自选（Free）".
        if let Some(ccers) = node.get("ccer").and_then(Value::as_array) {
            if ccers
                .iter()
                .any(|c| c.get("type").and_then(Value::as_str) == Some("Free"))
            {
                return Err(param_invalid("ccer type Free is not supported"));
            }
            if !ccers.is_empty() {
                return Err(param_invalid("simulator supports no ccer"));
            }
        }
        nodes.push(DefinitionNode {
            id: id.into(),
            node_id: hex32(),
            name,
            node_type: node_type.into(),
            multi: node.get("approver_chosen_multi") == Some(&Value::Bool(true)),
        });
    }
    // Passing an existing approval_code updates that definition, as on Feishu.
    let code = match str_field(&body, "approval_code") {
        Some(code) => match state.definitions.get(code) {
            Some(d) if d.tenant_key == app.tenant_key => code.to_string(),
            _ => return Err(bad(1390002, "approval code not found")),
        },
        None => uuid_like(),
    };
    let subscribers = state
        .definitions
        .get(&code)
        .map(|d| d.subscribers.clone())
        .unwrap_or_default();
    state.definitions.insert(
        code.clone(),
        Definition {
            approval_code: code.clone(),
            tenant_key: app.tenant_key.clone(),
            approval_name: name.into(),
            form_content: form_content.into(),
            nodes,
            subscribers,
        },
    );
    Ok(ok(json!({
        "approval_code": code,
        "approval_id": rand::thread_rng().gen_range(1_000_000_000u64..9_999_999_999u64),
    })))
}

fn subscribe(state: &mut FeishuState, app: &FeishuApp, code: &str) -> ApiResult {
    let def = state
        .definitions
        .get_mut(code)
        .filter(|d| d.tenant_key == app.tenant_key)
        .ok_or_else(|| bad(1390002, "approval code not found"))?;
    if def.subscribers.contains(&app.app_id) {
        return Err(bad(1390007, "subscription existed"));
    }
    def.subscribers.push(app.app_id.clone());
    Ok(ok(json!({})))
}

// ---------------------------------------------------------------------------------------------
// Approval instances
// ---------------------------------------------------------------------------------------------

fn find_user<'a>(inner: &'a Inner, id_type: &str, id: &str) -> Option<&'a FeishuUser> {
    inner.config.users.iter().find(|u| match id_type {
        "open_id" => u.open_id == id,
        "user_id" => u.user_id == id,
        "union_id" => u.union_id.as_deref() == Some(id),
        "email" => u.email.as_deref() == Some(id),
        _ => false,
    })
}

fn user_ids_of(list: Option<&Value>) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let items = list
        .as_array()
        .ok_or_else(|| param_invalid("approver lists are [{key, value: [ids]}]"))?;
    items
        .iter()
        .map(|item| {
            let key = str_field(item, "key").ok_or_else(|| param_invalid("approver list key"))?;
            let ids = item
                .get("value")
                .and_then(Value::as_array)
                .ok_or_else(|| param_invalid("approver list value"))?
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| param_invalid("approver ids must be strings"))?;
            Ok((key.to_string(), ids))
        })
        .collect()
}

fn create_instance(
    inner: &Inner,
    state: &mut FeishuState,
    app: &FeishuApp,
    req: &Request,
) -> ApiResult {
    let body = parse_json(req)?;
    let approval_code =
        str_field(&body, "approval_code").ok_or_else(|| param_invalid("approval_code"))?;
    let def = state
        .definitions
        .get(approval_code)
        .filter(|d| d.tenant_key == app.tenant_key)
        .cloned()
        .ok_or_else(|| bad(1390002, "approval code not found"))?;
    // user_id wins over open_id when both are given.
    let initiator = match (str_field(&body, "user_id"), str_field(&body, "open_id")) {
        (Some(uid), _) => find_user(inner, "user_id", uid),
        (None, Some(oid)) => find_user(inner, "open_id", oid),
        (None, None) => return Err(param_invalid("user_id or open_id is required")),
    }
    .ok_or_else(|| param_invalid("initiator not found"))?
    .clone();
    let form = str_field(&body, "form").ok_or_else(|| param_invalid("form"))?;
    let Ok(Value::Array(entries)) = serde_json::from_str::<Value>(form) else {
        return Err(param_invalid("form must be a JSON array string"));
    };
    // Each value fills a widget of the definition, and required widgets must be filled.
    let defined = widgets(&def.form_content);
    for f in &entries {
        let id = str_field(f, "id").unwrap_or("");
        if !defined.iter().any(|(w, _)| w == id) {
            return Err(param_invalid(&format!("form has no widget {id:?}")));
        }
    }
    for (w, _) in defined.iter().filter(|(_, required)| *required) {
        let filled = entries.iter().any(|f| {
            str_field(f, "id") == Some(w.as_str())
                && f.get("value")
                    .is_some_and(|v| v.as_str().is_none_or(|s| !s.is_empty()))
        });
        if !filled {
            return Err(param_invalid(&format!("required widget {w:?} is empty")));
        }
    }

    // Approvers may be given by open_id or user_id lists; both are merged per node.
    let mut chosen: HashMap<String, Vec<String>> = HashMap::new();
    let node_key = |key: &str| {
        def.nodes
            .iter()
            .find(|n| !n.node_type.is_empty() && (n.id == key || n.node_id == key))
            .map(|n| n.id.clone())
    };
    for (list, id_type) in [
        ("node_approver_open_id_list", "open_id"),
        ("node_approver_user_id_list", "user_id"),
    ] {
        for (key, ids) in user_ids_of(body.get(list))? {
            let node = node_key(&key).ok_or_else(|| param_invalid("unknown node key"))?;
            for id in ids {
                let user = find_user(inner, id_type, &id)
                    .ok_or_else(|| param_invalid("approver not found"))?;
                let entry = chosen.entry(node.clone()).or_default();
                if !entry.contains(&user.open_id) {
                    entry.push(user.open_id.clone());
                }
            }
        }
    }
    // Initiator-chosen cc needs a node whose ccer is Free, which no definition can have
    // (see `create_definition`): cc goes through `instances/cc`.
    for list in ["node_cc_open_id_list", "node_cc_user_id_list"] {
        if !user_ids_of(body.get(list))?.is_empty() {
            return Err(param_invalid("no node lets the initiator choose cc"));
        }
    }
    let mut node_approvers = Vec::new();
    for node in def.nodes.iter().filter(|n| !n.node_type.is_empty()) {
        let approvers = chosen.remove(&node.id).unwrap_or_default();
        if approvers.is_empty() {
            return Err(param_invalid(&format!("node {} needs approvers", node.id)));
        }
        if approvers.len() > 1 && !node.multi {
            return Err(param_invalid(&format!(
                "node {} takes one approver (approver_chosen_multi is false)",
                node.id
            )));
        }
        node_approvers.push((node.clone(), approvers));
    }
    // The title is an @i18n@ key the instance's own default locale defines.
    let title = match str_field(&body, "title") {
        None => None,
        Some(key) => {
            check_i18n(&i18n_keys(&body)?, key, "title")?;
            default_texts(&body)?
                .iter()
                .find(|t| t.get("key").and_then(Value::as_str) == Some(key))
                .and_then(|t| t.get("value")?.as_str())
                .map(str::to_string)
        }
    };

    let fingerprint = json!([
        approval_code,
        initiator.open_id,
        form,
        node_approvers
            .iter()
            .map(|(n, a)| json!([n.id, a]))
            .collect::<Vec<_>>(),
    ])
    .to_string();
    let uuid = str_field(&body, "uuid").map(str::to_string);
    if let Some(uuid) = &uuid {
        let existing = state.instances.values().find(|i| {
            i.tenant_key == app.tenant_key
                && i.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
        });
        if let Some(existing) = existing {
            return match inner.config.uuid_replay {
                UuidReplay::ReturnExisting if existing.fingerprint == fingerprint => {
                    Ok(ok(json!({"instance_code": existing.instance_code})))
                }
                _ => Err(bad(60012, "uuid conflict")),
            };
        }
    }

    let now = now_ms();
    let code = uuid_like();
    let mut instance = Instance {
        instance_code: code.clone(),
        approval_code: approval_code.into(),
        tenant_key: app.tenant_key.clone(),
        uuid,
        open_id: initiator.open_id.clone(),
        user_id: initiator.user_id.clone(),
        form: form.into(),
        status: "PENDING".into(),
        node_approvers,
        title,
        cc: Vec::new(),
        current_node: 0,
        tasks: Vec::new(),
        timeline: vec![json!({
            "type": "START",
            "create_time": now.to_string(),
            "user_id": initiator.user_id,
            "open_id": initiator.open_id,
        })],
        comments: Vec::new(),
        start_ms: now,
        end_ms: 0,
        serial_number: format!("{:06}", state.instances.len() + 1),
        fingerprint,
    };
    let mut events = vec![instance_event(&instance, now)];
    events.extend(activate_node(inner, &mut instance, 0, now));
    state.instances.insert(code.clone(), instance);
    queue_events(inner, state, app, approval_code, events);
    Ok(ok(json!({"instance_code": code})))
}

/// Creates PENDING tasks for node `idx` and returns their `approval_task` events.
fn activate_node(inner: &Inner, instance: &mut Instance, idx: usize, now: u64) -> Vec<Value> {
    instance.current_node = idx;
    let Some((node, approvers)) = instance.node_approvers.get(idx).cloned() else {
        return Vec::new();
    };
    let mut events = Vec::new();
    for open_id in approvers {
        let user_id = find_user(inner, "open_id", &open_id)
            .map(|u| u.user_id.clone())
            .unwrap_or_default();
        let task = Task {
            id: numeric_id(),
            node_key: node.id.clone(),
            node_id: node.node_id.clone(),
            node_name: node.name.clone(),
            mode: node.node_type.clone(),
            open_id,
            user_id,
            status: "PENDING".into(),
            start_ms: now,
            end_ms: 0,
        };
        events.push(task_event(instance, &task, now));
        instance.tasks.push(task);
    }
    events
}

fn instance_event(instance: &Instance, now: u64) -> Value {
    let mut event = json!({
        "type": "approval_instance",
        "approval_code": instance.approval_code,
        "instance_code": instance.instance_code,
        "status": instance.status,
        "operate_time": now.to_string(),
        "instance_operate_time": now.to_string(),
    });
    if let Some(uuid) = &instance.uuid {
        event["uuid"] = json!(uuid);
    }
    event
}

fn task_event(instance: &Instance, task: &Task, now: u64) -> Value {
    json!({
        "type": "approval_task",
        "approval_code": instance.approval_code,
        "instance_code": instance.instance_code,
        "task_id": task.id,
        "open_id": task.open_id,
        "user_id": task.user_id,
        "status": task.status,
        "operate_time": now.to_string(),
        "def_key": task.node_id,
        "custom_key": task.node_key,
    })
}

/// Wraps bare events for each app of the tenant and queues them for those that subscribed to
/// the definition.
fn queue_events(
    inner: &Inner,
    state: &mut FeishuState,
    app: &FeishuApp,
    approval_code: &str,
    events: Vec<Value>,
) {
    let subscribers = state
        .definitions
        .get(approval_code)
        .map(|d| d.subscribers.clone())
        .unwrap_or_default();
    let apps: Vec<&FeishuApp> = inner
        .config
        .apps
        .iter()
        .filter(|a| a.tenant_key == app.tenant_key)
        .collect();
    for mut event in events {
        for app in &apps {
            let subscribed = subscribers.contains(&app.app_id);
            event["app_id"] = json!(app.app_id);
            event["tenant_key"] = json!(app.tenant_key);
            let kind = event["type"].as_str().unwrap_or("").to_string();
            let payload = match app.schema {
                EventSchema::V1 => envelope_v1(app, event.clone()),
                EventSchema::V2 => envelope_v2(app, &kind, event.clone()),
            };
            state.events.push(EventRecord {
                app_id: app.app_id.clone(),
                payload: payload.clone(),
                delivered_to_outbox: subscribed,
            });
            if subscribed {
                state.outbox.push_back((app.app_id.clone(), payload));
            }
        }
    }
}

fn tenant_app<'a>(inner: &'a Inner, tenant_key: &str) -> anyhow::Result<&'a FeishuApp> {
    inner
        .config
        .apps
        .iter()
        .find(|a| a.tenant_key == tenant_key)
        .ok_or_else(|| anyhow!("no app for tenant {tenant_key}"))
}

fn decide_locked(
    inner: &Inner,
    state: &mut FeishuState,
    instance_code: &str,
    approver: &str,
    approve: bool,
    comment: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let mut instance = state
        .instances
        .get(instance_code)
        .cloned()
        .ok_or_else(|| anyhow!("unknown instance {instance_code}"))?;
    if instance.status != "PENDING" {
        bail!("instance {instance_code} is {}", instance.status);
    }
    let node = instance.current_node;
    let node_key = instance.node_approvers[node].0.id.clone();
    let mode = instance.node_approvers[node].0.node_type.clone();
    let task_idx = instance
        .tasks
        .iter()
        .position(|t| t.node_key == node_key && t.open_id == approver && t.status == "PENDING")
        .ok_or_else(|| anyhow!("{approver} has no pending task on the current node"))?;
    let now = now_ms();
    let mut events = Vec::new();
    {
        let task = &mut instance.tasks[task_idx];
        task.status = if approve { "APPROVED" } else { "REJECTED" }.into();
        task.end_ms = now;
    }
    let task = instance.tasks[task_idx].clone();
    events.push(task_event(&instance, &task, now));
    let mut entry = json!({
        "type": if approve { "PASS" } else { "REJECT" },
        "create_time": now.to_string(),
        "open_id": task.open_id,
        "user_id": task.user_id,
        "task_id": task.id,
        "node_key": task.node_key,
    });
    if let Some(c) = comment {
        entry["comment"] = json!(c);
        instance.comments.push(json!({
            "id": numeric_id(),
            "open_id": task.open_id,
            "user_id": task.user_id,
            "comment": c,
            "create_time": now.to_string(),
        }));
    }
    instance.timeline.push(entry);

    let others: Vec<usize> = instance
        .tasks
        .iter()
        .enumerate()
        .filter(|(i, t)| *i != task_idx && t.node_key == node_key && t.status == "PENDING")
        .map(|(i, _)| i)
        .collect();
    let node_done = !approve || mode == "OR" || others.is_empty();
    if node_done {
        // The rest of the node is closed without action.
        for i in others {
            instance.tasks[i].status = "DONE".into();
            instance.tasks[i].end_ms = now;
            events.push(task_event(&instance, &instance.tasks[i].clone(), now));
        }
        if !approve {
            instance.status = "REJECTED".into();
        } else if node + 1 < instance.node_approvers.len() {
            events.extend(activate_node(inner, &mut instance, node + 1, now));
        } else {
            instance.status = "APPROVED".into();
        }
        if instance.status != "PENDING" {
            instance.end_ms = now;
            events.push(instance_event(&instance, now));
        }
    } else {
        // On an AND node Feishu re-sends PENDING for the tasks still open (documented quirk
        // that exercises duplicate handling).
        for i in others {
            events.push(task_event(&instance, &instance.tasks[i].clone(), now));
        }
    }
    let app = tenant_app(inner, &instance.tenant_key)?.clone();
    let approval_code = instance.approval_code.clone();
    state.instances.insert(instance_code.into(), instance);
    let before = state.events.len();
    queue_events(inner, state, &app, &approval_code, events);
    Ok(state.events[before..]
        .iter()
        .filter(|e| e.app_id == app.app_id)
        .map(|e| e.payload.clone())
        .collect())
}

fn cancel_locked(
    inner: &Inner,
    state: &mut FeishuState,
    instance_code: &str,
) -> anyhow::Result<()> {
    let mut instance = state
        .instances
        .get(instance_code)
        .cloned()
        .ok_or_else(|| anyhow!("unknown instance {instance_code}"))?;
    if instance.status != "PENDING" {
        bail!("instance {instance_code} is {}", instance.status);
    }
    let now = now_ms();
    instance.status = "CANCELED".into();
    instance.end_ms = now;
    instance.timeline.push(json!({
        "type": "CANCEL",
        "create_time": now.to_string(),
        "open_id": instance.open_id,
        "user_id": instance.user_id,
    }));
    let mut events = vec![instance_event(&instance, now)];
    for i in 0..instance.tasks.len() {
        if instance.tasks[i].status == "PENDING" {
            instance.tasks[i].status = "DONE".into();
            instance.tasks[i].end_ms = now;
            events.push(task_event(&instance, &instance.tasks[i].clone(), now));
        }
    }
    let app = tenant_app(inner, &instance.tenant_key)?.clone();
    let approval_code = instance.approval_code.clone();
    state.instances.insert(instance_code.into(), instance);
    queue_events(inner, state, &app, &approval_code, events);
    Ok(())
}

/// What an operation on an instance (`cancel`, `cc`) names: its body, the instance (of the
/// app's tenant, on the definition the body names) and the `user_id_type` of its user ids.
fn instance_operation<'s>(
    state: &'s mut FeishuState,
    app: &FeishuApp,
    req: &Request,
) -> Result<(Value, &'s mut Instance, String), ApiError> {
    let body = parse_json(req)?;
    let approval_code =
        str_field(&body, "approval_code").ok_or_else(|| param_invalid("approval_code"))?;
    let instance_code =
        str_field(&body, "instance_code").ok_or_else(|| param_invalid("instance_code"))?;
    let id_type = req
        .query_param("user_id_type")
        .unwrap_or_else(|| "open_id".into());
    let instance = state
        .instances
        .get_mut(instance_code)
        .filter(|i| i.tenant_key == app.tenant_key)
        .ok_or_else(|| bad(1390003, "instance code not found"))?;
    if instance.approval_code != approval_code {
        return Err(bad(1390002, "approval code not found"));
    }
    Ok((body, instance, id_type))
}

fn cancel_instance(
    inner: &Inner,
    state: &mut FeishuState,
    app: &FeishuApp,
    req: &Request,
) -> ApiResult {
    let (body, instance, id_type) = instance_operation(state, app, req)?;
    let user = str_field(&body, "user_id").ok_or_else(|| param_invalid("user_id"))?;
    let is_initiator = match id_type.as_str() {
        "user_id" => instance.user_id == user,
        "open_id" => instance.open_id == user,
        _ => find_user(inner, &id_type, user).is_some_and(|u| u.open_id == instance.open_id),
    };
    if !is_initiator {
        return Err(param_invalid("only the initiator can cancel"));
    }
    if instance.status != "PENDING" {
        return Err(param_invalid(&format!("instance is {}", instance.status)));
    }
    let code = instance.instance_code.clone();
    cancel_locked(inner, state, &code).map_err(|e| param_invalid(&e.to_string()))?;
    Ok(ok(json!({})))
}

/// `POST /open-apis/approval/v4/instances/cc`: `user_id` copies the instance to
/// `cc_user_ids` (ids of `user_id_type`); a CC entry joins the timeline.
fn cc_instance(
    inner: &Inner,
    state: &mut FeishuState,
    app: &FeishuApp,
    req: &Request,
) -> ApiResult {
    let (body, instance, id_type) = instance_operation(state, app, req)?;
    let by = str_field(&body, "user_id")
        .and_then(|u| find_user(inner, &id_type, u))
        .ok_or_else(|| param_invalid("user_id not found"))?;
    let ids = body
        .get("cc_user_ids")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| param_invalid("cc_user_ids"))?;
    let mut cc = Vec::new();
    for id in ids {
        let user = id
            .as_str()
            .and_then(|id| find_user(inner, &id_type, id))
            .ok_or_else(|| param_invalid("cc user not found"))?;
        cc.push(user.open_id.clone());
    }
    instance.timeline.push(json!({
        "type": "CC",
        "create_time": now_ms().to_string(),
        "open_id": by.open_id,
        "open_id_list": cc,
    }));
    for open_id in cc {
        if !instance.cc.contains(&open_id) {
            instance.cc.push(open_id);
        }
    }
    Ok(ok(json!({})))
}

fn get_instance(state: &FeishuState, app: &FeishuApp, code: &str, req: &Request) -> ApiResult {
    // The path takes the instance code, or the uuid given at creation.
    let instance = state
        .instances
        .values()
        .filter(|i| i.tenant_key == app.tenant_key)
        .find(|i| {
            i.instance_code == code
                || i.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(code))
        })
        .ok_or_else(|| bad(1390003, "instance code not found"))?;
    let def = state.definitions.get(&instance.approval_code);
    let _ = req.query_param("user_id_type");
    let tasks: Vec<Value> = instance
        .tasks
        .iter()
        .map(|t| {
            json!({
                "id": t.id,
                "user_id": t.user_id,
                "open_id": t.open_id,
                "status": t.status,
                "node_id": t.node_id,
                "node_name": t.node_name,
                "custom_node_id": t.node_key,
                "type": t.mode,
                "start_time": t.start_ms.to_string(),
                "end_time": t.end_ms.to_string(),
            })
        })
        .collect();
    Ok(ok(json!({
        "approval_name": def.map(|d| d.approval_name.clone()).unwrap_or_default(),
        "approval_code": instance.approval_code,
        "instance_code": instance.instance_code,
        "start_time": instance.start_ms.to_string(),
        "end_time": instance.end_ms.to_string(),
        "user_id": instance.user_id,
        "open_id": instance.open_id,
        "serial_number": instance.serial_number,
        "department_id": "",
        "status": instance.status,
        "uuid": instance.uuid.clone().unwrap_or_default(),
        "form": instance.form,
        "task_list": tasks,
        "comment_list": instance.comments,
        "timeline": instance.timeline,
        "modified_instance_code": "",
        "reverted_instance_code": "",
        "reverted": false,
    })))
}

// ---------------------------------------------------------------------------------------------
// Contact and messages
// ---------------------------------------------------------------------------------------------

/// Mobiles without a country code are Chinese numbers on Feishu.
fn same_mobile(a: &str, b: &str) -> bool {
    let norm = |m: &str| m.trim().trim_start_matches("+86").to_string();
    norm(a) == norm(b)
}

fn batch_get_id(inner: &Inner, req: &Request) -> ApiResult {
    let body = parse_json(req)?;
    let id_type = req
        .query_param("user_id_type")
        .unwrap_or_else(|| "open_id".into());
    if !["open_id", "user_id", "union_id"].contains(&id_type.as_str()) {
        return Err(field_validation("user_id_type"));
    }
    let list = |name: &str| -> Result<Vec<String>, ApiError> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| field_validation(name)),
            Some(_) => Err(field_validation(name)),
        }
    };
    let (emails, mobiles) = (list("emails")?, list("mobiles")?);
    if emails.is_empty() && mobiles.is_empty() || emails.len() > 50 || mobiles.len() > 50 {
        return Err(field_validation("emails/mobiles: 1 to 50 entries each"));
    }
    let id_of = |u: &FeishuUser| match id_type.as_str() {
        "user_id" => Some(u.user_id.clone()),
        "union_id" => u.union_id.clone(),
        _ => Some(u.open_id.clone()),
    };
    let mut user_list = Vec::new();
    for email in &emails {
        let found = inner.config.users.iter().find(|u| {
            u.email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
        });
        let mut entry = json!({"email": email});
        if let Some(id) = found.and_then(id_of) {
            entry["user_id"] = json!(id);
        }
        user_list.push(entry);
    }
    for mobile in &mobiles {
        let found = inner
            .config
            .users
            .iter()
            .find(|u| u.mobile.as_deref().is_some_and(|m| same_mobile(m, mobile)));
        let mut entry = json!({"mobile": mobile});
        if let Some(id) = found.and_then(id_of) {
            entry["user_id"] = json!(id);
        }
        user_list.push(entry);
    }
    Ok(ok(json!({"user_list": user_list})))
}

fn send_message(
    inner: &Inner,
    state: &mut FeishuState,
    app: &FeishuApp,
    req: &Request,
) -> ApiResult {
    let id_type = req
        .query_param("receive_id_type")
        .ok_or_else(|| field_validation("receive_id_type is required"))?;
    let body = parse_json(req)?;
    let receive_id =
        str_field(&body, "receive_id").ok_or_else(|| field_validation("receive_id"))?;
    let msg_type = str_field(&body, "msg_type").ok_or_else(|| field_validation("msg_type"))?;
    let content = str_field(&body, "content").ok_or_else(|| field_validation("content"))?;
    let uuid = match body.get("uuid") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) if u.chars().count() <= 50 => Some(u.clone()),
        Some(_) => return Err(field_validation("uuid")),
    };
    let now = now_ms();
    // Feishu's documented dedupe: a request with a uuid seen within the hour sends nothing.
    if let Some(first) = state.messages.iter().rev().find(|m| {
        m.app_id == app.app_id
            && m.uuid.is_some()
            && m.uuid == uuid
            && now.saturating_sub(m.create_ms) < MESSAGE_UUID_KEPT_MS
    }) {
        return Ok(message_reply(app, first));
    }
    const TYPES: [&str; 11] = [
        "text",
        "post",
        "image",
        "file",
        "audio",
        "media",
        "sticker",
        "interactive",
        "share_chat",
        "share_user",
        "system",
    ];
    if !TYPES.contains(&msg_type) {
        return Err(field_validation("msg_type"));
    }
    // Feishu's docs: a card or rich-text request body may be at most 30 KB (text 150 KB),
    // else 230025. (Feishu has been seen taking cards of over 100 KB; the plugin leaves the
    // limit to Feishu.)
    if matches!(msg_type, "interactive" | "post") && req.body.len() > 30 << 10 {
        return Err(bad(
            230025,
            "The length of the message content reaches its limit.",
        ));
    }
    let parsed = serde_json::from_str::<Value>(content)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| bad(230001, "Your request contains an invalid request parameter. content is not a JSON object string"))?;
    if msg_type == "text" && parsed.get("text").and_then(Value::as_str).is_none() {
        return Err(bad(
            230001,
            "Your request contains an invalid request parameter. text content needs \"text\"",
        ));
    }
    let chat_id = match id_type.as_str() {
        "chat_id" => {
            if !inner.config.chats.iter().any(|c| c == receive_id) {
                return Err(bad(230002, "Bot/User can NOT be out of the chat."));
            }
            receive_id.to_string()
        }
        "open_id" | "user_id" | "union_id" | "email" => {
            let user = find_user(inner, &id_type, receive_id)
                .ok_or_else(|| bad(230013, "Bot has NO availability to this user."))?;
            format!("oc_p2p_{}", user.open_id)
        }
        _ => return Err(field_validation("receive_id_type")),
    };
    let message = SentMessage {
        app_id: app.app_id.clone(),
        message_id: format!("om_{}", hex32()),
        receive_id_type: id_type,
        receive_id: receive_id.into(),
        msg_type: msg_type.into(),
        content: content.into(),
        uuid,
        chat_id,
        create_ms: now,
    };
    let reply = message_reply(app, &message);
    state.messages.push(message);
    Ok(reply)
}

fn message_reply(app: &FeishuApp, m: &SentMessage) -> Value {
    let time = m.create_ms.to_string();
    ok(json!({
        "message_id": m.message_id,
        "root_id": "",
        "parent_id": "",
        "msg_type": m.msg_type,
        "create_time": time,
        "update_time": time,
        "deleted": false,
        "updated": false,
        "chat_id": m.chat_id,
        "sender": {"id": app.app_id, "id_type": "app_id", "sender_type": "app", "tenant_key": app.tenant_key},
        "body": {"content": m.content},
    }))
}

/// Returns (code, msg) for a custom bot webhook call and records the message.
fn bot_hook(inner: &Inner, state: &mut FeishuState, token: &str, req: &Request) -> (i64, String) {
    let Some(hook) = inner.config.hooks.iter().find(|h| h.token == token) else {
        return (
            19001,
            "param invalid: incoming webhook access token invalid".into(),
        );
    };
    // The documented request size limit for custom bots is 20 KB.
    if req.body.len() > 20 * 1024 {
        return (9499, "Bad Request".into());
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return (9499, "Bad Request".into());
    };
    let code_msg = check_bot_message(inner, hook, &body);
    state.bot_messages.push(BotMessage {
        hook_token: token.into(),
        body,
        code: code_msg.0,
    });
    code_msg
}

fn check_bot_message(inner: &Inner, hook: &BotHook, body: &Value) -> (i64, String) {
    if let Some(secret) = &hook.secret {
        let fail = (
            19021,
            "sign match fail or timestamp is not within one hour from current time".to_string(),
        );
        // Feishu's samples send the timestamp as a string, some clients as a number.
        let timestamp = match body.get("timestamp") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return fail,
        };
        let Ok(ts) = timestamp.parse::<i64>() else {
            return fail;
        };
        let now = (now_ms() / 1000) as i64;
        if (now - ts).unsigned_abs() > inner.config.bot_max_skew.as_secs() {
            return fail;
        }
        let sign = body.get("sign").and_then(Value::as_str).unwrap_or("");
        if !crypto::bot_sign_ok(&timestamp, secret, sign) {
            return fail;
        }
    }
    let Some(msg_type) = body.get("msg_type").and_then(Value::as_str) else {
        return (9499, "Bad Request".into());
    };
    let payload = if msg_type == "interactive" {
        body.get("card").or_else(|| body.get("content"))
    } else {
        body.get("content")
    };
    let Some(payload) = payload.filter(|p| p.is_object()) else {
        return (9499, "Bad Request".into());
    };
    if !hook.keywords.is_empty() {
        let text = payload.to_string();
        if !hook.keywords.iter().any(|k| text.contains(k.as_str())) {
            return (19024, "Key Words Not Found".into());
        }
    }
    (0, "success".into())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::http::{Faults, Handler, Server};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    const KEY: &str = "test key";

    fn config() -> FeishuConfig {
        let mut app = FeishuApp::new("cli_a", "secret_a");
        app.encrypt_key = Some("ek-a".into());
        FeishuConfig {
            apps: vec![app, FeishuApp::new("cli_b", "secret_b")],
            users: ["alice", "bob", "carol", "dave"]
                .iter()
                .map(|n| FeishuUser::new(n))
                .collect(),
            chats: vec!["oc_ops".into()],
            hooks: vec![
                BotHook {
                    token: "open".into(),
                    ..Default::default()
                },
                BotHook {
                    token: "signed".into(),
                    secret: Some("s3cret".into()),
                    keywords: vec![],
                },
            ],
            ..Default::default()
        }
    }

    async fn call(
        sim: &FeishuSim,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        // Minimal client: GET requests go through hyper too, so use a raw request.
        let url = format!("{}{path}", sim.base_url());
        let mut builder = hyper::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            builder = builder.header("authorization", format!("Bearer {t}"));
        }
        let req = builder
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let resp = client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        use http_body_util::BodyExt;
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn token(sim: &FeishuSim, app: &str, secret: &str) -> String {
        let (_, v) = call(
            sim,
            "POST",
            "/open-apis/auth/v3/tenant_access_token/internal",
            None,
            json!({"app_id": app, "app_secret": secret}),
        )
        .await;
        v["tenant_access_token"].as_str().unwrap().to_string()
    }

    fn definition_body() -> Value {
        let texts: Vec<Value> = ["deploy", "detail", "leads", "ops"]
            .iter()
            .map(|k| json!({"key": format!("@i18n@{k}"), "value": k}))
            .collect();
        json!({
            "approval_name": "@i18n@deploy",
            "viewers": [{"viewer_type": "NONE"}],
            "form": {"form_content": "[{\"id\":\"detail\",\"type\":\"textarea\",\"required\":true,\"name\":\"@i18n@detail\"}]"},
            "node_list": [
                {"id": "START"},
                {"id": "n1", "name": "@i18n@leads", "node_type": "AND", "approver": [{"type": "Free"}], "approver_chosen_multi": true},
                {"id": "n2", "name": "@i18n@ops", "node_type": "OR", "approver": [{"type": "Free"}], "approver_chosen_multi": true},
                {"id": "END"}
            ],
            "i18n_resources": [{"locale": "en-US", "is_default": true, "texts": texts}]
        })
    }

    async fn setup_instance(sim: &FeishuSim, t: &str, uuid: &str) -> (String, String) {
        let (_, def) = call(
            sim,
            "POST",
            "/open-apis/approval/v4/approvals",
            Some(t),
            definition_body(),
        )
        .await;
        let code = def["data"]["approval_code"].as_str().unwrap().to_string();
        let sub = format!("/open-apis/approval/v4/approvals/{code}/subscribe");
        assert_eq!(
            call(sim, "POST", &sub, Some(t), json!({})).await.1["code"],
            0
        );
        let (status, inst) = call(
            sim,
            "POST",
            "/open-apis/approval/v4/instances",
            Some(t),
            instance_body(&code, uuid),
        )
        .await;
        assert_eq!(status, 200, "{inst}");
        (
            code,
            inst["data"]["instance_code"].as_str().unwrap().to_string(),
        )
    }

    fn instance_body(code: &str, uuid: &str) -> Value {
        json!({
            "approval_code": code,
            "open_id": "ou_alice",
            "form": "[{\"id\":\"detail\",\"type\":\"textarea\",\"value\":\"ship it\"}]",
            "node_approver_open_id_list": [
                {"key": "n1", "value": ["ou_bob", "ou_carol"]},
                {"key": "n2", "value": ["ou_carol", "ou_dave"]}
            ],
            "title": "@i18n@title",
            "i18n_resources": [{"locale": "en-US", "is_default": true,
                "texts": [{"key": "@i18n@title", "value": "Ship it?"}]}],
            "uuid": uuid
        })
    }

    #[test]
    fn aes_matches_the_public_feishu_vector() {
        let plain = crypto::decrypt(KEY, "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=").unwrap();
        assert_eq!(plain, b"hello world");
        let round = crypto::encrypt(KEY, b"{\"a\":1}");
        assert_eq!(crypto::decrypt(KEY, &round).unwrap(), b"{\"a\":1}");
        assert!(crypto::decrypt(KEY, "not base64!").is_none());
        assert!(
            crypto::decrypt("other key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=").is_none()
        );
        // Same IV as the vector reproduces it exactly.
        let raw = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=",
        )
        .unwrap();
        let iv: [u8; 16] = raw[..16].try_into().unwrap();
        assert_eq!(
            crypto::encrypt_with_iv(KEY, &iv, b"hello world"),
            "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="
        );
    }

    #[test]
    fn bot_signature_round_trips_and_rejects_tampering() {
        let sign = crypto::bot_sign("1599360473", "s3cret");
        assert!(crypto::bot_sign_ok("1599360473", "s3cret", &sign));
        assert!(!crypto::bot_sign_ok("1599360474", "s3cret", &sign));
        assert!(!crypto::bot_sign_ok("1599360473", "other", &sign));
        assert!(!crypto::bot_sign_ok("1599360473", "s3cret", "%%%"));
    }

    #[tokio::test]
    async fn token_auth_and_expiry() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let (_, bad_secret) = call(
            &sim,
            "POST",
            "/open-apis/auth/v3/tenant_access_token/internal",
            None,
            json!({"app_id": "cli_a", "app_secret": "nope"}),
        )
        .await;
        assert_eq!(bad_secret["code"], 10014);
        let t = token(&sim, "cli_a", "secret_a").await;
        assert_eq!(
            token(&sim, "cli_a", "secret_a").await,
            t,
            "reused while > 30 min left"
        );
        let path = "/open-apis/contact/v3/users/batch_get_id?user_id_type=user_id";
        let body = json!({"emails": ["bob@example.com", "nobody@example.com"], "mobiles": ["123"]});
        let (_, missing) = call(&sim, "POST", path, None, body.clone()).await;
        assert_eq!(missing["code"], 99991661);
        let (status, found) = call(&sim, "POST", path, Some(&t), body.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(
            found["data"]["user_list"][0],
            json!({"email": "bob@example.com", "user_id": "u_bob"})
        );
        assert_eq!(
            found["data"]["user_list"][1],
            json!({"email": "nobody@example.com"})
        );
        sim.expire_all_tokens();
        let (status, expired) = call(&sim, "POST", path, Some(&t), body).await;
        assert_eq!((status, expired["code"].as_i64()), (400, Some(99991663)));
        assert_ne!(token(&sim, "cli_a", "secret_a").await, t);
    }

    /// Feishu sends a definition's events only to the apps that subscribed to it, even
    /// within one tenant, and tells each app when it already has.
    #[tokio::test]
    async fn events_reach_only_the_apps_that_subscribed() {
        let mut cfg = config();
        cfg.apps[1].tenant_key = cfg.apps[0].tenant_key.clone();
        let sim = FeishuSim::start(cfg).await.unwrap();
        let a = token(&sim, "cli_a", "secret_a").await;
        let (code, _) = setup_instance(&sim, &a, "uuid-1").await;
        let queued = |sim: &FeishuSim| {
            let st = sim.state();
            let to = |app: &str| st.outbox.iter().filter(|(id, _)| id == app).count();
            (to("cli_a"), to("cli_b"))
        };
        assert_eq!(queued(&sim), (3, 0), "cli_b never subscribed");

        let b = token(&sim, "cli_b", "secret_b").await;
        let sub = format!("/open-apis/approval/v4/approvals/{code}/subscribe");
        for want in [0, 1390007] {
            let (_, got) = call(&sim, "POST", &sub, Some(&b), json!({})).await;
            assert_eq!(got["code"], want, "{got}");
        }
        let (status, got) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/instances",
            Some(&a),
            instance_body(&code, "uuid-2"),
        )
        .await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(queued(&sim), (6, 3));
    }

    #[tokio::test]
    async fn and_then_or_nodes_produce_feishu_events() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let t = token(&sim, "cli_a", "secret_a").await;
        let (_, inst) = setup_instance(&sim, &t, "7C468A54-8745-2245-9675-08B7C63E7A87").await;
        // Creation queued instance PENDING + 2 task PENDING (no callback URL: dropped on flush).
        assert_eq!(sim.state().outbox.len(), 3);
        assert!(sim.flush_events().await.is_empty());

        let early = sim.decide(&inst, "ou_dave", true, None).await.unwrap_err();
        assert!(
            early
                .to_string()
                .contains("no pending task on the current node"),
            "{early}"
        );
        let d = sim
            .decide(&inst, "ou_bob", true, Some("lgtm"))
            .await
            .unwrap();
        let statuses: Vec<_> = d
            .events
            .iter()
            .map(|e| (e["event"]["open_id"].clone(), e["event"]["status"].clone()))
            .collect();
        assert_eq!(
            statuses,
            vec![
                (json!("ou_bob"), json!("APPROVED")),
                (json!("ou_carol"), json!("PENDING"))
            ]
        );
        assert_eq!(sim.state().instances[&inst].status, "PENDING");

        let d = sim.decide(&inst, "ou_carol", true, None).await.unwrap();
        // carol APPROVED, then node 2 opens for carol and dave.
        assert_eq!(d.events.len(), 3);
        assert_eq!(d.events[1]["event"]["status"], "PENDING");

        let d = sim.decide(&inst, "ou_dave", true, None).await.unwrap();
        let last = d.events.last().unwrap();
        assert_eq!(last["event"]["type"], "approval_instance");
        assert_eq!(last["event"]["status"], "APPROVED");
        assert_eq!(last["token"], "vt-cli_a");
        // OR: carol's node-2 task is closed as DONE.
        assert_eq!(d.events[1]["event"]["status"], "DONE");

        let (_, got) = call(
            &sim,
            "GET",
            &format!("/open-apis/approval/v4/instances/{inst}"),
            Some(&t),
            Value::Null,
        )
        .await;
        assert_eq!(got["data"]["status"], "APPROVED");
        assert_eq!(got["data"]["task_list"].as_array().unwrap().len(), 4);
        assert_eq!(got["data"]["comment_list"][0]["comment"], "lgtm");
        // Another tenant cannot see it.
        let tb = token(&sim, "cli_b", "secret_b").await;
        let (_, other) = call(
            &sim,
            "GET",
            &format!("/open-apis/approval/v4/instances/{inst}"),
            Some(&tb),
            Value::Null,
        )
        .await;
        assert_eq!(other["code"], 1390003);
    }

    #[tokio::test]
    async fn rejection_and_uuid_idempotency_and_cancel() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let t = token(&sim, "cli_a", "secret_a").await;
        let uuid = "11111111-2222-3333-4444-555555555555";
        let (code, inst) = setup_instance(&sim, &t, uuid).await;
        let (status, dup) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/instances",
            Some(&t),
            instance_body(&code, uuid),
        )
        .await;
        assert_eq!((status, dup["code"].as_i64()), (400, Some(60012)));
        let (_, by_uuid) = call(
            &sim,
            "GET",
            &format!("/open-apis/approval/v4/instances/{uuid}"),
            Some(&t),
            Value::Null,
        )
        .await;
        assert_eq!(by_uuid["data"]["instance_code"], inst.as_str());
        assert_eq!(sim.state().instances.len(), 1);

        let d = sim
            .decide(&inst, "ou_carol", false, Some("no"))
            .await
            .unwrap();
        assert_eq!(d.events.last().unwrap()["event"]["status"], "REJECTED");
        assert_eq!(d.events[1]["event"]["status"], "DONE", "bob's task closed");

        let (_, inst2) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/instances",
            Some(&t),
            instance_body(&code, "other-uuid"),
        )
        .await;
        let inst2 = inst2["data"]["instance_code"].as_str().unwrap().to_string();
        let cancel = json!({"approval_code": code, "instance_code": inst2, "user_id": "ou_bob"});
        let (_, not_initiator) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/instances/cancel?user_id_type=open_id",
            Some(&t),
            cancel,
        )
        .await;
        assert_eq!(not_initiator["code"], 1390001);
        let cancel = json!({"approval_code": code, "instance_code": inst2, "user_id": "u_alice"});
        let (_, done) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/instances/cancel?user_id_type=user_id",
            Some(&t),
            cancel,
        )
        .await;
        assert_eq!(done["code"], 0);
        assert_eq!(sim.state().instances[&inst2].status, "CANCELED");
        assert_eq!(sim.calls("POST /open-apis/approval/v4/instances/cancel"), 2);
        assert_eq!(sim.calls("POST /open-apis/approval/v4/approvals"), 1);
    }

    #[tokio::test]
    async fn definition_validation() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let t = token(&sim, "cli_a", "secret_a").await;
        let mut body = definition_body();
        body["node_list"][0]["id"] = json!("n0");
        let (status, v) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/approvals",
            Some(&t),
            body,
        )
        .await;
        assert_eq!((status, v["code"].as_i64()), (400, Some(1390001)));
        let mut body = definition_body();
        body["node_list"][1]["approver"][0]["type"] = json!("Supervisor");
        assert_eq!(
            call(
                &sim,
                "POST",
                "/open-apis/approval/v4/approvals",
                Some(&t),
                body
            )
            .await
            .1["code"],
            1390001
        );
        // Display names are i18n keys the default locale defines; viewers are required; cc
        // cannot be left to the initiator (Feishu: "抄送人类型不支持设置为发起人自选（Free）").
        let edits: [fn(&mut Value); 7] = [
            |b| b["form"]["form_content"] = json!("not json"),
            |b| b["approval_name"] = json!("Deploy"),
            |b| b["node_list"][1]["name"] = json!("@i18n@missing"),
            |b| b["i18n_resources"][0]["is_default"] = json!(false),
            |b| {
                b["form"]["form_content"] =
                    json!(r#"[{"id":"detail","type":"textarea","name":"Detail"}]"#)
            },
            |b| b["viewers"] = json!([]),
            |b| b["node_list"][1]["ccer"] = json!([{"type": "Free"}]),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut body = definition_body();
            edit(&mut body);
            let (_, v) = call(
                &sim,
                "POST",
                "/open-apis/approval/v4/approvals",
                Some(&t),
                body,
            )
            .await;
            assert_eq!(v["code"], 1390001, "edit {i}: {v}");
        }
        // An instance fills the definition's widgets, the required ones with a value.
        let (_, def) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/approvals",
            Some(&t),
            definition_body(),
        )
        .await;
        let code = def["data"]["approval_code"].as_str().unwrap();
        let mut single = definition_body();
        single["node_list"][1]
            .as_object_mut()
            .unwrap()
            .remove("approver_chosen_multi");
        let (_, def) = call(
            &sim,
            "POST",
            "/open-apis/approval/v4/approvals",
            Some(&t),
            single,
        )
        .await;
        let single = def["data"]["approval_code"].clone();
        // The form fills the definition's widgets, the required ones with a value; the title
        // is an i18n key; no node lets the initiator choose cc; a node without
        // approver_chosen_multi takes one approver.
        let form = |f: &'static str| move |b: &mut Value| b["form"] = json!(f);
        type Edit = Box<dyn Fn(&mut Value)>;
        let refused: [(&str, Edit); 6] = [
            (
                "unknown widget",
                Box::new(form(r#"[{"id":"details","type":"textarea","value":"x"}]"#)),
            ),
            (
                "empty widget",
                Box::new(form(r#"[{"id":"detail","type":"textarea","value":""}]"#)),
            ),
            ("no widget", Box::new(form("[]"))),
            ("plain title", Box::new(|b| b["title"] = json!("Ship it?"))),
            (
                "node cc",
                Box::new(|b| {
                    b["node_cc_open_id_list"] = json!([{"key": "n2", "value": ["ou_alice"]}])
                }),
            ),
            (
                "two approvers",
                Box::new(move |b| b["approval_code"] = single.clone()),
            ),
        ];
        for (what, edit) in &refused {
            let mut body = instance_body(code, "u");
            edit(&mut body);
            let (_, v) = call(
                &sim,
                "POST",
                "/open-apis/approval/v4/instances",
                Some(&t),
                body,
            )
            .await;
            assert_eq!(v["code"], 1390001, "{what}: {v}");
        }
        assert!(sim.state().instances.is_empty());
    }

    /// The title resolves to its text; `instances/cc` copies the instance to users, once
    /// each, and only on the instance's own definition.
    #[tokio::test]
    async fn titles_resolve_and_cc_is_a_request_of_its_own() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let t = token(&sim, "cli_a", "secret_a").await;
        let (code, inst) = setup_instance(&sim, &t, "7C468A54-8745-2245-9675-08B7C63E7A88").await;
        assert_eq!(
            sim.state().instances[&inst].title.as_deref(),
            Some("Ship it?")
        );
        assert!(sim.state().instances[&inst].cc.is_empty());
        let cc = "/open-apis/approval/v4/instances/cc?user_id_type=open_id";
        let body = |code: &str| {
            json!({"approval_code": code, "instance_code": inst, "user_id": "ou_alice",
                "cc_user_ids": ["ou_dave", "ou_bob"]})
        };
        for _ in 0..2 {
            let (status, v) = call(&sim, "POST", cc, Some(&t), body(&code)).await;
            assert_eq!((status, &v["code"]), (200, &json!(0)), "{v}");
        }
        let (_, v) = call(&sim, "POST", cc, Some(&t), body("OTHER")).await;
        assert_eq!(v["code"], 1390002, "{v}");
        assert_eq!(sim.state().instances[&inst].cc, ["ou_dave", "ou_bob"]);
    }

    #[tokio::test]
    async fn bot_webhook_signature_and_keywords() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let now = (now_ms() / 1000).to_string();
        let msg = |ts: &str, sign: &str| json!({"timestamp": ts, "sign": sign, "msg_type": "text", "content": {"text": "hi"}});
        let hook = "/open-apis/bot/v2/hook/signed";
        let good = crypto::bot_sign(&now, "s3cret");
        assert_eq!(
            call(&sim, "POST", hook, None, msg(&now, &good)).await.1["code"],
            0
        );
        assert_eq!(
            call(&sim, "POST", hook, None, msg(&now, "AAAA")).await.1["code"],
            19021
        );
        let old = (now_ms() / 1000 - 4000).to_string();
        let old_sign = crypto::bot_sign(&old, "s3cret");
        assert_eq!(
            call(&sim, "POST", hook, None, msg(&old, &old_sign)).await.1["code"],
            19021
        );
        let (_, unsigned) = call(
            &sim,
            "POST",
            "/open-apis/bot/v2/hook/open",
            None,
            json!({"msg_type": "text", "content": {"text": "x"}}),
        )
        .await;
        assert_eq!(unsigned["StatusCode"], 0);
        assert_eq!(
            call(&sim, "POST", "/open-apis/bot/v2/hook/nope", None, json!({}))
                .await
                .1["code"],
            19001
        );
        let codes: Vec<i64> = sim.state().bot_messages.iter().map(|m| m.code).collect();
        assert_eq!(codes, vec![0, 19021, 19021, 0]);
    }

    #[tokio::test]
    async fn messages_and_fault_injection() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let t = token(&sim, "cli_a", "secret_a").await;
        let path = "/open-apis/im/v1/messages";
        let body =
            json!({"receive_id": "oc_ops", "msg_type": "text", "content": "{\"text\":\"hi\"}"});
        sim.fail_next(path, 1, 429, 99991400, "request trigger frequency limit");
        let (status, v) = call(
            &sim,
            "POST",
            &format!("{path}?receive_id_type=chat_id"),
            Some(&t),
            body.clone(),
        )
        .await;
        assert_eq!((status, v["code"].as_i64()), (429, Some(99991400)));
        let (status, v) = call(
            &sim,
            "POST",
            &format!("{path}?receive_id_type=chat_id"),
            Some(&t),
            body,
        )
        .await;
        assert_eq!(status, 200);
        assert!(v["data"]["message_id"].as_str().unwrap().starts_with("om_"));
        let body = json!({"receive_id": "oc_elsewhere", "msg_type": "text", "content": "{\"text\":\"hi\"}"});
        assert_eq!(
            call(
                &sim,
                "POST",
                &format!("{path}?receive_id_type=chat_id"),
                Some(&t),
                body
            )
            .await
            .1["code"],
            230002
        );
        let body = json!({"receive_id": "ou_bob", "msg_type": "interactive", "content": "{\"elements\":[]}"});
        assert_eq!(
            call(
                &sim,
                "POST",
                &format!("{path}?receive_id_type=open_id"),
                Some(&t),
                body.clone()
            )
            .await
            .1["code"],
            0
        );
        assert_eq!(
            call(&sim, "POST", path, Some(&t), body).await.1["code"],
            99992402
        );
        assert_eq!(sim.state().messages.len(), 2);

        // A repeated uuid sends nothing and answers with the first message; over 50
        // characters it is refused.
        let send = |uuid: String| {
            let body = json!({"receive_id": "oc_ops", "msg_type": "text",
                              "content": "{\"text\":\"hi\"}", "uuid": uuid});
            let url = format!("{path}?receive_id_type=chat_id");
            let t = t.clone();
            let sim = &sim;
            async move { call(sim, "POST", &url, Some(&t), body).await.1 }
        };
        let first = send("u-1".into()).await;
        let again = send("u-1".into()).await;
        assert_eq!(again["code"], 0);
        assert_eq!(again["data"]["message_id"], first["data"]["message_id"]);
        assert_ne!(
            send("u-2".into()).await["data"]["message_id"],
            first["data"]["message_id"]
        );
        assert_eq!(send("u".repeat(51)).await["code"], 99992402);
        assert_eq!(sim.state().messages.len(), 4);

        // A card over 30 KB as sent is refused.
        let card = |len: usize| {
            json!({"receive_id": "oc_ops", "msg_type": "interactive",
                   "content": json!({"elements": [{"tag": "markdown", "content": "x".repeat(len)}]}).to_string()})
        };
        let url = format!("{path}?receive_id_type=chat_id");
        assert_eq!(
            call(&sim, "POST", &url, Some(&t), card(31 << 10)).await.1["code"],
            230025
        );
        assert_eq!(
            call(&sim, "POST", &url, Some(&t), card(29 << 10)).await.1["code"],
            0
        );
    }

    /// A callback receiver that checks the signature and decrypts with the simulator's
    /// counterpart code, failing the first `fail_first` deliveries.
    async fn receiver(
        fail_first: usize,
        encrypt_key: &'static str,
    ) -> (Server, Arc<Mutex<Vec<Value>>>, Arc<AtomicUsize>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen2, hits2) = (seen.clone(), hits.clone());
        let handler: Handler = Arc::new(move |req: Request| {
            let (seen, hits) = (seen2.clone(), hits2.clone());
            Box::pin(async move {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let plain: Value = serde_json::from_slice(
                    &crypto::decrypt(encrypt_key, body["encrypt"].as_str().unwrap()).unwrap(),
                )
                .unwrap();
                if plain["type"] == "url_verification" {
                    assert!(req.header("x-lark-signature").is_none());
                    return Response::json(200, &json!({"challenge": plain["challenge"]}));
                }
                let n = hits.fetch_add(1, Ordering::SeqCst);
                let sig = crypto::signature(
                    req.header("x-lark-request-timestamp").unwrap(),
                    req.header("x-lark-request-nonce").unwrap(),
                    encrypt_key,
                    &req.body,
                );
                assert_eq!(req.header("x-lark-signature"), Some(sig.as_str()));
                if n < fail_first {
                    return Response::json(500, &json!({}));
                }
                seen.lock().unwrap().push(plain);
                Response::json(200, &json!({"msg": "success"}))
            })
        });
        let server = Server::start(handler, Arc::new(Mutex::new(Faults::default())))
            .await
            .unwrap();
        (server, seen, hits)
    }

    #[tokio::test]
    async fn pushes_are_encrypted_signed_and_retried() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let (server, seen, hits) = receiver(2, "ek-a").await;
        let url = format!("{}/callback", server.base_url());
        let report = sim.url_verification("cli_a", &url).await.unwrap();
        assert!(report.echoed, "{:?}", report.reply);

        sim.set_callback_url("cli_a", Some(&url));
        let t = token(&sim, "cli_a", "secret_a").await;
        let (_, inst) = setup_instance(&sim, &t, "u-1").await;
        let reports = sim.flush_events().await;
        assert_eq!(reports.len(), 3);
        assert_eq!(reports[0].attempts.len(), 3, "two 500s then 200");
        assert!(reports.iter().all(|r| r.delivered));
        assert_eq!(hits.load(Ordering::SeqCst), 5);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0]["event"]["type"], "approval_instance");
        assert_eq!(seen[0]["event"]["instance_code"], inst.as_str());
        assert_eq!(seen[0]["event"]["uuid"], "u-1");

        let im = sim
            .envelope_v2(
                "cli_a",
                "im.message.receive_v1",
                json!({"message": {"message_id": "om_1"}}),
            )
            .unwrap();
        let r = sim.push_json("cli_a", &url, &im).await.unwrap();
        assert!(r.delivered);
    }

    /// Cross-check with the official SDK when it is installed (see tests/interop/README.md):
    /// lark-oapi's own webhook handler must accept our encrypted + signed pushes and reject
    /// a tampered copy.
    #[tokio::test]
    async fn lark_oapi_accepts_our_pushes() {
        let sim = FeishuSim::start(config()).await.unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/interop/feishu_events.py"
        );
        let dir =
            std::env::temp_dir().join(format!("imbridge-feishu-interop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let payloads = [
            ("v1", sim.envelope_v1("cli_a", json!({"type": "approval_instance", "instance_code": "X", "status": "APPROVED"})).unwrap()),
            ("v2", sim.envelope_v2("cli_a", "im.message.receive_v1", json!({"message": {}})).unwrap()),
            ("verify", json!({"challenge": "c-1", "token": "vt-cli_a", "type": "url_verification"})),
        ];
        let mut files = Vec::new();
        let mut expected = Vec::new();
        for (name, payload) in payloads {
            let mut req = sim.build_push("cli_a", &payload).unwrap();
            if name == "verify" {
                // Feishu does not sign the handshake.
                req = build_push(sim.inner.app("cli_a").unwrap(), &payload, false);
            }
            for tamper in [false, true] {
                if tamper {
                    // Still valid JSON, so only the signature check can catch it (the
                    // unsigned handshake is then still accepted, as on Feishu).
                    req.body.insert(1, b' ');
                }
                let file = dir.join(format!("{name}-{tamper}.json"));
                std::fs::write(&file, push_request_json(&req).to_string()).unwrap();
                files.push(file);
                expected.push(!tamper || name == "verify");
            }
        }
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            script,
            "validate",
            "--encrypt-key",
            "ek-a",
            "--token",
            "vt-cli_a",
        ]);
        for f in &files {
            cmd.arg("--request").arg(f);
        }
        // Fails, never skips, without the SDK: this is the only check of the simulator's
        // signing by code no one on this project wrote.
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {}", crate::sim::INTEROP_SDKS));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named"),
            "{stderr}\n{}",
            crate::sim::INTEROP_SDKS
        );
        let reports: Vec<Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
        let accepted: Vec<bool> = reports
            .iter()
            .map(|r| r["accepted"] == json!(true))
            .collect();
        assert_eq!(accepted, expected, "{reports:#?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The file format the interop script reads: `{"headers": {...}, "body": "<raw body>"}`.
    fn push_request_json(req: &PushRequest) -> Value {
        json!({
            "headers": req.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
            "body": String::from_utf8_lossy(&req.body),
        })
    }
}
