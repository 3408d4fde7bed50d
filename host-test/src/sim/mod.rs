//! Platform simulators speaking the real wire formats on loopback.
//!
//! External IM platforms are unreachable from CI, so integration tests point the component's
//! `api-base` at these simulators. Each one keeps its state behind a mutex so tests can inspect
//! and steer it, and implements its platform's crypto independently of the guest crate so that
//! the two sides cross-check each other.

pub mod dingtalk;
pub mod dingtalk_stream;
pub mod feishu;
pub mod feishu_ws;
pub mod http;
pub mod wecom;
pub mod ws_hub;

pub use feishu::{
    BotHook, EventSchema, FeishuApp, FeishuConfig, FeishuSim, FeishuUser, PushReport, UuidReplay,
};

/// Where the official SDKs the interop tests run against come from, for their failure messages.
pub const INTEROP_SDKS: &str = "`./dev test` installs them (Python ones into target/interop-venv, \
     put first on PATH; Node ones into tests/interop/node_modules); see tests/interop/README.md";
