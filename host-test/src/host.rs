//! [`Host`]: tenants, their plugins, and calls into them.

use crate::bindings::PluginPre;
use crate::bindings::types::{HttpRequest, ImApp};
use crate::call::{Call, Export, Reply};
use crate::clock::ReplayClock;
use crate::engine::{self, ComponentCache};
use crate::kv::KvCtx;
use crate::log;
use crate::sandbox::{self, CallState};
use crate::store::Store;
use crate::tenants::{self, Registry, Tenant, TenantPolicy};
use crate::wasi_http::{AllowList, HttpPolicy};
use anyhow::{Context as _, Result, anyhow};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wasmtime::component::Linker;
use wasmtime::{Engine, Trap, UpdateDeadline};

/// Default per-call deadline.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default linear-memory cap per plugin instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;
/// Default number of calls running at once; further calls wait for a slot.
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 32;

pub struct HostConfig {
    /// Where the database lives.
    pub state_dir: PathBuf,
    /// Where compiled components are cached; `state_dir/cache` when `None`.
    pub cache_dir: Option<PathBuf>,
    pub call_timeout: Duration,
    pub memory_limit_bytes: usize,
    /// Makes the plugin's wall clock start at this Unix time (for replaying captured
    /// callbacks); the real time when `None`.
    pub now_unix_secs: Option<u64>,
    pub max_concurrent_calls: u32,
}

impl HostConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            state_dir: state_dir.into(),
            cache_dir: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT,
            now_unix_secs: None,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
        }
    }
}

/// A call that ran out of time.
#[derive(Debug)]
struct DeadlineExceeded;

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// The reference host. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<CallState>,
    components: ComponentCache,
    store: Arc<Store>,
    tenants: Registry,
    clock: Option<ReplayClock>,
    call_timeout: Duration,
    memory_limit: usize,
    slots: Semaphore,
}

impl Host {
    pub fn new(cfg: HostConfig) -> Result<Host> {
        anyhow::ensure!(
            cfg.max_concurrent_calls > 0,
            "max_concurrent_calls must be at least 1"
        );
        anyhow::ensure!(!cfg.call_timeout.is_zero(), "call_timeout must not be zero");
        let engine = engine::new_engine(cfg.memory_limit_bytes, cfg.max_concurrent_calls)?;
        engine::start_epoch_ticker(&engine)?;
        let linker = sandbox::linker(&engine)?;
        let store = Arc::new(Store::open(&cfg.state_dir)?);
        let cache_dir = cfg
            .cache_dir
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("cache"));
        Ok(Host {
            inner: Arc::new(Inner {
                engine,
                linker,
                components: ComponentCache::new(cache_dir),
                store,
                tenants: Registry::default(),
                clock: cfg.now_unix_secs.map(ReplayClock::starting_at),
                call_timeout: cfg.call_timeout,
                memory_limit: cfg.memory_limit_bytes,
                slots: Semaphore::new(cfg.max_concurrent_calls as usize),
            }),
        })
    }

    /// Loads (or replaces) the plugin of `tenant` from a component file.
    pub async fn load_tenant(&self, tenant: &str, wasm: &Path, policy: TenantPolicy) -> Result<()> {
        let bytes = tokio::fs::read(wasm)
            .await
            .with_context(|| format!("reading component {}", wasm.display()))?;
        self.load_tenant_bytes(tenant, bytes, policy).await
    }

    /// Loads (or replaces) the plugin of `tenant` from component bytes. Calls already running
    /// finish on the previous version.
    pub async fn load_tenant_bytes(
        &self,
        tenant: &str,
        wasm: Vec<u8>,
        policy: TenantPolicy,
    ) -> Result<()> {
        tenants::check_id("tenant", tenant)?;
        let allow = AllowList::new(&policy.allow_hosts).context("invalid allow_hosts")?;
        let inner = self.inner.clone();
        // Compiling takes seconds of CPU: keep it off the async workers.
        let (pre, digest) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (component, digest) = inner.components.load(&inner.engine, &wasm)?;
            let pre = inner
                .linker
                .instantiate_pre(&component)
                .map_err(anyhow::Error::from)
                .context("the component does not fit the imbridge:plugin world")?;
            let pre = PluginPre::new(pre)
                .map_err(anyhow::Error::from)
                .context("the component does not fit the imbridge:plugin world")?;
            Ok((pre, digest))
        })
        .await
        .context("compile task failed")??;
        let short = &digest[..12];
        let replaced = self.inner.tenants.insert(Tenant {
            id: tenant.into(),
            pre,
            policy,
            allow,
            digest: digest.clone(),
        });
        match replaced {
            Some(old) => log!(
                "tenant={tenant} plugin replaced {} -> {short}",
                &old.digest[..12]
            ),
            None => log!("tenant={tenant} plugin loaded {short}"),
        }
        Ok(())
    }

    /// Unloads a tenant's plugin; its stored data stays.
    pub fn unload_tenant(&self, tenant: &str) -> bool {
        self.inner.tenants.remove(tenant).is_some()
    }

    pub fn tenants(&self) -> Vec<String> {
        self.inner.tenants.ids()
    }

    /// The policy a tenant was loaded with.
    pub fn tenant_policy(&self, tenant: &str) -> Option<TenantPolicy> {
        self.inner.tenants.get(tenant).map(|t| t.policy.clone())
    }

    /// Calls one export with JSON input (an object keyed by parameter name) and returns
    /// `{"ok": ...}` or `{"err": ...}`. `Err` means the host failed, not the plugin: bad
    /// input shape, unknown tenant, a trap, or the deadline.
    pub async fn invoke_json(
        &self,
        tenant: &str,
        export: &str,
        input: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let export: Export = export.parse()?;
        let call = crate::json::parse_call(export, &input)?;
        let reply = self.call(tenant, &call).await?;
        Ok(crate::json::reply_to_json(&reply))
    }

    /// `handle-callback` with typed arguments, as the HTTP server uses it.
    pub async fn handle_callback(
        &self,
        tenant: &str,
        app: ImApp,
        request: HttpRequest,
    ) -> Result<Reply> {
        self.call(tenant, &Call::HandleCallback { app, request })
            .await
    }

    /// `handle-event` with typed arguments, as the persistent connections use it: `event` is
    /// the plaintext event JSON received over the connection.
    pub async fn handle_event(&self, tenant: &str, app: ImApp, event: Vec<u8>) -> Result<Reply> {
        self.call(tenant, &Call::HandleEvent { app, event }).await
    }

    /// Calls one export in a fresh instance of the tenant's plugin.
    pub async fn call(&self, tenant: &str, call: &Call) -> Result<Reply> {
        let export = call.export();
        let plugin = self
            .inner
            .tenants
            .get(tenant)
            .ok_or_else(|| anyhow!("unknown tenant `{tenant}`"))?;
        let started = Instant::now();
        let result = self.run(plugin, call).await;
        let ms = started.elapsed().as_millis();
        match &result {
            Ok(reply) => match reply.error() {
                None => log!("tenant={tenant} call={export} ok ms={ms}"),
                Some(e) => log!("tenant={tenant} call={export} err={} ms={ms}", e.kind()),
            },
            Err(e) => log!("tenant={tenant} call={export} failed ms={ms}: {e:#}"),
        }
        result
    }

    async fn run(&self, tenant: Arc<Tenant>, call: &Call) -> Result<Reply> {
        let inner = &self.inner;
        let export = call.export();
        // The engine operator supplied the app, so its api-base is trusted for this call.
        let allow = match call.app().and_then(|a| a.api_base.as_deref()) {
            Some(base) => tenant
                .allow
                .with(base)
                .context("`app.api_base` must be a URL such as https://open.feishu.cn")?,
            None => tenant.allow.clone(),
        };
        let _slot = inner
            .slots
            .acquire()
            .await
            .context("host is shutting down")?;

        let timeout = inner.call_timeout;
        let deadline = Instant::now() + timeout;
        let state = CallState::new(
            KvCtx::new(inner.store.clone(), tenant.id.clone()),
            HttpPolicy {
                tenant: tenant.id.clone(),
                allow,
                deadline,
                margin: timeout / 10,
            },
            inner
                .clock
                .map(|c| Box::new(c) as Box<dyn wasmtime_wasi::HostWallClock + Send>),
            inner.memory_limit,
        );
        let mut store = wasmtime::Store::new(&inner.engine, state);
        store.limiter(|s| &mut s.limits);
        // Every tick a running guest yields to the executor (so one busy plugin cannot starve
        // the others) and is stopped once past its deadline.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(DeadlineExceeded.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let pre = tenant.pre.clone();
        let run = async move {
            let plugin = pre.instantiate_async(&mut store).await?;
            let reply = call.invoke(&plugin, &mut store).await?;
            wasmtime::Result::Ok((reply, store))
        };
        // The epoch only interrupts running wasm; this also bounds time spent waiting on the
        // host, e.g. on a slow HTTP response.
        let (reply, store) = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(describe_failure(export, timeout, e)),
            Err(_) => return Err(deadline_error(export, timeout)),
        };

        // The export returned normally (with `ok` or `err`): its writes become durable.
        let kv = store.into_data().kv;
        tokio::task::spawn_blocking(move || kv.commit())
            .await
            .context("commit task failed")?
            .with_context(|| format!("committing the state written by `{export}`"))?;
        Ok(reply)
    }

    /// Reads a key from a tenant's store, for tests and tooling.
    pub fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.store.get(tenant, key)
    }

    /// Lists a tenant's keys, for tests and tooling.
    pub fn kv_keys(&self, tenant: &str) -> Result<Vec<String>> {
        self.inner.store.keys(tenant)
    }

    /// Writes a key in a tenant's store, for tests and tooling.
    pub fn kv_set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<()> {
        self.inner
            .store
            .commit(tenant, [(key.to_string(), Some(value.to_vec()))])
    }

    /// The host's database, shared with the server's outbox.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}

fn deadline_error(export: Export, timeout: Duration) -> anyhow::Error {
    anyhow!(
        "deadline exceeded: `{export}` did not finish within {:.1}s",
        timeout.as_secs_f64()
    )
}

/// Turns a wasmtime failure into a message that says what happened: deadline, trap or host
/// error. The wasm backtrace holds only function names and offsets, no data.
fn describe_failure(export: Export, timeout: Duration, e: wasmtime::Error) -> anyhow::Error {
    if e.downcast_ref::<DeadlineExceeded>().is_some() {
        return deadline_error(export, timeout);
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        let trap = trap.to_string();
        return anyhow::Error::from(e).context(format!("plugin trapped in `{export}`: {trap}"));
    }
    anyhow::Error::from(e).context(format!("plugin call `{export}` failed (trap)"))
}
