//! A WeCom (WeChat Work) simulator.
//!
//! Speaks the `qyapi` wire formats the component uses: `gettoken` (per corp + secret, with
//! `expires_in`), `oa/approval/create_template`, `oa/gettemplatedetail`, `oa/applyevent`,
//! `oa/getapprovaldetail`, `user/getuserid`, `user/get_userid_by_email`, `message/send`,
//! `appchat/send` and the group robot `webhook/send`. Every API call must carry a valid `access_token`; each recorded request
//! notes which app (agent) that token was issued to, so tests can prove two apps of one corp
//! never share a token.
//!
//! It plays WeCom's side of callbacks too: approver actions produce `sys_approval_change`
//! events, encrypted with WXBizMsgCrypt (AES-256-CBC, 32-byte PKCS#7, CorpID as receive id) and
//! signed (`msg_signature` over the sorted token, timestamp, nonce and ciphertext), POSTed as
//! XML to the app's callback URL, and retried on a non-200 reply. [`WecomSim::url_check`]
//! performs the GET URL verification WeCom runs when a callback URL is saved.
//!
//! Simplifications: one user directory per simulator (real userids are per corp); approvals
//! have no conditions or templates' default approvers (`use_template_approver` must be 0).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use rand::Rng;
use serde_json::{Value, json};

use super::http::{self, Reply, Request, Response, Shared, Sim};

/// One self-built app: a corp's CorpID plus the app's Secret and AgentId.
#[derive(Debug, Clone)]
pub struct WecomApp {
    pub corp_id: String,
    pub secret: String,
    pub agent_id: u64,
    /// Callback "Token".
    pub token: String,
    /// Callback "EncodingAESKey" (43 characters).
    pub encoding_aes_key: String,
    pub callback_url: Option<String>,
}

impl WecomApp {
    /// An app of `corp_id` with a random token and EncodingAESKey.
    pub fn new(corp_id: &str, secret: &str, agent_id: u64) -> Self {
        WecomApp {
            corp_id: corp_id.into(),
            secret: secret.into(),
            agent_id,
            token: format!("tok{}", &hex(8)),
            encoding_aes_key: crypto::random_aes_key(),
            callback_url: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WecomUser {
    pub userid: String,
    /// As the directory stores it: 11 digits for mainland numbers.
    pub mobile: Option<String>,
    pub email: Option<String>,
}

impl WecomUser {
    pub fn new(userid: &str) -> Self {
        WecomUser {
            userid: userid.into(),
            mobile: None,
            email: Some(format!("{userid}@example.com")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WecomConfig {
    pub apps: Vec<WecomApp>,
    pub users: Vec<WecomUser>,
    /// Group chat ids the apps may post to through `appchat/send`.
    pub chats: Vec<String>,
    /// Group robot keys (`webhook/send?key=`).
    pub robot_keys: Vec<String>,
    /// `expires_in` of access tokens (WeCom: 7200 s).
    pub token_ttl: Duration,
    /// Delays between push attempts after a non-200 reply (WeCom retries 3 times).
    pub retry_delays: Vec<Duration>,
    /// WeCom expects a reply within 5 s (1 s for the URL check).
    pub push_timeout: Duration,
}

impl Default for WecomConfig {
    fn default() -> Self {
        WecomConfig {
            apps: Vec::new(),
            users: Vec::new(),
            chats: Vec::new(),
            robot_keys: Vec::new(),
            token_ttl: Duration::from_secs(7200),
            retry_delays: vec![
                Duration::from_millis(20),
                Duration::from_millis(50),
                Duration::from_millis(100),
            ],
            push_timeout: Duration::from_secs(5),
        }
    }
}

/// A request that reached the simulator.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
    /// The access token presented, if any.
    pub access_token: Option<String>,
    /// `(corp_id, agent_id)` the token was issued to, when it was valid.
    pub token_owner: Option<(String, u64)>,
}

/// A token issued by `gettoken`.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub corp_id: String,
    pub agent_id: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub template_id: String,
    pub corp_id: String,
    pub name: String,
    pub control_ids: Vec<String>,
}

/// One approver's action in a node.
#[derive(Debug, Clone)]
pub struct Detail {
    pub userid: String,
    /// 1 pending, 2 approved, 3 rejected.
    pub sp_status: i64,
    pub speech: String,
    pub sptime: u64,
}

#[derive(Debug, Clone)]
pub struct Node {
    /// 1 AND (all must agree), 2 OR (first one decides).
    pub apv_rel: i64,
    pub details: Vec<Detail>,
}

impl Node {
    /// 1 pending, 2 approved, 3 rejected.
    fn status(&self) -> i64 {
        if self.details.iter().any(|d| d.sp_status == 3) {
            3
        } else if (self.apv_rel == 2 && self.details.iter().any(|d| d.sp_status == 2))
            || self.details.iter().all(|d| d.sp_status == 2)
        {
            2
        } else {
            1
        }
    }
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub sp_no: String,
    pub corp_id: String,
    /// The app that created it; its callback URL gets the events.
    pub agent_id: u64,
    pub template_id: String,
    pub creator: String,
    /// 1 pending, 2 approved, 3 rejected, 4 withdrawn, 6 withdrawn after approval, 7 deleted.
    pub sp_status: i64,
    pub nodes: Vec<Node>,
    pub cc: Vec<String>,
    pub text: String,
    pub summary: Value,
    pub apply_time: u64,
}

impl Instance {
    fn current_node(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.status() == 1)
    }
}

#[derive(Debug, Clone)]
pub struct AppMessage {
    pub agent_id: u64,
    pub body: Value,
}

#[derive(Debug, Clone)]
pub struct RobotMessage {
    pub key: String,
    pub body: Value,
}

#[derive(Debug, Default)]
pub struct WecomState {
    pub requests: Vec<RecordedRequest>,
    pub tokens: Vec<IssuedToken>,
    pub templates: Vec<Template>,
    pub instances: BTreeMap<String, Instance>,
    pub app_messages: Vec<AppMessage>,
    pub chat_messages: Vec<AppMessage>,
    pub robot_messages: Vec<RobotMessage>,
    pub callback_urls: HashMap<u64, String>,
    sp_counter: u64,
}

impl WecomState {
    /// Requests to `path`.
    pub fn calls(&self, path: &str) -> usize {
        self.requests.iter().filter(|r| r.path == path).count()
    }
}

/// A push exactly as sent: query (`msg_signature`, `timestamp`, `nonce`) and XML body.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub query: String,
    pub body: Vec<u8>,
    /// The XML before encryption.
    pub plaintext: String,
}

#[derive(Debug, Clone)]
pub struct PushReport {
    pub url: String,
    pub request: PushRequest,
    pub attempts: Vec<Reply>,
    pub delivered: bool,
}

/// Outcome of [`WecomSim::url_check`].
#[derive(Debug, Clone)]
pub struct UrlCheckReport {
    /// The plaintext WeCom expects back, byte for byte.
    pub echo: String,
    pub query: String,
    pub reply: Reply,
    /// HTTP 200 and the body is exactly the plaintext (no quotes, no newline).
    pub verified: bool,
}

type Inner = Shared<WecomConfig, WecomState>;

impl Inner {
    fn app_by_agent(&self, agent_id: u64) -> anyhow::Result<&WecomApp> {
        self.config
            .apps
            .iter()
            .find(|a| a.agent_id == agent_id)
            .ok_or_else(|| anyhow!("unknown agent {agent_id}"))
    }
}

/// A running WeCom simulator on 127.0.0.1; stops when dropped. Its `base_url` is the apps'
/// `api-base`; robots live at `{base_url}/cgi-bin/webhook/send?key=KEY`.
pub type WecomSim = Sim<WecomConfig, WecomState>;

impl WecomSim {
    pub async fn start(config: WecomConfig) -> anyhow::Result<WecomSim> {
        let mut state = WecomState::default();
        for app in &config.apps {
            if let Some(url) = &app.callback_url {
                state.callback_urls.insert(app.agent_id, url.clone());
            }
        }
        Sim::launch("WeCom", config, state, handle).await
    }

    pub fn calls(&self, path: &str) -> usize {
        self.inner.lock().calls(path)
    }

    pub fn set_callback_url(&self, agent_id: u64, url: Option<&str>) {
        let mut state = self.inner.lock();
        match url {
            Some(u) => state.callback_urls.insert(agent_id, u.into()),
            None => state.callback_urls.remove(&agent_id),
        };
    }

    /// Every issued token becomes invalid (WeCom then answers 42001).
    pub fn expire_all_tokens(&self) {
        for t in &mut self.inner.lock().tokens {
            t.expires_ms = 0;
        }
    }

    /// The next `n` requests to `path` get `{"errcode": code, "errmsg": msg}` with HTTP
    /// `status` and change nothing.
    pub fn fail_next(&self, path: &str, n: usize, status: u16, code: i64, msg: &str) {
        self.faults().fail_next(
            path,
            n,
            Response::json(status, &json!({"errcode": code, "errmsg": msg})),
        );
    }

    /// An approver acts on the current node; the change is pushed to the creating app's
    /// callback URL (when set). Returns the push report, if a push was made.
    pub async fn decide(
        &self,
        sp_no: &str,
        userid: &str,
        approve: bool,
        speech: &str,
    ) -> anyhow::Result<Option<PushReport>> {
        let (agent, xml) = {
            let mut state = self.inner.lock();
            let inst = state
                .instances
                .get_mut(sp_no)
                .ok_or_else(|| anyhow!("no approval {sp_no}"))?;
            if inst.sp_status != 1 {
                bail!("approval {sp_no} is no longer pending");
            }
            let node = inst
                .current_node()
                .ok_or_else(|| anyhow!("approval {sp_no} has no pending node"))?;
            let detail = inst.nodes[node]
                .details
                .iter_mut()
                .find(|d| d.userid == userid && d.sp_status == 1)
                .ok_or_else(|| anyhow!("{userid} has nothing to decide on {sp_no} now"))?;
            detail.sp_status = if approve { 2 } else { 3 };
            detail.speech = speech.into();
            detail.sptime = now_ms() / 1000;
            if !approve {
                inst.sp_status = 3;
            } else if inst.current_node().is_none() {
                inst.sp_status = 2;
            }
            let change = if approve { 2 } else { 3 };
            (inst.agent_id, event_xml(inst, change))
        };
        self.push_event(agent, &xml).await
    }

    /// The creator withdraws the approval in the WeCom client (4; 6 when already approved).
    pub async fn withdraw(&self, sp_no: &str) -> anyhow::Result<Option<PushReport>> {
        let (agent, xml) = {
            let mut state = self.inner.lock();
            let inst = state
                .instances
                .get_mut(sp_no)
                .ok_or_else(|| anyhow!("no approval {sp_no}"))?;
            // StatuChangeEvent 6 is a withdrawal, 8 one after the approval passed.
            let change;
            (inst.sp_status, change) = match inst.sp_status {
                1 => (4, 6),
                2 => (6, 8),
                s => bail!("approval {sp_no} cannot be withdrawn in status {s}"),
            };
            (inst.agent_id, event_xml(inst, change))
        };
        self.push_event(agent, &xml).await
    }

    async fn push_event(&self, agent: u64, xml: &str) -> anyhow::Result<Option<PushReport>> {
        let url = self.inner.lock().callback_urls.get(&agent).cloned();
        match url {
            None => Ok(None),
            Some(url) => Ok(Some(self.push_xml(agent, &url, xml).await?)),
        }
    }

    /// The current `sys_approval_change` XML for an approval (as the next push would carry it).
    pub fn approval_event_xml(&self, sp_no: &str, change: i64) -> anyhow::Result<String> {
        let state = self.inner.lock();
        let inst = state
            .instances
            .get(sp_no)
            .ok_or_else(|| anyhow!("no approval {sp_no}"))?;
        Ok(event_xml(inst, change))
    }

    /// Encrypts and signs `plaintext` for the app as WeCom does, without sending it.
    pub fn build_push(&self, agent_id: u64, plaintext: &str) -> anyhow::Result<PushRequest> {
        let app = self.inner.app_by_agent(agent_id)?;
        Ok(build_push(app, plaintext, now_ms() / 1000))
    }

    /// Encrypts, signs and POSTs any plaintext message (e.g. a text message or another event).
    pub async fn push_xml(
        &self,
        agent_id: u64,
        url: &str,
        plaintext: &str,
    ) -> anyhow::Result<PushReport> {
        let request = self.build_push(agent_id, plaintext)?;
        Ok(self.send(url, request).await)
    }

    /// Sends a prepared push with WeCom's retries (same bytes each attempt).
    pub async fn send(&self, url: &str, request: PushRequest) -> PushReport {
        let config = &self.inner.config;
        let full = with_query(url, &request.query);
        let headers = vec![("Content-Type".to_string(), "text/xml".to_string())];
        let (attempts, delivered) = http::deliver(
            &full,
            &headers,
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

    /// The GET URL verification WeCom performs when a callback URL is saved: a random numeric
    /// echo string, encrypted, signed, sent as `echostr`; the reply must be exactly the echo.
    pub async fn url_check(&self, agent_id: u64, url: &str) -> anyhow::Result<UrlCheckReport> {
        let echo = format!(
            "{}",
            rand::thread_rng().gen_range(10u64.pow(17)..10u64.pow(19))
        );
        self.url_check_with(agent_id, url, &echo).await
    }

    /// [`url_check`](Self::url_check) with a chosen plaintext.
    pub async fn url_check_with(
        &self,
        agent_id: u64,
        url: &str,
        echo: &str,
    ) -> anyhow::Result<UrlCheckReport> {
        let app = self.inner.app_by_agent(agent_id)?;
        let query = url_check_query(app, echo, now_ms() / 1000);
        let reply = http::get(&with_query(url, &query), self.inner.config.push_timeout).await;
        let verified = reply.status == Some(200) && reply.body == echo.as_bytes();
        Ok(UrlCheckReport {
            echo: echo.into(),
            query,
            reply,
            verified,
        })
    }
}

/// The query of a GET URL check for `echo` at `timestamp`.
pub fn url_check_query(app: &WecomApp, echo: &str, timestamp: u64) -> String {
    let enc = crypto::encrypt(&app.encoding_aes_key, echo.as_bytes(), &app.corp_id);
    let ts = timestamp.to_string();
    let nonce = hex(5);
    let sig = crypto::signature(&app.token, &ts, &nonce, &enc);
    format!(
        "msg_signature={sig}&timestamp={ts}&nonce={nonce}&echostr={}",
        pct(&enc)
    )
}

/// A POST push for `plaintext` at `timestamp`.
pub fn build_push(app: &WecomApp, plaintext: &str, timestamp: u64) -> PushRequest {
    let enc = crypto::encrypt(&app.encoding_aes_key, plaintext.as_bytes(), &app.corp_id);
    let ts = timestamp.to_string();
    let nonce = hex(5);
    let sig = crypto::signature(&app.token, &ts, &nonce, &enc);
    let body = format!(
        "<xml><ToUserName><![CDATA[{}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt>\
         <AgentID><![CDATA[{}]]></AgentID></xml>",
        app.corp_id, app.agent_id
    );
    PushRequest {
        query: format!("msg_signature={sig}&timestamp={ts}&nonce={nonce}"),
        body: body.into_bytes(),
        plaintext: plaintext.into(),
    }
}

fn event_xml(inst: &Instance, change: i64) -> String {
    let mut records = String::new();
    for node in &inst.nodes {
        let mut details = String::new();
        for d in &node.details {
            details.push_str(&format!(
                "<Details><Approver><UserId><![CDATA[{}]]></UserId></Approver>\
                 <Speech><![CDATA[{}]]></Speech><SpStatus>{}</SpStatus><SpTime>{}</SpTime></Details>",
                d.userid, d.speech, d.sp_status, d.sptime
            ));
        }
        records.push_str(&format!(
            "<SpRecord><SpStatus>{}</SpStatus><ApproverAttr>{}</ApproverAttr>{details}</SpRecord>",
            node.status(),
            node.apv_rel
        ));
    }
    let notifyer: String = inst
        .cc
        .iter()
        .map(|u| format!("<Notifyer><UserId><![CDATA[{u}]]></UserId></Notifyer>"))
        .collect();
    format!(
        "<xml><ToUserName><![CDATA[{corp}]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>\
         <CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
         <Event><![CDATA[sys_approval_change]]></Event><AgentID>{agent}</AgentID>\
         <ApprovalInfo><SpNo>{sp_no}</SpNo><SpName><![CDATA[imbridge]]></SpName>\
         <SpStatus>{st}</SpStatus><TemplateId><![CDATA[{tpl}]]></TemplateId>\
         <ApplyTime>{applied}</ApplyTime><Applyer><UserId><![CDATA[{creator}]]></UserId>\
         <Party><![CDATA[1]]></Party></Applyer>{records}{notifyer}\
         <StatuChangeEvent>{change}</StatuChangeEvent></ApprovalInfo></xml>",
        corp = inst.corp_id,
        now = now_ms() / 1000,
        agent = inst.agent_id,
        sp_no = inst.sp_no,
        st = inst.sp_status,
        tpl = inst.template_id,
        applied = inst.apply_time,
        creator = inst.creator,
    )
}

// ---------------------------------------------------------------------------------------------
// Crypto (independent of the guest crate on purpose)
// ---------------------------------------------------------------------------------------------

/// WXBizMsgCrypt as WeCom implements it.
pub mod crypto {
    use aes::Aes256;
    use base64::Engine;
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
    use cbc::cipher::block_padding::NoPadding;
    use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
    use rand::RngCore;
    use sha1::{Digest, Sha1};

    // EncodingAESKey + "=" has non-zero trailing bits; WeCom's own SDKs accept that.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    /// A fresh 43-character EncodingAESKey.
    pub fn random_aes_key() -> String {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        STANDARD.encode(k)[..43].to_string()
    }

    fn key(encoding_aes_key: &str) -> [u8; 32] {
        let raw = LENIENT
            .decode(format!("{encoding_aes_key}="))
            .unwrap_or_default();
        let mut k = [0u8; 32];
        let n = raw.len().min(32);
        k[..n].copy_from_slice(&raw[..n]);
        k
    }

    /// base64(AES-256-CBC(key, iv = key[..16], pkcs7_32(random16 ‖ len_be32 ‖ msg ‖ receive_id))).
    pub fn encrypt(encoding_aes_key: &str, msg: &[u8], receive_id: &str) -> String {
        let mut random = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut random);
        encrypt_with(encoding_aes_key, random, msg, receive_id)
    }

    pub fn encrypt_with(
        encoding_aes_key: &str,
        random: [u8; 16],
        msg: &[u8],
        receive_id: &str,
    ) -> String {
        let k = key(encoding_aes_key);
        let mut pt = random.to_vec();
        pt.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        pt.extend_from_slice(msg);
        pt.extend_from_slice(receive_id.as_bytes());
        let pad = 32 - pt.len() % 32;
        pt.extend(std::iter::repeat_n(pad as u8, pad));
        let iv: [u8; 16] = k[..16].try_into().unwrap_or([0; 16]);
        let ct = cbc::Encryptor::<Aes256>::new(&k.into(), &iv.into())
            .encrypt_padded_vec_mut::<NoPadding>(&pt);
        STANDARD.encode(ct)
    }

    /// `(message, receive_id)`, or `None` on bad base64, length or 32-byte padding.
    pub fn decrypt(encoding_aes_key: &str, encrypted: &str) -> Option<(Vec<u8>, String)> {
        let k = key(encoding_aes_key);
        let ct = STANDARD.decode(encrypted.trim()).ok()?;
        if ct.is_empty() || ct.len() % 16 != 0 {
            return None;
        }
        let iv: [u8; 16] = k[..16].try_into().ok()?;
        let pt = cbc::Decryptor::<Aes256>::new(&k.into(), &iv.into())
            .decrypt_padded_vec_mut::<NoPadding>(&ct)
            .ok()?;
        let pad = *pt.last()? as usize;
        if !(1..=32).contains(&pad) || pad > pt.len() {
            return None;
        }
        let body = &pt[..pt.len() - pad];
        if pt[pt.len() - pad..].iter().any(|&b| b as usize != pad) || body.len() < 20 {
            return None;
        }
        let len = u32::from_be_bytes(body[16..20].try_into().ok()?) as usize;
        let rest = &body[20..];
        if len > rest.len() {
            return None;
        }
        Some((
            rest[..len].to_vec(),
            String::from_utf8_lossy(&rest[len..]).into_owned(),
        ))
    }

    /// `msg_signature`: hex(sha1(sorted(token, timestamp, nonce, encrypted) joined)).
    pub fn signature(token: &str, timestamp: &str, nonce: &str, encrypted: &str) -> String {
        let mut parts = [token, timestamp, nonce, encrypted];
        parts.sort_unstable();
        let mut h = Sha1::new();
        for p in parts {
            h.update(p.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Standard base64, for tests that tamper with ciphertexts.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    /// Empty on invalid input (tests feed it ciphertexts they made).
    pub fn decode(s: &str) -> Vec<u8> {
        STANDARD.decode(s).unwrap_or_default()
    }

    pub fn encode(b: &[u8]) -> String {
        STANDARD.encode(b)
    }
}

// ---------------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------------

fn err(code: i64, msg: &str) -> Response {
    Response::json(200, &json!({"errcode": code, "errmsg": msg}))
}

fn ok(mut body: Value) -> Response {
    body["errcode"] = json!(0);
    body["errmsg"] = json!("ok");
    Response::json(200, &body)
}

fn handle(inner: &Inner, req: Request) -> Response {
    let mut state = inner.lock();
    let access_token = req.query_param("access_token");
    let now = now_ms();
    let owner = access_token.as_ref().and_then(|t| {
        state
            .tokens
            .iter()
            .find(|i| &i.token == t && i.expires_ms > now)
            .map(|i| (i.corp_id.clone(), i.agent_id))
    });
    state.requests.push(RecordedRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        body: req.body.to_vec(),
        access_token: access_token.clone(),
        token_owner: owner.clone(),
    });
    let path = req.path.as_str();
    if path == "/cgi-bin/gettoken" {
        if req.method != "GET" {
            return err(43001, "require GET method");
        }
        let corp = req.query_param("corpid").unwrap_or_default();
        let secret = req.query_param("corpsecret").unwrap_or_default();
        if !inner.config.apps.iter().any(|a| a.corp_id == corp) {
            return err(40013, "invalid corpid");
        }
        let Some(app) = inner
            .config
            .apps
            .iter()
            .find(|a| a.corp_id == corp && a.secret == secret)
        else {
            return err(40001, "invalid credential");
        };
        let token = hex(32);
        let ttl = inner.config.token_ttl;
        state.tokens.push(IssuedToken {
            token: token.clone(),
            corp_id: corp,
            agent_id: app.agent_id,
            expires_ms: now + ttl.as_millis() as u64,
        });
        return ok(json!({"access_token": token, "expires_in": ttl.as_secs()}));
    }
    if path == "/cgi-bin/webhook/send" {
        return robot(inner, &mut state, &req);
    }
    if !path.starts_with("/cgi-bin/") {
        return Response::json(404, &json!({"errcode": 404, "errmsg": "not found"}));
    }
    let Some((corp, agent)) = owner else {
        return match access_token {
            None => err(41001, "access_token missing"),
            Some(t) if state.tokens.iter().any(|i| i.token == t) => {
                err(42001, "access_token expired")
            }
            Some(_) => err(40014, "invalid access_token"),
        };
    };
    if req.method != "POST" {
        return err(43002, "require POST method");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return err(47001, "data format error");
    };
    let user_exists = |u: &str| inner.config.users.iter().any(|x| x.userid == u);
    match path {
        "/cgi-bin/user/getuserid" => {
            let mobile = body["mobile"].as_str().unwrap_or("");
            match inner
                .config
                .users
                .iter()
                .find(|u| u.mobile.as_deref() == Some(mobile))
            {
                Some(u) => ok(json!({"userid": u.userid})),
                None => err(46004, "user no exist"),
            }
        }
        "/cgi-bin/user/get_userid_by_email" => {
            let email = body["email"].as_str().unwrap_or("");
            match inner
                .config
                .users
                .iter()
                .find(|u| u.email.as_deref() == Some(email))
            {
                Some(u) => ok(json!({"userid": u.userid})),
                None => err(46004, "user no exist"),
            }
        }
        "/cgi-bin/oa/approval/create_template" => {
            let name = body["template_name"][0]["text"].as_str().unwrap_or("");
            if name.is_empty() || name.chars().count() > 40 {
                return err(301002, "invalid template_name");
            }
            if state
                .templates
                .iter()
                .any(|t| t.corp_id == corp && t.name == name)
            {
                return err(301058, "template name already exists");
            }
            let mut control_ids = Vec::new();
            for c in body["template_content"]["controls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let id = c["property"]["id"].as_str().unwrap_or("");
                let control = c["property"]["control"].as_str().unwrap_or("");
                if !id.starts_with(&format!("{control}-")) || control.is_empty() {
                    return err(301002, "invalid control id");
                }
                control_ids.push(id.to_string());
            }
            let id = format!("C4{}", hex(20));
            state.templates.push(Template {
                template_id: id.clone(),
                corp_id: corp,
                name: name.into(),
                control_ids,
            });
            ok(json!({"template_id": id}))
        }
        // A template's name and controls; an id the corp does not have is 301025, as for a
        // deleted template.
        "/cgi-bin/oa/gettemplatedetail" => {
            let tpl_id = body["template_id"].as_str().unwrap_or("");
            match state
                .templates
                .iter()
                .find(|t| t.template_id == tpl_id && t.corp_id == corp)
            {
                Some(t) => ok(json!({
                    "template_names": [{"text": t.name, "lang": "zh_CN"}],
                    "template_content": {"controls": t.control_ids.iter()
                        .map(|id| json!({"property": {"id": id}}))
                        .collect::<Vec<_>>()},
                })),
                None => err(301025, "get approval param error"),
            }
        }
        "/cgi-bin/oa/applyevent" => {
            let creator = body["creator_userid"].as_str().unwrap_or("");
            if !user_exists(creator) {
                return err(301005, "creator_userid not exist");
            }
            let tpl_id = body["template_id"].as_str().unwrap_or("");
            let Some(tpl) = state
                .templates
                .iter()
                .find(|t| t.template_id == tpl_id && t.corp_id == corp)
                .cloned()
            else {
                return err(301025, "template_id not exist");
            };
            if body["use_template_approver"].as_i64() != Some(0) {
                return err(301002, "only use_template_approver=0 is simulated");
            }
            let mut nodes = Vec::new();
            let mut cc = Vec::new();
            for n in body["process"]["node_list"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let users: Vec<String> = n["userid"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u.as_str().map(String::from))
                    .collect();
                if users.is_empty() || users.iter().any(|u| !user_exists(u)) {
                    return err(301005, "invalid userid in node_list");
                }
                match n["type"].as_i64() {
                    Some(1) => {
                        let rel = n["apv_rel"].as_i64().unwrap_or(0);
                        if users.len() > 1 && !(rel == 1 || rel == 2) {
                            return err(301002, "apv_rel is required for several approvers");
                        }
                        nodes.push(Node {
                            apv_rel: if rel == 2 { 2 } else { 1 },
                            details: users
                                .into_iter()
                                .map(|u| Detail {
                                    userid: u,
                                    sp_status: 1,
                                    speech: String::new(),
                                    sptime: 0,
                                })
                                .collect(),
                        });
                    }
                    Some(2) => cc.extend(users),
                    _ => return err(301002, "invalid node type"),
                }
            }
            if nodes.is_empty() {
                return err(301002, "process needs an approver node");
            }
            let mut text = String::new();
            for c in body["apply_data"]["contents"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let id = c["id"].as_str().unwrap_or("");
                if !tpl.control_ids.iter().any(|x| x == id) {
                    return err(301002, "unknown control id in apply_data");
                }
                text = c["value"]["text"].as_str().unwrap_or("").to_string();
            }
            let summary = body["summary_list"].clone();
            for line in summary.as_array().into_iter().flatten() {
                for s in line["summary_info"].as_array().into_iter().flatten() {
                    if s["text"].as_str().unwrap_or("").chars().count() > 20 {
                        return err(301002, "summary text too long");
                    }
                }
            }
            state.sp_counter += 1;
            let sp_no = format!("20240101{:04}", state.sp_counter);
            state.instances.insert(
                sp_no.clone(),
                Instance {
                    sp_no: sp_no.clone(),
                    corp_id: corp,
                    agent_id: agent,
                    template_id: tpl_id.into(),
                    creator: creator.into(),
                    sp_status: 1,
                    nodes,
                    cc,
                    text,
                    summary,
                    apply_time: now / 1000,
                },
            );
            ok(json!({"sp_no": sp_no}))
        }
        "/cgi-bin/oa/getapprovaldetail" => {
            let sp_no = match &body["sp_no"] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            match state.instances.get(&sp_no).filter(|i| i.corp_id == corp) {
                None => err(301025, "sp_no not exist"),
                Some(inst) => ok(json!({"info": detail_json(inst)})),
            }
        }
        "/cgi-bin/message/send" => {
            if body["agentid"].as_u64() != Some(agent) {
                return err(60020, "agentid does not match the access_token");
            }
            let to: Vec<&str> = body["touser"].as_str().unwrap_or("").split('|').collect();
            let invalid: Vec<&str> = to.iter().copied().filter(|u| !user_exists(u)).collect();
            if invalid.len() == to.len() {
                return err(81013, "user & party & tag all invalid");
            }
            let msgtype = body["msgtype"].as_str().unwrap_or("");
            if body[msgtype]["content"].as_str().is_none_or(str::is_empty) {
                return err(41016, "missing content");
            }
            state.app_messages.push(AppMessage {
                agent_id: agent,
                body: body.clone(),
            });
            ok(json!({"invaliduser": invalid.join("|"), "msgid": hex(12)}))
        }
        "/cgi-bin/appchat/send" => {
            let chat = body["chatid"].as_str().unwrap_or("");
            if !inner.config.chats.iter().any(|c| c == chat) {
                return err(86003, "chat not exist");
            }
            state.chat_messages.push(AppMessage {
                agent_id: agent,
                body: body.clone(),
            });
            ok(json!({}))
        }
        _ => Response::json(404, &json!({"errcode": 404, "errmsg": "not found"})),
    }
}

fn robot(inner: &Inner, state: &mut WecomState, req: &Request) -> Response {
    let key = req.query_param("key").unwrap_or_default();
    if !inner.config.robot_keys.contains(&key) {
        return err(93000, "invalid webhook url");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return err(40008, "invalid message type");
    };
    let valid = match body["msgtype"].as_str().unwrap_or("") {
        "text" => body["text"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && c.len() <= 2048),
        "markdown" => body["markdown"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && c.len() <= 4096),
        "template_card" => {
            let c = &body["template_card"];
            c["card_type"] == "text_notice"
                && c["main_title"]["title"].is_string()
                && c["card_action"]["type"].is_number()
        }
        _ => false,
    };
    if !valid {
        return err(40008, "invalid message");
    }
    state.robot_messages.push(RobotMessage { key, body });
    ok(json!({}))
}

fn detail_json(inst: &Instance) -> Value {
    json!({
        "sp_no": inst.sp_no,
        "sp_name": "imbridge",
        "sp_status": inst.sp_status,
        "template_id": inst.template_id,
        "apply_time": inst.apply_time,
        "applyer": {"userid": inst.creator, "partyid": "1"},
        "sp_record": inst.nodes.iter().map(|n| json!({
            "sp_status": n.status(),
            "approverattr": n.apv_rel,
            "details": n.details.iter().map(|d| json!({
                "approver": {"userid": d.userid},
                "speech": d.speech,
                "sp_status": d.sp_status,
                "sptime": d.sptime,
                "media_id": [],
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "notifyer": inst.cc.iter().map(|u| json!({"userid": u})).collect::<Vec<_>>(),
        "apply_data": {"contents": [{"control": "Textarea", "value": {"text": inst.text}}]},
        "comments": [],
    })
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

fn hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>()))
        .collect()
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_query(url: &str, query: &str) -> String {
    if url.contains('?') {
        format!("{url}&{query}")
    } else {
        format!("{url}?{query}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_roundtrip_pads_to_32_and_signs_sorted() {
        let key = crypto::random_aes_key();
        let enc = crypto::encrypt_with(&key, [1; 16], b"123456789", "abc");
        // 16 + 4 + 9 + 3 = 32 → a whole extra 32-byte block of padding.
        assert_eq!(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &enc)
                .unwrap()
                .len(),
            64
        );
        let (msg, rid) = crypto::decrypt(&key, &enc).unwrap();
        assert_eq!((msg.as_slice(), rid.as_str()), (&b"123456789"[..], "abc"));
        assert_eq!(
            crypto::signature("token", "1700000000", "nonce", "ENC"),
            "8eff1fcabfa545a4f3228f21284394ba7964166a"
        );
    }

    #[tokio::test]
    async fn approval_flow_and_token_isolation() {
        let a1 = WecomApp::new("wwcorp", "s1", 1001);
        let a2 = WecomApp::new("wwcorp", "s2", 1002);
        let sim = WecomSim::start(WecomConfig {
            apps: vec![a1, a2],
            users: vec![WecomUser::new("u1"), WecomUser::new("u2")],
            ..Default::default()
        })
        .await
        .unwrap();
        let base = sim.base_url();
        let client = |url: String, body: Option<Value>| async move {
            match body {
                None => http::get(&url, Duration::from_secs(2)).await,
                Some(b) => {
                    http::post(
                        &url,
                        &[],
                        b.to_string().into_bytes(),
                        Duration::from_secs(2),
                    )
                    .await
                }
            }
        };
        let tok = |r: Reply| -> String {
            serde_json::from_slice::<Value>(&r.body).unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let t1 = tok(client(
            format!("{base}/cgi-bin/gettoken?corpid=wwcorp&corpsecret=s1"),
            None,
        )
        .await);
        let t2 = tok(client(
            format!("{base}/cgi-bin/gettoken?corpid=wwcorp&corpsecret=s2"),
            None,
        )
        .await);
        assert_ne!(t1, t2);
        let tpl = client(
            format!("{base}/cgi-bin/oa/approval/create_template?access_token={t1}"),
            Some(
                json!({"template_name": [{"text": "x"}], "template_content": {"controls": [
                {"property": {"control": "Textarea", "id": "Textarea-01"}}]}}),
            ),
        )
        .await;
        let tpl: Value = serde_json::from_slice(&tpl.body).unwrap();
        let r = client(
            format!("{base}/cgi-bin/oa/applyevent?access_token={t1}"),
            Some(
                json!({"creator_userid": "u1", "template_id": tpl["template_id"],
                "use_template_approver": 0, "process": {"node_list": [
                    {"type": 1, "apv_rel": 2, "userid": ["u1", "u2"]}]},
                "apply_data": {"contents": [{"control": "Textarea", "id": "Textarea-01",
                    "value": {"text": "t"}}]}}),
            ),
        )
        .await;
        let sp_no = serde_json::from_slice::<Value>(&r.body).unwrap()["sp_no"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            sim.decide(&sp_no, "u2", true, "ok")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(sim.state().instances[&sp_no].sp_status, 2);
        // The second app's token acts as that app, not the one that made the approval.
        let r = client(
            format!("{base}/cgi-bin/oa/getapprovaldetail?access_token={t2}"),
            Some(json!({"sp_no": sp_no})),
        )
        .await;
        // WeCom answers its errors with HTTP 200 too: the body says whether it was read.
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (&body["errcode"], &body["info"]["sp_no"]),
            (&json!(0), &json!(sp_no)),
            "{body}"
        );
        let owners: Vec<_> = sim
            .state()
            .requests
            .iter()
            .filter_map(|r| r.token_owner.clone())
            .collect();
        let (last, rest) = owners.split_last().unwrap();
        assert_eq!(last, &("wwcorp".to_string(), 1002));
        assert!(rest.iter().all(|o| o == &("wwcorp".to_string(), 1001)));
    }
}
