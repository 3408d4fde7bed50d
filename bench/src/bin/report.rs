//! Writes BENCHMARKS.md from the measurements of one `./dev bench` run: criterion's estimates
//! (`target/criterion`), the paired ratios (`target/bench/ratio*.json`), the load test
//! (`target/bench/load.json`), the host costs (`target/bench/hostcosts.json`), component sizes
//! (`target/bench/sizes.json`, when the size experiment ran) and the load averages `./dev bench`
//! recorded per phase. Every number in the file comes from those; the prose around the numbers
//! is fixed.

use anyhow::{Context as _, Result};
use imbridge_bench::workspace;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Median and spread of one criterion benchmark, in nanoseconds.
#[derive(Clone, Copy)]
struct Est {
    median: f64,
    lo: f64,
    hi: f64,
    mad: f64,
}

fn criterion(dir: &Path) -> BTreeMap<String, Est> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Some((id, est)) = read_est(&p) {
                        out.insert(id, est);
                    }
                } else if p.file_name().is_some_and(|n| n != "report" && n != "base") {
                    stack.push(p);
                }
            }
        }
    }
    out
}

fn read_est(new: &Path) -> Option<(String, Est)> {
    let b: Value =
        serde_json::from_str(&std::fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(new.join("estimates.json")).ok()?).ok()?;
    let m = &e["median"];
    Some((
        b["full_id"].as_str()?.to_string(),
        Est {
            median: m["point_estimate"].as_f64()?,
            lo: m["confidence_interval"]["lower_bound"].as_f64()?,
            hi: m["confidence_interval"]["upper_bound"].as_f64()?,
            mad: e["median_abs_dev"]["point_estimate"].as_f64()?,
        },
    ))
}

fn time(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn est_cell(e: Option<&Est>) -> String {
    match e {
        Some(e) => format!(
            "{} (95% CI {}–{}, MAD {})",
            time(e.median),
            time(e.lo),
            time(e.hi),
            time(e.mad)
        ),
        None => "not measured".into(),
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The load test's results in the order they ran (the database grows from one to the next);
/// files from before the order was recorded come alphabetically.
fn in_run_order(load: &Value) -> Vec<(&String, &Value)> {
    let results = load["results"].as_object();
    let order: Vec<&str> = load["order"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut rows: Vec<(&String, &Value)> = results.into_iter().flatten().collect();
    rows.sort_by_key(|(k, _)| order.iter().position(|o| o == k).unwrap_or(usize::MAX));
    rows
}

/// Every single run's imbridge results, in run order, as (run number from 1, platform, result).
fn imbridge_runs(load: &Value) -> Vec<(usize, &str, &Value)> {
    let runs = load["runs"].as_array().into_iter().flatten();
    runs.enumerate()
        .flat_map(|(i, run)| {
            in_run_order(run)
                .into_iter()
                .filter_map(move |(k, r)| Some((i + 1, k.strip_prefix("imbridge/")?, r)))
        })
        .collect()
}

/// The load test's slow commits of one run, as `calls×ms` entries.
fn slow_commits(v: &Value) -> String {
    match v.as_array() {
        None => "–".into(),
        Some(list) if list.is_empty() => "0".into(),
        Some(list) => {
            let each: Vec<String> = list
                .iter()
                .map(|c| format!("{}×{} ms", c["calls"], c["ms"]))
                .collect();
            format!("{}: {}", list.len(), each.join(", "))
        }
    }
}

/// The latency (ms) the p99 target is about.
const P99_TARGET_MS: f64 = 10.0;

/// The in-component ≤ 2× native target, as a ratio.
const RATIO_TARGET: f64 = 2.0;

/// The host's slow-commit threshold (ms): commits shorter than this are not logged.
fn slow_commit_ms() -> f64 {
    imbridge_host::store::SLOW_COMMIT.as_secs_f64() * 1000.0
}

/// A load-test result's requests/s and p99 (ms), and whether they meet the target (≥ 5,000/s,
/// p99 ≤ [`P99_TARGET_MS`]).
fn load_target(r: &Value) -> (f64, f64, bool) {
    let rps = r["rps"].as_f64().unwrap_or(0.0);
    let p99 = r["p99_us"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    (rps, p99, rps >= 5000.0 && p99 <= P99_TARGET_MS)
}

/// The durations (ms) of one run's slow commits.
fn stalls(slow: &Value) -> Vec<f64> {
    slow.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["ms"].as_f64())
        .collect()
}

/// Time (ms) that `stalls` spent beyond `x` ms each.
fn beyond(stalls: &[f64], x: f64) -> f64 {
    stalls.iter().map(|s| (s - x).max(0.0)).sum()
}

/// The p99 (ms) that a run's slow commits alone imply under wrk's correction for coordinated
/// omission: the `x` at which the time they spent beyond `x` is 1% of the run. `None` when
/// that is under the slow-commit threshold (20 ms), below which the log shows nothing.
fn implied_p99(stalls: &[f64], run_ms: f64) -> Option<f64> {
    let budget = run_ms / 100.0;
    let floor = slow_commit_ms();
    if beyond(stalls, floor) <= budget {
        return None;
    }
    // `beyond` falls continuously as x rises, so bisect between the floor and the longest.
    let (mut lo, mut hi) = (floor, stalls.iter().copied().fold(floor, f64::max));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if beyond(stalls, mid) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The sentence that splits the warm ratio into the sandbox's part and the crypto's part, when
/// the software-crypto reference was measured.
fn soft_split(soft: &[(&str, &str, f64)]) -> String {
    let Some((lo, hi)) = span(soft) else {
        return String::new();
    };
    format!(
        " Against the native path built with the same software crypto the warm instance is \
         {lo:.1}–{hi:.1}×: that is the sandbox's own share, and the rest of the warm ratio is \
         the crypto instructions wasm lacks."
    )
}

type Ratios = Vec<(&'static str, &'static str, f64)>;

/// The smallest and largest of the ratios, if any.
fn span(rs: &[(&str, &str, f64)]) -> Option<(f64, f64)> {
    rs.iter().map(|r| r.2).fold(None, |acc, r| {
        Some(acc.map_or((r, r), |(lo, hi): (f64, f64)| (lo.min(r), hi.max(r))))
    })
}

/// The sentence saying what is left with the crypto excluded on both sides, when that was
/// measured (`bench/crypto-excluded.sh`).
fn excluded_split(fresh: &[(&str, &str, f64)], warm: &[(&str, &str, f64)]) -> String {
    let (Some((flo, fhi)), Some((wlo, whi))) = (span(fresh), span(warm)) else {
        return String::new();
    };
    if whi > RATIO_TARGET {
        format!(
            " Neither is enough, even both together: with the crypto excluded on both sides \
             (*Crypto excluded* above) a warm instance is still up to {whi:.1}× native \
             ({wlo:.1}–{whi:.1}×) and a fresh one {flo:.1}–{fhi:.1}×; what stays above 2× is \
             the sandbox apart from crypto: cranelift's code for the parsing, state and reply, \
             and the copies and host calls of the WIT boundary."
        )
    } else {
        format!(
            " Both together would be: with the crypto excluded on both sides (*Crypto \
             excluded* above) a warm instance is {wlo:.1}–{whi:.1}× native, while a fresh one \
             stays at {flo:.1}–{fhi:.1}×."
        )
    }
}

/// A paired result's median, as recorded by `target/release/ratio`.
fn med(v: &Value) -> Option<f64> {
    v["median"].as_f64()
}

/// A paired ratio with its 10th–90th percentile.
fn ratio_cell(v: &Value) -> String {
    med(v).map_or("–".into(), |m| {
        format!(
            "{m:.1}× ({:.1}–{:.1})",
            v["p10"].as_f64().unwrap_or(f64::NAN),
            v["p90"].as_f64().unwrap_or(f64::NAN)
        )
    })
}

/// A paired per-call time (recorded in µs).
fn us_cell(v: &Value) -> String {
    med(v).map_or("–".into(), |m| time(m * 1e3))
}

/// The batch-by-batch comparison (`target/release/ratio`): its table, and the median ratios
/// per platform and path (component, warm instance, warm ÷ software-crypto native).
fn paired_section(
    w: &mut String,
    paired: &Value,
    soft: Option<&Value>,
) -> Result<(Ratios, Ratios, Ratios)> {
    writeln!(
        w,
        "### Paired, batch by batch\n\n\
         The criterion medians above are taken seconds apart, and this VM's speed drifts by up \
         to ±40% over seconds, so a ratio of two of them can be off by that much. \
         `target/release/ratio` measures the same paths in pairs: each of {} rounds runs one \
         batch of {} calls of every variant (native, a fresh instance per call through \
         `Host::call`, a warm instance), in a new order each round, and takes each ratio \
         within its round. Times are the median of the rounds' per-call means; ratios are the \
         median of the per-round ratios, with the 10th–90th percentile in brackets. The tool \
         runs on mimalloc, as `imbridge-host` and every bench process do, native and \
         component calls alike: with glibc's allocator the \
         events it generates and drops between batches were consolidated inside the next \
         timed batch, which doubled native DingTalk times after a few hundred rounds. The \
         software-crypto columns come from the same tool built with `--features soft-crypto` \
         (its own run, paired the same way). These are the ratios the target below is judged \
         on.\n",
        paired["rounds"], paired["batch"]
    )?;
    writeln!(
        w,
        "| platform | path | native | in component | ratio | warm instance | ratio | \
         native, software crypto | warm ÷ software-crypto native |\n\
         |---|---|---|---|---|---|---|---|---|"
    )?;
    let (mut ratios, mut warm, mut soft_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for (p, path, r) in paired_results(paired) {
        let s = soft.map_or(&Value::Null, |s| &s["results"][format!("{p}/{path}")]);
        ratios.extend(med(&r["ratio"]).map(|m| (p, path, m)));
        warm.extend(med(&r["warm_ratio"]).map(|m| (p, path, m)));
        soft_ratios.extend(med(&s["warm_ratio"]).map(|m| (p, path, m)));
        writeln!(
            w,
            "{} {} | {} |",
            paired_cells(p, path, r),
            us_cell(&s["us"]["native"]),
            ratio_cell(&s["warm_ratio"]),
        )?;
    }
    writeln!(w)?;
    Ok((ratios, warm, soft_ratios))
}

/// The results of one `target/release/ratio` run, per platform and path, in table order.
fn paired_results(v: &Value) -> Vec<(&'static str, &'static str, &Value)> {
    let mut out = Vec::new();
    for p in ["feishu", "dingtalk", "wecom"] {
        for path in ["fresh", "duplicate"] {
            let r = &v["results"][format!("{p}/{path}")];
            if !r.is_null() {
                out.push((p, path, r));
            }
        }
    }
    out
}

/// A paired result's row up to its warm ratio: platform, path, native, in component, ratio,
/// warm instance, ratio.
fn paired_cells(p: &str, path: &str, r: &Value) -> String {
    format!(
        "| {p} | {path} | {} | {} | {} | {} | {} |",
        us_cell(&r["us"]["native"]),
        us_cell(&r["us"]["component"]),
        ratio_cell(&r["ratio"]),
        us_cell(&r["us"]["component-warm"]),
        ratio_cell(&r["warm_ratio"]),
    )
}

/// The paired ratios measured on the patched code without crypto (`bench/crypto-excluded.sh`):
/// its table, and the median ratios (fresh instance, warm instance) per platform and path.
fn excluded_section(w: &mut String, v: &Value) -> Result<(Ratios, Ratios)> {
    writeln!(
        w,
        "### Crypto excluded\n\n\
         The same paired measurement on a patched copy of the committed code \
         (`bench/crypto-excluded.sh`, run by `./dev bench`; the patch is \
         `bench/crypto-excluded.patch`): AES's block function is the identity (CBC's chaining \
         stays) and SHA-1 and SHA-256 are a multiply-rotate mix of about one cycle per byte, in \
         the guest, natively and in the simulators that sign the callbacks alike. What is left \
         is what the sandbox costs apart from crypto: the least that a host import for the \
         crypto could leave, and on a warm instance the least that also reusing instances \
         could leave. {} rounds of {} calls.\n",
        v["rounds"], v["batch"]
    )?;
    writeln!(
        w,
        "| platform | path | native | in component | ratio | warm instance | ratio |\n\
         |---|---|---|---|---|---|---|"
    )?;
    let (mut fresh, mut warm) = (Vec::new(), Vec::new());
    for (p, path, r) in paired_results(v) {
        fresh.extend(med(&r["ratio"]).map(|m| (p, path, m)));
        warm.extend(med(&r["warm_ratio"]).map(|m| (p, path, m)));
        writeln!(w, "{}", paired_cells(p, path, r))?;
    }
    writeln!(w)?;
    Ok((fresh, warm))
}

/// The paired payload measurement (`target/release/payloads`).
fn payload_section(w: &mut String, v: &Value) -> Result<()> {
    writeln!(
        w,
        "Paired, batch by batch (`target/release/payloads`): each of {rounds} rounds runs one \
         batch of {batch} payloads of every variant in a new order and takes the ratios within \
         the round; times per payload are the median of the rounds' means, ratios the median \
         of the per-round ratios (10th–90th percentile in brackets). *In component*: one call \
         of the guest's export builds the {batch} payloads, on an instance made untimed for the \
         batch — the builders' code in the sandbox. *One call per payload*: {batch} calls, one \
         payload each, on such an instance — the same plus, per payload, a crossing of the WIT \
         boundary and making the inputs again (`run` makes them once per call, natively once \
         per batch; a real export lifts its request on every call too). The fresh instance every export call gets in the host is not in either; it \
         is *instantiate + an empty-ish call* under Host costs.\n",
        rounds = v["rounds"],
        batch = v["batch"]
    )?;
    writeln!(
        w,
        "| builder | bytes | native | in component | ratio | one call per payload | ratio |\n\
         |---|---|---|---|---|---|---|"
    )?;
    for name in imbridge_payload_guest::BUILDERS {
        let r = &v["results"][name];
        if r.is_null() {
            continue;
        }
        writeln!(
            w,
            "| `{name}` | {} | {} | {} | {} | {} | {} |",
            r["bytes"],
            us_cell(&r["us"]["native"]),
            us_cell(&r["us"]["component"]),
            ratio_cell(&r["ratio"]),
            us_cell(&r["us"]["component-per-call"]),
            ratio_cell(&r["per_call_ratio"]),
        )?;
    }
    writeln!(w)?;
    Ok(())
}

/// Per run and imbridge platform: the p99 wrk measured against what the slow commits alone
/// imply (see [`implied_p99`]), so a missed p99 can be told apart from a slow server.
fn stall_table(w: &mut String, load: &Value) -> Result<()> {
    let mut rows = Vec::new();
    for (run, platform, r) in imbridge_runs(load) {
        let each = stalls(&r["slow_commits"]);
        let run_ms = r["duration_us"].as_f64().unwrap_or(0.0) / 1000.0;
        if each.is_empty() || run_ms <= 0.0 {
            continue;
        }
        let over = beyond(&each, P99_TARGET_MS);
        rows.push(format!(
            "| {run} | {platform} | {:.2} ms | {} | {:.0} ms ({:.1}% of the run) | {} |",
            r["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
            slow_commits(&r["slow_commits"]),
            over,
            over / run_ms * 100.0,
            implied_p99(&each, run_ms).map_or_else(
                || format!("under {:.0} ms", slow_commit_ms()),
                |x| format!("{x:.0} ms")
            ),
        ));
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        w,
        "Runs with slow commits, one row each. *Beyond {t:.0} ms*: the time the slow commits \
         took beyond {t:.0} ms each, which callbacks arriving at a steady rate would have spent \
         waiting past the target. *p99 they imply*: the latency x at which the slow commits' \
         time beyond x is 1% of the run — the p99 they alone cause under wrk's correction \
         (commits under {slow:.0} ms are not logged, so below that the log cannot say).\n\n\
         | run | platform | p99 (wrk) | slow commits | beyond {t:.0} ms | p99 they imply |\n\
         |---|---|---|---|---|---|",
        t = P99_TARGET_MS,
        slow = slow_commit_ms(),
    )?;
    for row in rows {
        writeln!(w, "{row}")?;
    }
    writeln!(w)?;
    Ok(())
}

/// The median of one of `hostcosts`' paired per-call figures, in ns (as criterion's are).
fn paired_ns(costs: Option<&Value>, key: &str) -> Option<f64> {
    med(&costs?["paired"][key]).map(|us| us * 1e3)
}

/// A paired per-call time with its 10th–90th percentile.
fn paired_cell(v: &Value) -> String {
    let us = |k: &str| v[k].as_f64().map_or("–".into(), |t| time(t * 1e3));
    format!("{} ({}–{})", us_cell(v), us("p10"), us("p90"))
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn main() -> Result<()> {
    let ws = workspace();
    let bench_dir = ws.join("target/bench");
    let crit = criterion(&ws.join("target/criterion"));
    let load = read_json(&bench_dir.join("load.json"));
    let costs = read_json(&bench_dir.join("hostcosts.json"));
    let sizes = read_json(&bench_dir.join("sizes.json"));
    let phases = read_json(&bench_dir.join("phases.json")).unwrap_or(Value::Null);
    let get = |id: &str| crit.get(id);

    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "# Benchmarks\n")?;
    writeln!(
        w,
        "Generated by `./dev bench` (bench/src/bin/report.rs) from the measurements of one run; \
         do not edit by hand. Criterion numbers are the median per operation with the 95% \
         confidence interval of the median and the median absolute deviation (MAD) of the \
         samples.\n"
    )?;

    // ---- machine ----
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-");
    let mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo");
    writeln!(w, "## Machine\n")?;
    writeln!(w, "| what | value |\n|---|---|")?;
    writeln!(w, "| cores (`nproc`) | {} |", sh("nproc"))?;
    writeln!(w, "| CPU | {} |", cpu.trim())?;
    writeln!(w, "| memory | {mem} |")?;
    writeln!(w, "| kernel | {} |", sh("uname -r"))?;
    writeln!(w, "| rustc | {} |", sh("rustc --version"))?;
    writeln!(w, "| date (UTC) | {} |", sh("date -u '+%Y-%m-%d %H:%M'"))?;
    // In run order; runs before the order was kept wrote an object (alphabetical here).
    let phases: Vec<(&str, &Value)> = match &phases {
        Value::Array(a) => a
            .iter()
            .map(|p| (p[0].as_str().unwrap_or(""), &p[1]))
            .collect(),
        Value::Object(o) => o.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        _ => Vec::new(),
    };
    for (phase, load) in phases {
        writeln!(
            w,
            "| load average (1/5/15 min) before {phase} | {} |",
            load.as_str().unwrap_or("")
        )?;
    }
    writeln!(w)?;
    // A run made by hand (e.g. with shorter times) leaves its exact commands here.
    let commands = std::fs::read_to_string(bench_dir.join("commands.txt")).unwrap_or_else(|_| {
        "./dev build\n\
         # then bench/guest into target/payload-guest.wasm, built as ./dev build builds the plugin\n\
         export IMBRIDGE_QUIET=1   # no log line per call\n\
         cargo build --release -p imbridge-host -p imbridge-bench --bins\n\
         # every build before the first measurement:\n\
         CARGO_TARGET_DIR=target/soft RUSTFLAGS=\"--cfg aes_force_soft\" cargo bench -p imbridge-bench --bench callbacks --features soft-crypto --no-run\n\
         CARGO_TARGET_DIR=target/soft RUSTFLAGS=\"--cfg aes_force_soft\" cargo build --profile bench -p imbridge-bench --bin ratio --features soft-crypto\n\
         bench/crypto-excluded.sh build\n\
         target/release/hostcosts\n\
         env -u IMBRIDGE_QUIET target/release/loadtest   # wrk + lark-oapi peer, see below\n\
         cargo bench -p imbridge-bench --bench callbacks -- --warm-up-time 1 --measurement-time 3\n\
         CARGO_TARGET_DIR=target/soft RUSTFLAGS=\"--cfg aes_force_soft\" cargo bench -p imbridge-bench --bench callbacks --features soft-crypto -- --warm-up-time 1 --measurement-time 3\n\
         target/release/ratio\n\
         target/soft/release/ratio\n\
         bench/crypto-excluded.sh run\n\
         target/release/payloads\n\
         cargo bench -p imbridge-bench --bench host -- --warm-up-time 1 --measurement-time 3\n\
         target/release/report     # writes this file\n"
            .to_string()
    });
    writeln!(
        w,
        "Commands of this run:\n\n```sh\n{}\n```\n",
        commands.trim_end()
    )?;

    // ---- callbacks ----
    writeln!(w, "## Callback handling: native vs in the component\n")?;
    writeln!(
        w,
        "Verify + decrypt + parse + state update + reply, per platform (`bench/benches/callbacks.rs`). \
         *native*: `imbridge::callback::handle` over an in-memory `Env`. *component*: \
         `Host::call(handle-callback)` on `target/imbridge.wasm`, a fresh instance per call from \
         `InstancePre` (pooling allocator), state in the host's in-memory store (`StoreConfig::Memory`) \
         as the native side's is in memory, so the ratio is the sandbox rather than the disk. \
         *component-disk*: the same with the embedded redb database on the real disk (durable \
         commit, fsync). *fresh*: a new event id about a new pending instance every \
         iteration — the real path (load, apply, save, reply). *duplicate*: the same delivery \
         again (a platform retry) — verify, decrypt, parse, load, and the event changes \
         nothing, so nothing is written. *warm instance*: the export called on an instance \
         that already exists (one per 256 calls, instantiated untimed; the host itself never \
         reuses one): the handling alone, without the per-call instance that \
         `host/instantiate+call` measures separately.\n"
    )?;
    writeln!(
        w,
        "| platform | path | native | in component | ratio | warm instance | ratio |\n\
         |---|---|---|---|---|---|---|"
    )?;
    let mut ratios = Vec::new();
    let mut warm_ratios = Vec::new();
    let ratio = |n: Option<&Est>, c: Option<&Est>| n.zip(c).map(|(n, c)| c.median / n.median);
    let cell = |r: Option<f64>| r.map_or("–".into(), |r| format!("{r:.1}×"));
    // One row per platform and path: native, component, warm instance, software-crypto native.
    let rows: Vec<_> = ["feishu", "dingtalk", "wecom"]
        .into_iter()
        .flat_map(|p| ["fresh", "duplicate"].map(|path| (p, path)))
        .map(|(p, path)| {
            let at = |variant: &str| get(&format!("callback/{p}/{variant}/{path}"));
            let variants = ["native", "component", "component-warm", "native-soft"].map(at);
            (p, path, variants)
        })
        .collect();
    for &(p, path, [n, c, warm, _]) in &rows {
        let (r, rw) = (ratio(n, c), ratio(n, warm));
        ratios.extend(r.map(|r| (p, path, r)));
        warm_ratios.extend(rw.map(|r| (p, path, r)));
        writeln!(
            w,
            "| {p} | {path} | {} | {} | {} | {} | {} |",
            est_cell(n),
            est_cell(c),
            cell(r),
            est_cell(warm),
            cell(rw)
        )?;
    }
    // The same native path built with the software AES/SHA the guest is limited to (./dev
    // bench builds it separately): what is left of the ratio is the sandbox's own cost.
    let mut soft_ratios = Vec::new();
    if crit.keys().any(|k| k.contains("/native-soft/")) {
        writeln!(
            w,
            "\nThe native path again, built with the portable software AES, SHA-1 and SHA-256 \
             that the component runs (`--features soft-crypto`, `RUSTFLAGS=\"--cfg \
             aes_force_soft\"`; natively the crates otherwise use AES-NI and SHA-NI). Against \
             it, the warm instance's ratio is the sandbox's own cost (cranelift's code, a \
             component built mostly for size, copies across the WIT boundary, host calls); the \
             rest of the ratio above is the missing crypto instructions. One difference stays: \
             natively the software AES is the crate's 64-bit fixsliced code, in wasm32 its \
             32-bit one.\n"
        )?;
        writeln!(
            w,
            "| platform | path | native | native, software crypto | warm instance | warm ÷ software-crypto native |\n\
             |---|---|---|---|---|---|"
        )?;
        for &(p, path, [n, _, warm, soft]) in &rows {
            let r = ratio(soft, warm);
            soft_ratios.extend(r.map(|r| (p, path, r)));
            writeln!(
                w,
                "| {p} | {path} | {} | {} | {} | {} |",
                est_cell(n),
                est_cell(soft),
                est_cell(warm),
                cell(r)
            )?;
        }
    }
    let disk = get("callback/feishu/component-disk/fresh");
    let in_memory = get("callback/feishu/component/fresh");
    writeln!(
        w,
        "\nFeishu fresh with the database on disk (durable commit): {}.\n",
        est_cell(disk)
    )?;
    let paired = read_json(&bench_dir.join("ratio.json"));
    let paired_soft = read_json(&bench_dir.join("ratio-soft.json"));
    if let Some(paired) = &paired {
        let (p_ratios, p_warm, p_soft) = paired_section(w, paired, paired_soft.as_ref())?;
        // The paired ratios are the better measurement of the two (see the section's text),
        // so the target is judged on them.
        ratios = p_ratios;
        warm_ratios = p_warm;
        if !p_soft.is_empty() {
            soft_ratios = p_soft;
        }
    }
    let excluded = match read_json(&bench_dir.join("ratio-nocrypto.json")) {
        Some(v) => excluded_section(w, &v)?,
        None => Default::default(),
    };

    // ---- payloads ----
    writeln!(
        w,
        "## Payload building: native vs in the component\n\n\
         What start-approval and notify build before they send: the request body from an \
         engine's approval request or notification, serialised to the bytes sent \
         (`bench/guest`: `imbridge_payload_guest::run`, the plugin's own builders). The \
         plugin's exports cannot build a payload without sending it, so for the component side \
         the same function is built into a component of its own, `target/payload-guest.wasm`, \
         exactly as the plugin is built (opt-level 3, the capped inliner, wasm-opt, the same \
         allocator), and run in an engine configured as the host's. Native, criterion:\n"
    )?;
    writeln!(w, "| builder | time |\n|---|---|")?;
    for (id, est) in crit.iter().filter(|(k, _)| k.starts_with("payload/")) {
        writeln!(
            w,
            "| `{}` | {} |",
            id.trim_start_matches("payload/"),
            est_cell(Some(est))
        )?;
    }
    writeln!(w)?;
    if let Some(v) = read_json(&bench_dir.join("payloads.json")) {
        payload_section(w, &v)?;
    }

    // ---- host ----
    writeln!(w, "## Host costs\n")?;
    writeln!(w, "| what | time |\n|---|---|")?;
    for (id, what) in [
        (
            "host-compile/compile",
            "compile (`Component::new`, cranelift, parallel)",
        ),
        (
            "host/load-precompiled/deserialize",
            "load the precompiled artifact (`Component::deserialize_file`)",
        ),
        (
            "host/load-precompiled/cache",
            "load via `ComponentCache` from disk (sha256 of the wasm + deserialize), as on host restart",
        ),
        (
            "host/instantiate",
            "instantiate from `InstancePre` (pooling), fresh store",
        ),
        (
            "host/instantiate+call",
            "instantiate + an empty-ish call (handle-callback refused before any work)",
        ),
        (
            "host/host-call",
            "the same through `Host::call` (slot, WASI/HTTP context, epoch deadline, commit hand-off)",
        ),
    ] {
        writeln!(w, "| {what} | {} |", est_cell(get(id)))?;
    }
    writeln!(w)?;
    if let Some(p) = costs
        .as_ref()
        .map(|c| &c["paired"])
        .filter(|p| p.is_object())
    {
        writeln!(
            w,
            "The last three again, paired (`target/release/hostcosts`, run before every other \
             phase: minutes of full load slow this VM down by up to 2×): criterion runs them \
             seconds apart, and this VM's speed drifts over seconds, so here each of {} rounds \
             runs one batch of {} of each, in a new order. Median of the rounds' per-call \
             means, 10th–90th percentile in brackets; the target below is judged on these.\n",
            p["rounds"], p["batch"]
        )?;
        writeln!(w, "| what | per call |\n|---|---|")?;
        for (k, what) in [
            (
                "instantiate",
                "instantiate from `InstancePre` (pooling), fresh store",
            ),
            ("instantiate_call", "instantiate + an empty-ish call"),
            ("host_call", "the same through `Host::call`"),
            (
                "host_call_minus_raw",
                "what `Host::call` adds, within each round",
            ),
        ] {
            writeln!(w, "| {what} | {} |", paired_cell(&p[k]))?;
        }
        writeln!(w)?;
    }
    if let Some(c) = &costs {
        let s = &c["swap"];
        let row = |v: &Value| {
            format!(
                "{} calls, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                v["n"],
                v["p50_us"].as_f64().unwrap_or(0.0),
                v["p99_us"].as_f64().unwrap_or(0.0),
                v["max_us"].as_f64().unwrap_or(0.0)
            )
        };
        writeln!(
            w,
            "Replacing tenant `a`'s plugin while four callers keep tenants `b` and `c` busy with \
             empty-ish calls (`target/release/hostcosts`):\n"
        )?;
        writeln!(
            w,
            "| phase | swap took | other tenants' calls |\n|---|---|---|"
        )?;
        writeln!(
            w,
            "| no swap (2 s baseline) | – | {} |",
            row(&s["baseline"])
        )?;
        for (k, label) in [
            ("precompiled", "swap to a cached (precompiled) version"),
            ("compile", "swap to a new version (compiles)"),
        ] {
            writeln!(
                w,
                "| {label} | {:.1} ms | {} |",
                s[k]["swap_ms"].as_f64().unwrap_or(0.0),
                row(&s[k]["others"])
            )?;
        }
        let m = &c["memory"];
        writeln!(
            w,
            "\nMemory per live instance ({} instances alive at once, RSS delta): {:.0} KiB idle, \
             {:.0} KiB after each handled a Feishu callback (the pooling allocator reserves \
             address space per slot up front; only touched pages count here).\n",
            m["instances"],
            m["idle_per_instance_kib"].as_f64().unwrap_or(0.0),
            m["after_call_per_instance_kib"].as_f64().unwrap_or(0.0)
        )?;
    }

    // ---- size ----
    let wasm_bytes = std::fs::metadata(ws.join("target/imbridge.wasm"))
        .map(|m| m.len())
        .ok();
    writeln!(w, "## Component size\n")?;
    if let Some(b) = wasm_bytes {
        writeln!(
            w,
            "`target/imbridge.wasm` as built by `./dev build`: **{b} bytes** ({:.1} KB). \
             Where `./dev build` builds std itself (Debian's Rust; not with rustup's \
             prebuilt std), panics abort immediately and carry no location (`-Cpanic=immediate-abort \
             -Zlocation-detail=none`): wasm32-unknown-unknown has no stderr, so a panic \
             message was never seen, only the trap; dropping the formatting saved 21,496 \
             bytes (391,927 → 370,431 on 2026-12-03). std is also built with its smaller \
             implementations (`-Zbuild-std-features=optimize_for_size`) and the core module \
             goes through `wasm-opt -Oz` rather than `-Os`: 2,079 bytes less together \
             (399,978 → 397,899 on 2026-12-08), no callback slower by more than 2% in \
             interleaved `abwarm` runs.\n",
            b as f64 / 1000.0
        )?;
    }
    if let Some(s) = &sizes {
        writeln!(
            w,
            "Profile experiment (`bench/sizes.sh`, run by `./dev bench sizes`; core module built \
             with each `[profile.component]` variant, then componentized; `wasm-opt -Oz` from \
             Debian's binaryen {} on the core module before componentizing):\n",
            s["wasm_opt_version"].as_str().unwrap_or("?")
        )?;
        writeln!(
            w,
            "| variant | component bytes | + wasm-opt -Oz |\n|---|---|---|"
        )?;
        for v in s["variants"].as_array().into_iter().flatten() {
            writeln!(
                w,
                "| {} | {} | {} |",
                v["name"].as_str().unwrap_or(""),
                v["bytes"],
                v["wasm_opt_bytes"]
            )?;
        }
        writeln!(w)?;
    }

    // ---- load test ----
    writeln!(
        w,
        "## Load test: `imbridge-host serve` vs the official Feishu SDK\n"
    )?;
    if let Some(l) = &load {
        writeln!(
            w,
            "`target/release/loadtest`: {} pre-generated, valid, signed, encrypted decision \
             callbacks per platform, each with its own event id about its own pending instance \
             (records seeded before the server starts), fired by `{}`. The server runs with its \
             default configuration (durable redb state in the state directory, per-call log \
             line to a file); every applied update is also written to the durable outbox. The \
             peer is `bench/peer/feishu_peer.py`: lark-oapi {} `EventDispatcherHandler.do` \
             behind Python's `ThreadingHTTPServer` (decrypt, token and signature check, \
             dispatch; no state, no dedup, no outbox — strictly less work). The request files \
             are formatted for the wire, split per wrk thread and synced to disk before the \
             server starts, so neither wrk's setup nor their writeback lands in a measured \
             phase.\n\n\
             The latencies are wrk's, and wrk (4.x, `stats_correct`) corrects them for \
             coordinated omission before reporting any: a closed-loop connection sends nothing \
             while its request is stuck, so for every sample of at least two intervals between \
             one connection's requests wrk also counts the requests that would have arrived \
             meanwhile (at that sample minus one interval, minus two, …). The percentiles are \
             therefore those of callbacks that keep arriving at the measured rate whatever the \
             server's latency, as the platforms' do: the share above a latency x is about the \
             share of the run's time the server spent stalled beyond x. Without the correction \
             a 300 ms stall would be 16 slow samples out of 50,000; with it, it is the ~1,500 \
             callbacks that would have arrived during it. (`--client loadgen` applies the same \
             correction and also reports the uncorrected figures.)\n",
            l["requests_per_platform"],
            l["command"].as_str().unwrap_or(""),
            l["lark_oapi_version"].as_str().unwrap_or("?")
        )?;
        let runs = l["runs"].as_array().map_or(1, Vec::len);
        if runs > 1 {
            writeln!(
                w,
                "Each figure is the median over {runs} complete runs, each on a fresh database; \
                 requests/s and p99 give the smallest and largest run in brackets; non-2xx responses, socket errors \
                 and slow commits are those of all runs together.\n"
            )?;
        }
        writeln!(
            w,
            "| server | platform | requests/s | p50 | p90 | p99 | max | non-2xx | socket errors | slow commits | load before |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for (k, r) in in_run_order(l) {
            let (server, platform) = k.split_once('/').unwrap_or((k, ""));
            let ms = |f: &str| format!("{:.2} ms", r[f].as_f64().unwrap_or(0.0) / 1000.0);
            // Over several runs: the median, then the smallest and largest in brackets.
            let range = |lo: &str, hi: &str, scale: f64, digits: usize| match (
                r[lo].as_f64(),
                r[hi].as_f64(),
            ) {
                (Some(lo), Some(hi)) if runs > 1 => {
                    format!(" ({:.digits$}–{:.digits$})", lo / scale, hi / scale)
                }
                _ => String::new(),
            };
            let load_before = match &r["loadavg_before"] {
                Value::Array(each) => each
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("; "),
                other => other.as_str().unwrap_or("").to_string(),
            };
            let sock = [
                "errors_connect",
                "errors_read",
                "errors_write",
                "errors_timeout",
            ]
            .iter()
            .map(|f| r[*f].as_u64().unwrap_or(0))
            .sum::<u64>();
            writeln!(
                w,
                "| {server} | {platform} | {:.0}{}{} | {} | {} | {}{} | {} | {} | {sock} | {} | {load_before} |",
                r["rps"].as_f64().unwrap_or(0.0),
                range("rps_min", "rps_max", 1.0, 0),
                if r["wrapped"].as_bool() == Some(true) {
                    " (wrapped: repeats are duplicates)"
                } else {
                    ""
                },
                ms("p50_us"),
                ms("p90_us"),
                ms("p99_us"),
                range("p99_min_us", "p99_max_us", 1000.0, 2),
                ms("max_us"),
                r["errors_status"],
                slow_commits(&r["slow_commits"]),
            )?;
        }
        writeln!(
            w,
            "\nOutbox records written (one per applied update), per run: {}. *Slow \
             commits*: the server's `store: slow commit` log lines during that platform's runs, \
             each a batch of calls whose one durable redb transaction took ≥ {slow:.0} ms (as \
             calls × ms); every call in flight waits for it, and so would every callback \
             arriving meanwhile. Rows are in the order the platforms ran; within a run they \
             share one server and one growing database.\n",
            l["runs"]
                .as_array()
                .map(|each| each
                    .iter()
                    .map(|r| r["outbox_records"].to_string())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_else(|| l["outbox_records"].to_string()),
            slow = slow_commit_ms(),
        )?;
        stall_table(w, l)?;
    }

    // ---- targets ----
    writeln!(w, "## Targets\n")?;
    writeln!(w, "| target | measured | status |\n|---|---|---|")?;
    // The largest ratio on a path ("fresh": the one judged), and every ratio as text.
    let worst_on = |rs: &[(&str, &str, f64)], path: &str| {
        rs.iter()
            .filter(|r| r.1 == path)
            .map(|r| r.2)
            .fold(None::<f64>, |a, r| Some(a.map_or(r, |a: f64| a.max(r))))
    };
    let worst = |rs: &[(&str, &str, f64)]| worst_on(rs, "fresh");
    let listed = |rs: &[(&str, &str, f64)]| {
        rs.iter()
            .map(|(p, path, r)| format!("{p} {path} {r:.1}×"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (worst_ratio, ratio_text) = (worst(&ratios), listed(&ratios));
    let (warm_worst, warm_text) = (worst(&warm_ratios), listed(&warm_ratios));
    writeln!(
        w,
        "| in-component callback handling ≤ 2× native | {}: fresh instance per call (as \
         served): {ratio_text}; on a warm instance (handling alone): {warm_text} | {} |",
        if paired.is_some() {
            "paired medians (`target/release/ratio`)"
        } else {
            "criterion medians"
        },
        met(worst_ratio.map(|r| r <= RATIO_TARGET))
    )?;
    // Judged on the path engines use, `Host::call`, where the paired figures exist; else on
    // criterion's raw loop (`Host::call`'s own criterion median drifts too far from it).
    let paired_hc = paired_ns(costs.as_ref(), "host_call");
    let (source, ic, hc, judged) = match paired_hc {
        Some(hc) => {
            let ic = paired_ns(costs.as_ref(), "instantiate_call");
            ("paired medians", ic, Some(hc), Some(hc))
        }
        None => {
            let ic = get("host/instantiate+call").map(|e| e.median);
            let hc = get("host/host-call").map(|e| e.median);
            ("criterion medians", ic, hc, ic)
        }
    };
    writeln!(
        w,
        "| instantiate + call overhead ≤ 20 µs | {source}: raw {}; through `Host::call` {} | {} |",
        ic.map_or("–".into(), time),
        hc.map_or("–".into(), time),
        met(judged.map(|t| t <= 20_000.0))
    )?;
    let pl = get("host/load-precompiled/cache").map(|e| e.median);
    writeln!(
        w,
        "| precompiled load ≤ 5 ms | {} | {} |",
        pl.map_or("–".into(), time),
        met(pl.map(|t| t <= 5e6))
    )?;
    let mut load_ok = None;
    // Single runs that missed the load target, whatever the medians say.
    let mut runs_missed = Vec::new();
    let mut load_text = Vec::new();
    let mut feishu_rps = None;
    let mut peer_rps = None;
    if let Some(l) = &load {
        for (k, r) in l["results"].as_object().into_iter().flatten() {
            let (rps, p99, ok) = load_target(r);
            if k == "lark-oapi/feishu" {
                peer_rps = Some(rps);
                continue;
            }
            if k == "imbridge/feishu" {
                feishu_rps = Some(rps);
            }
            load_text.push(format!(
                "{} {rps:.0}/s p99 {p99:.1} ms",
                k.trim_start_matches("imbridge/")
            ));
            load_ok = Some(load_ok.unwrap_or(true) && ok);
        }
        for (run, platform, r) in imbridge_runs(l) {
            let (rps, p99, ok) = load_target(r);
            if !ok {
                runs_missed.push(format!("run {run} {platform} {rps:.0}/s p99 {p99:.1} ms"));
            }
        }
    }
    writeln!(
        w,
        "| ≥ 5,000 durable callbacks/s through `serve`, p99 ≤ 10 ms | {} | {} |",
        load_text.join("; "),
        met(load_ok)
    )?;
    let peer_ratio = feishu_rps.zip(peer_rps).map(|(a, b)| a / b.max(1e-9));
    writeln!(
        w,
        "| ≥ 10× the Python SDK peer's throughput | {} | {} |",
        peer_ratio.map_or("–".into(), |r| format!(
            "{r:.1}× ({:.0}/s vs {:.0}/s)",
            feishu_rps.unwrap_or(0.0),
            peer_rps.unwrap_or(0.0)
        )),
        met(peer_ratio.map(|r| r >= 10.0))
    )?;
    writeln!(
        w,
        "| component ≤ 400 KB | {} | {} |\n",
        wasm_bytes.map_or("–".into(), |b| format!("{b} bytes")),
        met(wasm_bytes.map(|b| b <= 400_000))
    )?;

    // ---- what bounds the misses ----
    writeln!(w, "## What bounds the numbers\n")?;
    writeln!(
        w,
        "- **What the per-call numbers rest on.** The guest allocates from a 384 KiB bump arena \
         in its own `.bss` that rewinds whenever nothing in it is live, as at the end of every \
         call (src/alloc.rs; talc serves only what outgrows it, on grown memory): against talc \
         over the same arena, callbacks are 2–6% faster through `Host::call` and 5–9% on a \
         warm instance (`target/release/abwarm [--fresh]`, 300 interleaved rounds, \
         2026-12-04). It runs on a 512 KiB stack (build.rs), so stack, \
         data and a typical call's heap sit inside the memory the module starts with and inside \
         the 1 MiB each pool slot keeps resident: a call never grows linear memory, so the host \
         never has to `mprotect` the grown pages away again before the slot's next instance \
         (with Rust's default allocator that `mprotect` made the kernel flush the TLB of every \
         core on every call, ~8% of a call's time, and the heap pages were refaulted each time). \
         The engine keeps wasmtime's default 4 GiB reservation per memory slot so compiled code \
         needs no bounds checks, and the component is built at opt-level 3 with LLVM's inline \
         threshold at 120 instead of that level's 225 (Cargo.toml, ./dev): 3–10% slower on a \
         warm instance than with 225 but under 400 KB, where opt-level s was about 20% slower \
         than 120 on a warm instance (interleaved A/B with `target/release/abwarm`, 2026-12-03); the WeCom \
         XML tree borrows its names and text from the decrypted document, and decryption runs \
         in the buffer base64 decoded into. Commits are awaited on the \
         group committer directly instead of from a blocking thread. The host binary allocates \
         with mimalloc: 8–11% more durable callbacks/s through `serve` than with glibc's \
         allocator (5 interleaved load-test pairs per platform, 2026-12-03), and a \
         single-threaded instantiate + call loop is no slower with it (`host/instantiate+call` \
         built both ways, 5 interleaved pairs on 2026-12-04: medians 15.9 µs with mimalloc, \
         17.2 µs with glibc, each faster in some pairs).\n"
    )?;
    if worst_ratio.is_some_and(|r| r > RATIO_TARGET) {
        let inst = paired_hc
            .or_else(|| get("host/host-call").map(|e| e.median))
            .unwrap_or(0.0);
        writeln!(
            w,
            "- **In-component ≤ 2× native — missed.** Two parts, measured apart. The per-call \
             instance: a fresh instance plus call machinery costs {} through `Host::call`, paid \
             on every callback regardless of work, against a native handler of a few µs. The \
             handling itself: even on an instance that already exists (the *warm instance* \
             column) the guest's work alone is {}. The \
             guest's work is slower because the aes and sha2 crates have no wasm32 backend \
             besides their portable software one (natively they use AES-NI/SHA-NI; wasm has no \
             such instructions), cranelift's code is less optimised than LLVM's, the inliner \
             is held below opt-level 3's default to stay under 400 KB, \
             and request, reply and every KV value cross the WIT boundary by copy.{} What \
             would lift part of it: \
             reusing instances (removes only the first part, and this host refuses it on purpose: \
             a fresh instance per call is its isolation guarantee), and crypto that wasm can \
             run fast: a host import for AES-CBC and the digests (outside the standard WASI \
             interfaces this component is limited to), since wasm SIMD has no AES instructions \
             either and table-based AES would be fast but not constant-time, which is not \
             acceptable for the platforms' keys.{}\n",
            time(inst),
            match (warm_worst, worst_on(&warm_ratios, "duplicate")) {
                (Some(f), Some(d)) => format!(
                    "up to {f:.1}× native for a new event (up to {d:.1}× for a duplicate delivery)"
                ),
                (Some(f), None) => format!("up to {f:.1}× native"),
                _ => "–".into(),
            },
            soft_split(&soft_ratios),
            excluded_split(&excluded.0, &excluded.1)
        )?;
    }
    if ic.is_some_and(|t| t > 20_000.0) {
        writeln!(
            w,
            "- **Instantiate + call ≤ 20 µs — missed.** A fresh store + instance per call from \
             `InstancePre` costs {} alone (memory slot, tables, the componentized module's \
             core instances, WASI context); the empty call adds lifting and lowering. Lifting it \
             further means reusing instances across calls, which this host refuses on purpose.\n",
            get("host/instantiate").map_or("–".into(), |e| time(e.median))
        )?;
    }
    if pl.is_some_and(|t| t > 5e6) {
        writeln!(
            w,
            "- **Precompiled load ≤ 5 ms — missed.** Bounded by mapping and relocating the artifact; see the deserialize row.\n"
        )?;
    }
    // Written when the target is met too: the p99 rests on the disk of the run, and the next
    // run's may be slower.
    if let Some(ok) = load_ok {
        let all_met = ok && runs_missed.is_empty();
        let verdict = if !ok {
            "missed".to_string()
        } else if all_met {
            "met in every run".to_string()
        } else {
            format!(
                "met in the median of the runs, missed in {} of them ({})",
                runs_missed.len(),
                runs_missed.join("; ")
            )
        };
        let lift = if all_met {
            "This run's disk stayed within that budget; a disk with longer fsync stalls would \
             not, and the server's `store: slow commit` log lines say when that happens."
        } else {
            "What would lift it: a disk whose fsync stays under 10 ms."
        };
        let fsync = match (disk, in_memory) {
            (Some(d), Some(t)) => format!(
                "The same Feishu callback costs {} in the component with the in-memory store \
                 and {} with the database on disk and nothing else running, so about {} of a \
                 lone callback is the durable commit",
                time(t.median),
                time(d.median),
                time((d.median - t.median).max(0.0))
            ),
            _ => "The durable commit dominates a lone callback".into(),
        };
        writeln!(
            w,
            "- **≥ 5,000 durable callbacks/s, p99 ≤ 10 ms — {verdict}.** {fsync}. Under load that \
             commit is shared: the embedded store's group committer \
             (host-test/src/store/group_commit.rs) applies the commits of all concurrent calls \
             in one redb write transaction with one fsync and answers each call once its batch \
             is durable, so throughput is bounded by CPU: the plugin calls and HTTP handling on \
             the tokio workers, and the committer's copy-on-write B-tree updates, page \
             checksums and the block I/O of its fsyncs (in a VM each I/O submission can also \
             cost a VM exit), on 2 cores that the load generator shares. \
             The p99 is bounded by the disk: with callbacks arriving at a steady rate (see the \
             correction above), p99 ≤ 10 ms needs the commits' time beyond 10 ms to stay under \
             1% of the run, 100 ms of a 10 s run, and a single 110 ms fsync or four of 35 ms \
             use that up. The per-run table above puts the slow commits next to the p99 wrk \
             measured; where they exceed the budget they account for it. {lift} The server \
             cannot hide a stalled fsync without \
             answering before the callback is durable, which would lose approvals on a crash. \
             (A p99 of 25–90 ms that \
             earlier runs showed in whichever phase ran third was the load test's own request \
             files — several hundred MB — being written back by the kernel 30 s after they \
             were written, during that phase; the load test now syncs them before the server \
             starts.)\n"
        )?;
    }
    if peer_ratio.is_some_and(|r| r < 10.0) {
        writeln!(
            w,
            "- **≥ 10× the Python SDK peer — missed.** The peer keeps no state, so it never \
             fsyncs; imbridge's throughput is bounded by the CPU per callback (above), on the \
             same 2 cores as wrk and the peer's own server.\n"
        )?;
    }
    if wasm_bytes.is_some_and(|b| b > 400_000) {
        writeln!(
            w,
            "- **Component ≤ 400 KB — missed.** See the profile experiment above for what the \
             compiler settings and wasm-opt achieve. The remainder is code: serde_json \
             (de)serialisation monomorphised per type, quick-xml, three platforms' payload \
             builders, AES/SHA/HMAC, and std's formatting and panic machinery.\n"
        )?;
    }
    writeln!(
        w,
        "- Load generator, server and peer share the same 2 cores, so every throughput number \
         here is also bounded by wrk's own CPU use.\n"
    )?;

    let out = ws.join("BENCHMARKS.md");
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_host_costs_are_read_in_ns_and_absent_without_a_paired_run() {
        let costs = serde_json::json!({"paired": {"host_call": {"median": 13.5, "p10": 12.0, "p90": 16.25}}});
        assert_eq!(paired_ns(Some(&costs), "host_call"), Some(13_500.0));
        assert_eq!(paired_ns(Some(&costs), "instantiate"), None);
        assert_eq!(
            paired_ns(Some(&serde_json::json!({"swap": {}})), "host_call"),
            None
        );
        assert_eq!(paired_ns(None, "host_call"), None);
        assert_eq!(
            paired_cell(&costs["paired"]["host_call"]),
            "13.5 µs (12.0 µs–16.2 µs)"
        );
    }

    #[test]
    fn implied_p99_is_where_the_stalls_use_up_one_percent_of_the_run() {
        // One 156 ms commit in a 10 s run: 1% is 100 ms, so x = 56 ms.
        let x = implied_p99(&[156.0], 10_000.0).unwrap();
        assert!((x - 56.0).abs() < 0.01, "{x}");
        // Two equal stalls share the budget: 2 × (150 - x) = 50 → x = 125.
        let x = implied_p99(&[150.0, 150.0], 5_000.0).unwrap();
        assert!((x - 125.0).abs() < 0.01, "{x}");
        // Past 341 ms only the 524 ms commit counts: 524 - x = 100 → x = 424.
        let x = implied_p99(&[341.0, 524.0, 30.0], 10_000.0).unwrap();
        assert!((x - 424.0).abs() < 0.01, "{x}");
        // Within the budget at the logging threshold: the log cannot say.
        assert_eq!(implied_p99(&[110.0], 10_000.0), None);
        assert_eq!(implied_p99(&[], 10_000.0), None);
    }

    #[test]
    fn stalls_are_read_from_the_load_tests_json() {
        let v = serde_json::json!([{"calls": 3, "ms": 26}, {"calls": 1, "ms": 159}]);
        assert_eq!(stalls(&v), [26.0, 159.0]);
        assert_eq!(beyond(&stalls(&v), 10.0), 16.0 + 149.0);
        assert!(stalls(&Value::Null).is_empty());
    }

    #[test]
    fn payload_rows_follow_the_builders_and_skip_what_was_not_measured() {
        let r = |m: f64| serde_json::json!({"median": m, "p10": m - 0.1, "p90": m + 0.1});
        let v = serde_json::json!({"rounds": 10, "batch": 64, "results": {
            "wecom/notify/robot_bodies": {"bytes": 440, "ratio": r(2.0), "per_call_ratio": r(2.5),
                "us": {"native": r(5.0), "component": r(10.0), "component-per-call": r(12.5)}},
            "feishu/start/instance_body": {"bytes": 488, "ratio": r(1.9), "per_call_ratio": r(2.2),
                "us": {"native": r(7.0), "component": r(13.3), "component-per-call": r(15.4)}},
        }});
        let mut w = String::new();
        payload_section(&mut w, &v).unwrap();
        let rows: Vec<&str> = w.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(
            rows,
            [
                "| `feishu/start/instance_body` | 488 | 7.0 µs | 13.3 µs | 1.9× (1.8–2.0) | 15.4 µs | 2.2× (2.1–2.3) |",
                "| `wecom/notify/robot_bodies` | 440 | 5.0 µs | 10.0 µs | 2.0× (1.9–2.1) | 12.5 µs | 2.5× (2.4–2.6) |",
            ]
        );
        assert!(
            w.contains("each of 10 rounds runs one batch of 64 payloads"),
            "{w}"
        );
    }

    #[test]
    fn the_crypto_excluded_verdict_follows_the_warm_ratios() {
        let fresh = [("feishu", "fresh", 5.7), ("wecom", "duplicate", 4.1)];
        assert_eq!(span(&fresh), Some((4.1, 5.7)));
        assert_eq!(span(&[]), None);
        let above = excluded_split(&fresh, &[("feishu", "fresh", 2.8), ("x", "y", 1.6)]);
        assert!(above.contains("Neither is enough"), "{above}");
        assert!(above.contains("up to 2.8× native (1.6–2.8×)"), "{above}");
        assert!(above.contains("fresh one 4.1–5.7×"), "{above}");
        let within = excluded_split(&fresh, &[("feishu", "fresh", 1.9), ("x", "y", 1.4)]);
        assert!(within.contains("Both together would be"), "{within}");
        assert!(within.contains("1.4–1.9× native"), "{within}");
        // Not measured: no sentence at all rather than one about nothing.
        assert_eq!(excluded_split(&[], &[]), "");
        assert_eq!(excluded_split(&fresh, &[]), "");
    }
}
