//! Shared fixtures for the end-to-end tests: the built component in a fresh reference host.
//!
//! Every test gets its own state directory and host, so tests run in parallel and never see
//! each other's keys. The component must have been built first (`./dev build` or `./dev test`).

use anyhow::{Context, Result, bail};
use imbridge_host::sim::dingtalk::{DingtalkApp, DingtalkConfig, DingtalkSim, DingtalkUser};
use imbridge_host::sim::feishu::{BotHook, FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::store::Backend;
use imbridge_host::{Host, HostConfig, TenantPolicy};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

pub use imbridge_host;

pub mod wave;

/// `target/imbridge.wasm`, or `$IMBRIDGE_COMPONENT`.
pub fn component_path() -> PathBuf {
    std::env::var_os("IMBRIDGE_COMPONENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/imbridge.wasm")
        })
}

pub struct Harness {
    pub host: Host,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// A host with `tenants` loaded from the built component, each allowed to call `allow`
    /// (e.g. a simulator's `127.0.0.1:port`).
    pub async fn new(tenants: &[&str], allow: &[String]) -> Result<Harness> {
        Self::with_config(tenants, allow, |_| {}).await
    }

    pub async fn with_config(
        tenants: &[&str],
        allow: &[String],
        tweak: impl FnOnce(&mut HostConfig),
    ) -> Result<Harness> {
        Self::build(tenants, allow, tweak, None).await
    }

    /// A host whose state is `store`.
    pub async fn with_store(
        tenants: &[&str],
        allow: &[String],
        store: Arc<dyn Backend>,
    ) -> Result<Harness> {
        Self::build(tenants, allow, |_| {}, Some(store)).await
    }

    async fn build(
        tenants: &[&str],
        allow: &[String],
        tweak: impl FnOnce(&mut HostConfig),
        store: Option<Arc<dyn Backend>>,
    ) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let mut cfg = HostConfig::new(dir.path().join("state"));
        // One compiled-artifact cache for the whole test run keeps each test's start cheap.
        cfg.cache_dir =
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-cache"));
        tweak(&mut cfg);
        let host = match store {
            Some(store) => Host::with_store(cfg, store)?,
            None => Host::new(cfg)?,
        };
        let wasm = component_path();
        if !wasm.exists() {
            bail!(
                "{} is missing: run `./dev build` (or `./dev test`) first",
                wasm.display()
            );
        }
        for t in tenants {
            host.load_tenant(
                t,
                &wasm,
                TenantPolicy {
                    allow_hosts: allow.to_vec(),
                },
            )
            .await
            .with_context(|| format!("loading tenant {t}"))?;
        }
        Ok(Harness { host, dir })
    }

    /// Calls an export; returns the `{"ok": …}` / `{"err": …}` object.
    pub async fn invoke(&self, tenant: &str, export: &str, input: Value) -> Value {
        self.host
            .invoke_json(tenant, export, input)
            .await
            .unwrap_or_else(|e| panic!("host failed on {export}: {e:#}"))
    }

    /// All keys the tenant's plugin has stored, with their values.
    pub fn kv_dump(&self, tenant: &str) -> Vec<(String, Vec<u8>)> {
        let keys = self.host.kv_keys(tenant).expect("kv keys");
        keys.into_iter()
            .map(|k| {
                let v = self
                    .host
                    .kv_get(tenant, &k)
                    .expect("kv get")
                    .unwrap_or_default();
                (k, v)
            })
            .collect()
    }
}

/// The `ok` value of a reply, or a panic showing the error.
pub fn ok(reply: &Value) -> &Value {
    match reply.get("ok") {
        Some(v) => v,
        None => panic!("expected ok, got {reply}"),
    }
}

/// The error kind of a reply (`invalid-input`, `platform`, …), or a panic showing the value.
pub fn err_kind(reply: &Value) -> String {
    match reply.get("err") {
        Some(e) => e["kind"].as_str().unwrap_or_default().to_string(),
        None => panic!("expected err, got {reply}"),
    }
}

/// The message of an `err` reply.
pub fn err_message(reply: &Value) -> &str {
    match reply["err"]["message"].as_str() {
        Some(m) => m,
        None => panic!("expected err with a message, got {reply}"),
    }
}

/// An http-request value for handle-callback.
pub fn http_request(method: &str, query: &str, headers: &[(String, String)], body: &[u8]) -> Value {
    json!({
        "method": method,
        "path": "/callback",
        "query": query,
        "headers": headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "body": String::from_utf8_lossy(body),
    })
}

/// A DingTalk simulator with `app` and `users` (each with a distinct mainland mobile).
pub async fn dingtalk_sim(app: &DingtalkApp, users: &[&str]) -> DingtalkSim {
    DingtalkSim::start(DingtalkConfig {
        apps: vec![app.clone()],
        users: users
            .iter()
            .enumerate()
            .map(|(i, u)| DingtalkUser::new(u, Some(&format!("1380000000{i}"))))
            .collect(),
        ..Default::default()
    })
    .await
    .expect("DingTalk simulator")
}

/// A Feishu app whose pushes are encrypted with `encrypt_key` and carry `token`.
pub fn encrypted_feishu_app(
    app_id: &str,
    secret: &str,
    encrypt_key: &str,
    token: &str,
) -> FeishuApp {
    let mut app = FeishuApp::new(app_id, secret);
    app.encrypt_key = Some(encrypt_key.into());
    app.verification_token = token.into();
    app
}

/// A Feishu simulator with one app and the named users (`ou_{name}`).
pub async fn feishu_sim(app: FeishuApp, users: &[&str]) -> FeishuSim {
    FeishuSim::start(FeishuConfig {
        apps: vec![app],
        users: users.iter().map(|u| FeishuUser::new(u)).collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("Feishu simulator")
}

/// A custom bot webhook that requires signed messages.
pub fn signed_hook(token: &str, secret: &str) -> BotHook {
    BotHook {
        token: token.into(),
        secret: Some(secret.into()),
        keywords: vec![],
    }
}
