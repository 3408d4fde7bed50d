//! Compares builds of the component on the warm-instance callback path, interleaved.
//!
//! `target/release/abwarm [--rounds N] A.wasm B.wasm ...`
//!
//! This VM's speed drifts by ±30% over seconds (BENCHMARKS.md), so criterion runs of one build
//! after the other cannot resolve a 10% difference between two builds. Here every round runs
//! one batch of fresh callbacks per build, in a new order each round, so drift hits all builds
//! alike; the per-build minimum and median over the rounds' batch means are what to compare.
//! The calls are those of `callback/{platform}/component-warm/fresh` in `benches/callbacks.rs`.

use imbridge_bench::{PLATFORMS, Shuffler, Warm, fresh_calls, quantile, warm_call};
use imbridge_host::store::{Backend, MemoryStore};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Calls per batch: long enough (a few ms) to dwarf the timer, short enough to interleave.
const BATCH: u64 = 64;

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
    let store: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    let builds = args
        .iter()
        .map(|path| Warm::load(Path::new(path), store.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut n = 0u64;
    // Which build goes first must not be the same every round.
    let mut order: Vec<usize> = (0..builds.len()).collect();
    let mut shuffler = Shuffler::default();
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let mut means: Vec<Vec<f64>> = vec![Vec::new(); builds.len()];
        for _ in 0..rounds {
            shuffler.shuffle(&mut order);
            for &b in &order {
                let (seeds, calls) = fresh_calls(p, 900 + pi as u32, &mut n, BATCH);
                store.put("t", seeds)?;
                let elapsed = rt.block_on(async {
                    let (mut kv, plugin) = builds[b].instance().await;
                    let t = Instant::now();
                    for call in &calls {
                        let updates = warm_call(&mut kv, &plugin, call).await;
                        assert_eq!(updates, 1, "{}: a fresh callback must update", args[b]);
                    }
                    t.elapsed()
                });
                means[b].push(elapsed.as_secs_f64() * 1e6 / BATCH as f64);
            }
        }
        for (path, m) in args.iter().zip(&mut means) {
            m.sort_by(f64::total_cmp);
            println!(
                "{:<9} {:<40} min {:>6.1} µs  p25 {:>6.1} µs  median {:>6.1} µs  ({} batches of {BATCH})",
                p.name(),
                path,
                m[0],
                quantile(m, 0.25),
                quantile(m, 0.5),
                m.len()
            );
        }
    }
    Ok(())
}
