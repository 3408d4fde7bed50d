//! A DingTalk open platform simulator.
//!
//! Speaks the wire formats the component uses: the new API (`/v1.0/oauth2/accessToken`,
//! `/v1.0/workflow/forms`, template listing, form schemas by process code,
//! `/v1.0/workflow/processInstances` create / get / terminate; token in
//! `x-acs-dingtalk-access-token`, errors as HTTP status + `{code, message, requestid}`), the legacy API (`/topapi/v2/user/getbymobile`,
//! `/topapi/message/corpconversation/asyncsend_v2`; `?access_token=`, `{errcode, errmsg}`),
//! and custom robots (`/robot/send?access_token=` with 加签 verification). It plays the
//! platform's side of event delivery: approver actions produce `bpms_task_change` and
//! `bpms_instance_change` events, encrypted in the WX frame with the app's aes_key, signed
//! with the sorted SHA-1 in the query, POSTed to the app's callback URL, and retried unless the
//! reply is a correctly signed JSON wrapping an encrypted "success" for the app's AppKey.
//!
//! Simplifications: one user directory and one organisation for all apps; the same origin
//! serves the new and legacy APIs and robots (point both at `base_url`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use rand::Rng;
use serde_json::{Value, json};

use super::http::{self, Reply, Request, Response, Shared, Sim};

/// One self-built (internal) app.
#[derive(Debug, Clone)]
pub struct DingtalkApp {
    pub app_key: String,
    pub app_secret: String,
    pub agent_id: u64,
    /// Callback token (signature input).
    pub token: String,
    /// 43-character callback aes_key.
    pub aes_key: String,
    pub callback_url: Option<String>,
}

impl DingtalkApp {
    /// An app with a derived secret, token and a random aes_key.
    pub fn new(app_key: &str) -> Self {
        DingtalkApp {
            app_key: app_key.into(),
            app_secret: format!("secret-{app_key}"),
            agent_id: 1000 + rand::thread_rng().gen_range(0..1000u64),
            token: format!("tok-{app_key}"),
            aes_key: crypto::random_aes_key(),
            callback_url: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DingtalkUser {
    pub userid: String,
    pub mobile: Option<String>,
    pub name: String,
}

impl DingtalkUser {
    pub fn new(userid: &str, mobile: Option<&str>) -> Self {
        DingtalkUser {
            userid: userid.into(),
            mobile: mobile.map(String::from),
            name: userid.into(),
        }
    }
}

/// A custom robot `/robot/send?access_token={access_token}`.
#[derive(Debug, Clone)]
pub struct Robot {
    pub access_token: String,
    /// 加签 secret (`SEC…`); when set, `timestamp` + `sign` query parameters are required.
    pub secret: Option<String>,
}

/// DingTalk's terminate API refuses an instance younger than this (its docs: "提交审批单后15秒内
/// 不能进行撤回"); a test ages an instance through its `create_ms`.
pub const REVOKE_AFTER: Duration = Duration::from_secs(15);
/// The terminate API's refusal of an instance in its first 15 s or already ended.
const STATUS_EXCEPTION: &str = "aflowProcessInstStatusException";

#[derive(Debug, Clone)]
pub struct DingtalkConfig {
    pub apps: Vec<DingtalkApp>,
    pub users: Vec<DingtalkUser>,
    pub robots: Vec<Robot>,
    /// Lifetime of app tokens (DingTalk: 7200 s).
    pub token_ttl: Duration,
    /// Delays before re-sending a push whose reply was not the encrypted "success";
    /// the number of entries is the number of retries (shortened for tests).
    pub retry_delays: Vec<Duration>,
    /// How long a push waits for its reply (DingTalk: 1.5 s).
    pub push_timeout: Duration,
    /// Accepted age of a robot `timestamp` (DingTalk: one hour).
    pub robot_max_skew: Duration,
}

impl Default for DingtalkConfig {
    fn default() -> Self {
        DingtalkConfig {
            apps: Vec::new(),
            users: Vec::new(),
            robots: Vec::new(),
            token_ttl: Duration::from_secs(7200),
            retry_delays: vec![Duration::from_millis(20), Duration::from_millis(50)],
            // Generous, because the first call into a freshly loaded component can be slow.
            push_timeout: Duration::from_secs(5),
            robot_max_skew: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Form {
    pub process_code: String,
    pub app_key: String,
    pub name: String,
    /// Labels of the form's components.
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Node {
    /// `AND` / `OR` / `NONE`.
    pub action_type: String,
    pub user_ids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub task_id: u64,
    pub user_id: String,
    pub node: usize,
    /// `RUNNING` / `COMPLETED` / `CANCELED` / `TERMINATED`.
    pub status: String,
    /// `NONE` / `AGREE` / `REFUSE`.
    pub result: String,
    pub remark: String,
    pub create_ms: u64,
    pub finish_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub app_key: String,
    pub process_code: String,
    pub originator: String,
    pub nodes: Vec<Node>,
    pub cc: Vec<String>,
    pub form_values: Value,
    pub current: usize,
    pub tasks: Vec<Task>,
    /// `RUNNING` / `COMPLETED` / `TERMINATED`.
    pub status: String,
    /// `""` / `agree` / `refuse`.
    pub result: String,
    pub create_ms: u64,
    pub finish_ms: u64,
}

#[derive(Debug, Clone)]
pub struct RobotMessage {
    pub access_token: String,
    pub body: Value,
    /// 0 when accepted, else the errcode returned.
    pub errcode: i64,
}

#[derive(Debug, Clone)]
pub struct WorkNotice {
    pub app_key: String,
    pub agent_id: u64,
    pub userids: Vec<String>,
    pub msg: Value,
    pub task_id: u64,
}

#[derive(Debug, Default)]
pub struct DingtalkState {
    pub requests: Vec<RecordedRequest>,
    pub forms: BTreeMap<String, Form>,
    pub instances: BTreeMap<String, Instance>,
    pub robot_messages: Vec<RobotMessage>,
    pub notices: Vec<WorkNotice>,
    /// Events waiting for delivery: `(app_key, plaintext event)`.
    pub outbox: VecDeque<(String, Value)>,
    pub callback_urls: HashMap<String, String>,
    /// Apps whose events go to a persistent-connection simulator instead of a callback URL.
    event_sinks: HashMap<String, super::ws_hub::EventSink>,
    tokens: HashMap<String, (String, u64)>,
    next_id: u64,
}

impl DingtalkState {
    /// Requests to `path` (exact, no query) that reached the handler: an injected fault answers
    /// before it, so faulted ones are not counted.
    pub fn calls(&self, path: &str) -> usize {
        self.requests.iter().filter(|r| r.path == path).count()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// A fully built push, byte for byte what goes on the wire.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// `signature=…&timestamp=…&nonce=…` appended to the callback URL.
    pub query: String,
    pub body: Vec<u8>,
    pub plaintext: String,
}

#[derive(Debug, Clone)]
pub struct PushReport {
    pub url: String,
    pub request: PushRequest,
    pub attempts: Vec<Reply>,
    /// True when an attempt was answered with a valid encrypted "success".
    pub delivered: bool,
}

type Inner = Shared<DingtalkConfig, DingtalkState>;

impl Inner {
    fn app(&self, app_key: &str) -> anyhow::Result<&DingtalkApp> {
        self.config
            .apps
            .iter()
            .find(|a| a.app_key == app_key)
            .ok_or_else(|| anyhow!("unknown app {app_key}"))
    }

    fn user(&self, id: &str) -> Option<&DingtalkUser> {
        self.config.users.iter().find(|u| u.userid == id)
    }
}

/// A running DingTalk simulator on 127.0.0.1; stops when dropped. Its `base_url` is the
/// app's `api-base`; robots are at `{base_url}/robot/send?access_token={token}`.
pub type DingtalkSim = Sim<DingtalkConfig, DingtalkState>;

impl DingtalkSim {
    pub async fn start(config: DingtalkConfig) -> anyhow::Result<DingtalkSim> {
        let mut state = DingtalkState::default();
        for app in &config.apps {
            if let Some(url) = &app.callback_url {
                state.callback_urls.insert(app.app_key.clone(), url.clone());
            }
        }
        Sim::launch("DingTalk", config, state, handle).await
    }

    pub fn calls(&self, path: &str) -> usize {
        self.inner.lock().calls(path)
    }

    pub fn set_callback_url(&self, app_key: &str, url: Option<&str>) {
        let mut s = self.inner.lock();
        match url {
            Some(u) => s.callback_urls.insert(app_key.into(), u.into()),
            None => s.callback_urls.remove(app_key),
        };
    }

    /// Sends the app's events to `sink` (the Stream simulator) instead of its callback URL;
    /// `None` goes back to the URL.
    pub fn set_event_sink(&self, app_key: &str, sink: Option<super::ws_hub::EventSink>) {
        let mut s = self.inner.lock();
        match sink {
            Some(x) => s.event_sinks.insert(app_key.into(), x),
            None => s.event_sinks.remove(app_key),
        };
    }

    pub fn expire_all_tokens(&self) {
        for t in self.inner.lock().tokens.values_mut() {
            t.1 = 0;
        }
    }

    /// The next `n` requests to `path` get HTTP `status` with `body` and change nothing.
    pub fn fail_next(&self, path: &str, n: usize, status: u16, body: Value) {
        self.faults()
            .fail_next(path, n, Response::json(status, &body));
    }

    /// An approver acts on their running task: AND nodes need every approver, OR / NONE
    /// nodes one; a refusal ends the instance. Delivers the resulting events (task finish,
    /// then instance finish when the instance ends).
    pub async fn decide(
        &self,
        instance_id: &str,
        user_id: &str,
        agree: bool,
        remark: &str,
    ) -> anyhow::Result<Vec<PushReport>> {
        {
            let mut s = self.inner.lock();
            decide_locked(&mut s, instance_id, user_id, agree, remark)?;
        }
        Ok(self.flush_events().await)
    }

    /// An approver agrees and adds `added` as a signer after themselves (后加签): the added
    /// person's node goes in right after the approver's, so the instance stays running for
    /// them even when the approver's node was the last one laid out at creation.
    pub async fn agree_adding_signer(
        &self,
        instance_id: &str,
        user_id: &str,
        added: &str,
    ) -> anyhow::Result<Vec<PushReport>> {
        {
            let mut s = self.inner.lock();
            let inst = s
                .instances
                .get_mut(instance_id)
                .ok_or_else(|| anyhow!("no instance {instance_id}"))?;
            let node = inst
                .tasks
                .iter()
                .find(|t| t.user_id == user_id && t.status == "RUNNING")
                .map(|t| t.node)
                .ok_or_else(|| anyhow!("{user_id} has no running task in {instance_id}"))?;
            inst.nodes.insert(
                node + 1,
                Node {
                    action_type: "NONE".into(),
                    user_ids: vec![added.into()],
                },
            );
            decide_locked(&mut s, instance_id, user_id, true, "")?;
        }
        Ok(self.flush_events().await)
    }

    /// The originator revokes the instance in the DingTalk app (撤销): TERMINATED, running
    /// tasks canceled, `bpms_instance_change type=terminate` delivered.
    pub async fn revoke(&self, instance_id: &str) -> anyhow::Result<Vec<PushReport>> {
        {
            let mut s = self.inner.lock();
            terminate_locked(&mut s, instance_id)?;
        }
        Ok(self.flush_events().await)
    }

    /// Delivers every queued event in order; events of apps without a URL are dropped.
    pub async fn flush_events(&self) -> Vec<PushReport> {
        let mut reports = Vec::new();
        loop {
            let next = {
                let mut s = self.inner.lock();
                s.outbox.pop_front().map(|(app, ev)| {
                    let url = s.callback_urls.get(&app).cloned();
                    let sink = s.event_sinks.get(&app).cloned();
                    (app, ev, url, sink)
                })
            };
            let Some((app, ev, url, sink)) = next else {
                break;
            };
            if let Some(sink) = sink {
                sink.send(ev);
                continue;
            }
            let Some(url) = url else { continue };
            if let Ok(r) = self.push_json(&app, &url, &ev).await {
                reports.push(r);
            }
        }
        reports
    }

    /// Drops queued events without delivering them.
    pub fn discard_events(&self) {
        self.inner.lock().outbox.clear();
    }

    /// The callback-URL check DingTalk runs when the URL is saved: `{"EventType":"check_url"}`.
    pub async fn check_url(&self, app_key: &str, url: &str) -> anyhow::Result<PushReport> {
        self.push_json(app_key, url, &json!({"EventType": "check_url"}))
            .await
    }

    /// Builds the exact push DingTalk would send for `event` (for tampering in tests).
    pub fn build_push(&self, app_key: &str, event: &Value) -> anyhow::Result<PushRequest> {
        let app = self.inner.app(app_key)?;
        Ok(build_push(app, event, now_ms()))
    }

    /// A push signed at `ts_ms` whose ciphertext is `encrypt` (already base64), for
    /// malformed, stale or misaddressed pushes in tests.
    pub fn build_raw_push(
        &self,
        app_key: &str,
        encrypt: &str,
        ts_ms: u64,
    ) -> anyhow::Result<PushRequest> {
        let app = self.inner.app(app_key)?;
        let ts = ts_ms.to_string();
        let nonce = crypto::nonce();
        let sig = crypto::signature(&app.token, &ts, &nonce, encrypt);
        Ok(PushRequest {
            query: format!("signature={sig}&timestamp={ts}&nonce={nonce}"),
            body: json!({ "encrypt": encrypt }).to_string().into_bytes(),
            plaintext: String::new(),
        })
    }

    pub async fn push_json(
        &self,
        app_key: &str,
        url: &str,
        event: &Value,
    ) -> anyhow::Result<PushReport> {
        let request = self.build_push(app_key, event)?;
        self.send(app_key, url, request).await
    }

    /// Sends a prepared push, retrying until the reply is a valid encrypted "success".
    pub async fn send(
        &self,
        app_key: &str,
        url: &str,
        request: PushRequest,
    ) -> anyhow::Result<PushReport> {
        let app = self.inner.app(app_key)?.clone();
        let config = &self.inner.config;
        let sep = if url.contains('?') { '&' } else { '?' };
        let full = format!("{url}{sep}{}", request.query);
        let headers = vec![(
            "Content-Type".to_string(),
            "application/json; charset=utf-8".to_string(),
        )];
        let (attempts, delivered) = http::deliver(
            &full,
            &headers,
            &request.body,
            &config.retry_delays,
            config.push_timeout,
            |reply| reply.status == Some(200) && reply_is_success(&app, &reply.body),
        )
        .await;
        Ok(PushReport {
            url: url.into(),
            request,
            attempts,
            delivered,
        })
    }
}

/// Whether `body` is `{"msg_signature","timeStamp","nonce","encrypt"}` with a valid
/// signature and an encrypted "success" addressed to the app's AppKey.
pub fn reply_is_success(app: &DingtalkApp, body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let (Some(sig), Some(ts), Some(nonce), Some(enc)) = (
        field("msg_signature"),
        field("timeStamp"),
        field("nonce"),
        field("encrypt"),
    ) else {
        return false;
    };
    if crypto::signature(&app.token, ts, nonce, enc) != sig {
        return false;
    }
    crypto::decrypt(&app.aes_key, enc, &app.app_key).as_deref() == Some(b"success".as_slice())
}

fn build_push(app: &DingtalkApp, event: &Value, ts_ms: u64) -> PushRequest {
    let plaintext = event.to_string();
    let enc = crypto::encrypt(&app.aes_key, plaintext.as_bytes(), &app.app_key);
    let ts = ts_ms.to_string();
    let nonce = crypto::nonce();
    let sig = crypto::signature(&app.token, &ts, &nonce, &enc);
    PushRequest {
        query: format!("signature={sig}&timestamp={ts}&nonce={nonce}"),
        body: json!({ "encrypt": enc }).to_string().into_bytes(),
        plaintext,
    }
}

// ---------------------------------------------------------------------------------------------
// Crypto (independent of the guest crate on purpose)
// ---------------------------------------------------------------------------------------------

/// DingTalk callback cryptography: AES-256-CBC with IV = key[..16], a 32-byte PKCS#7 block,
/// and `random16 ‖ u32 BE len ‖ msg ‖ AppKey` framing; signatures are hex SHA-1 over the
/// sorted token, timestamp, nonce and ciphertext.
pub mod crypto {
    use aes::Aes256;
    use base64::Engine;
    use base64::alphabet::STANDARD as ALPHABET;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use cbc::cipher::block_padding::NoPadding;
    use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
    use hmac::{Hmac, Mac};
    use rand::{Rng, RngCore};
    use sha1::{Digest, Sha1};
    use sha2::Sha256;

    /// aes_key's 43rd character carries spare bits the platform ignores.
    const KEY_B64: GeneralPurpose = GeneralPurpose::new(
        &ALPHABET,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    pub fn random_aes_key() -> String {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        B64.encode(k)[..43].to_string()
    }

    pub fn nonce() -> String {
        let mut r = rand::thread_rng();
        (0..8)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[r.gen_range(0..36)]))
            .collect()
    }

    fn key(aes_key: &str) -> Option<[u8; 32]> {
        KEY_B64.decode(format!("{aes_key}=")).ok()?.try_into().ok()
    }

    pub fn encrypt(aes_key: &str, msg: &[u8], owner: &str) -> String {
        let mut random = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut random);
        encrypt_with(aes_key, random, msg, owner)
    }

    /// [`encrypt`] with a chosen random prefix.
    pub fn encrypt_with(aes_key: &str, random: [u8; 16], msg: &[u8], owner: &str) -> String {
        // A configured key is 43 base64 characters; anything else is a test bug.
        let k = key(aes_key).expect("aes_key must be 43 base64 characters");
        let mut pt = random.to_vec();
        pt.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        pt.extend_from_slice(msg);
        pt.extend_from_slice(owner.as_bytes());
        let n = 32 - pt.len() % 32;
        pt.extend(std::iter::repeat_n(n as u8, n));
        let ct = cbc::Encryptor::<Aes256>::new_from_slices(&k, &k[..16])
            .expect("32-byte key, 16-byte iv")
            .encrypt_padded_vec_mut::<NoPadding>(&pt);
        B64.encode(ct)
    }

    /// Encrypts `plaintext` as is (no framing, no padding; a multiple of 16 bytes), for
    /// producing malformed pushes in tests.
    pub fn encrypt_raw(aes_key: &str, plaintext: &[u8]) -> String {
        let k = key(aes_key).expect("aes_key must be 43 base64 characters");
        let ct = cbc::Encryptor::<Aes256>::new_from_slices(&k, &k[..16])
            .expect("32-byte key, 16-byte iv")
            .encrypt_padded_vec_mut::<NoPadding>(plaintext);
        B64.encode(ct)
    }

    /// The message, if `enc` decrypts, is well framed and addressed to `owner`.
    pub fn decrypt(aes_key: &str, enc: &str, owner: &str) -> Option<Vec<u8>> {
        let k = key(aes_key)?;
        let ct = B64.decode(enc).ok()?;
        if ct.is_empty() || ct.len() % 16 != 0 {
            return None;
        }
        let pt = cbc::Decryptor::<Aes256>::new_from_slices(&k, &k[..16])
            .ok()?
            .decrypt_padded_vec_mut::<NoPadding>(&ct)
            .ok()?;
        let n = *pt.last()? as usize;
        if n == 0 || n > 32 || n > pt.len() || !pt[pt.len() - n..].iter().all(|&b| b as usize == n)
        {
            return None;
        }
        let body = &pt[..pt.len() - n];
        if body.len() < 20 {
            return None;
        }
        let len = u32::from_be_bytes(body[16..20].try_into().ok()?) as usize;
        let rest = &body[20..];
        if len > rest.len() || &rest[len..] != owner.as_bytes() {
            return None;
        }
        Some(rest[..len].to_vec())
    }

    pub fn signature(token: &str, ts: &str, nonce: &str, enc: &str) -> String {
        let mut parts = [token, ts, nonce, enc];
        parts.sort();
        let mut h = Sha1::new();
        for p in parts {
            h.update(p.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Robot 加签: base64(HMAC-SHA256(key = secret, msg = `timestamp + "\n" + secret`)).
    pub fn robot_sign(ts: &str, secret: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(format!("{ts}\n{secret}").as_bytes());
        B64.encode(mac.finalize().into_bytes())
    }

    pub fn robot_sign_ok(ts: &str, secret: &str, sign: &str) -> bool {
        let Ok(given) = B64.decode(sign) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(format!("{ts}\n{secret}").as_bytes());
        mac.verify_slice(&given).is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-03-01T08:05Z`, the new API's time format.
pub fn iso(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// A new-API error: HTTP status, string code, message.
struct NewErr(u16, &'static str, String);

fn new_err(status: u16, code: &'static str, msg: impl Into<String>) -> NewErr {
    NewErr(status, code, msg.into())
}

fn legacy(code: i64, msg: &str) -> Value {
    json!({"errcode": code, "errmsg": msg})
}

/// How `/topapi` answers a bad token (and throttling): errcode 88, the real code in
/// `sub_code` and in the message.
fn topapi_error(sub_code: i64, sub_msg: &str) -> Value {
    json!({"errcode": 88, "errmsg": format!("ding talk error[subcode={sub_code},submsg={sub_msg}]"),
        "sub_code": sub_code.to_string(), "sub_msg": sub_msg, "request_id": "r"})
}

fn handle(inner: &Inner, req: Request) -> Response {
    let mut state = inner.lock();
    state.requests.push(RecordedRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        body: req.body.to_vec(),
    });
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let path = req.path.as_str();
    if path.starts_with("/v1.0/") {
        let result = if path == "/v1.0/oauth2/accessToken" {
            issue_token(inner, &mut state, &body)
        } else {
            match authenticate_new(&state, &req) {
                Err(e) => Err(e),
                Ok(app_key) => route_new(inner, &mut state, &app_key, &req, &body),
            }
        };
        return match result {
            Ok(v) => Response::json(200, &v),
            Err(NewErr(status, code, message)) => Response::json(
                status,
                &json!({"code": code, "message": message, "requestid": format!("{:X}", rand::thread_rng().r#gen::<u64>())}),
            ),
        };
    }
    if path == "/robot/send" {
        return Response::json(200, &robot(inner, &mut state, &req, &body));
    }
    if path.starts_with("/topapi/") {
        let Some(app_key) = authenticate_legacy(&state, &req) else {
            return Response::json(200, &topapi_error(40014, "不合法的access_token"));
        };
        let v = match path {
            "/topapi/v2/user/getbymobile" => getbymobile(inner, &body),
            "/topapi/message/corpconversation/asyncsend_v2" => {
                work_notice(inner, &mut state, &app_key, &body)
            }
            _ => legacy(404, "api not found"),
        };
        return Response::json(200, &v);
    }
    Response::json(404, &json!({"code": "NotFound", "message": "no such API"}))
}

fn issue_token(inner: &Inner, state: &mut DingtalkState, body: &Value) -> Result<Value, NewErr> {
    let key = body.get("appKey").and_then(Value::as_str).unwrap_or("");
    let secret = body.get("appSecret").and_then(Value::as_str).unwrap_or("");
    let ok = inner
        .config
        .apps
        .iter()
        .any(|a| a.app_key == key && a.app_secret == secret);
    if !ok {
        return Err(new_err(
            400,
            "invalidClientIdOrSecret",
            "无效的clientId或者clientSecret",
        ));
    }
    let token = format!("{:032x}", rand::thread_rng().r#gen::<u128>());
    let ttl = inner.config.token_ttl;
    state.tokens.insert(
        token.clone(),
        (key.to_string(), now_ms() + ttl.as_millis() as u64),
    );
    Ok(json!({"accessToken": token, "expireIn": ttl.as_secs()}))
}

fn token_owner(state: &DingtalkState, token: &str) -> Option<String> {
    state
        .tokens
        .get(token)
        .filter(|(_, exp)| *exp > now_ms())
        .map(|(app, _)| app.clone())
}

fn authenticate_new(state: &DingtalkState, req: &Request) -> Result<String, NewErr> {
    req.header("x-acs-dingtalk-access-token")
        .and_then(|t| token_owner(state, t))
        .ok_or_else(|| new_err(401, "InvalidAuthentication", "不合法的access_token"))
}

fn authenticate_legacy(state: &DingtalkState, req: &Request) -> Option<String> {
    req.query_param("access_token")
        .and_then(|t| token_owner(state, &t))
}

fn route_new(
    inner: &Inner,
    state: &mut DingtalkState,
    app_key: &str,
    req: &Request,
    body: &Value,
) -> Result<Value, NewErr> {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1.0/workflow/forms") => create_form(state, app_key, body),
        ("GET", "/v1.0/workflow/processes/userVisibilities/templates") => {
            let list: Vec<Value> = state
                .forms
                .values()
                .filter(|f| f.app_key == app_key)
                .map(|f| json!({"name": f.name, "processCode": f.process_code, "iconUrl": "", "url": ""}))
                .collect();
            Ok(json!({"result": {"processList": list}}))
        }
        // The form's schema (only what imbridge reads of it); an unknown or deleted code is
        // `formNotExist`, as the platform documents.
        ("GET", "/v1.0/workflow/forms/schemas/processCodes") => {
            let code = req.query_param("processCode").unwrap_or_default();
            let form = state
                .forms
                .get(&code)
                .filter(|f| f.app_key == app_key)
                .ok_or_else(|| new_err(400, "formNotExist", "审批表单模板不存在"))?;
            Ok(
                json!({"result": {"formCode": form.process_code, "name": form.name,
                                 "status": "PUBLISHED"}}),
            )
        }
        ("POST", "/v1.0/workflow/processInstances") => create_instance(inner, state, app_key, body),
        ("GET", "/v1.0/workflow/processInstances") => {
            let id = req.query_param("processInstanceId").unwrap_or_default();
            let inst = state
                .instances
                .get(&id)
                .filter(|i| i.app_key == app_key)
                .ok_or_else(|| new_err(400, "InvalidParameter", "processInstanceId is invalid"))?;
            Ok(json!({"success": true, "result": instance_json(inst)}))
        }
        ("POST", "/v1.0/workflow/processInstances/terminate") => {
            let id = body
                .get("processInstanceId")
                .and_then(Value::as_str)
                .unwrap_or("");
            let Some(inst) = state.instances.get(id).filter(|i| i.app_key == app_key) else {
                return Err(new_err(
                    400,
                    "InvalidParameter",
                    "processInstanceId is invalid",
                ));
            };
            // Not a system revoke, it must say whose: DingTalk refuses it otherwise.
            let system = body.get("isSystem").and_then(Value::as_bool) == Some(true);
            let operator = body.get("operatingUserId").and_then(Value::as_str);
            if !system && operator.is_none_or(str::is_empty) {
                return Err(new_err(
                    400,
                    "InvalidParameter",
                    "operatingUserId is required when isSystem is false",
                ));
            }
            let remark = body.get("remark").and_then(Value::as_str).unwrap_or("");
            if remark.encode_utf16().count() > 1024 {
                return Err(new_err(400, "InvalidParameter", "remark is too long"));
            }
            // One code for both refusals, as DingTalk documents for this API.
            if inst.status != "RUNNING" {
                return Err(new_err(400, STATUS_EXCEPTION, "审批单已结束"));
            }
            if now_ms() < inst.create_ms + REVOKE_AFTER.as_millis() as u64 {
                return Err(new_err(
                    400,
                    STATUS_EXCEPTION,
                    "提交审批后 15 秒内不允许撤销",
                ));
            }
            terminate_locked(state, id)
                .map_err(|e| new_err(400, STATUS_EXCEPTION, e.to_string()))?;
            Ok(json!({"success": true, "result": true}))
        }
        _ => Err(new_err(404, "NotFound", "no such API")),
    }
}

fn create_form(state: &mut DingtalkState, app_key: &str, body: &Value) -> Result<Value, NewErr> {
    let name = body.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Err(new_err(400, "InvalidParameter", "name is required"));
    }
    let comps = body
        .get("formComponents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| new_err(400, "InvalidParameter", "formComponents is required"))?;
    let mut labels = Vec::new();
    for c in comps {
        let kind = c.get("componentType").and_then(Value::as_str).unwrap_or("");
        let label = c
            .get("props")
            .and_then(|p| p.get("label"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if kind.is_empty() || label.is_empty() {
            return Err(new_err(
                400,
                "InvalidParameter",
                "componentType and props.label are required",
            ));
        }
        labels.push(label.to_string());
    }
    let code = match body.get("processCode").and_then(Value::as_str) {
        Some(c) if state.forms.contains_key(c) => c.to_string(),
        _ => format!("PROC-{:08X}", state.id()),
    };
    state.forms.insert(
        code.clone(),
        Form {
            process_code: code.clone(),
            app_key: app_key.into(),
            name: name.into(),
            labels,
        },
    );
    Ok(json!({"result": {"processCode": code}}))
}

fn create_instance(
    inner: &Inner,
    state: &mut DingtalkState,
    app_key: &str,
    body: &Value,
) -> Result<Value, NewErr> {
    let invalid = |m: &str| new_err(400, "InvalidParameter", m.to_string());
    let code = body
        .get("processCode")
        .and_then(Value::as_str)
        .unwrap_or("");
    let form = state
        .forms
        .get(code)
        .filter(|f| f.app_key == app_key)
        .ok_or_else(|| invalid("processCode is invalid"))?
        .clone();
    let originator = body
        .get("originatorUserId")
        .and_then(Value::as_str)
        .filter(|u| inner.user(u).is_some())
        .ok_or_else(|| invalid("originatorUserId is invalid"))?
        .to_string();
    let mut nodes = Vec::new();
    for a in body
        .get("approvers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("approvers is required"))?
    {
        let action = a.get("actionType").and_then(Value::as_str).unwrap_or("");
        let ids: Vec<String> = a
            .get("userIds")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let ok_count = match action {
            "NONE" => ids.len() == 1,
            "AND" | "OR" => !ids.is_empty(),
            _ => false,
        };
        if !ok_count {
            return Err(invalid("approvers.actionType does not fit userIds"));
        }
        if let Some(u) = ids.iter().find(|u| inner.user(u).is_none()) {
            return Err(invalid(&format!("user {u} not found")));
        }
        nodes.push(Node {
            action_type: action.into(),
            user_ids: ids,
        });
    }
    if nodes.is_empty() {
        return Err(invalid("approvers is required"));
    }
    let cc: Vec<String> = body
        .get("ccList")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if !cc.is_empty()
        && !matches!(
            body.get("ccPosition").and_then(Value::as_str),
            Some("START" | "FINISH" | "START_FINISH")
        )
    {
        return Err(invalid("ccPosition is required with ccList"));
    }
    let values = body
        .get("formComponentValues")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("formComponentValues is required"))?;
    for v in values {
        let name = v.get("name").and_then(Value::as_str).unwrap_or("");
        if !form.labels.iter().any(|l| l == name) {
            return Err(invalid(&format!("form has no component named {name}")));
        }
    }
    let id = format!("{:022x}", rand::thread_rng().r#gen::<u128>() >> 40);
    let now = now_ms();
    let mut inst = Instance {
        id: id.clone(),
        app_key: app_key.into(),
        process_code: code.into(),
        originator,
        nodes,
        cc,
        form_values: Value::Array(values.clone()),
        current: 0,
        tasks: Vec::new(),
        status: "RUNNING".into(),
        result: String::new(),
        create_ms: now,
        finish_ms: 0,
    };
    let mut events = vec![instance_event(&inst, "start", now)];
    events.extend(activate(state, &mut inst, 0, now));
    for e in events {
        state.outbox.push_back((app_key.into(), e));
    }
    state.instances.insert(id.clone(), inst);
    Ok(json!({"instanceId": id}))
}

fn activate(state: &mut DingtalkState, inst: &mut Instance, node: usize, now: u64) -> Vec<Value> {
    inst.current = node;
    let mut events = Vec::new();
    for u in inst.nodes[node].user_ids.clone() {
        let task = Task {
            task_id: state.id(),
            user_id: u,
            node,
            status: "RUNNING".into(),
            result: "NONE".into(),
            remark: String::new(),
            create_ms: now,
            finish_ms: 0,
        };
        events.push(task_event(inst, &task, "start", now));
        inst.tasks.push(task);
    }
    events
}

fn task_event(inst: &Instance, task: &Task, kind: &str, now: u64) -> Value {
    let mut ev = json!({
        "EventType": "bpms_task_change", "processInstanceId": inst.id, "corpId": "dingcorp",
        "createTime": task.create_ms, "title": "imbridge", "type": kind, "staffId": task.user_id,
        "processCode": inst.process_code, "bizCategoryId": "", "taskId": task.task_id,
    });
    if kind == "finish" {
        ev["finishTime"] = json!(now);
        ev["result"] = json!(task.result.to_ascii_lowercase());
        ev["remark"] = json!(task.remark);
    }
    ev
}

fn instance_event(inst: &Instance, kind: &str, now: u64) -> Value {
    let mut ev = json!({
        "EventType": "bpms_instance_change", "processInstanceId": inst.id, "corpId": "dingcorp",
        "createTime": inst.create_ms, "title": "imbridge", "type": kind,
        "staffId": inst.originator, "processCode": inst.process_code,
        "url": format!("https://aflow.dingtalk.com/dingtalk/mobile/homepage.htm#/approval?procInsId={}", inst.id),
    });
    if kind == "finish" {
        ev["finishTime"] = json!(now);
        ev["result"] = json!(inst.result);
    }
    ev
}

fn decide_locked(
    state: &mut DingtalkState,
    instance_id: &str,
    user_id: &str,
    agree: bool,
    remark: &str,
) -> anyhow::Result<()> {
    let mut inst = state
        .instances
        .get(instance_id)
        .cloned()
        .ok_or_else(|| anyhow!("no instance {instance_id}"))?;
    if inst.status != "RUNNING" {
        bail!("instance {instance_id} is {}", inst.status);
    }
    let now = now_ms();
    let Some(ti) = inst
        .tasks
        .iter()
        .position(|t| t.user_id == user_id && t.status == "RUNNING")
    else {
        bail!("{user_id} has no running task in {instance_id}");
    };
    let node = inst.tasks[ti].node;
    {
        let t = &mut inst.tasks[ti];
        t.status = "COMPLETED".into();
        t.result = if agree { "AGREE" } else { "REFUSE" }.into();
        t.remark = remark.into();
        t.finish_ms = now;
    }
    let mut events = vec![task_event(&inst, &inst.tasks[ti], "finish", now)];
    let node_done = !agree
        || inst.nodes[node].action_type != "AND"
        || inst
            .tasks
            .iter()
            .filter(|t| t.node == node)
            .all(|t| t.status == "COMPLETED");
    if node_done {
        // The others' tasks of this node (OR, or after a refusal) are withdrawn.
        for t in inst.tasks.iter_mut().filter(|t| t.status == "RUNNING") {
            t.status = "CANCELED".into();
            t.finish_ms = now;
        }
        let withdrawn: Vec<Value> = inst
            .tasks
            .iter()
            .filter(|t| t.status == "CANCELED" && t.finish_ms == now)
            .map(|t| task_event(&inst, t, "cancel", now))
            .collect();
        events.extend(withdrawn);
        if !agree || node + 1 == inst.nodes.len() {
            inst.status = "COMPLETED".into();
            inst.result = if agree { "agree" } else { "refuse" }.into();
            inst.finish_ms = now;
            events.push(instance_event(&inst, "finish", now));
        } else {
            events.extend(activate(state, &mut inst, node + 1, now));
        }
    }
    let app = inst.app_key.clone();
    state.instances.insert(inst.id.clone(), inst);
    for e in events {
        state.outbox.push_back((app.clone(), e));
    }
    Ok(())
}

fn terminate_locked(state: &mut DingtalkState, instance_id: &str) -> anyhow::Result<()> {
    let inst = state
        .instances
        .get_mut(instance_id)
        .ok_or_else(|| anyhow!("no instance {instance_id}"))?;
    if inst.status != "RUNNING" {
        bail!("instance {instance_id} is {}", inst.status);
    }
    let now = now_ms();
    inst.status = "TERMINATED".into();
    inst.finish_ms = now;
    for t in inst.tasks.iter_mut().filter(|t| t.status == "RUNNING") {
        t.status = "CANCELED".into();
        t.finish_ms = now;
    }
    let ev = instance_event(inst, "terminate", now);
    let app = inst.app_key.clone();
    state.outbox.push_back((app, ev));
    Ok(())
}

fn instance_json(inst: &Instance) -> Value {
    let tasks: Vec<Value> = inst
        .tasks
        .iter()
        .map(|t| {
            let mut v = json!({"taskId": t.task_id, "userId": t.user_id, "status": t.status,
                "result": t.result, "createTime": iso(t.create_ms),
                "activityId": format!("node{}", t.node + 1)});
            if t.finish_ms > 0 {
                v["finishTime"] = json!(iso(t.finish_ms));
            }
            v
        })
        .collect();
    let mut records = vec![
        json!({"userId": inst.originator, "date": iso(inst.create_ms),
        "type": "START_PROCESS_INSTANCE", "result": "NONE"}),
    ];
    for t in inst.tasks.iter().filter(|t| t.status == "COMPLETED") {
        records.push(json!({"userId": t.user_id, "date": iso(t.finish_ms),
            "type": "EXECUTE_TASK_NORMAL", "result": t.result, "remark": t.remark}));
    }
    if inst.status == "TERMINATED" {
        records.push(
            json!({"userId": inst.originator, "date": iso(inst.finish_ms),
            "type": "TERMINATE_PROCESS_INSTANCE", "result": "NONE"}),
        );
    }
    let mut v = json!({
        "title": "imbridge", "status": inst.status, "result": inst.result,
        "originatorUserId": inst.originator, "createTime": iso(inst.create_ms),
        "formComponentValues": inst.form_values, "ccUserIds": inst.cc,
        "tasks": tasks, "operationRecords": records, "businessId": inst.id,
    });
    if inst.finish_ms > 0 {
        v["finishTime"] = json!(iso(inst.finish_ms));
    }
    v
}

fn getbymobile(inner: &Inner, body: &Value) -> Value {
    let mobile = body.get("mobile").and_then(Value::as_str).unwrap_or("");
    match inner
        .config
        .users
        .iter()
        .find(|u| !mobile.is_empty() && u.mobile.as_deref() == Some(mobile))
    {
        Some(u) => json!({"errcode": 0, "errmsg": "ok", "result": {"userid": u.userid},
            "request_id": "r"}),
        None => legacy(60121, "找不到该用户"),
    }
}

fn work_notice(inner: &Inner, state: &mut DingtalkState, app_key: &str, body: &Value) -> Value {
    let Ok(app) = inner.app(app_key) else {
        return topapi_error(40014, "不合法的access_token");
    };
    if body.get("agent_id").and_then(Value::as_u64) != Some(app.agent_id) {
        return legacy(40056, "不合法的agentid");
    }
    let users: Vec<String> = body
        .get("userid_list")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if users.is_empty() || users.len() > 100 {
        return legacy(40035, "userid_list 不合法");
    }
    let msg = body.get("msg").cloned().unwrap_or(Value::Null);
    let valid = match msg.get("msgtype").and_then(Value::as_str) {
        Some("markdown") => msg
            .get("markdown")
            .is_some_and(|m| m.get("title").is_some() && m.get("text").is_some()),
        Some("text") => msg.get("text").and_then(|t| t.get("content")).is_some(),
        _ => false,
    };
    if !valid {
        return legacy(40035, "msg 不合法");
    }
    let task_id = state.id();
    state.notices.push(WorkNotice {
        app_key: app_key.into(),
        agent_id: app.agent_id,
        userids: users,
        msg,
        task_id,
    });
    json!({"errcode": 0, "errmsg": "ok", "task_id": task_id, "request_id": "r"})
}

fn robot(inner: &Inner, state: &mut DingtalkState, req: &Request, body: &Value) -> Value {
    let token = req.query_param("access_token").unwrap_or_default();
    let code_msg = check_robot(inner, &token, req, body);
    state.robot_messages.push(RobotMessage {
        access_token: token,
        body: body.clone(),
        errcode: code_msg.0,
    });
    legacy(code_msg.0, code_msg.1)
}

fn check_robot(inner: &Inner, token: &str, req: &Request, body: &Value) -> (i64, &'static str) {
    let Some(robot) = inner.config.robots.iter().find(|r| r.access_token == token) else {
        return (300001, "token is not exist");
    };
    if let Some(secret) = &robot.secret {
        let (Some(ts), Some(sign)) = (req.query_param("timestamp"), req.query_param("sign")) else {
            return (
                310000,
                "sign not match, more: [https://ding-doc.dingtalk.com/doc#/serverapi2/qf2nxq]",
            );
        };
        let fresh = ts
            .parse::<u64>()
            .is_ok_and(|t| now_ms().abs_diff(t) <= inner.config.robot_max_skew.as_millis() as u64);
        if !fresh {
            return (310000, "invalid timestamp");
        }
        if !crypto::robot_sign_ok(&ts, secret, &sign) {
            return (310000, "sign not match");
        }
    }
    let ok = match body.get("msgtype").and_then(Value::as_str) {
        Some("text") => body.get("text").and_then(|t| t.get("content")).is_some(),
        Some("markdown") => body
            .get("markdown")
            .is_some_and(|m| m.get("title").is_some() && m.get("text").is_some()),
        Some("actionCard") => body.get("actionCard").is_some_and(|c| {
            c.get("title").is_some()
                && c.get("text").is_some()
                && (c.get("singleURL").is_some() || c.get("btns").is_some())
        }),
        _ => false,
    };
    if ok {
        (0, "ok")
    } else {
        (40035, "缺少参数 json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_roundtrip_and_owner_check() {
        let key = crypto::random_aes_key();
        assert_eq!(key.len(), 43);
        let enc = crypto::encrypt(&key, b"hello", "dingkey");
        assert_eq!(crypto::decrypt(&key, &enc, "dingkey").unwrap(), b"hello");
        assert!(crypto::decrypt(&key, &enc, "other").is_none());
        // 16 + 4 + 9 + 3 = 32: a whole extra 32-byte block of padding.
        let enc = crypto::encrypt_with(&key, [0; 16], b"123456789", "abc");
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&enc)
            .unwrap();
        assert_eq!(raw.len(), 64);
    }

    #[test]
    fn signature_sorts_and_iso_formats() {
        // sha1("1700000000ENCnoncetoken"), as in the guest's known answer.
        assert_eq!(
            crypto::signature("token", "1700000000", "nonce", "ENC"),
            "8eff1fcabfa545a4f3228f21284394ba7964166a"
        );
        assert_eq!(iso(1_709_280_300_000), "2024-03-01T08:05Z");
        assert_eq!(iso(0), "1970-01-01T00:00Z");
        // printf '1700000000000\nsec' | openssl dgst -sha256 -hmac sec -binary | base64
        assert_eq!(
            crypto::robot_sign("1700000000000", "sec"),
            "2Bn+1b9JMbAnwLtaHqn8F5V8vOWoUG9M7qcsi2p+u90="
        );
    }

    #[test]
    fn replies_are_checked() {
        let app = DingtalkApp::new("k");
        let enc = crypto::encrypt(&app.aes_key, b"success", "k");
        let sig = crypto::signature(&app.token, "1", "n", &enc);
        let good = json!({"msg_signature": sig, "timeStamp": "1", "nonce": "n", "encrypt": enc});
        assert!(reply_is_success(&app, good.to_string().as_bytes()));
        let mut bad = good.clone();
        bad["nonce"] = json!("m");
        assert!(!reply_is_success(&app, bad.to_string().as_bytes()));
        let other = crypto::encrypt(&app.aes_key, b"success", "not-k");
        let sig = crypto::signature(&app.token, "1", "n", &other);
        let wrong_owner =
            json!({"msg_signature": sig, "timeStamp": "1", "nonce": "n", "encrypt": other});
        assert!(!reply_is_success(&app, wrong_owner.to_string().as_bytes()));
        assert!(!reply_is_success(&app, b"success"));
    }
}
