//! Plain Rust mirrors of the WIT types, so all logic compiles and unit-tests natively.
//! `lib.rs` converts between these and the generated bindings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Feishu,
    Lark,
    Dingtalk,
    Wecom,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Feishu => "feishu",
            Platform::Lark => "lark",
            Platform::Dingtalk => "dingtalk",
            Platform::Wecom => "wecom",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct ImApp {
    pub id: String,
    pub platform: Platform,
    pub app_id: String,
    pub app_secret: String,
    pub agent_id: Option<String>,
    pub encrypt_key: Option<String>,
    pub token: Option<String>,
    pub api_base: Option<String>,
    /// `None`: the default window, `callback::DEFAULT_MAX_SKEW_SECS` (Feishu and Lark:
    /// `callback::FEISHU_MAX_SKEW_SECS`).
    pub max_clock_skew_secs: Option<u32>,
}

// Secrets must never reach logs or error messages, so Debug shows only the public fields.
impl core::fmt::Debug for ImApp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ImApp")
            .field("id", &self.id)
            .field("platform", &self.platform)
            .field("app_id", &self.app_id)
            .field("agent_id", &self.agent_id)
            .field("api_base", &self.api_base)
            .field("max_clock_skew_secs", &self.max_clock_skew_secs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserRef {
    Id(String),
    Email(String),
    Mobile(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignMode {
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalNode {
    pub approvers: Vec<UserRef>,
    pub mode: SignMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub key: String,
    pub title: String,
    pub initiator: UserRef,
    pub nodes: Vec<ApprovalNode>,
    pub cc: Vec<UserRef>,
    pub fields: Vec<(String, String)>,
    pub detail_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
    Canceled,
}

impl ApprovalStatus {
    pub fn is_terminal(self) -> bool {
        self != ApprovalStatus::Pending
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub user: String,
    pub approved: bool,
    pub comment: Option<String>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub instance_id: String,
    pub key: String,
    pub status: ApprovalStatus,
    pub decisions: Vec<Decision>,
    pub updated_at_ms: u64,
}

#[derive(Clone, PartialEq, Eq)]
pub struct RobotWebhook {
    pub platform: Platform,
    pub url: String,
    pub secret: Option<String>,
}

impl core::fmt::Debug for RobotWebhook {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The URL itself carries the hook's access token.
        f.debug_struct("RobotWebhook")
            .field("platform", &self.platform)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Webhook(RobotWebhook),
    Chat(String),
    Users(Vec<UserRef>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Success,
    Warning,
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub text: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub target: Target,
    pub title: String,
    pub markdown: String,
    pub level: Level,
    pub link: Option<Link>,
    pub mentions: Vec<UserRef>,
    pub mention_all: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Receipt {
    pub message_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// `value` serialised. Straight into bytes: `Value::to_string` goes through the formatting
/// machinery, several times slower inside the component for the replies every callback sends.
pub fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a Value always serialises: its keys are strings")
}

impl HttpResponse {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: json_bytes(value),
        }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallbackOutcome {
    pub response: HttpResponse,
    pub updates: Vec<Approval>,
}
