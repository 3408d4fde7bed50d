//! The WIT glue: generated bindings, the exports, and conversions between generated types and
//! `model`. No logic lives here.

mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        generate_all,
    });
}

use crate::error::Error;
use crate::model as m;
use crate::wasi_env::WasiEnv;
use bindings::imbridge::plugin::types as w;

struct Component;

bindings::export!(Component with_types_in bindings);

impl bindings::Guest for Component {
    fn start_approval(app: w::ImApp, request: w::ApprovalRequest) -> Result<w::Approval, w::Error> {
        let env = WasiEnv::new();
        crate::approval::start(&env, &app.into(), &request.into())
            .map(Into::into)
            .map_err(Into::into)
    }

    fn get_approval(
        app: w::ImApp,
        instance_id: String,
        refresh: bool,
    ) -> Result<w::Approval, w::Error> {
        let env = WasiEnv::new();
        crate::approval::get(&env, &app.into(), &instance_id, refresh)
            .map(Into::into)
            .map_err(Into::into)
    }

    fn cancel_approval(
        app: w::ImApp,
        instance_id: String,
        reason: Option<String>,
    ) -> Result<w::Approval, w::Error> {
        let env = WasiEnv::new();
        crate::approval::cancel(&env, &app.into(), &instance_id, reason.as_deref())
            .map(Into::into)
            .map_err(Into::into)
    }

    fn notify(
        app: Option<w::ImApp>,
        notification: w::Notification,
    ) -> Result<w::Receipt, w::Error> {
        let env = WasiEnv::new();
        let app: Option<m::ImApp> = app.map(Into::into);
        crate::notify::notify(&env, app.as_ref(), &notification.into())
            .map(|r| w::Receipt {
                message_id: r.message_id,
            })
            .map_err(Into::into)
    }

    fn handle_callback(
        app: w::ImApp,
        request: w::HttpRequest,
    ) -> Result<w::CallbackOutcome, w::Error> {
        let env = WasiEnv::new();
        let req = m::HttpRequest {
            method: request.method,
            path: request.path,
            query: request.query,
            headers: request.headers,
            body: request.body,
        };
        crate::callback::handle(&env, &app.into(), &req)
            .map(|o| w::CallbackOutcome {
                response: w::HttpResponse {
                    status: o.response.status,
                    headers: o.response.headers,
                    body: o.response.body,
                },
                updates: o.updates.into_iter().map(Into::into).collect(),
            })
            .map_err(Into::into)
    }

    fn handle_event(app: w::ImApp, event: Vec<u8>) -> Result<Vec<w::Approval>, w::Error> {
        let env = WasiEnv::new();
        crate::callback::handle_event(&env, &app.into(), &event)
            .map(|updates| updates.into_iter().map(Into::into).collect())
            .map_err(Into::into)
    }
}

impl From<Error> for w::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidConfig(s) => w::Error::InvalidConfig(s),
            Error::InvalidInput(s) => w::Error::InvalidInput(s),
            Error::Unauthorized(s) => w::Error::Unauthorized(s),
            Error::Platform {
                code,
                message,
                retryable,
            } => w::Error::Platform(w::PlatformError {
                code,
                message,
                retryable,
            }),
            Error::Transport(s) | Error::Unsent(s) => w::Error::Transport(s),
            Error::Storage(s) => w::Error::Storage(s),
        }
    }
}

impl From<w::Platform> for m::Platform {
    fn from(p: w::Platform) -> Self {
        match p {
            w::Platform::Feishu => m::Platform::Feishu,
            w::Platform::Lark => m::Platform::Lark,
            w::Platform::Dingtalk => m::Platform::Dingtalk,
            w::Platform::Wecom => m::Platform::Wecom,
        }
    }
}

impl From<w::ImApp> for m::ImApp {
    fn from(a: w::ImApp) -> Self {
        m::ImApp {
            id: a.id,
            platform: a.platform.into(),
            app_id: a.app_id,
            app_secret: a.app_secret,
            agent_id: a.agent_id,
            encrypt_key: a.encrypt_key,
            token: a.token,
            api_base: a.api_base,
            max_clock_skew_secs: a.max_clock_skew_secs,
        }
    }
}

impl From<w::UserRef> for m::UserRef {
    fn from(u: w::UserRef) -> Self {
        match u {
            w::UserRef::Id(s) => m::UserRef::Id(s),
            w::UserRef::Email(s) => m::UserRef::Email(s),
            w::UserRef::Mobile(s) => m::UserRef::Mobile(s),
        }
    }
}

fn users(v: Vec<w::UserRef>) -> Vec<m::UserRef> {
    v.into_iter().map(Into::into).collect()
}

impl From<w::ApprovalRequest> for m::ApprovalRequest {
    fn from(r: w::ApprovalRequest) -> Self {
        m::ApprovalRequest {
            key: r.key,
            title: r.title,
            initiator: r.initiator.into(),
            nodes: r
                .nodes
                .into_iter()
                .map(|n| m::ApprovalNode {
                    approvers: users(n.approvers),
                    mode: match n.mode {
                        w::SignMode::And => m::SignMode::And,
                        w::SignMode::Or => m::SignMode::Or,
                    },
                })
                .collect(),
            cc: users(r.cc),
            fields: r.fields,
            detail_url: r.detail_url,
        }
    }
}

impl From<m::Approval> for w::Approval {
    fn from(a: m::Approval) -> Self {
        w::Approval {
            instance_id: a.instance_id,
            key: a.key,
            status: match a.status {
                m::ApprovalStatus::Pending => w::ApprovalStatus::Pending,
                m::ApprovalStatus::Approved => w::ApprovalStatus::Approved,
                m::ApprovalStatus::Rejected => w::ApprovalStatus::Rejected,
                m::ApprovalStatus::Canceled => w::ApprovalStatus::Canceled,
            },
            decisions: a
                .decisions
                .into_iter()
                .map(|d| w::Decision {
                    user: d.user,
                    approved: d.approved,
                    comment: d.comment,
                    at_ms: d.at_ms,
                })
                .collect(),
            updated_at_ms: a.updated_at_ms,
        }
    }
}

impl From<w::Notification> for m::Notification {
    fn from(n: w::Notification) -> Self {
        m::Notification {
            target: match n.target {
                w::Target::Webhook(h) => m::Target::Webhook(m::RobotWebhook {
                    platform: h.platform.into(),
                    url: h.url,
                    secret: h.secret,
                }),
                w::Target::Chat(c) => m::Target::Chat(c),
                w::Target::Users(u) => m::Target::Users(users(u)),
            },
            title: n.title,
            markdown: n.markdown,
            level: match n.level {
                w::Level::Info => m::Level::Info,
                w::Level::Success => m::Level::Success,
                w::Level::Warning => m::Level::Warning,
                w::Level::Failure => m::Level::Failure,
            },
            link: n.link.map(|l| m::Link {
                text: l.text,
                url: l.url,
            }),
            mentions: users(n.mentions),
            mention_all: n.mention_all,
        }
    }
}

pub(crate) use bindings::wasi;
