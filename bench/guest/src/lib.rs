//! The payload builders behind start-approval and notify, run natively by the benches and
//! inside a component (target/payload-guest.wasm) by `target/release/payloads`: one code path,
//! so the two sides build byte-identical payloads and their ratio is the sandbox's.

use imbridge::model::{ApprovalNode, ApprovalRequest, Level, Link, Notification, SignMode};
use imbridge::model::{Target, UserRef};
use imbridge::platform::{dingtalk, feishu, wecom};
use serde_json::Value;

/// The builders `run` knows, by index.
pub const BUILDERS: [&str; 6] = [
    "feishu/start/instance_body",
    "feishu/notify/webhook_body",
    "dingtalk/start/approvers_body",
    "dingtalk/notify/robot_body",
    "wecom/start/applyevent_body",
    "wecom/notify/robot_bodies",
];

/// Builds payload `builder` (an index into [`BUILDERS`]) `rounds` times, each serialised to
/// the bytes that would be sent, from inputs made once per call. Returns the bytes built in
/// all, which both sides must agree on; `None` for an unknown builder.
pub fn run(builder: u32, rounds: u32) -> Option<u64> {
    let inputs = Inputs::new();
    let mut total = 0u64;
    for _ in 0..rounds {
        total += inputs.build(builder)?;
    }
    Some(total)
}

/// One start request and one notification, as an engine would send them.
pub struct Inputs {
    request: ApprovalRequest,
    notification: Notification,
    nodes_ids: Vec<Vec<String>>,
    nodes_mode: Vec<(SignMode, Vec<String>)>,
    cc: Vec<String>,
    mentions: Vec<String>,
    mobiles: Vec<String>,
}

impl Default for Inputs {
    fn default() -> Self {
        Self::new()
    }
}

impl Inputs {
    pub fn new() -> Inputs {
        Inputs {
            request: request(),
            notification: notification(),
            nodes_ids: vec![ids(&["ou_bob", "ou_carol"]), ids(&["ou_dave", "ou_erin"])],
            nodes_mode: vec![
                (SignMode::And, ids(&["bob", "carol"])),
                (SignMode::Or, ids(&["dave", "erin"])),
            ],
            cc: ids(&["frank"]),
            mentions: ids(&["<at id=ou_bob></at>"]),
            mobiles: ids(&["13800000000"]),
        }
    }

    /// One payload of `builder`, serialised; its length in bytes.
    pub fn build(&self, builder: u32) -> Option<u64> {
        let body: Value = match builder {
            0 => feishu::instance_body(
                "CODE",
                "ou_alice",
                &self.nodes_ids,
                &self.request,
                "8c5f0a4e-0000-4000-8000-000000000042",
            ),
            1 => feishu::webhook_body(&self.notification, &self.mentions, 1_700_000_000, Some("s")),
            2 => dingtalk::approvers_body(&self.nodes_mode),
            3 => dingtalk::robot_body(&self.notification, &self.mobiles, &self.cc),
            4 => wecom::applyevent_body("tpl", "alice", &self.nodes_mode, &self.cc, &self.request),
            5 => Value::Array(wecom::robot_bodies(&self.notification, &self.cc, &[]).ok()?),
            _ => return None,
        };
        Some(body.to_string().len() as u64)
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn request() -> ApprovalRequest {
    ApprovalRequest {
        key: "wf-42-deploy".into(),
        title: "Deploy release #42 to prod?".into(),
        initiator: UserRef::Email("alice@example.com".into()),
        nodes: vec![
            ApprovalNode {
                approvers: vec![UserRef::Id("bob".into()), UserRef::Id("carol".into())],
                mode: SignMode::And,
            },
            ApprovalNode {
                approvers: vec![UserRef::Id("dave".into()), UserRef::Id("erin".into())],
                mode: SignMode::Or,
            },
        ],
        cc: vec![UserRef::Id("frank".into())],
        fields: vec![
            ("workflow".into(), "release #42".into()),
            ("env".into(), "prod".into()),
            ("commit".into(), "3f9c2e1".into()),
        ],
        detail_url: Some("https://ci.example.com/wf/42".into()),
    }
}

fn notification() -> Notification {
    Notification {
        target: Target::Chat("oc_ops".into()),
        title: "workflow #42 failed".into(),
        markdown: "**deploy** failed at step `migrate`\n\n- exit code 1\n- 3 retries".into(),
        level: Level::Failure,
        link: Some(Link {
            text: "Open".into(),
            url: "https://ci.example.com/42".into(),
        }),
        mentions: vec![UserRef::Id("bob".into())],
        mention_all: false,
    }
}

#[cfg(any(target_arch = "wasm32", imbridge_lint_guest))]
mod component {
    wit_bindgen::generate!({
        inline: "
            package imbridge:payload-guest;
            world payload-guest {
                /// Builds payload `builder` `rounds` times; the bytes built, none if unknown.
                export run: func(builder: u32, rounds: u32) -> option<u64>;
            }
        ",
    });

    struct PayloadGuest;

    export!(PayloadGuest);

    impl Guest for PayloadGuest {
        fn run(builder: u32, rounds: u32) -> Option<u64> {
            super::run(builder, rounds)
        }
    }
}
