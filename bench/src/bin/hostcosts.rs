//! Host costs that are distributions or one-off measurements rather than criterion loops:
//!
//! - swap: latency of other tenants' calls while one tenant's plugin is replaced, for a swap
//!   to an already-compiled version (artifact cache hit) and to a new version (compiles);
//! - memory: resident memory per live instance, N instances alive at once, idle and after
//!   each has handled a callback;
//! - paired: instantiate, instantiate + call and `Host::call` in turns, batch by batch, so the
//!   VM's drift over seconds (which criterion's loops, seconds apart, each see differently)
//!   hits all three alike.
//!
//! Writes one JSON object to `--out` (default `target/bench/hostcosts.json`).

use anyhow::{Context as _, Result};
use imbridge::model::Platform;
use imbridge_bench::{Shuffler, bench_store, callback, empty_call, instance_id, now_ms};
use imbridge_bench::{plugin_pre, quantile, seed_record, spread, workspace};
use imbridge_host::engine::{ComponentCache, new_engine};
use imbridge_host::json::parse_call;
use imbridge_host::store::{Backend as _, Store};
use imbridge_host::{Call, Export, Host, HostConfig, TenantPolicy};
use serde_json::{Value, json};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Percentiles in microseconds of a set of durations.
fn summary(mut d: Vec<Duration>) -> Value {
    d.sort();
    if d.is_empty() {
        return json!({"n": 0});
    }
    let q = |p: f64| quantile(&d, p).as_secs_f64() * 1e6;
    json!({"n": d.len(), "p50_us": q(0.5), "p99_us": q(0.99), "max_us": q(1.0)})
}

/// A new version of the same component: an extra custom section changes its hash (so the
/// host compiles it) without changing what it does.
fn new_version(wasm: &[u8], tag: u32) -> Vec<u8> {
    let name = b"imbridge-bench";
    let payload = tag.to_le_bytes();
    let mut v = wasm.to_vec();
    v.push(0); // custom section id
    v.push((1 + name.len() + payload.len()) as u8); // section size (fits one LEB byte)
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v.extend_from_slice(&payload);
    v
}

async fn swap(wasm: &[u8]) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let mut cfg = HostConfig::new(dir.path().join("state"));
    cfg.cache_dir = Some(dir.path().join("cache"));
    let host = Host::new(cfg)?;
    for t in ["a", "b", "c"] {
        host.load_tenant_bytes(t, wasm.to_vec(), TenantPolicy::default())
            .await?;
    }
    let call = Arc::new(empty_call());
    // Two callers per other tenant, back to back: the "under load" of the measurement.
    let start_load = || {
        let host = host.clone();
        let call = call.clone();
        async move {
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for t in ["b", "c", "b", "c"] {
                let (host, call, stop) = (host.clone(), call.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let s = Instant::now();
                        host.call(t, &call).await.expect("call");
                        lat.push(s.elapsed());
                    }
                    lat
                }));
            }
            (stop, tasks)
        }
    };
    let collect = |tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>| async move {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("caller"));
        }
        all
    };

    // Baseline: the same load, no swap.
    let (stop, tasks) = start_load().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let baseline = collect(tasks).await;

    let mut out = json!({"baseline": summary(baseline)});
    for (label, bytes) in [
        ("precompiled", wasm.to_vec()),
        ("compile", new_version(wasm, now_ms() as u32)),
    ] {
        let (stop, tasks) = start_load().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = Instant::now();
        host.load_tenant_bytes("a", bytes, TenantPolicy::default())
            .await?;
        let took = s.elapsed();
        // Keep measuring a little after the swap, as in-flight work drains.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let lat = collect(tasks).await;
        out[label] = json!({"swap_ms": took.as_secs_f64() * 1e3, "others": summary(lat)});
    }
    Ok(out)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn memory(wasm: &[u8], n: u32) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let engine = new_engine(64 << 20, n)?;
    let (component, _) = ComponentCache::new(dir.path().join("cache")).load(&engine, wasm)?;
    let pre = plugin_pre(&engine, &component)?.bindings()?;
    let store = Arc::new(Store::open(&dir.path().join("state"))?);
    let p = Platform::Feishu;
    let inst = instance_id(p, 1, 0);
    let (k, v) = seed_record(p, &inst);
    store.put("t", vec![(k, Some(v))])?;
    let Call::HandleCallback { app, request } = parse_call(
        Export::HandleCallback,
        &callback(p, 1, 0, &inst, now_ms()).host_input(p),
    )?
    else {
        unreachable!()
    };

    // One instance and call first, so one-time costs (code pages, lazy init) are not
    // charged to the per-instance numbers.
    let new_store = || bench_store(&engine, store.clone());
    {
        let mut s = new_store()?;
        let plugin = pre.instantiate_async(&mut s).await?;
        plugin
            .call_handle_callback(&mut s, &app, &request)
            .await?
            .ok()
            .context("warm-up callback")?;
    }
    let before = rss_bytes();
    let mut live = Vec::new();
    for _ in 0..n {
        let mut s = new_store()?;
        let plugin = pre.instantiate_async(&mut s).await?;
        live.push((s, plugin));
    }
    let idle = rss_bytes();
    for (s, plugin) in &mut live {
        plugin
            .call_handle_callback(&mut *s, &app, &request)
            .await?
            .ok()
            .context("callback")?;
    }
    let used = rss_bytes();
    let per = |after: u64| after.saturating_sub(before) as f64 / f64::from(n) / 1024.0;
    Ok(json!({
        "instances": n,
        "rss_before_kib": before / 1024,
        "idle_per_instance_kib": per(idle),
        "after_call_per_instance_kib": per(used),
    }))
}

/// The per-call cost before any plugin work, three ways: a fresh instance from `InstancePre`,
/// that plus an empty-ish call, and the same call through `Host::call`. Each round runs one
/// batch of each, in a new order; every figure is taken over the rounds' per-call means.
async fn paired(wasm: &[u8], rounds: usize, batch: u32) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    // The criterion bench's engine (`benches/host.rs`): the host's configuration, 32 slots.
    let engine = new_engine(64 << 20, 32)?;
    let (component, _) = ComponentCache::new(dir.path().join("cache")).load(&engine, wasm)?;
    let pre = plugin_pre(&engine, &component)?;
    let kv = Arc::new(Store::open(&dir.path().join("state"))?);
    let mut cfg = HostConfig::new(dir.path().join("host-state"));
    cfg.cache_dir = Some(dir.path().join("cache"));
    let host = Host::new(cfg)?;
    host.load_tenant_bytes("t", wasm.to_vec(), TenantPolicy::default())
        .await?;
    let call = empty_call();

    const NAMES: [&str; 3] = ["instantiate", "instantiate_call", "host_call"];
    let mut means: [Vec<f64>; 3] = Default::default();
    let mut order = [0, 1, 2];
    let mut shuffler = Shuffler::default();
    for round in 0..=rounds {
        shuffler.shuffle(&mut order);
        for &v in &order {
            let t = Instant::now();
            for _ in 0..batch {
                match v {
                    0 => {
                        let mut s = bench_store(&engine, kv.clone())?;
                        black_box(pre.instantiate(&mut s).await?);
                    }
                    1 => {
                        let mut s = bench_store(&engine, kv.clone())?;
                        black_box(call.invoke(&pre, &mut s).await?.error().is_some());
                    }
                    _ => {
                        black_box(host.call("t", &call).await?.error().is_some());
                    }
                }
            }
            // Round 0 warms code pages and pool slots for all three and is not counted.
            if round > 0 {
                means[v].push(t.elapsed().as_secs_f64() * 1e6 / f64::from(batch));
            }
        }
    }
    // Within each round: what `Host::call` adds to the raw instantiate + call.
    let added: Vec<f64> = means[2].iter().zip(&means[1]).map(|(h, r)| h - r).collect();
    let mut out = json!({"rounds": rounds, "batch": batch, "host_call_minus_raw": spread(added)});
    for (name, m) in NAMES.into_iter().zip(means) {
        out[name] = spread(m);
    }
    Ok(out)
}

fn main() -> Result<()> {
    // SAFETY: first statement of main, before any other thread exists.
    unsafe { std::env::set_var("IMBRIDGE_QUIET", "1") };
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/bench/hostcosts.json"));
    let wasm = std::fs::read(workspace().join("target/imbridge.wasm"))
        .context("target/imbridge.wasm (./dev build)")?;
    let rt = tokio::runtime::Runtime::new()?;
    let swap = rt.block_on(swap(&wasm))?;
    eprintln!("swap: {swap}");
    let memory = rt.block_on(memory(&wasm, 32))?;
    eprintln!("memory: {memory}");
    let paired = rt.block_on(paired(&wasm, 300, 256))?;
    eprintln!("paired: {paired}");
    let result = json!({
        "swap": swap,
        "memory": memory,
        "paired": paired,
        "component_bytes": wasm.len(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    Ok(())
}
