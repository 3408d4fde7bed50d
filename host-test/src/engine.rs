//! The wasmtime engine: configuration, the precompiled-component cache and the epoch ticker.

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances. Running guests are checked (and yield to the executor) once
/// per tick, so this is also the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of each linear memory and table kept mapped between the calls that reuse a pool
/// slot. The component's stack, data and allocator arena all lie below this (build.rs,
/// src/alloc.rs), so a typical call touches only pages that stay mapped.
const KEEP_RESIDENT: usize = 1 << 20;

/// Builds an engine whose instances are preallocated from a pool, each limited to
/// `memory_limit` bytes of linear memory, with at most `max_instances` alive at once.
pub fn new_engine(memory_limit: usize, max_instances: u32) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(max_instances)
        // A componentized core module needs a few core instances (main module, shims).
        .total_core_instances(max_instances * 8)
        .total_memories(max_instances * 2)
        .total_tables(max_instances * 8)
        .total_stacks(max_instances)
        .max_memory_size(memory_limit)
        // Every call gets a fresh instance, so slots are reused all the time. Resetting the
        // pages a call touched with memset (found with the PAGEMAP_SCAN ioctl where the
        // kernel has it) instead of madvise keeps them mapped: no syscall per reuse and no
        // page faults in the next call. The reset is the same either way, so one call
        // still never sees another's memory.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    // wasmtime's default reservation (4 GiB plus guard pages per memory slot) is kept on
    // purpose: it lets compiled code skip the bounds check on every load and store, which
    // makes the guest up to a fifth faster (BENCHMARKS.md). It is address space, not memory:
    // a pool of 64 slots reserves about 260 GiB of the 128 TiB a 64-bit process has, while
    // `max_memory_size` and the store limiter still cap what a plugin may use.
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // Lets `perf` name the plugin's compiled functions (written to /tmp/perf-PID.map).
    if std::env::var_os("IMBRIDGE_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("configuring wasmtime")
}

/// Compiled components by content, in memory and on disk.
///
/// Compiling takes seconds; loading the same plugin for many tenants, or restarting the host,
/// should not pay for it again.
pub struct ComponentCache {
    dir: PathBuf,
    loaded: Mutex<HashMap<String, Component>>,
}

impl ComponentCache {
    pub fn new(dir: PathBuf) -> ComponentCache {
        ComponentCache {
            dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The component for `wasm`, compiled at most once per engine configuration.
    /// Returns the component and the sha256 of `wasm` (hex).
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> Result<(Component, String)> {
        let digest = hex(&Sha256::digest(wasm));
        let key = cache_key(engine, &digest);
        if let Some(component) = self.lock().get(&key) {
            return Ok((component.clone(), digest));
        }
        let component = self.load_uncached(engine, wasm, &key)?;
        self.lock().insert(key, component.clone());
        Ok((component, digest))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Component>> {
        // A panic elsewhere while holding the lock leaves the map itself consistent.
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_uncached(&self, engine: &Engine, wasm: &[u8], key: &str) -> Result<Component> {
        let path = self.dir.join(format!("{key}.cwasm"));
        if path.exists() {
            // SAFETY: the cache directory belongs to the host and is written only by
            // `store_artifact` below with the output of `Component::serialize`; the file name
            // binds it to the input's hash and this engine's configuration.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    crate::log!("cache: ignoring unusable artifact {}: {e}", path.display());
                }
            }
        }
        let component = Component::new(engine, wasm)
            .map_err(anyhow::Error::from)
            .context("compiling the component")?;
        if let Err(e) = self.store_artifact(&component, &path) {
            // The cache is an optimisation: a read-only or full disk must not stop the host.
            crate::log!("cache: could not write {}: {e:#}", path.display());
        }
        Ok(component)
    }

    fn store_artifact(&self, component: &Component, path: &Path) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize()?;
        // Write then rename, so a concurrent or interrupted writer never leaves a torn file.
        // Unique per writer, so two hosts in one process cannot interleave writes either.
        static WRITER: AtomicU64 = AtomicU64::new(0);
        let n = WRITER.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Content hash plus everything about the engine that makes an artifact (in)compatible.
fn cache_key(engine: &Engine, wasm_digest: &str) -> String {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut h = Sha(Sha256::new());
    h.write(wasm_digest.as_bytes());
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex(&h.0.finalize())[..32].to_string()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) -> Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("imbridge-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .context("starting the epoch thread")?;
    Ok(())
}
