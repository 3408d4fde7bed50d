//! [`Host`]: tenants, their plugins, and calls into them.

use crate::bindings::types::{HttpRequest, ImApp};
use crate::call::PluginPre;
use crate::call::{Call, Export, Reply};
use crate::clock::ReplayClock;
use crate::engine::{self, ComponentCache};
use crate::kv::{HOST_KEY_PREFIX, KvCtx};
use crate::log;
use crate::sandbox::{self, CallState};
use crate::store::{Backend, Commit, Outcome, StoreConfig, blocking};
use crate::tenants::{self, Registry, Superseded, Tenant, TenantPolicy};
use crate::wasi_http::{AllowList, HttpPolicy};
use anyhow::{Context as _, Result, anyhow};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use wasmtime::component::Linker;
use wasmtime::{Engine, Trap, UpdateDeadline};

/// Default per-call deadline.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than any platform round trip needs; also keeps `Instant + timeout` from overflowing.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default linear-memory cap per plugin instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;
/// Default number of calls running at once; further calls wait for a slot.
pub const DEFAULT_MAX_CONCURRENT_CALLS: u32 = 32;
/// How often a call whose reads were changed by a concurrent call is run again before the
/// host gives up with a `storage` error. Each conflict means another call committed, so
/// running out takes that many commits to the same keys during one call.
const MAX_RUNS: u32 = 8;
/// Pauses before the host tries a failed commit again, for the exports that cannot be re-run
/// (see [`commit_or_retry`]): together about 2 s, a store's restart or failover.
const COMMIT_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_millis(1500),
];

pub struct HostConfig {
    /// Where the embedded database lives (with the default `store`) and the component cache.
    pub state_dir: PathBuf,
    /// Where the key-value state, outbox and leases live.
    pub store: StoreConfig,
    /// Where compiled components are cached; `state_dir/cache` when `None`.
    pub cache_dir: Option<PathBuf>,
    pub call_timeout: Duration,
    pub memory_limit_bytes: usize,
    /// Makes the plugin's wall clock start at this Unix time (for replaying captured
    /// callbacks); the real time when `None`.
    pub now_unix_secs: Option<u64>,
    pub max_concurrent_calls: u32,
    /// Calls of one tenant running at once, so a tenant whose calls all wait (on a platform
    /// that stopped answering, say) leaves slots to the others; `None`: three quarters of
    /// `max_concurrent_calls` (at least 1).
    pub max_calls_per_tenant: Option<u32>,
}

impl HostConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            state_dir: state_dir.into(),
            store: StoreConfig::default(),
            cache_dir: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            memory_limit_bytes: DEFAULT_MEMORY_LIMIT,
            now_unix_secs: None,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            max_calls_per_tenant: None,
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

/// The default of [`HostConfig::max_calls_per_tenant`].
pub fn default_calls_per_tenant(max_concurrent_calls: u32) -> u32 {
    (max_concurrent_calls - max_concurrent_calls / 4).max(1)
}

/// A call that found no free slot within its wait: the plugin did not run, so the same call
/// may be sent again as it is (`serve` answers 503).
#[derive(Debug)]
pub struct Busy {
    what: &'static str,
    waited: Duration,
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "busy: no free {} within {:.1}s",
            self.what,
            self.waited.as_secs_f64()
        )
    }
}

impl std::error::Error for Busy {}

/// Waits for a permit of `slots` until `until`, the end of the call's `budget` for waiting:
/// the deadline starts once a call has its slot, so without a bound a call queued behind
/// slow ones waited without end.
async fn permit_within<'a>(
    slots: &'a Semaphore,
    until: Instant,
    budget: Duration,
    what: &'static str,
) -> Result<tokio::sync::SemaphorePermit<'a>> {
    match tokio::time::timeout_at(until.into(), slots.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(anyhow!("host is shutting down")),
        Err(_) => Err(Busy {
            what,
            waited: budget,
        }
        .into()),
    }
}

/// The reference host. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<CallState>,
    components: ComponentCache,
    store: Arc<dyn Backend>,
    /// Whether approval updates from callbacks and events go to the outbox (set once a
    /// server fronts this host; see [`Host::enable_outbox`]).
    outbox: AtomicBool,
    tenants: Registry,
    clock: Option<ReplayClock>,
    call_timeout: Duration,
    memory_limit: usize,
    slots: Semaphore,
    /// Each tenant's share of `slots` ([`HostConfig::max_calls_per_tenant`]), kept across
    /// its versions and unloads so a swap does not hand it a fresh share.
    tenant_slots: std::sync::Mutex<std::collections::HashMap<Arc<str>, Arc<Semaphore>>>,
    per_tenant: u32,
    /// Loads asked for so far (each tenant's newest wins).
    loads: AtomicU64,
}

impl Inner {
    /// A store for one call of `tenant`'s plugin, stopped at `deadline`.
    fn new_store(
        &self,
        tenant: &Arc<str>,
        allow: AllowList,
        deadline: Instant,
    ) -> wasmtime::Store<CallState> {
        let timeout = self.call_timeout;
        let state = CallState::new(
            KvCtx::new(self.store.clone(), tenant.clone()),
            HttpPolicy::new(tenant.clone(), allow, deadline, timeout / 10),
            self.clock
                .map(|c| Box::new(c) as Box<dyn wasmtime_wasi::HostWallClock + Send>),
            self.memory_limit,
        );
        let mut store = wasmtime::Store::new(&self.engine, state);
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
        store
    }

    /// Instantiates `pre` once, with no network and nothing committed: a component whose
    /// start function or data segments trap fits the world's types, and would otherwise
    /// replace a working version and then fail every call.
    async fn try_instantiate(&self, tenant: &str, pre: &PluginPre) -> Result<()> {
        let budget = self.call_timeout;
        let _slot =
            permit_within(&self.slots, Instant::now() + budget, budget, "call slot").await?;
        let deadline = Instant::now() + self.call_timeout;
        let mut store = self.new_store(&tenant.into(), AllowList::new(&[])?, deadline);
        match tokio::time::timeout(self.call_timeout, pre.instantiate(&mut store)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(anyhow!("the component fails when instantiated: {e:#}")),
            Err(_) => Err(anyhow!(
                "the component's instantiation did not end within the call deadline"
            )),
        }
    }

    /// `tenant`'s share of the call slots.
    fn tenant_slots(&self, tenant: &Arc<str>) -> Arc<Semaphore> {
        let mut shares = self.tenant_slots.lock().unwrap_or_else(|e| e.into_inner());
        shares
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant as usize)))
            .clone()
    }

    /// Drops the compiled versions no tenant runs any more (calls still running on one keep
    /// it alive until they end).
    fn forget_unused_components(&self) {
        self.components.retain(&self.tenants.digests());
    }
}

impl Host {
    pub fn new(cfg: HostConfig) -> Result<Host> {
        let store = cfg.store.open(&cfg.state_dir)?;
        Host::with_store(cfg, store)
    }

    /// A host on a store the embedder opened itself (`cfg.store` is not used).
    pub fn with_store(cfg: HostConfig, store: Arc<dyn Backend>) -> Result<Host> {
        anyhow::ensure!(
            cfg.max_concurrent_calls > 0,
            "max_concurrent_calls must be at least 1"
        );
        anyhow::ensure!(
            !cfg.call_timeout.is_zero() && cfg.call_timeout <= MAX_CALL_TIMEOUT,
            "call_timeout must be between 1 ns and {} s",
            MAX_CALL_TIMEOUT.as_secs()
        );
        let per_tenant = cfg
            .max_calls_per_tenant
            .unwrap_or_else(|| default_calls_per_tenant(cfg.max_concurrent_calls));
        anyhow::ensure!(
            (1..=cfg.max_concurrent_calls).contains(&per_tenant),
            "max_calls_per_tenant must be between 1 and max_concurrent_calls ({})",
            cfg.max_concurrent_calls
        );
        let engine = engine::new_engine(cfg.memory_limit_bytes, cfg.max_concurrent_calls)?;
        engine::start_epoch_ticker(&engine)?;
        let linker = sandbox::linker(&engine)?;
        log!("state in {}", store.describe());
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
                outbox: AtomicBool::new(false),
                tenants: Registry::default(),
                clock: cfg.now_unix_secs.map(ReplayClock::starting_at),
                call_timeout: cfg.call_timeout,
                memory_limit: cfg.memory_limit_bytes,
                slots: Semaphore::new(cfg.max_concurrent_calls as usize),
                tenant_slots: Default::default(),
                per_tenant,
                loads: AtomicU64::new(0),
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
        let generation = self.inner.loads.fetch_add(1, Ordering::Relaxed);
        let allow = AllowList::new(&policy.allow_hosts).context("invalid allow_hosts")?;
        let inner = self.inner.clone();
        // Compiling takes seconds of CPU: keep it off the async workers.
        let (component, pre, digest) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (component, digest) = inner.components.load(&inner.engine, &wasm)?;
            let pre = inner
                .linker
                .instantiate_pre(&component)
                .map_err(anyhow::Error::from)
                .and_then(PluginPre::new)
                .context("the component does not fit the imbridge:plugin world")?;
            Ok((component, pre, digest))
        })
        .await
        .context("compile task failed")
        .and_then(|compiled| compiled)
        // A component compiled and then refused stays in memory until the next load else.
        .inspect_err(|_| self.inner.forget_unused_components())?;
        let short = &digest[..12];
        if let Err(e) = self.inner.try_instantiate(tenant, &pre).await {
            self.inner.forget_unused_components();
            return Err(e.context(format!("tenant {tenant}: plugin {short} was not installed")));
        }
        let id: Arc<str> = tenant.into();
        let replaced = self.inner.tenants.insert(Tenant {
            share: self.inner.tenant_slots(&id),
            id,
            pre,
            policy,
            allow,
            digest: digest.clone(),
            generation,
        });
        if replaced.is_ok() {
            // Another tenant's load or unload may have dropped it from memory meanwhile.
            self.inner
                .components
                .keep(&self.inner.engine, &digest, component);
        }
        self.inner.forget_unused_components();
        if let Ok(Some(_)) = replaced {
            // Only when a version is replaced: a first load (a restart loading tenant after
            // tenant) would count the versions of tenants not loaded yet as unused.
            let inner = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let in_use = inner.tenants.digests();
                inner
                    .components
                    .prune_disk(&inner.engine, &in_use, engine::STALE_ARTIFACT)
            })
            .await;
        }
        match replaced {
            Ok(Some(old)) => log!(
                "tenant={tenant} plugin replaced {} -> {short}",
                &old.digest[..12]
            ),
            Ok(None) => log!("tenant={tenant} plugin loaded {short}"),
            Err(Superseded::Loaded(newer)) => anyhow::bail!(
                "tenant {tenant}: plugin {short} was not installed: a load of {} asked for \
                 after it finished first",
                &newer.digest[..12]
            ),
            Err(Superseded::Unloaded) => anyhow::bail!(
                "tenant {tenant}: plugin {short} was not installed: the tenant was unloaded \
                 after this load was asked for"
            ),
        }
        Ok(())
    }

    /// Unloads a tenant's plugin; its stored data stays. A load of the tenant asked for
    /// before this and still compiling will not install.
    pub fn unload_tenant(&self, tenant: &str) -> bool {
        let generation = self.inner.loads.fetch_add(1, Ordering::Relaxed);
        let removed = self.inner.tenants.remove(tenant, generation).is_some();
        self.inner.forget_unused_components();
        removed
    }

    pub fn tenants(&self) -> Vec<String> {
        self.inner.tenants.ids()
    }

    /// How many compiled components the host holds in memory: one per plugin version that
    /// some tenant runs.
    pub fn compiled_components(&self) -> usize {
        self.inner.components.len()
    }

    /// The digest ([`engine::digest`]) of the version a tenant runs.
    pub fn tenant_digest(&self, tenant: &str) -> Option<String> {
        self.inner.tenants.get(tenant).map(|t| t.digest.clone())
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
        let result = self.run_in_share(plugin, call).await;
        let ms = started.elapsed().as_millis();
        match &result {
            Ok(reply) if crate::log::per_call() => match reply.error() {
                None => log!("tenant={tenant} call={export} ok ms={ms}"),
                Some(e) => log!("tenant={tenant} call={export} err={} ms={ms}", e.kind()),
            },
            Ok(_) => {}
            // A call the host could not complete (trap, deadline, store) is always logged.
            Err(e) => log!("tenant={tenant} call={export} failed ms={ms}: {e:#}"),
        }
        result
    }

    /// Runs the call in its tenant's share of the slots, again while it conflicts with
    /// concurrent calls.
    async fn run_in_share(&self, plugin: Arc<Tenant>, call: &Call) -> Result<Reply> {
        // One budget for both waits, the tenant's share and then a slot: one after the other
        // they were twice the call timeout before the call even began.
        let budget = self.inner.call_timeout;
        let until = Instant::now() + budget;
        let _share =
            permit_within(&plugin.share, until, budget, "call slot of this tenant").await?;
        let export = call.export();
        let mut runs = 0;
        loop {
            runs += 1;
            // A rerun (after a conflict, which committed nothing) waits anew.
            let until = if runs == 1 {
                until
            } else {
                Instant::now() + budget
            };
            match self.run(plugin.clone(), call, until).await? {
                Run::Committed(reply) => return Ok(reply),
                Run::Conflict if runs < MAX_RUNS => log!(
                    "tenant={} call={export} conflicted with a concurrent call; running it again",
                    plugin.id
                ),
                Run::Conflict => return Ok(conflict_reply(export, runs)),
            }
        }
    }

    /// Runs the call once and commits its effect: the plugin's writes and, when the outbox is
    /// on, the approvals a callback or event changed, in one atomic commit. An acknowledged
    /// callback is therefore durable together with its notification for the engine.
    async fn run(&self, tenant: Arc<Tenant>, call: &Call, slot_until: Instant) -> Result<Run> {
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
        let _slot =
            permit_within(&inner.slots, slot_until, inner.call_timeout, "call slot").await?;

        let timeout = inner.call_timeout;
        let mut store = inner.new_store(&tenant.id, allow, Instant::now() + timeout);

        let pre = tenant.pre.clone();
        let run = async move {
            let reply = call.invoke(&pre, &mut store).await?;
            wasmtime::Result::Ok((reply, store))
        };
        // The epoch only interrupts running wasm; this also bounds time spent waiting on the
        // host, e.g. on a slow HTTP response.
        let (reply, store) = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(describe_failure(export, timeout, e)),
            Err(_) => return Err(deadline_error(export, timeout)),
        };

        // The export returned normally (with `ok` or `err`): its writes become durable, except
        // those of a failed call whose only effect is on the store (callbacks, events,
        // get-approval). The platform redelivers a failed callback, so a partial write (one
        // of the approvals it changed saved, another not) would only make the redelivery find
        // part of its update applied already and not report it; without it the store stays
        // as it was.
        let rerun = rerun_on_conflict(export);
        let (backend, ns, mut commit) = store.into_data().kv.into_commit();
        if rerun && reply.error().is_some() {
            commit = Default::default();
        }
        if inner.outbox.load(Ordering::Acquire)
            && let Some(app) = call.app()
        {
            let refreshed = matches!(export, Export::GetApproval | Export::CancelApproval)
                && !commit.writes.is_empty();
            commit.outbox = outbox_records(&tenant.id, &app.id, &reply, refreshed);
        }
        // Every backend applies an empty commit without looking at it (nothing to write, so
        // nothing to validate); most calls (duplicates, refusals, reads) have one, and the
        // hop to a blocking thread would cost more than the call's own work.
        let committed = if commit.is_empty() {
            Ok(Outcome::Applied)
        } else if rerun {
            commit_once(&backend, &ns, commit).await
        } else {
            commit_or_retry(&backend, &ns, commit, &tenant.id, export).await
        };
        let outcome =
            committed.with_context(|| format!("committing the state written by `{export}`"))?;
        Ok(match outcome {
            Outcome::Applied => Run::Committed(reply),
            Outcome::Conflict => Run::Conflict,
        })
    }

    /// From now on, approval updates that callbacks and events return (and approvals a
    /// `get-approval` stored news for) are appended to the tenant's outbox in the same commit
    /// as the plugin's writes. The server turns this on.
    pub fn enable_outbox(&self) {
        self.inner.outbox.store(true, Ordering::Release);
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
            .put(tenant, vec![(key.to_string(), Some(value.to_vec()))])
    }

    /// The host's state, shared with the server's outbox and the persistent connections'
    /// leases.
    pub fn store(&self) -> &Arc<dyn Backend> {
        &self.inner.store
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}

pub(crate) async fn commit_once(
    backend: &Arc<dyn Backend>,
    ns: &Arc<str>,
    commit: Commit,
) -> Result<Outcome> {
    match backend.submit(ns, commit) {
        Ok(submitted) => submitted.outcome().await,
        // A backend that blocks on its own I/O (Redis) gets a blocking thread.
        Err(commit) => {
            let (backend, ns) = (backend.clone(), ns.clone());
            blocking(move || backend.commit(&ns, commit)).await
        }
    }
}

/// Commits the writes of an export that changed the platform first (see
/// [`rerun_on_conflict`]), trying again when the store fails: its call cannot be re-run, and
/// what it failed to write may be all that ties an approval the platform now has to its key
/// (a DingTalk or WeCom start's record). A failed commit may still have been applied (Redis
/// went away before its answer), and a callback about the new approval may have changed the
/// record since, so every attempt applies only while the keys the call creates (read as
/// absent, written) are still absent, and nothing else it read is checked (its reads were
/// never validated: it cannot be re-run). When one is not, either an earlier attempt was
/// applied, or another call created it first (a cache both filled, such as a first access
/// token, or the record and index of a Feishu approval two starts with one key both got): the
/// next attempt then leaves that key as the other call wrote it, since a callback may have
/// moved such a record on since, and a cache's first writer is as right as its last. Which of
/// the two it was, only a key no other call can write tells: every attempt also creates this
/// call's own mark (under [`HOST_KEY_PREFIX`], which plugins cannot touch), so the mark
/// existing means an attempt was applied. Judging by the created keys alone took a cancel
/// whose only created key was a token another call had fetched meanwhile for applied, and
/// lost its record. The mark is deleted once the outcome is known. The first attempt is
/// checked too: one whose answer was lost may yet reach the store after a repeat applied and
/// a callback moved the record on, and must not set it back.
async fn commit_or_retry(
    backend: &Arc<dyn Backend>,
    ns: &Arc<str>,
    mut commit: Commit,
    tenant: &str,
    export: Export,
) -> Result<Outcome> {
    let reads = std::mem::take(&mut commit.reads);
    let absent: std::collections::BTreeSet<&str> = reads
        .iter()
        .filter(|(_, seen)| seen.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    let mut created: Vec<String> = commit
        .writes
        .iter()
        .filter(|(k, v)| v.is_some() && absent.contains(k.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    let mark = format!("{HOST_KEY_PREFIX}commit/{:032x}", rand::random::<u128>());
    commit.writes.push((mark.clone(), Some(b"1".to_vec())));
    created.push(mark.clone());
    let mut result = Err(anyhow!("not tried"));
    // Whether an attempt failed, and so may have been applied unseen.
    let mut failed = false;
    let mut pauses = std::iter::once(&Duration::ZERO).chain(&COMMIT_RETRY_PAUSES);
    while let Err(e) = &result {
        let Some(pause) = pauses.next() else { break };
        if !pause.is_zero() {
            log!("tenant={tenant} call={export} commit failed, trying again: {e:#}");
            tokio::time::sleep(*pause).await;
        }
        // Each conflict drops a key from `created`, or ends the retry.
        for _ in 0..8 {
            let repeat = Commit {
                reads: created.iter().map(|k| (k.clone(), None)).collect(),
                ..commit.clone()
            };
            result = commit_once(backend, ns, repeat).await;
            if let Err(e) = &result
                && e.is::<crate::store::NotReplicated>()
            {
                log!(
                    "tenant={tenant} call={export} {e:#}; counted as applied: the call cannot run again"
                );
                result = Ok(Outcome::Applied);
            }
            failed |= result.is_err();
            if !matches!(result, Ok(Outcome::Conflict)) {
                break;
            }
            let (backend, ns, keys) = (backend.clone(), ns.clone(), created.clone());
            let still_absent = blocking(move || {
                let mut absent = Vec::new();
                for k in keys {
                    if backend.get(&ns, &k)?.is_none() {
                        absent.push(k);
                    }
                }
                Ok(absent)
            })
            .await;
            match still_absent {
                // Only this call writes its mark, so only an attempt that failed can have
                // put it there: that attempt was applied, whole.
                Ok(absent) if failed && !absent.contains(&mark) => {
                    result = Ok(Outcome::Applied);
                    break;
                }
                Ok(absent) => {
                    commit
                        .writes
                        .retain(|(k, _)| !created.contains(k) || absent.contains(k));
                    created = absent;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    if matches!(result, Ok(Outcome::Applied)) {
        // Best effort: a mark left behind (a store that fails now or failed every try, a
        // crash) is a few bytes no plugin sees. These exports waited on a platform; one more
        // write is noise to them.
        let (backend, ns2) = (backend.clone(), ns.clone());
        // A deletion the replicas did not confirm still happened on the primary, and one a
        // failover loses only leaves the mark behind: not worth a line.
        if let Err(e) = blocking(move || backend.put(&ns2, vec![(mark, None)])).await
            && !e.is::<crate::store::NotReplicated>()
        {
            log!("tenant={tenant} call={export} commit mark not deleted: {e:#}");
        }
    }
    match result {
        Ok(Outcome::Conflict) => Err(anyhow!("the keys the call creates kept changing")),
        other => other,
    }
}

/// One run of a call.
enum Run {
    Committed(Reply),
    /// What the call read changed before it could commit; nothing was written.
    Conflict,
}

/// Whether an export's commit is validated against concurrent calls, and re-run when it
/// conflicts. Yes for the exports whose only effect is on the store: callbacks and events
/// (the double-delivery case), and `get-approval` (which at most polls the platform with
/// reads). No for those that changed the platform before committing, which must not be
/// redone; their writes are safe without validation:
/// - `start-approval` writes the record and index of a key it claimed through the counter
///   (committed at once, so no concurrent start can claim it too), and the token cache;
/// - `cancel-approval` marks an approval the platform has just withdrawn as canceled, or
///   stores how one it refused to withdraw ended, on the record as read after that round trip;
/// - `notify` writes the token cache, where the last writer is as right as the first, and
///   the marks of the parts a failed notification delivered (the same for every call).
fn rerun_on_conflict(export: Export) -> bool {
    match export {
        Export::HandleCallback | Export::HandleEvent | Export::GetApproval => true,
        Export::StartApproval | Export::CancelApproval | Export::Notify => false,
    }
}

/// The typed error of a call that kept conflicting: `storage`, which callers treat as
/// retryable (a callback answered with it gets a 500, so the platform redelivers).
fn conflict_reply(export: Export, runs: u32) -> Reply {
    let e = crate::bindings::types::Error::Storage(format!(
        "`{export}` conflicted with concurrent calls {runs} time(s) and was not applied; retry"
    ));
    match export {
        Export::StartApproval | Export::GetApproval | Export::CancelApproval => {
            Reply::Approval(Err(e))
        }
        Export::Notify => Reply::Receipt(Err(e)),
        Export::HandleCallback => Reply::Callback(Err(e)),
        Export::HandleEvent => Reply::Event(Err(e)),
    }
}

/// The outbox records for the approvals a callback or event changed, and for the one a
/// `get-approval` or `cancel-approval` returned when it wrote (`refreshed`: a refresh, or a
/// refused cancel's read, that found news stores it; the platform's late callback then
/// changes nothing, so without this record an engine that learns of decisions only from the
/// outbox would never hear of it). A write that was only a fetched token repeats an
/// unchanged approval, which the engine must tolerate anyway.
fn outbox_records(tenant: &str, app_id: &str, reply: &Reply, refreshed: bool) -> Vec<Vec<u8>> {
    use crate::json::Json as _;
    let updates = match reply {
        Reply::Callback(Ok(outcome)) => &outcome.updates,
        Reply::Event(Ok(updates)) => updates,
        Reply::Approval(Ok(approval)) if refreshed => std::slice::from_ref(approval),
        _ => return Vec::new(),
    };
    updates
        .iter()
        .map(|u| {
            serde_json::json!({"tenant": tenant, "app_id": app_id, "approval": u.to_json()})
                .to_string()
                .into_bytes()
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_waits_for_a_slot_no_longer_than_its_limit() {
        let slots = Semaphore::new(1);
        let _taken = slots.acquire().await.unwrap();
        let budget = Duration::from_millis(50);
        let err = permit_within(&slots, Instant::now() + budget, budget, "call slot")
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "busy: no free call slot within 0.1s");
        slots.close();
        let err = permit_within(&slots, Instant::now() + budget, budget, "call slot")
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "host is shutting down");
    }
    use crate::store::{Intercept, MemoryStore, digest};
    use std::sync::Mutex;

    /// A memory store whose first commit fails and is kept back, as a request whose answer
    /// was lost and whose bytes reach the server later (retransmitted after the client gave
    /// up on the connection); `replay` lets it arrive.
    #[derive(Default)]
    struct LateFirst {
        inner: MemoryStore,
        held: Mutex<Option<(String, Commit)>>,
        failed_once: std::sync::atomic::AtomicBool,
    }

    impl LateFirst {
        fn replay(&self) -> Result<Outcome> {
            let (ns, commit) = self
                .held
                .lock()
                .unwrap()
                .take()
                .expect("a commit held back");
            self.inner.commit(&ns, commit)
        }
    }

    impl Intercept for LateFirst {
        fn memory(&self) -> &MemoryStore {
            &self.inner
        }
        fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
            if !self
                .failed_once
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                *self.held.lock().unwrap() = Some((ns.to_string(), commit));
                anyhow::bail!("answer lost");
            }
            self.inner.commit(ns, commit)
        }
    }

    /// A cancel whose only created key is a token cache another call filled first: its first
    /// attempt conflicts, and the cancel's record must still be written (the token's last
    /// writer wins). Taking "all created keys exist" for "an earlier attempt applied" lost it.
    #[tokio::test]
    async fn a_first_attempt_that_conflicts_is_still_committed() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let ns: Arc<str> = "t".into();
        backend
            .put("t", vec![("rec".into(), Some(b"pending".to_vec()))])
            .unwrap();
        let cancel = Commit {
            reads: vec![("tok".into(), digest(None))],
            writes: vec![
                ("tok".into(), Some(b"mine".to_vec())),
                ("rec".into(), Some(b"canceled".to_vec())),
            ],
            outbox: Vec::new(),
        };
        backend
            .put("t", vec![("tok".into(), Some(b"theirs".to_vec()))])
            .unwrap();
        let outcome = commit_or_retry(&backend, &ns, cancel, "t", Export::CancelApproval)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Applied));
        assert_eq!(backend.get("t", "rec").unwrap(), Some(b"canceled".to_vec()));
    }

    /// A memory store whose first commit fails; `applied` says whether it was applied before
    /// failing (its answer lost) or refused whole, and `meanwhile` is what other calls write
    /// while the failing call pauses before trying again.
    struct FailsFirst {
        inner: MemoryStore,
        applied: bool,
        meanwhile: Vec<(String, Option<Vec<u8>>)>,
        failed_once: std::sync::atomic::AtomicBool,
    }

    impl Intercept for FailsFirst {
        fn memory(&self) -> &MemoryStore {
            &self.inner
        }
        fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
            if self
                .failed_once
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return self.inner.commit(ns, commit);
            }
            if self.applied {
                self.inner.commit(ns, commit)?;
            }
            self.inner.put(ns, self.meanwhile.clone())?;
            anyhow::bail!("connection reset")
        }
    }

    /// A cancel's commit, whose only created key is the app's first token.
    fn cancel_commit() -> Commit {
        Commit {
            reads: vec![("tok".into(), digest(None))],
            writes: vec![
                ("tok".into(), Some(b"mine".to_vec())),
                ("rec".into(), Some(b"canceled".to_vec())),
            ],
            outbox: vec![b"canceled".to_vec()],
        }
    }

    fn fails_first(applied: bool) -> Arc<FailsFirst> {
        let store = Arc::new(FailsFirst {
            inner: MemoryStore::new(),
            applied,
            // Another call fetching the app's first token meanwhile.
            meanwhile: vec![("tok".into(), Some(b"theirs".to_vec()))],
            failed_once: Default::default(),
        });
        store
            .inner
            .put("t", vec![("rec".into(), Some(b"pending".to_vec()))])
            .unwrap();
        store
    }

    /// A cancel's first commit fails, and is retried. Not applied, with another call storing
    /// the token meanwhile: every key the cancel creates now exists, yet none of its writes
    /// were made; taking that for "an earlier attempt applied" answered the cancel and lost
    /// its record and outbox update. Applied (its answer lost): it is not applied again, so
    /// the engine gets one outbox update and the token stands as written.
    #[tokio::test]
    async fn a_failed_attempt_counts_as_applied_only_when_it_was() {
        for (applied, token) in [(false, "theirs"), (true, "mine")] {
            let mut store = fails_first(applied);
            if applied {
                Arc::get_mut(&mut store).unwrap().meanwhile.clear();
            }
            let backend: Arc<dyn Backend> = store.clone();
            let ns: Arc<str> = "t".into();
            let outcome =
                commit_or_retry(&backend, &ns, cancel_commit(), "t", Export::CancelApproval)
                    .await
                    .unwrap();
            assert!(matches!(outcome, Outcome::Applied));
            let get = |k| backend.get("t", k).unwrap();
            assert_eq!(get("rec"), Some(b"canceled".to_vec()), "applied: {applied}");
            assert_eq!(get("tok"), Some(token.as_bytes().to_vec()));
            assert_eq!(backend.outbox_list("t", 0).unwrap().len(), 1);
            assert_eq!(
                backend.keys("t").unwrap(),
                ["rec", "tok"],
                "the mark is gone"
            );
        }
    }

    /// Two Feishu starts with one key get the same instance; the first commits its record,
    /// and a callback moves it on. The second's commit then finds the record and index
    /// created, and must leave them as they are rather than set the record back to pending.
    #[tokio::test]
    async fn a_record_another_call_created_first_stands() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let ns: Arc<str> = "t".into();
        backend
            .put(
                "t",
                vec![
                    ("rec".into(), Some(b"approved".to_vec())),
                    ("idx".into(), Some(b"i1".to_vec())),
                ],
            )
            .unwrap();
        let second = Commit {
            reads: vec![("rec".into(), digest(None)), ("idx".into(), digest(None))],
            writes: vec![
                ("rec".into(), Some(b"pending".to_vec())),
                ("idx".into(), Some(b"i1".to_vec())),
                ("mark".into(), None),
            ],
            outbox: Vec::new(),
        };
        backend
            .put("t", vec![("mark".into(), Some(b"1".to_vec()))])
            .unwrap();
        let outcome = commit_or_retry(&backend, &ns, second, "t", Export::StartApproval)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Applied));
        assert_eq!(backend.get("t", "rec").unwrap(), Some(b"approved".to_vec()));
        assert_eq!(backend.get("t", "mark").unwrap(), None);
    }

    /// A start's commit whose first attempt was lost is committed again; a callback then moves
    /// the record on; the lost attempt reaching the store after all must not set it back.
    #[tokio::test]
    async fn a_late_first_attempt_cannot_undo_what_came_after() {
        let store = Arc::new(LateFirst::default());
        let backend: Arc<dyn Backend> = store.clone();
        let ns: Arc<str> = "t".into();
        let start = Commit {
            reads: vec![("rec".into(), digest(None))],
            writes: vec![("rec".into(), Some(b"pending".to_vec()))],
            outbox: Vec::new(),
        };
        let outcome = commit_or_retry(&backend, &ns, start, "t", Export::StartApproval)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Applied));
        backend
            .put("t", vec![("rec".into(), Some(b"approved".to_vec()))])
            .unwrap();
        assert!(matches!(store.replay().unwrap(), Outcome::Conflict));
        assert_eq!(backend.get("t", "rec").unwrap(), Some(b"approved".to_vec()));
    }
}
