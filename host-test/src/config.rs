//! The `serve` / `urls` configuration file (JSON).
//!
//! ```json
//! {
//!   "listen": "127.0.0.1:8080",
//!   "public_url": "https://ci.example.com",
//!   "state_dir": "state",
//!   "component": "target/imbridge.wasm",
//!   "tenants": [{
//!     "id": "acme",
//!     "allow_hosts": ["127.0.0.1:40123"],
//!     "engine_webhook": "http://127.0.0.1:9000/imbridge",
//!     "apps": [{"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "..."}]
//!   }]
//! }
//! ```
//!
//! Relative paths are resolved against the directory of the configuration file, so a config
//! means the same thing whatever directory the host is started from.

use crate::bindings::types::ImApp;
use crate::json::Json as _;
use crate::tenants::{TenantPolicy, check_id};
use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    public_url: String,
    state_dir: PathBuf,
    #[serde(default)]
    component: Option<PathBuf>,
    #[serde(default)]
    call_timeout_secs: Option<u64>,
    #[serde(default)]
    api_token: Option<String>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    #[serde(default)]
    allow_hosts: Vec<String>,
    // Parsed by `json`, whose errors never echo values: apps carry secrets.
    #[serde(default)]
    apps: Vec<serde_json::Value>,
    #[serde(default)]
    engine_webhook: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}

/// A validated configuration. No `Debug`: it holds app secrets and the API token.
pub struct ServeConfig {
    pub listen: String,
    /// The externally visible origin, e.g. `https://ci.example.com`, without trailing slash.
    pub public_url: String,
    pub state_dir: PathBuf,
    /// The plugin every tenant runs; `None` means the CLI default.
    pub component: Option<PathBuf>,
    pub call_timeout: Option<Duration>,
    /// When set, the engine API requires `Authorization: Bearer <api_token>`.
    pub api_token: Option<String>,
    pub tenants: Vec<TenantConfig>,
}

pub struct TenantConfig {
    pub id: String,
    pub policy: TenantPolicy,
    pub apps: Vec<ImApp>,
    /// Where callback updates are POSTed, if anywhere.
    pub engine_webhook: Option<String>,
}

impl TenantConfig {
    pub fn app(&self, id: &str) -> Option<&ImApp> {
        self.apps.iter().find(|a| a.id == id)
    }
}

impl ServeConfig {
    pub fn tenant(&self, id: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.id == id)
    }

    /// The address to paste into a platform's developer console for one app.
    pub fn callback_url(&self, tenant: &str, app: &str) -> String {
        format!("{}/callback/{tenant}/{app}", self.public_url)
    }

    pub fn load(path: &Path) -> Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("in config {}", path.display()))
    }

    /// Parses configuration text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<ServeConfig> {
        let raw: RawConfig = serde_json::from_str(text).context("invalid JSON")?;
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let public_url = raw.public_url.trim_end_matches('/').to_string();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            bail!("`public_url` must start with http:// or https://");
        }
        let mut seen = HashSet::new();
        let mut tenants = Vec::new();
        for (i, t) in raw.tenants.into_iter().enumerate() {
            check_id("tenant", &t.id)?;
            if !seen.insert(t.id.clone()) {
                bail!("tenant `{}` is configured twice", t.id);
            }
            let mut apps = Vec::new();
            for (j, app) in t.apps.iter().enumerate() {
                let app = ImApp::from_json(app, &format!("tenants[{i}].apps[{j}]"))?;
                check_id("app", &app.id)?;
                if apps.iter().any(|a: &ImApp| a.id == app.id) {
                    bail!("app `{}` of tenant `{}` is configured twice", app.id, t.id);
                }
                apps.push(app);
            }
            tenants.push(TenantConfig {
                id: t.id,
                policy: TenantPolicy {
                    allow_hosts: t.allow_hosts,
                },
                apps,
                engine_webhook: t.engine_webhook,
            });
        }
        Ok(ServeConfig {
            listen: raw.listen,
            public_url,
            state_dir: resolve(raw.state_dir),
            component: raw.component.map(resolve),
            call_timeout: raw.call_timeout_secs.map(Duration::from_secs),
            api_token: raw.api_token.filter(|t| !t.is_empty()),
            tenants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_paths() {
        let cfg = ServeConfig::parse(
            r#"{"public_url": "https://ci.example.com/", "state_dir": "state",
                "component": "/abs/imbridge.wasm",
                "tenants": [{"id": "acme", "apps": [
                  {"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s"}]}]}"#,
            Path::new("/etc/imbridge"),
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8080");
        assert_eq!(cfg.state_dir, Path::new("/etc/imbridge/state"));
        assert_eq!(
            cfg.component.as_deref(),
            Some(Path::new("/abs/imbridge.wasm"))
        );
        assert_eq!(
            cfg.callback_url("acme", "a1"),
            "https://ci.example.com/callback/acme/a1"
        );
        assert!(cfg.tenant("acme").unwrap().app("a1").is_some());
    }

    #[test]
    fn rejects_bad_configs_without_echoing_secrets() {
        let base = Path::new(".");
        for (text, want) in [
            (
                r#"{"public_url": "ftp://x", "state_dir": "s"}"#,
                "public_url",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a/b"}]}"#,
                "tenant id",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a"}, {"id": "a"}]}"#,
                "twice",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "s3cr3t", "app_id": "i", "app_secret": "s3cr3t"}]}]}"#,
                "tenants[0].apps[0].platform",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenant": []}"#,
                "unknown field",
            ),
        ] {
            let err = match ServeConfig::parse(text, base) {
                Ok(_) => panic!("accepted {text}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }
}
