//! The `serve` / `urls` configuration file (JSON).
//!
//! ```json
//! {
//!   "listen": "127.0.0.1:8080",
//!   "public_url": "https://ci.example.com",
//!   "state_dir": "state",
//!   "store": {"redis": "redis://127.0.0.1:6379/0"},
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
//! `store` is optional: without it the state lives in an embedded database in `state_dir`
//! (one host process per directory); with `{"redis": URL}` in Redis, shared by every host
//! replica configured with the same URL.
//!
//! Relative paths are resolved against the directory of the configuration file, so a config
//! means the same thing whatever directory the host is started from.
//!
//! Each app may also say how platform events reach it: `"callback": "http"` (the default: the
//! platform calls `/callback/{tenant}/{app}`) or `"callback": "persistent"` (the host dials out
//! over Feishu's long connection / DingTalk's Stream mode, for engines the platform cannot
//! reach). That option belongs to the host, not to the plugin's `im-app`, so it is taken out of
//! the app object before the rest is parsed; [`Config`] carries it next to the [`ServeConfig`].

use crate::bindings::types::ImApp;
use crate::json::Json as _;
use crate::store::StoreConfig;
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
    // Read as a bare value: serde's errors for a mistyped enum quote the value, and a Redis
    // URL carries its password.
    #[serde(default)]
    store: Option<serde_json::Value>,
    #[serde(default)]
    cache_dir: Option<PathBuf>,
    #[serde(default)]
    lease_ttl_secs: Option<u64>,
    #[serde(default)]
    component: Option<PathBuf>,
    #[serde(default)]
    call_timeout_secs: Option<u64>,
    #[serde(default)]
    max_concurrent_calls: Option<u32>,
    #[serde(default)]
    max_calls_per_tenant: Option<u32>,
    #[serde(default)]
    api_token: Option<String>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

/// A JSON document in which no object holds a key twice. serde_json keeps the last of two
/// equal keys without a word, and the apps (and `store`) are read as plain JSON values, so an
/// app with two `app_secret`s ran on whichever came last. The error names the key and where
/// it is, never a value.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<UniqueKeys, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key `{key}` appears twice in one object"
                )));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
}

/// `"store": {"embedded": {}}` or `{"redis": "redis://…"}`, the latter with an optional
/// `"wait_replicas": N`. The URL may carry a password, so no error quotes it.
fn parse_store(raw: Option<serde_json::Value>) -> Result<StoreConfig> {
    use serde_json::Value;
    const SHAPE: &str = "`store` must be {\"embedded\": {}} or {\"redis\": \"redis://[user:password@]host:port/db\"} (with Redis, optionally \"wait_replicas\": 0 to 16)";
    let Some(raw) = raw else {
        return Ok(StoreConfig::Embedded);
    };
    let Value::Object(mut o) = raw else {
        bail!(SHAPE)
    };
    let wait_replicas = match o.remove("wait_replicas") {
        None => None,
        Some(n) => match n.as_u64() {
            Some(n @ 0..=16) => Some(n as u32),
            _ => bail!(SHAPE),
        },
    };
    let mut fields = o.into_iter();
    let (Some((kind, value)), None) = (fields.next(), fields.next()) else {
        bail!(SHAPE)
    };
    match (kind.as_str(), value) {
        ("embedded", Value::Object(e)) if e.is_empty() && wait_replicas.is_none() => {
            Ok(StoreConfig::Embedded)
        }
        ("redis", Value::String(url)) if url.starts_with("redis://") => Ok(StoreConfig::Redis {
            url,
            wait_replicas: wait_replicas.unwrap_or(0),
        }),
        ("redis", Value::String(url)) if url.starts_with("rediss://") => bail!(
            "`store.redis`: TLS to Redis (rediss://) is not built into this host; reach Redis \
             over a private network or a TLS tunnel and use redis://"
        ),
        _ => bail!(SHAPE),
    }
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
    #[serde(default)]
    engine_webhook_secret: Option<String>,
    #[serde(default)]
    api_token: Option<String>,
    #[serde(default)]
    component: Option<PathBuf>,
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
    /// Where the state lives: the embedded database in `state_dir` (default) or Redis.
    pub store: StoreConfig,
    /// Where compiled components are cached (default `state_dir/cache`); replicas may share
    /// one.
    pub cache_dir: Option<PathBuf>,
    /// How long a persistent connection's lease lasts without renewal, i.e. how soon another
    /// replica takes the connection over when its holder dies (default 30 s).
    pub lease_ttl: Option<Duration>,
    /// The plugin every tenant runs; `None` means the CLI default.
    pub component: Option<PathBuf>,
    pub call_timeout: Option<Duration>,
    /// Plugin calls running at once, and of one tenant (defaults in [`crate::host`]).
    pub max_concurrent_calls: Option<u32>,
    pub max_calls_per_tenant: Option<u32>,
    /// When set, the engine API requires `Authorization: Bearer <api_token>`; it opens every
    /// tenant's routes (the operator's token).
    pub api_token: Option<String>,
    pub tenants: Vec<TenantConfig>,
}

pub struct TenantConfig {
    pub id: String,
    pub policy: TenantPolicy,
    pub apps: Vec<ImApp>,
    /// Where callback updates are POSTed, if anywhere.
    pub engine_webhook: Option<String>,
    /// When set, each POST to `engine_webhook` is signed with it (see the README).
    pub engine_webhook_secret: Option<String>,
    /// When set, this tenant's engine API routes require it (or the server-wide token), so
    /// one tenant's engine cannot reach another's approvals or acknowledge its updates.
    pub api_token: Option<String>,
    /// This tenant's plugin, when it is not the server's `component` (one tenant tries a new
    /// version first).
    pub component: Option<PathBuf>,
}

impl TenantConfig {
    pub fn app(&self, id: &str) -> Option<&ImApp> {
        self.apps.iter().find(|a| a.id == id)
    }
}

/// How platform events reach an app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackMode {
    /// The platform POSTs to the host's callback URL.
    Http,
    /// The host holds a WebSocket to the platform (Feishu long connection, DingTalk Stream).
    Persistent,
}

/// An app whose events arrive over a persistent connection the host opens.
#[derive(Clone)]
pub struct PersistentApp {
    pub tenant: String,
    pub app: ImApp,
    /// Where to ask for the connection endpoint, when not the app's `api_base` or the
    /// platform's public host (a proxy, a private deployment, a simulator). Config key
    /// `endpoint_base`, host-only like `callback`.
    pub endpoint_base: Option<String>,
}

/// A whole configuration file: the HTTP server's part and the persistent connections.
pub struct Config {
    pub serve: ServeConfig,
    pub persistent: Vec<PersistentApp>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).with_context(|| format!("in config {}", path.display()))
    }

    /// Parses configuration text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config> {
        parse_config(text, base)
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

    /// Parses configuration text; relative paths are taken relative to `base`. Refuses apps in
    /// persistent mode, which only [`Config::parse`] can carry: silently serving them over
    /// HTTP instead would lose their events.
    pub fn parse(text: &str, base: &Path) -> Result<ServeConfig> {
        let config = parse_config(text, base)?;
        if let Some(p) = config.persistent.first() {
            bail!(
                "app `{}` of tenant `{}` has \"callback\": \"persistent\"; load this \
                 configuration with `Config::parse` so its connection is opened",
                p.app.id,
                p.tenant
            );
        }
        Ok(config.serve)
    }
}

/// Takes the host-only `callback` option out of an app object.
fn take_callback_mode(
    app: &serde_json::Value,
    path: &str,
) -> Result<(serde_json::Value, CallbackMode, Option<String>)> {
    let mut app = app.clone();
    let base = match app.as_object_mut().and_then(|o| o.remove("endpoint_base")) {
        None | Some(serde_json::Value::Null) => None,
        // Trimmed as it is checked: the connection code takes it as it stands.
        Some(serde_json::Value::String(s)) => Some(s.trim().to_string()),
        Some(_) => bail!("`{path}.endpoint_base` must be a URL"),
    };
    let mode = match app.as_object_mut().and_then(|o| o.remove("callback")) {
        None | Some(serde_json::Value::Null) => CallbackMode::Http,
        Some(v) => match v.as_str() {
            Some("http") => CallbackMode::Http,
            Some("persistent") => CallbackMode::Persistent,
            _ => bail!("`{path}.callback` must be \"http\" or \"persistent\""),
        },
    };
    Ok((app, mode, base))
}

/// A webhook URL that cannot be POSTed to would only show as a log line per delivery while
/// the outbox grows. The URL itself is not echoed: it may carry a token.
fn check_webhook(url: String, path: &str) -> Result<String> {
    let uri = url.parse::<http::Uri>().ok();
    let ok = uri.as_ref().is_some_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
    });
    anyhow::ensure!(ok, "`{path}` must be an http:// or https:// URL");
    // `user:password@` would be sent as part of the Host header and make every delivery's
    // address lookup fail; the URL's path or query can carry a token instead.
    let userinfo = uri
        .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
        .unwrap_or(false);
    anyhow::ensure!(
        !userinfo,
        "`{path}` must not carry credentials before the host (user:password@); put a token \
         in its path or query"
    );
    Ok(url)
}

/// Settings the plugin would refuse on every call, or every HTTP callback, of the app:
/// refused at load, where the operator sees it, not as 500s to the platform's pushes later.
/// Keys an app does not use stay free (one that only sends notifications, or takes its
/// events over a persistent connection, never decrypts an HTTP callback).
fn check_app_settings(app: &ImApp, mode: CallbackMode, path: &str) -> Result<()> {
    use crate::bindings::types::Platform;
    if let Some(base) = &app.api_base {
        check_base_url(base, &format!("{path}.api_base"))?;
    }
    if matches!(mode, CallbackMode::Http) && app.max_clock_skew_secs == Some(0) {
        bail!(
            "`{path}.max_clock_skew_secs` must be at least 1 (0 would refuse nearly every callback)"
        );
    }
    // Past a day the window no longer limits replays (a value like 4294967295 turned it off
    // without a word); clocks that far apart need fixing, not a wider window.
    if app.max_clock_skew_secs.is_some_and(|s| s > 86_400) {
        bail!("`{path}.max_clock_skew_secs` must be at most 86400 (a day)");
    }
    let key = app
        .encrypt_key
        .as_deref()
        .map(str::trim)
        .unwrap_or_default();
    if let (Platform::Dingtalk | Platform::Wecom, CallbackMode::Http) = (app.platform, mode)
        && !key.is_empty()
        && key.len() != 43
    {
        bail!(
            "`{path}.encrypt_key` must be the console's 43-character EncodingAESKey (aes_key), \
             not {} characters",
            key.len()
        );
    }
    Ok(())
}

/// A base URL that API paths are appended to (`api_base`, `endpoint_base`): anything else
/// would fail every request made with it, far from the setting.
fn check_base_url(base: &str, field: &str) -> Result<()> {
    let base = base.trim();
    if !(base.starts_with("https://") || base.starts_with("http://")) {
        bail!("`{field}` must be a URL such as https://open.feishu.cn");
    }
    crate::wasi_http::HostPattern::parse(base).with_context(|| format!("`{field}`"))?;
    Ok(())
}

/// An empty token (an unset variable in a config template, say) must not silently open the
/// API it was meant to close.
fn check_token(token: Option<String>, path: &str) -> Result<Option<String>> {
    match token {
        Some(t) if t.trim().is_empty() => {
            bail!(
                "`{path}` is empty: set a value, or leave the field out (no token leaves an API \
                 open, no secret a webhook unsigned)"
            )
        }
        // HTTP trims a header value's surrounding whitespace and carries only visible ASCII
        // reliably: such a token could never match (a trailing newline from a secret file).
        Some(t) if t.trim() != t || !t.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) => {
            bail!(
                "`{path}` may hold only visible ASCII characters and inner spaces, without \
                 surrounding whitespace or line breaks"
            )
        }
        t => Ok(t),
    }
}

fn parse_config(text: &str, base: &Path) -> Result<Config> {
    serde_json::from_str::<UniqueKeys>(text).context("invalid JSON")?;
    let raw: RawConfig = serde_json::from_str(text).context("invalid JSON")?;
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    let public_url = raw.public_url.trim_end_matches('/').to_string();
    if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
        bail!("`public_url` must start with http:// or https://");
    }
    let mut seen = HashSet::new();
    let mut tenants = Vec::new();
    let mut persistent = Vec::new();
    for (i, t) in raw.tenants.into_iter().enumerate() {
        check_id("tenant", &t.id)?;
        if !seen.insert(t.id.clone()) {
            bail!("tenant `{}` is configured twice", t.id);
        }
        let mut apps = Vec::new();
        for (j, app) in t.apps.iter().enumerate() {
            let path = format!("tenants[{i}].apps[{j}]");
            let (app, mode, endpoint_base) = take_callback_mode(app, &path)?;
            let app = ImApp::from_json(&app, &path)?;
            check_id("app", &app.id)?;
            check_app_settings(&app, mode, &path)?;
            if let Some(base) = &endpoint_base {
                // Only a persistent connection reads it: an HTTP app would drop it unseen.
                if mode != CallbackMode::Persistent {
                    bail!(
                        "`{path}.endpoint_base` is read only for \"callback\": \"persistent\" \
                         (app `{}` of tenant `{}` takes its events over HTTP): remove it, or set \
                         \"callback\": \"persistent\"",
                        app.id,
                        t.id
                    );
                }
                check_base_url(base, &format!("{path}.endpoint_base"))?;
            }

            if apps.iter().any(|a: &ImApp| a.id == app.id) {
                bail!("app `{}` of tenant `{}` is configured twice", app.id, t.id);
            }
            if mode == CallbackMode::Persistent {
                crate::persistent::check_platform(&app)
                    .with_context(|| format!("`{path}.callback`"))?;
                // The platform hands each event to one of an app's connections at random, so
                // a second connection for the same app would take events the first one's
                // tenant is waiting for and drop them as unknown (acknowledged, never resent).
                if let Some(other) = persistent.iter().find(|p: &&PersistentApp| {
                    p.app.platform == app.platform && p.app.app_id == app.app_id
                }) {
                    bail!(
                        "`{path}`: app `{}` of tenant `{}` and app `{}` of tenant `{}` would \
                         both hold a persistent connection for {:?} app id `{}`; the platform \
                         gives each event to one connection, so each would lose the other's \
                         events: configure the app once",
                        other.app.id,
                        other.tenant,
                        app.id,
                        t.id,
                        app.platform,
                        app.app_id
                    );
                }
                persistent.push(PersistentApp {
                    tenant: t.id.clone(),
                    app: app.clone(),
                    endpoint_base,
                });
            }
            apps.push(app);
        }
        let has_hook = t.engine_webhook.is_some();
        tenants.push(TenantConfig {
            id: t.id,
            policy: TenantPolicy {
                allow_hosts: t.allow_hosts,
            },
            apps,
            engine_webhook: match t.engine_webhook {
                Some(url) => Some(check_webhook(url, &format!("tenants[{i}].engine_webhook"))?),
                None => None,
            },
            engine_webhook_secret: match (has_hook, t.engine_webhook_secret) {
                (true, secret) => {
                    check_token(secret, &format!("tenants[{i}].engine_webhook_secret"))?
                }
                (false, Some(_)) => {
                    bail!("`tenants[{i}].engine_webhook_secret` is set without an `engine_webhook`")
                }
                (false, None) => None,
            },
            api_token: check_token(t.api_token, &format!("tenants[{i}].api_token"))?,
            component: t.component.map(resolve),
        });
    }
    let serve = ServeConfig {
        listen: raw.listen,
        public_url,
        state_dir: resolve(raw.state_dir),
        store: parse_store(raw.store)?,
        cache_dir: raw.cache_dir.map(resolve),
        lease_ttl: match raw.lease_ttl_secs {
            Some(t @ 1..=86_400) => Some(Duration::from_secs(t)),
            Some(_) => bail!("`lease_ttl_secs` must be between 1 and 86400"),
            None => None,
        },
        component: raw.component.map(resolve),
        call_timeout: match raw.call_timeout_secs {
            Some(t) if t >= 1 && t <= crate::host::MAX_CALL_TIMEOUT.as_secs() => {
                Some(Duration::from_secs(t))
            }
            Some(_) => bail!(
                "`call_timeout_secs` must be between 1 and {}",
                crate::host::MAX_CALL_TIMEOUT.as_secs()
            ),
            None => None,
        },
        max_concurrent_calls: match raw.max_concurrent_calls {
            Some(n @ 1..=MAX_CONCURRENT_CALLS) => Some(n),
            Some(_) => bail!("`max_concurrent_calls` must be between 1 and {MAX_CONCURRENT_CALLS}"),
            None => None,
        },
        max_calls_per_tenant: raw.max_calls_per_tenant,
        api_token: check_token(raw.api_token, "api_token")?,
        tenants,
    };
    // A token is what tells the engines apart: two tenants sharing one could each read and
    // acknowledge the other's updates, and the operator's token opens every tenant already.
    let mut tokens: HashSet<&str> = serve.api_token.as_deref().into_iter().collect();
    for (i, t) in serve.tenants.iter().enumerate() {
        if let Some(token) = &t.api_token
            && !tokens.insert(token)
        {
            bail!(
                "`tenants[{i}].api_token` is also another tenant's or the server's token: give each its own"
            );
        }
    }
    let slots = serve
        .max_concurrent_calls
        .unwrap_or(crate::host::DEFAULT_MAX_CONCURRENT_CALLS);
    if let Some(n) = serve.max_calls_per_tenant
        && !(1..=slots).contains(&n)
    {
        bail!("`max_calls_per_tenant` must be between 1 and `max_concurrent_calls` ({slots})");
    }
    Ok(Config { serve, persistent })
}

/// Each slot reserves an instance's share of the pooling allocator (memories, tables), so
/// the pool's address-space reservation grows with it.
const MAX_CONCURRENT_CALLS: u32 = 256;

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
        assert_eq!(cfg.store, StoreConfig::Embedded);
    }

    #[test]
    fn store_is_embedded_or_redis() {
        let parse = |store: &str| {
            let text =
                format!(r#"{{"public_url": "http://x", "state_dir": "s", "store": {store}}}"#);
            ServeConfig::parse(&text, Path::new(".")).map(|c| c.store)
        };
        let redis = |wait_replicas| StoreConfig::Redis {
            url: "redis://127.0.0.1:6379/0".into(),
            wait_replicas,
        };
        assert_eq!(
            parse(r#"{"redis": "redis://127.0.0.1:6379/0"}"#).unwrap(),
            redis(0)
        );
        assert_eq!(
            parse(r#"{"redis": "redis://127.0.0.1:6379/0", "wait_replicas": 2}"#).unwrap(),
            redis(2)
        );
        assert_eq!(parse(r#"{"embedded": {}}"#).unwrap(), StoreConfig::Embedded);
        for bad in [
            r#"{"redis": 5}"#,
            r#"{"mysql": "x"}"#,
            r#""redis""#,
            r#"{"embedded": {}, "redis": "redis://h"}"#,
            r#"{"embedded": {"x": 1}}"#,
            r#"{"embedded": {}, "wait_replicas": 1}"#,
            r#"{"redis": "redis://h", "wait_replicas": 17}"#,
            r#"{"redis": "redis://h", "wait_replicas": -1}"#,
            r#"{"redis": "redis://h", "wait_replicas": "1"}"#,
            r#"{"wait_replicas": 1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // A URL in the wrong place, or one this host cannot use, is never quoted back: it may
        // carry the password.
        for bad in [
            r#""redis://u:s3cr3t@h:6379/0""#,
            r#"{"redis": "rediss://u:s3cr3t@h:6379/0"}"#,
            r#"{"redis": "http://u:s3cr3t@h"}"#,
            r#"["redis://u:s3cr3t@h"]"#,
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(err.contains("store"), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
        assert!(format!("{:#}", parse(r#"{"redis": "rediss://h"}"#).unwrap_err()).contains("TLS"));
    }

    #[test]
    fn timeouts_are_bounded() {
        let parse = |field: &str, n: u64| {
            let text = format!(r#"{{"public_url": "http://x", "state_dir": "s", "{field}": {n}}}"#);
            ServeConfig::parse(&text, Path::new("."))
        };
        assert_eq!(
            parse("call_timeout_secs", 3600).unwrap().call_timeout,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse("lease_ttl_secs", 5).unwrap().lease_ttl,
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse("max_calls_per_tenant", 32)
                .unwrap()
                .max_calls_per_tenant,
            Some(32)
        );
        let both = r#"{"public_url": "http://x", "state_dir": "s", "max_concurrent_calls": 64,
                       "max_calls_per_tenant": 48}"#;
        let both = ServeConfig::parse(both, Path::new(".")).unwrap();
        assert_eq!(
            (both.max_concurrent_calls, both.max_calls_per_tenant),
            (Some(64), Some(48))
        );
        for (field, n) in [
            ("call_timeout_secs", 0),
            ("call_timeout_secs", 3601),
            ("call_timeout_secs", u64::MAX),
            ("lease_ttl_secs", 0),
            ("lease_ttl_secs", u64::MAX),
            ("max_concurrent_calls", 0),
            ("max_concurrent_calls", 257),
            ("max_calls_per_tenant", 0),
            ("max_calls_per_tenant", 33),
        ] {
            let err = format!("{:#}", parse(field, n).err().expect("refused"));
            assert!(err.contains(field), "{err}");
        }
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
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "callback": "s3cr3t"}]}]}"#,
                "tenants[0].apps[0].callback",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a",
                "engine_webhook": "s3cr3t"}]}"#,
                "tenants[0].engine_webhook",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a",
                "engine_webhook": "ftp://engine/s3cr3t"}]}"#,
                "tenants[0].engine_webhook",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a",
                "engine_webhook": "https://bot:s3cr3t@engine.example/hook"}]}"#,
                "must not carry credentials",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "api_token": ""}"#,
                "`api_token` is empty",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a",
                "api_token": " "}]}"#,
                "`tenants[0].api_token` is empty",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "dingtalk", "app_id": "i", "app_secret": "s3cr3t",
                 "encrypt_key": "s3cr3t"}]}]}"#,
                "must be the console's 43-character EncodingAESKey",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "api_base": ""}]}]}"#,
                "`tenants[0].apps[0].api_base` must be a URL",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "max_clock_skew_secs": 0}]}]}"#,
                "`tenants[0].apps[0].max_clock_skew_secs` must be at least 1",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "max_clock_skew_secs": 86401}]}]}"#,
                "`tenants[0].apps[0].max_clock_skew_secs` must be at most 86400",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "app_secret": "s3cr3t-2"}]}]}"#,
                "the key `app_secret` appears twice in one object at line 3",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [
                {"id": "a", "engine_webhook_secret": "whsec"}]}"#,
                "`tenants[0].engine_webhook_secret` is set without an `engine_webhook`",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a",
                "engine_webhook": "https://e/hook", "engine_webhook_secret": " "}]}"#,
                "`tenants[0].engine_webhook_secret` is empty",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [
                {"id": "a", "api_token": "tok-a"}, {"id": "b", "api_token": "tok-a"}]}"#,
                "`tenants[1].api_token` is also another tenant's",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "api_token": "op",
                "tenants": [{"id": "a", "api_token": "op"}]}"#,
                "`tenants[0].api_token` is also another tenant's or the server's",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "api_token": "s3cr3t\n"}"#,
                "`api_token` may hold only visible ASCII",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "api_token": "s3cr3t-é"}"#,
                "`api_token` may hold only visible ASCII",
            ),
            (
                r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "a", "apps": [
                {"id": "x", "platform": "feishu", "app_id": "i", "app_secret": "s3cr3t",
                 "api_base": "open.feishu.cn"}]}]}"#,
                "`tenants[0].apps[0].api_base` must be a URL",
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

    /// Settings an app does not use are not checked: a DingTalk app on a Stream connection or
    /// with a blank key never decrypts an HTTP callback; a token may hold inner spaces.
    #[test]
    fn unused_keys_stay_free() {
        let text = r#"{"public_url": "http://x", "state_dir": "s", "api_token": "a b",
            "tenants": [{"id": "t", "apps": [
              {"id": "a", "platform": "dingtalk", "app_id": "i", "app_secret": "s",
               "encrypt_key": "old", "callback": "persistent"},
              {"id": "b", "platform": "wecom", "app_id": "j", "app_secret": "s",
               "encrypt_key": ""},
              {"id": "c", "platform": "dingtalk", "app_id": "k", "app_secret": "s",
               "encrypt_key": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
               "api_base": " https://api.dingtalk.com/ "}]}]}"#;
        let cfg = Config::parse(text, Path::new("/srv")).unwrap();
        assert_eq!(cfg.serve.tenants[0].apps.len(), 3);
        assert_eq!(cfg.persistent.len(), 1);
    }

    #[test]
    fn callback_mode_is_per_app_and_defaults_to_http() {
        let text = r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "t",
            "apps": [
              {"id": "a", "platform": "feishu", "app_id": "i", "app_secret": "s"},
              {"id": "b", "platform": "feishu", "app_id": "j", "app_secret": "s",
               "callback": "http"},
              {"id": "c", "platform": "dingtalk", "app_id": "k", "app_secret": "s",
               "callback": "persistent"}]}]}"#;
        let cfg = Config::parse(text, Path::new(".")).unwrap();
        assert_eq!(cfg.serve.tenant("t").unwrap().apps.len(), 3);
        let ids: Vec<_> = cfg
            .persistent
            .iter()
            .map(|p| (p.tenant.as_str(), p.app.id.as_str()))
            .collect();
        assert_eq!(ids, [("t", "c")]);
        // The server-only parser refuses what it could not serve.
        let err = ServeConfig::parse(text, Path::new(".")).err().unwrap();
        assert!(err.to_string().contains("persistent"), "{err}");
    }

    /// `endpoint_base` is read only for a persistent connection: on an HTTP app it was dropped
    /// without a word, and on a persistent one any string was taken, to fail at every connect.
    #[test]
    fn endpoint_base_is_refused_unless_persistent_and_a_url() {
        let app = |extra: &str| {
            format!(
                r#"{{"public_url": "http://x", "state_dir": "s", "tenants": [{{"id": "t",
                "apps": [{{"id": "d", "platform": "dingtalk", "app_id": "i",
                           "app_secret": "s3cr3t"{extra}}}]}}]}}"#
            )
        };
        for (extra, want) in [
            (
                r#", "endpoint_base": "https://gw.example""#,
                "`tenants[0].apps[0].endpoint_base` is read only for \"callback\": \"persistent\"",
            ),
            (
                r#", "callback": "http", "endpoint_base": "https://gw.example""#,
                "app `d` of tenant `t`",
            ),
            (
                r#", "callback": "persistent", "endpoint_base": "gw.example""#,
                "`tenants[0].apps[0].endpoint_base` must be a URL",
            ),
            (
                r#", "callback": "persistent", "endpoint_base": "https://""#,
                "`tenants[0].apps[0].endpoint_base`",
            ),
        ] {
            let err = match Config::parse(&app(extra), Path::new(".")) {
                Ok(_) => panic!("accepted {extra}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
        let ok = app(r#", "callback": "persistent", "endpoint_base": " http://127.0.0.1:9/ ""#);
        let cfg = Config::parse(&ok, Path::new(".")).unwrap();
        assert_eq!(
            cfg.persistent[0].endpoint_base.as_deref(),
            Some("http://127.0.0.1:9/")
        );
    }

    #[test]
    fn wecom_in_persistent_mode_is_refused() {
        let text = r#"{"public_url": "http://x", "state_dir": "s", "tenants": [{"id": "t",
            "apps": [{"id": "w", "platform": "wecom", "app_id": "ww1", "app_secret": "s3cr3t",
                      "agent_id": "1000002", "callback": "persistent"}]}]}"#;
        let err = match Config::parse(text, Path::new(".")) {
            Ok(_) => panic!("accepted WeCom in persistent mode"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("tenants[0].apps[0].callback"), "{err}");
        assert!(
            err.contains("WeCom has no persistent connection mode"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
        let http = text.replace("persistent", "http");
        assert!(Config::parse(&http, Path::new(".")).is_ok());
    }

    #[test]
    fn one_platform_app_holds_one_persistent_connection() {
        let app = |id: &str, app_id: &str, platform: &str, mode: &str| {
            format!(
                r#"{{"id": "{id}", "platform": "{platform}", "app_id": "{app_id}",
                    "app_secret": "s3cr3t", "callback": "{mode}"}}"#
            )
        };
        let config = |a: String, b: String| {
            format!(
                r#"{{"public_url": "http://x", "state_dir": "s", "tenants": [
                    {{"id": "prod", "apps": [{a}]}}, {{"id": "staging", "apps": [{b}]}}]}}"#
            )
        };
        let refused = [
            config(
                app("a", "cli_x", "feishu", "persistent"),
                app("b", "cli_x", "feishu", "persistent"),
            ),
            config(
                format!(
                    "{}, {}",
                    app("a", "ding1", "dingtalk", "persistent"),
                    app("b", "ding1", "dingtalk", "persistent")
                ),
                app("c", "ding2", "dingtalk", "persistent"),
            ),
        ];
        for text in refused {
            let err = match Config::parse(&text, Path::new(".")) {
                Ok(_) => panic!("accepted two connections for one app: {text}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains("configure the app once"), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
        for text in [
            config(
                app("a", "cli_x", "feishu", "persistent"),
                app("b", "cli_x", "feishu", "http"),
            ),
            config(
                app("a", "cli_x", "feishu", "persistent"),
                app("a", "cli_x", "lark", "persistent"),
            ),
            config(
                app("a", "cli_x", "feishu", "persistent"),
                app("a", "cli_y", "feishu", "persistent"),
            ),
        ] {
            if let Err(e) = Config::parse(&text, Path::new(".")) {
                panic!("{e:#}: {text}");
            }
        }
    }
}
