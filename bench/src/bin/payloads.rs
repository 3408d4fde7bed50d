//! Payload building for start-approval and notify, native vs inside a component, in pairs.
//!
//! `target/release/payloads [--rounds N]` writes `target/bench/payloads.json`. Both sides run
//! the same function, `imbridge_payload_guest::run` (bench/guest): natively, and in
//! `target/payload-guest.wasm`, which `./dev bench` builds from that crate exactly as it builds
//! the plugin (opt-level 3, the capped inliner, wasm-opt, the same allocator) and which runs in
//! an engine configured as the host's. The plugin's own exports cannot build a payload without
//! sending it, so this is where the builders' sandbox cost is measured apart from the network.
//!
//! Each round runs one batch of every variant in a new order (this VM drifts over seconds, see
//! BENCHMARKS.md) and takes the ratios within the round:
//! - `native`: `run(builder, BATCH)`;
//! - `component`: one call of the export `run(builder, BATCH)` on an instance made untimed
//!   for the batch: the builders' code in the sandbox;
//! - `component-per-call`: BATCH calls of `run(builder, 1)` on such an instance: the same plus,
//!   per payload, one crossing of the WIT boundary and making the inputs again (`run` makes
//!   them once per call, as a real export lifts its request on every call); the per-call
//!   instance that every export pays is `host/instantiate+call`, measured on its own.

use anyhow::{Context as _, Result, ensure};
use imbridge_bench::write_bench_json;
use imbridge_bench::{Shuffler, paired_entry, paired_rounds, rounds_arg, workspace};
use imbridge_payload_guest::BUILDERS;
use serde_json::json;
use std::hint::black_box;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, TypedFunc};
use wasmtime::{Engine, Store};

/// Payloads per batch: long enough to dwarf the timer, short enough to interleave.
const BATCH: u32 = 64;

const VARIANTS: [&str; 3] = ["native", "component", "component-per-call"];

type RunFn = TypedFunc<(u32, u32), (Option<u64>,)>;

struct Guest {
    engine: Engine,
    component: Component,
    linker: Linker<()>,
}

impl Guest {
    fn load(path: &std::path::Path) -> Result<Guest> {
        let engine = imbridge_host::engine::new_engine(64 << 20, 8)?;
        let component = Component::from_file(&engine, path)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} (./dev bench builds it)", path.display()))?;
        let linker = Linker::new(&engine);
        Ok(Guest {
            engine,
            component,
            linker,
        })
    }

    async fn instance(&self) -> Result<(Store<()>, RunFn)> {
        let mut store = Store::new(&self.engine, ());
        // The engine interrupts by epoch; nothing here advances it.
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = self
            .linker
            .instantiate_async(&mut store, &self.component)
            .await?;
        let run = instance.get_typed_func::<(u32, u32), (Option<u64>,)>(&mut store, "run")?;
        Ok((store, run))
    }
}

/// One batch of `VARIANTS[variant]` for `builder`: the time per payload, and the bytes built,
/// which every variant must agree on.
async fn batch(guest: &Guest, builder: u32, variant: usize) -> Result<(Duration, u64)> {
    let (elapsed, bytes) = match variant {
        0 => {
            let t = Instant::now();
            let bytes = black_box(imbridge_payload_guest::run(builder, BATCH));
            (t.elapsed(), bytes.context("unknown builder")?)
        }
        1 => {
            let (mut store, run) = guest.instance().await?;
            let t = Instant::now();
            let (bytes,) = run.call_async(&mut store, (builder, BATCH)).await?;
            (t.elapsed(), bytes.context("unknown builder")?)
        }
        _ => {
            let (mut store, run) = guest.instance().await?;
            let mut total = 0;
            let t = Instant::now();
            for _ in 0..BATCH {
                let (bytes,) = run.call_async(&mut store, (builder, 1)).await?;
                total += bytes.context("unknown builder")?;
            }
            (t.elapsed(), total)
        }
    };
    Ok((elapsed / BATCH, bytes))
}

fn main() -> Result<()> {
    let rounds = rounds_arg("payloads")?;
    let guest = Guest::load(&workspace().join("target/payload-guest.wasm"))?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut out = serde_json::Map::new();
    let mut shuffler = Shuffler::default();
    for (i, name) in BUILDERS.iter().enumerate() {
        let builder = i as u32;
        let mut bytes = None;
        let times = paired_rounds(rounds, VARIANTS.len(), &mut shuffler, |v| {
            let (t, b) = rt.block_on(batch(&guest, builder, v))?;
            ensure!(
                *bytes.get_or_insert(b) == b,
                "{name}: {} built {b} bytes per batch, another variant {}",
                VARIANTS[v],
                bytes.unwrap_or_default()
            );
            Ok(t)
        })?;
        let mut entry = paired_entry(&VARIANTS, &times, &[("ratio", 1), ("per_call_ratio", 2)]);
        entry["bytes"] = json!(bytes.unwrap_or_default() / u64::from(BATCH));
        println!(
            "{name:<30} native {:>6.2} µs  component {:>6.2} µs  ×{:.1}  per call {:>6.2} µs  ×{:.1}",
            entry["us"]["native"]["median"].as_f64().unwrap_or(0.0),
            entry["us"]["component"]["median"].as_f64().unwrap_or(0.0),
            entry["ratio"]["median"].as_f64().unwrap_or(0.0),
            entry["us"]["component-per-call"]["median"]
                .as_f64()
                .unwrap_or(0.0),
            entry["per_call_ratio"]["median"].as_f64().unwrap_or(0.0),
        );
        out.insert(name.to_string(), entry);
    }
    write_bench_json(
        "payloads.json",
        &json!({"rounds": rounds, "batch": BATCH, "results": out}),
    )
}
