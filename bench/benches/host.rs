//! Host costs: compiling the component vs loading the precompiled artifact, and what every
//! call pays before the plugin does any work (a fresh instance from `InstancePre` with the
//! pooling allocator).
//!
//! Ids: `host/compile`, `host/load-precompiled/{deserialize,cache}`,
//! `host/instantiate`, `host/instantiate+call`, `host/host-call`.

use criterion::Criterion;
use imbridge_bench::{bench_store, empty_call, plugin_pre};
use imbridge_host::engine::{ComponentCache, new_engine};
use imbridge_host::store::Store;
use imbridge_host::{Host, HostConfig, TenantPolicy};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::Component;

fn main() {
    // SAFETY: first statement of main, before any other thread exists; keeps the host's
    // per-call log line out of the measurement.
    unsafe { std::env::set_var("IMBRIDGE_QUIET", "1") };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    host(&mut c);
    c.final_summary();
}

fn component_path() -> PathBuf {
    std::env::var_os("IMBRIDGE_COMPONENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/imbridge.wasm")
        })
}

fn host(c: &mut Criterion) {
    let wasm = std::fs::read(component_path()).expect("target/imbridge.wasm (./dev build)");
    // The host's own engine configuration (pooling, 64 MiB cap, epochs), so artifacts and
    // instance costs are exactly the host's.
    let engine = new_engine(64 << 20, 32).expect("engine");
    let dir = tempfile::tempdir().expect("tmp");

    {
        // Seconds per iteration: the minimum sample count, and enough time for it.
        let mut slow = c.benchmark_group("host-compile");
        slow.sample_size(10)
            .measurement_time(Duration::from_secs(30))
            .warm_up_time(Duration::from_millis(1));
        slow.bench_function("compile", |b| {
            b.iter(|| black_box(Component::new(&engine, &wasm).expect("compile")))
        });
        slow.finish();
    }

    let mut g = c.benchmark_group("host");
    let component = Component::new(&engine, &wasm).expect("compile");
    let artifact = dir.path().join("imbridge.cwasm");
    std::fs::write(&artifact, component.serialize().expect("serialize")).expect("write");
    g.bench_function("load-precompiled/deserialize", |b| {
        // SAFETY: the file was written just above by `Component::serialize` on this engine.
        b.iter(|| black_box(unsafe { Component::deserialize_file(&engine, &artifact) }.ok()))
    });
    // What a restarted host does per tenant: hash the bytes, find the artifact on disk, map it.
    let cache_dir = dir.path().join("cache");
    ComponentCache::new(cache_dir.clone())
        .load(&engine, &wasm)
        .expect("fill cache");
    g.bench_function("load-precompiled/cache", |b| {
        b.iter(|| {
            black_box(
                ComponentCache::new(cache_dir.clone())
                    .load(&engine, &wasm)
                    .ok(),
            )
        })
    });

    let pre = plugin_pre(&engine, &component).expect("pre");
    let kv_store = Arc::new(Store::open(&dir.path().join("state")).expect("store"));
    let new_store = || bench_store(&engine, kv_store.clone()).expect("store");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    g.bench_function("instantiate", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut store = new_store();
                    black_box(pre.instantiate(&mut store).await.expect("instantiate"));
                }
                t.elapsed()
            })
        })
    });
    let call = empty_call();
    g.bench_function("instantiate+call", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut store = new_store();
                    let r = call.invoke(&pre, &mut store).await.expect("call");
                    black_box(r.error().is_some());
                }
                t.elapsed()
            })
        })
    });

    // The same through the public host API: adds the concurrency slot, the per-call store
    // setup (WASI context, HTTP policy, limits, epoch callback) and the commit hand-off.
    let mut cfg = HostConfig::new(dir.path().join("host-state"));
    cfg.cache_dir = Some(cache_dir.clone());
    let h = Host::new(cfg).expect("host");
    rt.block_on(h.load_tenant_bytes("t", wasm.clone(), TenantPolicy::default()))
        .expect("load");
    g.bench_function("host-call", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(h.call("t", &call).await.is_ok());
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}
