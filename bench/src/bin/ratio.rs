//! The callback ratios of BENCHMARKS.md measured in pairs: native vs the component.
//!
//! `target/release/ratio [--rounds N]` writes `target/bench/ratio.json` (with feature
//! `soft-crypto`, built as `./dev bench` builds it: `target/bench/ratio-soft.json`).
//!
//! Criterion measures the native path and the component one after the other, seconds apart,
//! and this VM's speed drifts by up to ±40% over seconds, so a ratio of two criterion medians
//! can be off by that much (BENCHMARKS.md). Here every round runs one batch of each variant —
//! native, a fresh instance per call through `Host::call`, and a warm instance — in a new order
//! each round, and takes the ratio within the round: drift moves both sides of a ratio alike.
//! The paths and calls are those of `benches/callbacks.rs` (`fresh`: a new event about a new
//! pending instance; `duplicate`: one delivery replayed).

use anyhow::{Result, ensure};
use imbridge::model::Platform;
use imbridge_bench::write_bench_json;
use imbridge_bench::{InComponent, MemEnv, PLATFORMS, Warm, app_native, callback, fresh_calls};
use imbridge_bench::{fresh_native, paired_entry, paired_rounds, rounds_arg, workspace};
use imbridge_bench::{host_call, instance_id, mem_env, now_ms, seed_record, updates, warm_call};
use imbridge_host::store::StoreConfig;
use serde_json::json;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Calls per batch: a few ms, long enough to dwarf the timer, short enough to interleave.
const BATCH: u64 = 64;

#[derive(Clone, Copy)]
enum Path {
    Fresh,
    Duplicate,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Fresh => "fresh",
            Path::Duplicate => "duplicate",
        }
    }
}

/// What is measured, in the order of the output's columns.
const VARIANTS: [&str; 3] = ["native", "component", "component-warm"];

struct Bench {
    host: InComponent,
    warm: Warm,
    /// The last event number handed out. Together with a run id per platform and variant it
    /// keeps every fresh event new: no batch sees another's events as seen.
    next_event: u64,
}

impl Bench {
    /// One batch of `VARIANTS[variant]` on platform `pi`'s `path`, prepared untimed; the time
    /// per call.
    fn batch(&mut self, pi: usize, path: Path, variant: usize, fixed: &Fixed) -> Duration {
        let p = PLATFORMS[pi];
        let run = 3000 + pi as u32 * 10;
        let want = match path {
            Path::Fresh => 1,
            Path::Duplicate => 0,
        };
        let elapsed = match (variant, path) {
            (0, Path::Fresh) => {
                let env = &fixed.native_env;
                let reqs = fresh_native(env, p, run, &mut self.next_event, BATCH);
                let t = Instant::now();
                for r in &reqs {
                    let out = imbridge::callback::handle(env, &fixed.app, r).expect("native");
                    assert_eq!(black_box(out).updates.len(), want);
                }
                t.elapsed()
            }
            (0, Path::Duplicate) => {
                let req = &fixed.native_dup;
                let t = Instant::now();
                for _ in 0..BATCH {
                    let out = imbridge::callback::handle(&fixed.dup_env, &fixed.app, req)
                        .expect("native");
                    assert_eq!(black_box(out).updates.len(), want);
                }
                t.elapsed()
            }
            (1, _) => {
                let fresh = self.fresh(p, path, run + 1);
                let calls = batch_of(path, &fresh, fixed);
                let h = &self.host;
                h.rt.block_on(async {
                    let t = Instant::now();
                    for call in calls.iter().copied() {
                        let reply = h.host.call("t", call).await.expect("host call");
                        assert_eq!(updates(black_box(&reply)), want);
                    }
                    t.elapsed()
                })
            }
            _ => {
                let fresh = self.fresh(p, path, run + 2);
                let calls = batch_of(path, &fresh, fixed);
                let (warm, rt) = (&self.warm, &self.host.rt);
                rt.block_on(async {
                    let (mut store, plugin) = warm.instance().await;
                    let t = Instant::now();
                    for call in calls.iter().copied() {
                        assert_eq!(black_box(warm_call(&mut store, &plugin, call).await), want);
                    }
                    t.elapsed()
                })
            }
        };
        elapsed / BATCH as u32
    }

    /// New events for the component's fresh path, their records seeded; none for duplicates.
    fn fresh(&mut self, p: Platform, path: Path, run: u32) -> Vec<imbridge_host::Call> {
        match path {
            Path::Fresh => {
                let (seeds, calls) = fresh_calls(p, run, &mut self.next_event, BATCH);
                self.host.host.store().put("t", seeds).expect("seed");
                calls
            }
            Path::Duplicate => Vec::new(),
        }
    }
}

/// The component's calls of one batch: the new events, or the applied delivery again.
fn batch_of<'a>(
    path: Path,
    fresh: &'a [imbridge_host::Call],
    fixed: &'a Fixed,
) -> Vec<&'a imbridge_host::Call> {
    match path {
        Path::Fresh => fresh.iter().collect(),
        Path::Duplicate => vec![&fixed.component_dup; BATCH as usize],
    }
}

/// Per platform: the app, the native environments and the duplicate deliveries (each applied
/// once, untimed, where it is replayed).
struct Fixed {
    app: imbridge::model::ImApp,
    native_env: MemEnv,
    dup_env: MemEnv,
    native_dup: imbridge::model::HttpRequest,
    component_dup: imbridge_host::Call,
}

impl Fixed {
    fn new(pi: usize, bench: &mut Bench) -> Result<Fixed> {
        let p = PLATFORMS[pi];
        let app = app_native(p);
        let run = 3900 + pi as u32;
        let inst = instance_id(p, run, 0);
        let (k, v) = seed_record(p, &inst);
        let dup_env = mem_env();
        dup_env.kv.borrow_mut().insert(k.clone(), v.clone());
        let push = callback(p, run, 0, &inst, now_ms());
        let native_dup = push.native();
        let first = imbridge::callback::handle(&dup_env, &app, &native_dup)?;
        ensure!(first.updates.len() == 1, "the first delivery must update");
        // The component's store holds its own copy of the record and sees the delivery once.
        let component_dup = host_call(p, &push);
        bench.host.host.store().put("t", vec![(k, Some(v))])?;
        ensure!(updates(&bench.host.call(&component_dup)) == 1);
        Ok(Fixed {
            app,
            native_env: mem_env(),
            dup_env,
            native_dup,
            component_dup,
        })
    }
}

fn main() -> Result<()> {
    let rounds = rounds_arg("ratio")?;
    let soft = cfg!(feature = "soft-crypto");
    let host = InComponent::new(StoreConfig::Memory, &workspace().join("target"));
    let warm = Warm::new(host.host.store().clone());
    let mut bench = Bench {
        host,
        warm,
        next_event: 0,
    };
    let mut out = serde_json::Map::new();
    let mut shuffler = imbridge_bench::Shuffler::default();
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let fixed = Fixed::new(pi, &mut bench)?;
        for path in [Path::Fresh, Path::Duplicate] {
            let times = paired_rounds(rounds, VARIANTS.len(), &mut shuffler, |v| {
                Ok(bench.batch(pi, path, v, &fixed))
            })?;
            let entry = paired_entry(&VARIANTS, &times, &[("ratio", 1), ("warm_ratio", 2)]);
            println!(
                "{:<9} {:<9} native {:>6.1} µs  component {:>6.1} µs  ×{:.1}  warm {:>6.1} µs  ×{:.1}",
                p.name(),
                path.name(),
                entry["us"]["native"]["median"].as_f64().unwrap_or(0.0),
                entry["us"]["component"]["median"].as_f64().unwrap_or(0.0),
                entry["ratio"]["median"].as_f64().unwrap_or(0.0),
                entry["us"]["component-warm"]["median"]
                    .as_f64()
                    .unwrap_or(0.0),
                entry["warm_ratio"]["median"].as_f64().unwrap_or(0.0),
            );
            out.insert(format!("{}/{}", p.name(), path.name()), entry);
        }
    }
    let file = if soft {
        "ratio-soft.json"
    } else {
        "ratio.json"
    };
    let doc = json!({"rounds": rounds, "batch": BATCH, "soft_crypto": soft, "results": out});
    write_bench_json(file, &doc)
}
