//! Load test of `imbridge-host serve` with a real HTTP load generator (wrk), and of the
//! official Feishu SDK (lark-oapi) as a peer, in one run.
//!
//! 1. Pre-generates, per platform, `--requests` valid, signed, encrypted callbacks, each with
//!    its own event id about its own pending instance, and seeds those instances' records into
//!    the state database (so every callback takes the full update path: load, apply, save,
//!    outbox).
//! 2. Starts `imbridge-host serve` (durable redb state, default config and logging, stderr
//!    to a file) and fires each platform's callbacks with wrk through `bench/loadtest.lua`
//!    (or, with `--client loadgen`, with `loadgen`, which keeps every request's timing).
//! 3. Starts `bench/peer/feishu_peer.py` (lark-oapi's `EventDispatcherHandler` behind
//!    Python's `ThreadingHTTPServer`) and fires the same Feishu callbacks at it.
//! 4. Stops the server and counts the outbox records the run produced (each update is one).
//!
//! Does all of it `--runs` times (default 3, each on a fresh database) and writes one JSON
//! object to `--out`: every run, and per server/platform the median and range over the runs.

use anyhow::{Context as _, Result, bail};
use imbridge::model::Platform;
use imbridge_bench::workspace;
use imbridge_bench::{PLATFORMS, app_json, callback, instance_id, now_ms, seed_record};
use imbridge_host::store::{Backend as _, Store};
use serde_json::{Value, json};
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    duration: u64,
    connections: u64,
    threads: u64,
    requests: u64,
    host_bin: PathBuf,
    out: PathBuf,
    /// Which platforms, in this order (default: all three).
    platforms: Vec<Platform>,
    /// Complete runs (each on a fresh database); the report shows the median and the range.
    runs: u64,
    client: Client,
}

/// The load generator.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    Wrk,
    /// bench/src/bin/loadgen.rs, which also writes every request's timing to
    /// `target/bench/load/<server>-<platform>.trace.csv`.
    Loadgen,
}

fn args() -> Result<Args> {
    let ws = workspace();
    let mut a = Args {
        duration: 10,
        connections: 16,
        threads: 2,
        requests: 150_000,
        host_bin: ws.join("target/release/imbridge-host"),
        out: ws.join("target/bench/load.json"),
        platforms: PLATFORMS.to_vec(),
        client: Client::Wrk,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().context("missing value");
        match flag.as_str() {
            "--duration" => a.duration = val()?.parse()?,
            "--connections" => a.connections = val()?.parse()?,
            "--threads" => a.threads = val()?.parse()?,
            "--requests" => a.requests = val()?.parse()?,
            "--host-bin" => a.host_bin = val()?.into(),
            "--out" => a.out = val()?.into(),
            "--client" => {
                a.client = match val()?.as_str() {
                    "wrk" => Client::Wrk,
                    "loadgen" => Client::Loadgen,
                    other => bail!("unknown client {other} (wrk or loadgen)"),
                }
            }
            "--runs" => a.runs = val()?.parse::<u64>()?.max(1),
            "--platforms" => {
                a.platforms = val()?
                    .split(',')
                    .map(|name| {
                        PLATFORMS
                            .into_iter()
                            .find(|p| p.name() == name)
                            .with_context(|| format!("unknown platform {name}"))
                    })
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Kills the child (ours, by pid) when dropped, so a failed run leaves no server behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `server` to answer 200 on `path`; a server that exits meanwhile fails at once,
/// pointing at its log.
fn wait_healthy(server: &mut Guard, port: u16, path: &str, log: &Path) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(status) = server.0.try_wait()? {
            bail!(
                "server for port {port} exited ({status}) before it was healthy; see {}",
                log.display()
            );
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).is_ok() {
                let mut buf = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut buf);
                if buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200") {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("server on port {port} did not become healthy")
}

/// The requests as they go on the wire, split the way the clients' threads take them: thread
/// k of `threads` sends requests k, k+threads, … from `{prefix}.{k}`, each record a decimal
/// length, a newline and that many bytes. Formatted here rather than in wrk's Lua `init`, which
/// wrk runs for one thread after another while the threads already started are sending: with a
/// 200 MB file that took over a second per thread and skewed the first second of every run.
fn write_requests(
    prefix: &Path,
    threads: u64,
    target: &str,
    host: &str,
    pushes: &[imbridge_bench::Push],
) -> Result<()> {
    let mut files = (0..threads)
        .map(|k| {
            let name = format!("{}.{k}", prefix.display());
            Ok(std::io::BufWriter::new(std::fs::File::create(name)?))
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, p) in pushes.iter().enumerate() {
        let t = if p.query.is_empty() {
            target.to_string()
        } else {
            format!("{target}?{}", p.query)
        };
        let mut req = format!("POST {t} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in &p.headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", p.body.len()));
        let mut req = req.into_bytes();
        req.extend_from_slice(&p.body);
        let n = files.len();
        let f = &mut files[i % n];
        writeln!(f, "{}", req.len())?;
        f.write_all(&req)?;
    }
    // Durable before the server starts: otherwise the kernel writes these hundreds of MB back
    // 30 s later (vm.dirty_expire_centisecs), in the middle of a measured phase, where that
    // disk traffic slowed the server's fsyncs and showed as a p99 tail in whichever phase it hit.
    for f in files {
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(())
}

/// Runs the load generator against `url` with the requests in `reqs` (see `write_requests`);
/// `loadgen` also writes every request's timing to `trace`.
fn fire(a: &Args, url: &str, reqs: &Path, trace: &Path, generated: u64) -> Result<Value> {
    let out = if a.client == Client::Loadgen {
        let addr = url
            .strip_prefix("http://")
            .and_then(|u| u.split('/').next())
            .context("url")?;
        Command::new(workspace().join("target/release/loadgen"))
            .args(["--addr", addr, "--duration", &a.duration.to_string()])
            .args(["--connections", &a.connections.to_string()])
            .args(["--threads", &a.threads.to_string()])
            .arg("--reqs")
            .arg(reqs)
            .arg("--trace")
            .arg(trace)
            .output()
            .context("running target/release/loadgen")?
    } else {
        let script = workspace().join("bench/loadtest.lua");
        Command::new("wrk")
            .args([
                "-t",
                &a.threads.to_string(),
                "-c",
                &a.connections.to_string(),
            ])
            .args(["-d", &format!("{}s", a.duration), "--timeout", "10s"])
            .arg("-s")
            .arg(&script)
            .arg(url)
            .env("REQS", reqs)
            .output()
            .context("running wrk (apt-get install wrk)")?
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("JSON "))
        .with_context(|| {
            format!(
                "no result from wrk: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let mut v: Value = serde_json::from_str(line)?;
    let requests = v["requests"].as_f64().unwrap_or(0.0);
    let secs = v["duration_us"].as_f64().unwrap_or(1.0) / 1e6;
    v["rps"] = json!(requests / secs);
    // Past the pre-generated set the script starts over, and repeats are duplicates.
    v["generated"] = json!(generated);
    v["wrapped"] = json!(requests as u64 > generated);
    Ok(v)
}

/// The server's `store: slow commit` lines written after byte `from` of its log: each is one
/// batch of commits whose durable transaction (fsync) took at least 20 ms.
fn slow_commits(log: &Path, from: u64) -> Result<Vec<Value>> {
    let text = std::fs::read(log)?;
    let tail = text.get(from as usize..).unwrap_or_default();
    Ok(String::from_utf8_lossy(tail)
        .lines()
        .filter_map(|l| l.split_once("store: slow commit: ").map(|(_, rest)| rest))
        .filter_map(|rest| {
            // "N call(s) waited M ms for one durable transaction"
            let mut words = rest.split_whitespace();
            let calls: u64 = words.next()?.parse().ok()?;
            let ms: u64 = words.nth(2)?.parse().ok()?;
            Some(json!({"calls": calls, "ms": ms}))
        })
        .collect())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// One complete run: fresh state, requests, server, every platform, then the peer. Returns
/// `{order, results, outbox_records}`.
fn one_run(a: &Args) -> Result<Value> {
    let dir = workspace().join("target/bench/load");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let tenant = "bench";
    let run = (now_ms() / 1000 % 100_000) as u32;

    // Requests and seeded records. Signed now: the run must start within the 10-minute window.
    let t0 = Instant::now();
    let port = free_port()?;
    let mut files = Vec::new();
    {
        let store = Store::open(&state)?;
        for &p in &a.platforms {
            let now = now_ms();
            let mut seeds = Vec::new();
            let pushes: Vec<_> = (0..a.requests)
                .map(|n| {
                    let inst = instance_id(p, run, n);
                    let (k, v) = seed_record(p, &inst);
                    seeds.push((k, Some(v)));
                    callback(p, run, n, &inst, now)
                })
                .collect();
            store.put(tenant, seeds)?;
            let app = app_json(p)["id"].as_str().unwrap_or_default().to_string();
            let file = dir.join(format!("{}.reqs", p.name()));
            let target = format!("/callback/{tenant}/{app}");
            write_requests(
                &file,
                a.threads,
                &target,
                &format!("127.0.0.1:{port}"),
                &pushes,
            )?;
            files.push((p, app, file));
        }
    }
    eprintln!(
        "generated {} requests per platform in {:.1?}",
        a.requests,
        t0.elapsed()
    );

    let component = workspace().join("target/imbridge.wasm").canonicalize()?;
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "public_url": format!("http://127.0.0.1:{port}"),
        "state_dir": state,
        "component": component,
        "tenants": [{"id": tenant, "apps": PLATFORMS.map(app_json)}],
    });
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_string())?;
    let log_path = dir.join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let mut server = Guard(
        Command::new(&a.host_bin)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", a.host_bin.display()))?,
    );
    wait_healthy(&mut server, port, "/healthz", &log_path)?;

    let mut results = serde_json::Map::new();
    // The map sorts its keys; the report needs the order the runs happened in.
    let mut order = Vec::new();
    for (p, app, file) in &files {
        let url = format!("http://127.0.0.1:{port}/callback/{tenant}/{app}");
        let load_before = loadavg();
        let log_before = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let trace = dir.join(format!("imbridge-{}.trace.csv", p.name()));
        let mut r = fire(a, &url, file, &trace, a.requests)?;
        r["loadavg_before"] = json!(load_before);
        r["slow_commits"] = json!(slow_commits(&log_path, log_before)?);
        eprintln!("imbridge {}: {r}", p.name());
        order.push(format!("imbridge/{}", p.name()));
        results.insert(format!("imbridge/{}", p.name()), r);
    }
    drop(server);

    // What the run did to durable state: each applied update leaves one outbox record.
    let store = Store::open(&state)?;
    let outbox = store.outbox_list(tenant, 0)?.len();
    drop(store);

    // The peer: the same Feishu callbacks through lark-oapi (only Feishu has a peer, so a run
    // without Feishu has none).
    if let Some((_, _, feishu_file)) = files.iter().find(|(p, ..)| *p == Platform::Feishu) {
        let peer_port = free_port()?;
        let feishu = app_json(Platform::Feishu);
        let peer_log = dir.join("peer.log");
        // lark-oapi is installed in the interop tests' venv (./dev); run straight from a
        // shell, the venv is not on PATH.
        let venv_python = workspace().join("target/interop-venv/bin/python3");
        let python = if venv_python.exists() {
            venv_python
        } else {
            PathBuf::from("python3")
        };
        let mut peer = Guard(
            Command::new(python)
                .arg(workspace().join("bench/peer/feishu_peer.py"))
                .args(["--port", &peer_port.to_string()])
                .args([
                    "--encrypt-key",
                    feishu["encrypt_key"].as_str().unwrap_or_default(),
                ])
                .args(["--token", feishu["token"].as_str().unwrap_or_default()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&peer_log)?)
                .spawn()
                .context("starting the Python peer")?,
        );
        wait_healthy(&mut peer, peer_port, "/healthz", &peer_log)?;
        let load_before = loadavg();
        let mut r = fire(
            a,
            &format!("http://127.0.0.1:{peer_port}/callback"),
            feishu_file,
            &dir.join("lark-oapi-feishu.trace.csv"),
            a.requests,
        )?;
        r["loadavg_before"] = json!(load_before);
        eprintln!("lark-oapi feishu: {r}");
        order.push("lark-oapi/feishu".to_string());
        results.insert("lark-oapi/feishu".into(), r);
        drop(peer);
    } else {
        eprintln!("no Feishu callbacks in this run: no lark-oapi peer");
    }

    Ok(json!({"order": order, "results": results, "outbox_records": outbox}))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per server/platform over all runs: the median of each figure, the smallest and largest
/// throughput and p99, the errors and slow commits of all runs together.
fn aggregate(runs: &[Value]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let keys = runs[0]["order"].as_array().cloned().unwrap_or_default();
    for key in keys.iter().filter_map(Value::as_str) {
        let each: Vec<&Value> = runs.iter().map(|r| &r["results"][key]).collect();
        let nums = |f: &str| -> Vec<f64> { each.iter().filter_map(|r| r[f].as_f64()).collect() };
        let min = |v: Vec<f64>| v.into_iter().fold(f64::INFINITY, f64::min);
        let max = |v: Vec<f64>| v.into_iter().fold(f64::NEG_INFINITY, f64::max);
        let mut m = serde_json::Map::new();
        for f in ["rps", "p50_us", "p90_us", "p99_us", "max_us", "mean_us"] {
            m.insert(f.into(), json!(median(nums(f))));
        }
        for f in [
            "requests",
            "errors_connect",
            "errors_read",
            "errors_write",
            "errors_status",
            "errors_timeout",
        ] {
            m.insert(
                f.into(),
                json!(each.iter().filter_map(|r| r[f].as_u64()).sum::<u64>()),
            );
        }
        m.insert("rps_min".into(), json!(min(nums("rps"))));
        m.insert("rps_max".into(), json!(max(nums("rps"))));
        m.insert("p99_min_us".into(), json!(min(nums("p99_us"))));
        m.insert("p99_max_us".into(), json!(max(nums("p99_us"))));
        m.insert(
            "wrapped".into(),
            json!(each.iter().any(|r| r["wrapped"].as_bool() == Some(true))),
        );
        if each.iter().any(|r| r.get("slow_commits").is_some()) {
            let all: Vec<Value> = each
                .iter()
                .filter_map(|r| r["slow_commits"].as_array())
                .flatten()
                .cloned()
                .collect();
            m.insert("slow_commits".into(), Value::Array(all));
        }
        let loads: Vec<Value> = each.iter().map(|r| r["loadavg_before"].clone()).collect();
        m.insert("loadavg_before".into(), Value::Array(loads));
        out.insert(key.to_string(), Value::Object(m));
    }
    out
}

fn main() -> Result<()> {
    let a = args()?;
    let mut runs = Vec::new();
    for i in 0..a.runs {
        eprintln!("run {} of {}", i + 1, a.runs);
        runs.push(one_run(&a)?);
    }
    let lark_version = Command::new("python3")
        // lark_oapi has no __version__; the installed distribution's metadata does.
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('lark-oapi'))",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let out = json!({
        "order": runs[0]["order"],
        "results": aggregate(&runs),
        "runs": runs,
        "wrk": {"threads": a.threads, "connections": a.connections, "duration_s": a.duration},
        "requests_per_platform": a.requests,
        "lark_oapi_version": lark_version,
        "command": match a.client {
            Client::Wrk => format!(
                "wrk -t{} -c{} -d{}s --timeout 10s -s bench/loadtest.lua http://127.0.0.1:PORT/callback/bench/APP",
                a.threads, a.connections, a.duration
            ),
            Client::Loadgen => format!(
                "target/release/loadgen --threads {} --connections {} --duration {} --addr 127.0.0.1:PORT --reqs PLATFORM.reqs",
                a.threads, a.connections, a.duration
            ),
        },
    });
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
