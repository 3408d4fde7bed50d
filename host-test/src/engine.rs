//! The wasmtime engine: configuration, the precompiled-component cache and the epoch ticker.

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use wasmtime::component::Component;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances. Running guests are checked (and yield to the executor) once
/// per tick, so this is also the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of each linear memory and table kept mapped between the calls that reuse a pool
/// slot. The component's stack, data and allocator arena all lie below this (build.rs,
/// src/alloc.rs), so a typical call touches only pages that stay mapped.
const KEEP_RESIDENT: usize = 1 << 20;

/// What one call's component may instantiate: the plugin is one core module with one memory;
/// componentizing adds a few shim modules and tables.
pub(crate) const MEMORIES_PER_CALL: u32 = 2;
pub(crate) const CORE_INSTANCES_PER_CALL: u32 = 8;
pub(crate) const TABLES_PER_CALL: u32 = 8;

/// Builds an engine whose instances are preallocated from a pool, each limited to
/// `memory_limit` bytes of linear memory, with at most `max_instances` alive at once.
pub fn new_engine(memory_limit: usize, max_instances: u32) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(max_instances)
        // A componentized core module needs a few core instances (main module, shims).
        .total_core_instances(max_instances * CORE_INSTANCES_PER_CALL)
        .total_memories(max_instances * MEMORIES_PER_CALL)
        .total_tables(max_instances * TABLES_PER_CALL)
        .total_stacks(max_instances)
        // Per component as well as in total: without these a plugin of many modules, each
        // with its own memory, takes several calls' share of the pool, and a few of its
        // calls at once leave every other tenant's instantiation failing. A plugin over them
        // is refused when it is loaded.
        .max_memories_per_component(MEMORIES_PER_CALL)
        .max_core_instances_per_component(CORE_INSTANCES_PER_CALL)
        .max_tables_per_component(TABLES_PER_CALL)
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
/// should not pay for it again. A host that swaps versions for months must not keep every
/// version it ever ran either: [`retain`](Self::retain) drops from memory what no tenant
/// runs, and [`prune_disk`](Self::prune_disk) deletes artifacts unused for [`STALE_ARTIFACT`].
pub struct ComponentCache {
    dir: PathBuf,
    /// By cache key: the digest of the component's bytes, and the component.
    loaded: Mutex<HashMap<String, (String, Component)>>,
}

/// How long an artifact on disk that no tenant of this host runs is kept: long enough that a
/// rollback or a restart finds the versions of the last days precompiled.
pub const STALE_ARTIFACT: Duration = Duration::from_secs(7 * 24 * 3600);

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
        let digest = digest(wasm);
        let key = cache_key(engine, &digest);
        if let Some((_, component)) = self.lock().get(&key) {
            return Ok((component.clone(), digest));
        }
        let component = self.load_uncached(engine, wasm, &key)?;
        self.lock().insert(key, (digest.clone(), component.clone()));
        Ok((component, digest))
    }

    /// Holds `component` (of `digest`) in memory, unless it already is.
    pub fn keep(&self, engine: &Engine, digest: &str, component: Component) {
        self.lock()
            .entry(cache_key(engine, digest))
            .or_insert_with(|| (digest.to_string(), component));
    }

    /// Forgets the compiled components whose digest is not in `in_use`; each holds its
    /// machine code in memory. They stay on disk.
    pub fn retain(&self, in_use: &HashSet<String>) {
        self.lock().retain(|_, (digest, _)| in_use.contains(digest));
    }

    /// Components held in memory.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes the files in the cache directory that are not the artifact of a digest in
    /// `in_use` and were not written or loaded for `older_than`: old versions and the
    /// leftovers of writers that died. Returns how many were deleted.
    pub fn prune_disk(
        &self,
        engine: &Engine,
        in_use: &HashSet<String>,
        older_than: Duration,
    ) -> usize {
        let keep: HashSet<String> = in_use
            .iter()
            .map(|d| format!("{}.cwasm", cache_key(engine, d)))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut deleted = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only what `store_artifact` writes: `KEY.cwasm` and `KEY.tmpPID-N`.
            let ours = name.ends_with(".cwasm") || name.contains(".tmp");
            if !ours || keep.contains(&name) {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= older_than);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                deleted += 1;
            }
        }
        if deleted > 0 {
            crate::log!("cache: deleted {deleted} artifacts unused for {older_than:?}");
        }
        deleted
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Component)>> {
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
                Ok(component) => {
                    // Its age is what `prune_disk` goes by: a version loaded again is in use.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(SystemTime::now()));
                    return Ok(component);
                }
                Err(e) => {
                    crate::log!(
                        "cache: ignoring unusable artifact {}: {e:#}",
                        path.display()
                    );
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
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        // Durable before it gets its name: after a power cut the name could otherwise point
        // at pages that never reached the disk, and a file that still parses is trusted as
        // compiled code (see the SAFETY note in `load_uncached`).
        file.sync_all()?;
        drop(file);
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

/// How a component version is named: the hex SHA-256 of its bytes.
pub fn digest(wasm: &[u8]) -> String {
    hex(&Sha256::digest(wasm))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_disk_deletes_only_old_files_no_tenant_runs() {
        let dir = tempfile::tempdir().unwrap();
        let engine = new_engine(1 << 20, 2).unwrap();
        let cache = ComponentCache::new(dir.path().to_path_buf());
        let artifact = |digest: &str| format!("{}.cwasm", cache_key(&engine, digest));
        let week = STALE_ARTIFACT;
        let long_ago = SystemTime::now() - week - Duration::from_secs(60);
        let files = [
            (artifact("running"), long_ago, true),
            (artifact("old"), long_ago, false),
            (artifact("recent"), SystemTime::now(), true),
            (
                format!("{}.tmp7-0", cache_key(&engine, "died")),
                long_ago,
                false,
            ),
            ("operator-notes.txt".to_string(), long_ago, true),
        ];
        for (name, mtime, _) in &files {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_modified(*mtime).unwrap();
        }
        let in_use = HashSet::from(["running".to_string()]);
        assert_eq!(cache.prune_disk(&engine, &in_use, week), 2);
        for (name, _, kept) in &files {
            assert_eq!(dir.path().join(name).exists(), *kept, "{name}");
        }
        // A missing directory (nothing compiled yet) is not an error.
        let none = ComponentCache::new(dir.path().join("absent"));
        assert_eq!(none.prune_disk(&engine, &in_use, week), 0);
    }
}
