//! Compares builds of the component on the warm-instance callback path, interleaved.
//!
//! `target/release/abwarm [--rounds N] A.wasm B.wasm ...`
//!
//! This VM's speed drifts by ±30% over seconds (BENCHMARKS.md), so criterion runs of one build
//! after the other cannot resolve a 10% difference between two builds. Here every round runs
//! one batch of fresh callbacks per build, in a new order each round, so drift hits all builds
//! alike; the per-build minimum and median over the rounds' batch means are what to compare.
//! The calls are those of `callback/{platform}/component-warm/fresh` in `benches/callbacks.rs`.

use imbridge_bench::{PLATFORMS, bench_store, fresh_calls, plugin_pre};
use imbridge_host::Call;
use imbridge_host::store::{Backend, MemoryStore};
use std::sync::Arc;
use std::time::Instant;

/// Calls per batch: long enough (a few ms) to dwarf the timer, short enough to interleave.
const BATCH: u64 = 64;

struct Build {
    path: String,
    pre: imbridge_host::bindings::PluginPre<imbridge_host::sandbox::CallState>,
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 40u32;
    if args.first().map(String::as_str) == Some("--rounds") {
        rounds = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(rounds);
        args.drain(..2.min(args.len()));
    }
    if args.len() < 2 {
        anyhow::bail!("usage: abwarm [--rounds N] A.wasm B.wasm ...");
    }
    let engine = imbridge_host::engine::new_engine(64 << 20, 32)?;
    let builds = args
        .iter()
        .map(|path| {
            let component = wasmtime::component::Component::from_file(&engine, path)?;
            let pre = plugin_pre(&engine, &component)?.bindings()?;
            Ok(Build {
                path: path.clone(),
                pre,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    let rt = tokio::runtime::Runtime::new()?;
    let mut n = 0u64;
    // Which build goes first must not be the same every round.
    let mut order: Vec<usize> = (0..builds.len()).collect();
    let mut shuffler = imbridge_bench::Shuffler::default();
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let mut means: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
        for _ in 0..rounds {
            shuffler.shuffle(&mut order);
            for &b in &order {
                let (seeds, calls) = fresh_calls(p, 900 + pi as u32, &mut n, BATCH);
                store.put("t", seeds)?;
                let mut kv = bench_store(&engine, store.clone())?;
                let elapsed = rt.block_on(async {
                    let plugin = builds[b].pre.instantiate_async(&mut kv).await?;
                    let t = Instant::now();
                    for call in &calls {
                        let Call::HandleCallback { app, request } = call else {
                            unreachable!("callbacks only")
                        };
                        let r = plugin.call_handle_callback(&mut kv, app, request).await?;
                        let path = &builds[b].path;
                        match r {
                            Ok(o) if o.updates.len() == 1 => {}
                            other => anyhow::bail!("{path}: callback failed: {other:?}"),
                        }
                    }
                    Ok(t.elapsed())
                })?;
                means[b].push(elapsed.as_secs_f64() * 1e6 / BATCH as f64);
            }
        }
        for (b, m) in builds.iter().zip(&mut means) {
            m.sort_by(f64::total_cmp);
            println!(
                "{:<9} {:<40} min {:>6.1} µs  p25 {:>6.1} µs  median {:>6.1} µs  ({} batches of {BATCH})",
                p.name(),
                b.path,
                m[0],
                m[m.len() / 4],
                m[m.len() / 2],
                m.len()
            );
        }
    }
    Ok(())
}
