//! Callback hot path (verify + decrypt + parse + state update + reply) per platform, natively
//! and inside the component, side by side; and payload building for start-approval and notify.
//!
//! Ids: `callback/{platform}/{native|component|component-disk}/{fresh|duplicate}`.
//! - `fresh`: every iteration is a new event about a new pending instance (seeded, untimed),
//!   so it takes the real path: load, apply, save, reply.
//! - `duplicate`: the same delivery again (a platform retry): verify, decrypt, parse, load, and
//!   the event changes nothing, so nothing is written.
//! - `component`: `Host::call` (= `Host::handle_callback`), a fresh instance per call from
//!   `InstancePre`, state in the host's in-memory store, as the native side's is in memory: the
//!   ratio is the sandbox's cost, not the disk's. `component-disk` is the same with the
//!   embedded redb database on the real disk (a durable commit per call).
//! - `component-warm`: the export called on an instance that is already there (one instance
//!   per batch of 256 calls, instantiated untimed; its writes stay in the call's buffer, as the
//!   native side's stay in its map): the sandbox's cost for the handling alone, without the
//!   per-call instance that `host/instantiate+call` measures on its own.

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use imbridge::model::Platform;
use imbridge_bench::host_call;
use imbridge_bench::{
    InComponent, PLATFORMS, Warm, app_native, callback, fresh_calls, fresh_native,
};
use imbridge_bench::{instance_id, mem_env, now_ms, seed_record, updates, warm_call, workspace};
use imbridge_host::store::StoreConfig;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Inputs are generated (and records seeded) in batches outside the timed region, so memory
/// stays bounded however many iterations criterion asks for.
const BATCH: u64 = 256;

fn main() {
    // SAFETY: first statement of main, before any other thread exists. The host logs one line
    // per call to stderr unless told otherwise, which would be measured too.
    unsafe { std::env::set_var("IMBRIDGE_QUIET", "1") };
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        // The software-crypto build has a target dir of its own; its results still belong
        // next to the others, for the report.
        .output_directory(&workspace().join("target/criterion"))
        .configure_from_args();
    if cfg!(feature = "soft-crypto") {
        native_soft(&mut c);
    } else {
        callbacks(&mut c);
        payloads(&mut c);
    }
    c.final_summary();
}

/// Runs `iters` iterations in batches of at most [`BATCH`]: `timed(k)` prepares k of them
/// untimed, runs them and returns the time the running took.
fn batched(iters: u64, mut timed: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let k = left.min(BATCH);
        total += timed(k);
        left -= k;
    }
    total
}

fn callbacks(c: &mut Criterion) {
    let parent = workspace().join("target");
    let mem = InComponent::new(StoreConfig::Memory, &parent);
    let disk = InComponent::new(StoreConfig::Embedded, &parent);
    let warm = Warm::new(mem.host.store().clone());
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let mut g = c.benchmark_group(format!("callback/{}", p.name()));
        let run = |variant: u32| run_id(pi, variant);

        native(&mut g, p, "native", run);

        for (label, host, variant) in [("component", &mem, 2), ("component-disk", &disk, 3)] {
            // The on-disk variant only for Feishu: it shows the commit cost, which is the same
            // for every platform; the load test covers all three on disk.
            if label == "component-disk" && p != Platform::Feishu {
                continue;
            }
            let inst = instance_id(p, run(8 + variant), 0);
            let (k, v) = seed_record(p, &inst);
            host.host.kv_set("t", &k, &v).expect("seed");
            let check = host_call(p, &callback(p, run(8 + variant), 0, &inst, now_ms()));
            assert_eq!(updates(&host.call(&check)), 1, "fresh must update");
            assert_eq!(updates(&host.call(&check)), 0, "duplicate must not");

            let mut n = 0u64;
            g.bench_function(BenchmarkId::new(label, "fresh"), |b| {
                b.iter_custom(|iters| {
                    batched(iters, |k| {
                        let (seeds, calls) = fresh_calls(p, run(variant), &mut n, k);
                        host.host.store().put("t", seeds).expect("seed");
                        let t = Instant::now();
                        host.rt.block_on(async {
                            for call in &calls {
                                black_box(host.host.call("t", call).await.ok());
                            }
                        });
                        t.elapsed()
                    })
                })
            });
        }

        {
            let variant = 5;
            let inst = instance_id(p, run(8 + variant), 0);
            let (k, v) = seed_record(p, &inst);
            warm.store.put("t", vec![(k, Some(v))]).expect("seed");
            let check = host_call(p, &callback(p, run(8 + variant), 0, &inst, now_ms()));
            mem.rt.block_on(async {
                let (mut store, plugin) = warm.instance().await;
                assert_eq!(
                    warm_call(&mut store, &plugin, &check).await,
                    1,
                    "fresh must update"
                );
                assert_eq!(
                    warm_call(&mut store, &plugin, &check).await,
                    0,
                    "duplicate must not"
                );
            });
            let mut n = 0u64;
            g.bench_function(BenchmarkId::new("component-warm", "fresh"), |b| {
                b.iter_custom(|iters| {
                    batched(iters, |k| {
                        let (seeds, calls) = fresh_calls(p, run(variant), &mut n, k);
                        warm.store.put("t", seeds).expect("seed");
                        mem.rt.block_on(async {
                            let (mut store, plugin) = warm.instance().await;
                            let t = Instant::now();
                            for call in &calls {
                                black_box(warm_call(&mut store, &plugin, call).await);
                            }
                            t.elapsed()
                        })
                    })
                })
            });
        }

        // Duplicates: one delivery, applied once untimed, then replayed.
        let inst = instance_id(p, run(4), 0);
        let (k, v) = seed_record(p, &inst);
        let push = callback(p, run(4), 0, &inst, now_ms());
        mem.host.kv_set("t", &k, &v).expect("seed");
        let call = host_call(p, &push);
        assert_eq!(updates(&mem.call(&call)), 1);
        g.bench_function(BenchmarkId::new("component", "duplicate"), |b| {
            b.iter_custom(|iters| {
                mem.rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(mem.host.call("t", &call).await.ok());
                    }
                    t.elapsed()
                })
            })
        });
        // `warm` shares `mem`'s store, where this delivery was just applied: a duplicate.
        mem.rt.block_on(async {
            let (mut store, plugin) = warm.instance().await;
            assert_eq!(warm_call(&mut store, &plugin, &call).await, 0);
        });
        g.bench_function(BenchmarkId::new("component-warm", "duplicate"), |b| {
            b.iter_custom(|iters| {
                batched(iters, |k| {
                    mem.rt.block_on(async {
                        let (mut store, plugin) = warm.instance().await;
                        let t = Instant::now();
                        for _ in 0..k {
                            black_box(warm_call(&mut store, &plugin, &call).await);
                        }
                        t.elapsed()
                    })
                })
            })
        });
        g.finish();
    }
}

/// The software-crypto build's only measurements: `callback/{platform}/native-soft/...`, the
/// native path in the build whose AES, SHA-1 and SHA-256 are the portable software code the
/// component runs (feature `soft-crypto`, `--cfg aes_force_soft`). The component is the same
/// in either build, so it is not measured again.
fn native_soft(c: &mut Criterion) {
    for (pi, p) in PLATFORMS.into_iter().enumerate() {
        let mut g = c.benchmark_group(format!("callback/{}", p.name()));
        native(&mut g, p, "native-soft", |variant| run_id(pi, variant));
        g.finish();
    }
}

/// The id space of one variant of the `pi`-th platform's benchmarks: separate per variant, so
/// no variant's events are ever duplicates of another's (already recorded, they would change
/// nothing).
fn run_id(pi: usize, variant: u32) -> u32 {
    1000 * (pi as u32 + 1) + variant
}

/// `{label}/fresh` and `{label}/duplicate`: `imbridge::callback::handle` over an in-memory
/// `Env`, after checking once, untimed, that each really takes the path it names.
fn native(
    g: &mut BenchmarkGroup<'_, WallTime>,
    p: Platform,
    label: &str,
    run: impl Fn(u32) -> u32,
) {
    let app = app_native(p);
    {
        let env = mem_env();
        let inst = instance_id(p, run(9), 0);
        let (k, v) = seed_record(p, &inst);
        env.kv.borrow_mut().insert(k, v);
        let req = callback(p, run(9), 0, &inst, now_ms()).native();
        let first = imbridge::callback::handle(&env, &app, &req).expect("native callback");
        assert_eq!(first.updates.len(), 1, "fresh must update");
        let again = imbridge::callback::handle(&env, &app, &req).expect("native callback");
        assert!(again.updates.is_empty(), "duplicate must not update");
    }

    let env = mem_env();
    let mut n = 0u64;
    g.bench_function(BenchmarkId::new(label, "fresh"), |b| {
        b.iter_custom(|iters| {
            batched(iters, |k| {
                let reqs = fresh_native(&env, p, run(1), &mut n, k);
                let t = Instant::now();
                for r in &reqs {
                    black_box(imbridge::callback::handle(&env, &app, r).ok());
                }
                t.elapsed()
            })
        })
    });

    // Duplicates: one delivery, applied once untimed, then replayed; on an env of its own, so
    // the lookups do not search the records the fresh iterations left behind.
    let dup_env = mem_env();
    let inst = instance_id(p, run(4), 0);
    let (k, v) = seed_record(p, &inst);
    dup_env.kv.borrow_mut().insert(k, v);
    let req = callback(p, run(4), 0, &inst, now_ms()).native();
    imbridge::callback::handle(&dup_env, &app, &req).expect("first delivery");
    g.bench_function(BenchmarkId::new(label, "duplicate"), |b| {
        b.iter(|| black_box(imbridge::callback::handle(&dup_env, &app, &req).ok()))
    });
}

/// The payload builders behind start-approval and notify (no network, no state), each payload
/// built and serialised, as `target/release/payloads` runs them in the component too.
fn payloads(c: &mut Criterion) {
    let inputs = imbridge_payload_guest::Inputs::new();
    let mut g = c.benchmark_group("payload");
    for (i, name) in imbridge_payload_guest::BUILDERS.iter().enumerate() {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(inputs.build(i as u32).expect("a known builder")))
        });
    }
    g.finish();
}
