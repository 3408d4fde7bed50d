//! Compares builds of the component on the callback path, interleaved.
//!
//! `target/release/abwarm [--rounds N] [--fresh] A.wasm B.wasm ...`
//!
//! This VM's speed drifts by ±30% over seconds (BENCHMARKS.md), so criterion runs of one build
//! after the other cannot resolve a 10% difference between two builds. Here every round runs
//! one batch of fresh callbacks per build, in a new order each round, so drift hits all builds
//! alike; the per-build minimum and median over the rounds' batch means are what to compare.
//! The calls are those of `callback/{platform}/component-warm/fresh` in `benches/callbacks.rs`
//! (one instance serves a batch), or with `--fresh` those of `callback/{platform}/component/fresh`
//! (`Host::call`, a fresh instance per call, as the host serves them), which also counts what a
//! build costs the instance's creation and teardown (pages it dirties, data it initialises).
//!
//! Run it three times or more, in rotated orders, and compare the builds' medians across
//! the runs: within one process a build can come out 17-23% slower on DingTalk and WeCom
//! (Feishu unaffected) for the whole run. Four byte-different copies of one build showed it,
//! a different copy in different runs (2026-12-08), so it is where that copy's code landed
//! among the others', not the build; a server runs one compiled copy of each version.

use imbridge_bench::{
    InComponent, PLATFORMS, Shuffler, Warm, fresh_calls, paired_rounds, quantile, updates,
    warm_call, workspace,
};
use imbridge_host::store::{Backend, MemoryStore, StoreConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Calls per batch: long enough (a few ms) to dwarf the timer, short enough to interleave.
const BATCH: u64 = 64;

/// One build under test, driven the way the chosen path needs.
enum Build {
    /// One instance per batch, state in the shared store.
    Warm(Warm),
    /// Its own host (tenant `t`, in-memory state): a fresh instance per call.
    Fresh(InComponent),
}

impl Build {
    fn store(&self) -> &dyn Backend {
        match self {
            Build::Warm(w) => &*w.store,
            Build::Fresh(h) => &**h.host.store(),
        }
    }

    /// Runs `calls` (seeded, fresh callbacks); each must update one approval.
    fn run(
        &self,
        rt: &tokio::runtime::Runtime,
        calls: &[imbridge_host::Call],
        name: &str,
    ) -> Duration {
        match self {
            Build::Warm(w) => rt.block_on(async {
                let (mut kv, plugin) = w.instance().await;
                let t = Instant::now();
                for call in calls {
                    let n = warm_call(&mut kv, &plugin, call).await;
                    assert_eq!(n, 1, "{name}: a fresh callback must update");
                }
                t.elapsed()
            }),
            Build::Fresh(h) => h.rt.block_on(async {
                let t = Instant::now();
                for call in calls {
                    let reply = h.host.call("t", call).await.expect("host call");
                    assert_eq!(updates(&reply), 1, "{name}: a fresh callback must update");
                }
                t.elapsed()
            }),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 40usize;
    let mut fresh = false;
    while let Some(flag) = args.first().filter(|a| a.starts_with("--")).cloned() {
        args.remove(0);
        match flag.as_str() {
            "--fresh" => fresh = true,
            "--rounds" if !args.is_empty() => rounds = args.remove(0).parse()?,
            _ => anyhow::bail!(
                "unknown flag {flag}; usage: abwarm [--rounds N] [--fresh] A.wasm B.wasm ..."
            ),
        }
    }
    if args.len() < 2 {
        anyhow::bail!("usage: abwarm [--rounds N] [--fresh] A.wasm B.wasm ...");
    }
    let shared: Arc<dyn Backend> = Arc::new(MemoryStore::new());
    let builds = args
        .iter()
        .map(|path| {
            Ok(if fresh {
                let parent = workspace().join("target");
                Build::Fresh(InComponent::load(
                    StoreConfig::Memory,
                    &parent,
                    Path::new(path),
                ))
            } else {
                Build::Warm(Warm::load(Path::new(path), shared.clone())?)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut n = 0u64;
    let mut shuffler = Shuffler::default();
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let mut means = paired_rounds(rounds, builds.len(), &mut shuffler, |b| {
            let (seeds, calls) = fresh_calls(p, 900 + pi as u32, &mut n, BATCH);
            builds[b].store().put("t", seeds)?;
            Ok(builds[b].run(&rt, &calls, &args[b]) / BATCH as u32)
        })?;
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
