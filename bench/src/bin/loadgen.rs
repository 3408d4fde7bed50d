//! A closed-loop HTTP/1.1 load generator that keeps every request's timing, to see *where* a
//! latency tail comes from (which connection, when), which wrk's summary cannot show.
//!
//! It reads the load test's request files (thread k sends the requests in `{--reqs}.k`, each a
//! decimal length, a newline and the request's bytes) and works like wrk: `--threads` OS
//! threads, each an event loop (a current-thread tokio runtime) driving its share of
//! `--connections` keep-alive connections, one request in flight per connection.
//!
//! Prints one `JSON {…}` line in the shape the load test reads from wrk, plus per-connection
//! statistics and, with `--trace FILE`, writes every request as `conn,start_us,latency_us,status`.
//!
//! The summary's latency figures are corrected for coordinated omission exactly as wrk corrects
//! its own (see [`corrected`]), so the two clients' p99 mean the same thing; the uncorrected
//! ones are under `raw`, and the per-connection statistics and the trace are uncorrected.

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Args {
    addr: SocketAddr,
    reqs: PathBuf,
    connections: usize,
    threads: usize,
    duration: Duration,
    timeout: Duration,
    trace: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut addr = None;
    let mut reqs = None;
    let mut a = Args {
        addr: "127.0.0.1:1".parse()?,
        reqs: PathBuf::new(),
        connections: 16,
        threads: 2,
        duration: Duration::from_secs(10),
        timeout: Duration::from_secs(10),
        trace: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().context("missing value");
        match flag.as_str() {
            "--addr" => addr = Some(val()?.parse()?),
            "--reqs" => reqs = Some(PathBuf::from(val()?)),
            "--connections" => a.connections = val()?.parse()?,
            "--threads" => a.threads = val()?.parse()?,
            "--duration" => a.duration = Duration::from_secs_f64(val()?.parse()?),
            "--timeout" => a.timeout = Duration::from_secs_f64(val()?.parse()?),
            "--trace" => a.trace = Some(val()?.into()),
            other => bail!("unknown flag {other}"),
        }
    }
    a.addr = addr.context("--addr HOST:PORT is required")?;
    a.reqs = reqs.context("--reqs FILE is required")?;
    if a.threads == 0 || a.connections < a.threads {
        bail!("need at least one connection per thread");
    }
    Ok(a)
}

/// The records of one request file: a decimal length, a newline, that many bytes.
fn read_requests(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("record without a length line")?;
        let len: usize = std::str::from_utf8(&rest[..nl])?.trim().parse()?;
        let end = nl + 1 + len;
        out.push(rest.get(nl + 1..end).context("truncated record")?.to_vec());
        rest = &rest[end..];
    }
    if out.is_empty() {
        bail!("{}: no requests", path.display());
    }
    Ok(out)
}

struct Sample {
    start_us: u64,
    latency_us: u32,
    status: u16,
}

/// Failures by kind, as wrk counts them; after one the connection is replaced.
#[derive(Default)]
struct ConnResult {
    samples: Vec<Sample>,
    connect_errors: u64,
    /// A failed write or read (reported as wrk's read errors).
    read_errors: u64,
    timeouts: u64,
}

/// Reads one response; returns its status. Responses carry Content-Length (hyper's `Full`).
async fn read_response(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<u16> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("no content-length")?;
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

async fn connection(
    addr: SocketAddr,
    reqs: Arc<Vec<Vec<u8>>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    epoch: Instant,
    stop: Instant,
    timeout: Duration,
) -> ConnResult {
    let mut r = ConnResult::default();
    let mut buf = Vec::with_capacity(8192);
    'reconnect: while Instant::now() < stop {
        let Ok(mut sock) = tokio::net::TcpStream::connect(addr).await else {
            r.connect_errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        while Instant::now() < stop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % reqs.len();
            let t0 = Instant::now();
            let res = tokio::time::timeout(timeout, async {
                sock.write_all(&reqs[i]).await?;
                read_response(&mut sock, &mut buf).await
            })
            .await;
            let latency = t0.elapsed();
            match res {
                Ok(Ok(status)) => r.samples.push(Sample {
                    start_us: (t0 - epoch).as_micros() as u64,
                    latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
                    status,
                }),
                Ok(Err(_)) => {
                    r.read_errors += 1;
                    continue 'reconnect;
                }
                Err(_) => {
                    r.timeouts += 1;
                    continue 'reconnect;
                }
            }
        }
    }
    r
}

/// `raw` (sorted latencies of a closed-loop run) with wrk's correction for coordinated omission
/// added: wrk 4.x's `stats_correct`, which wrk applies to every latency figure it reports.
///
/// A closed-loop connection sends nothing while its request is stuck, so a stall shows up as
/// one slow sample per connection, whereas callbacks that arrive on the platform's schedule
/// keep arriving during it and all wait. With `interval` the mean time between one
/// connection's requests, each sample `n` of at least two intervals also counts the requests
/// that would have arrived while it waited: `n - interval`, `n - 2·interval`, … while above one
/// interval. So the share of corrected samples above a latency `x` is about the share of the
/// run's time spent in stalls beyond `x`, which is what an open arrival process sees. In a
/// closed loop the samples add up to at most connections × duration, so this at most about
/// doubles their number.
fn corrected(raw: &[u32], interval: u32) -> Vec<u32> {
    let mut out = raw.to_vec();
    if interval > 0 {
        for &n in raw.iter().filter(|&&n| n >= interval.saturating_mul(2)) {
            out.extend(
                (1..)
                    .map(|k| n - k * interval)
                    .take_while(|&m| m > interval),
            );
        }
        out.sort_unstable();
    }
    out
}

/// wrk's expected interval between one connection's requests, from which [`corrected`] works.
fn interval_us(duration_us: u64, requests: usize, connections: usize) -> u32 {
    match (requests / connections.max(1)) as u64 {
        0 => 0,
        per_conn => (duration_us / per_conn).min(u32::MAX as u64) as u32,
    }
}

fn mean(sorted: &[u32]) -> f64 {
    sorted.iter().map(|&x| x as f64).sum::<f64>() / sorted.len().max(1) as f64
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn main() -> Result<()> {
    let a = args()?;
    let mut per_thread = Vec::new();
    for t in 0..a.threads {
        let path = PathBuf::from(format!("{}.{t}", a.reqs.display()));
        per_thread.push(Arc::new(read_requests(&path)?));
    }
    let epoch = Instant::now();
    // To line the trace up with the server's log, whose lines carry wall-clock times.
    let epoch_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as u64;
    let stop = epoch + a.duration;
    let mut handles = Vec::new();
    for (t, reqs) in per_thread.into_iter().enumerate() {
        let conns = a.connections / a.threads + usize::from(t < a.connections % a.threads);
        let (addr, timeout) = (a.addr, a.timeout);
        handles.push(std::thread::spawn(move || -> Result<Vec<ConnResult>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let tasks: Vec<_> = (0..conns)
                    .map(|_| {
                        tokio::spawn(connection(
                            addr,
                            reqs.clone(),
                            next.clone(),
                            epoch,
                            stop,
                            timeout,
                        ))
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await?);
                }
                Ok(out)
            })
        }));
    }
    let mut conns = Vec::new();
    for h in handles {
        conns.extend(h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??);
    }
    let elapsed = epoch.elapsed();

    let mut all: Vec<u32> = conns
        .iter()
        .flat_map(|c| c.samples.iter().map(|s| s.latency_us))
        .collect();
    all.sort_unstable();
    let count = |f: fn(&ConnResult) -> u64| conns.iter().map(f).sum::<u64>();
    let bad_status = conns
        .iter()
        .flat_map(|c| &c.samples)
        .filter(|s| s.status >= 400)
        .count();
    let per_conn: Vec<Value> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut l: Vec<u32> = c.samples.iter().map(|s| s.latency_us).collect();
            l.sort_unstable();
            json!({"conn": i, "requests": l.len(), "p50_us": pct(&l, 50.0),
                   "p99_us": pct(&l, 99.0), "max_us": pct(&l, 100.0),
                   "over_10ms": l.iter().filter(|&&x| x > 10_000).count()})
        })
        .collect();
    let duration_us = elapsed.as_micros() as u64;
    let open = corrected(&all, interval_us(duration_us, all.len(), a.connections));
    let summary = json!({
        "requests": all.len(),
        "epoch_unix_us": epoch_unix_us,
        "duration_us": duration_us,
        "errors_connect": count(|c| c.connect_errors),
        "errors_read": count(|c| c.read_errors),
        "errors_write": 0,
        "errors_status": bad_status,
        "errors_timeout": count(|c| c.timeouts),
        "p50_us": pct(&open, 50.0), "p90_us": pct(&open, 90.0), "p99_us": pct(&open, 99.0),
        "p999_us": pct(&open, 99.9), "max_us": pct(&open, 100.0), "mean_us": mean(&open),
        "raw": {
            "p50_us": pct(&all, 50.0), "p90_us": pct(&all, 90.0), "p99_us": pct(&all, 99.0),
            "p999_us": pct(&all, 99.9), "mean_us": mean(&all),
        },
    });
    println!("JSON {summary}");
    println!("CONNS {}", Value::Array(per_conn));
    if let Some(path) = &a.trace {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(f, "conn,start_us,latency_us,status")?;
        for (i, c) in conns.iter().enumerate() {
            for s in &c.samples {
                writeln!(f, "{i},{},{},{}", s.start_us, s.latency_us, s.status)?;
            }
        }
        f.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_sample_also_counts_the_requests_that_would_have_waited() {
        let mut raw = vec![100; 99];
        raw.push(1000);
        let open = corrected(&raw, 100);
        // 900, 800, …, 200: the samples an open source would have had waiting behind it.
        assert_eq!(open.len(), 108);
        assert_eq!(&open[99..], &[200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        // A sample under two intervals is left alone, as in wrk.
        assert_eq!(corrected(&[150, 199], 100), [150, 199]);
        assert_eq!(corrected(&[200], 100), [200]);
        assert_eq!(corrected(&[5, 7], 0), [5, 7]);
    }

    /// One connection, 1 ms per request, one 500 ms stall in a 10 s run: requests arriving at a
    /// steady rate would find the server stalled about 5% of the time, and the corrected p99
    /// lands inside the stall where the raw one does not see it.
    #[test]
    fn the_corrected_tail_is_the_share_of_time_spent_stalled() {
        let mut raw = vec![1000u32; 9500];
        raw.push(500_000);
        let interval = interval_us(10_000_000, raw.len(), 1);
        assert_eq!(interval, 1052);
        let open = corrected(&raw, interval);
        assert_eq!(pct(&raw, 99.0), 1000);
        let over_10ms = open.iter().filter(|&&x| x > 10_000).count() as f64;
        let share = over_10ms / open.len() as f64;
        assert!((0.04..0.06).contains(&share), "{share}");
        let p99 = pct(&open, 99.0);
        assert!((380_000..420_000).contains(&p99), "{p99}");
    }

    #[test]
    fn no_correction_without_a_full_round_per_connection() {
        assert_eq!(interval_us(10_000_000, 15, 16), 0);
        assert_eq!(interval_us(10_000_000, 32, 16), 5_000_000);
    }
}
