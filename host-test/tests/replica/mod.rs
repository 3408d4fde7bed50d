//! `imbridge-host serve` as a separate process, for tests that need several replicas or must
//! kill one with SIGKILL: the real binary, its config file, its log.

#![allow(dead_code)]

use imbridge_host::sim::http;
use serde_json::Value;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The built component (`./dev build`), or `$IMBRIDGE_COMPONENT`.
pub fn component() -> PathBuf {
    let path = std::env::var_os("IMBRIDGE_COMPONENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/imbridge.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `./dev build` (or `./dev test`) first",
        path.display()
    );
    path
}

/// One compiled-artifact cache for every replica of the test run.
pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-cache")
}

pub struct Replica {
    pub name: String,
    child: Child,
    pub base: String,
    pub pid: u32,
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Replica {
    /// Starts `imbridge-host serve --config CONFIG` and waits until it listens.
    pub fn spawn(name: &str, config: &Path) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imbridge-host"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--component")
            .arg(component())
            .env_remove("IMBRIDGE_QUIET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning imbridge-host serve");
        let pid = child.id();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // stdout is kept too: whatever the host prints must be searchable like its log.
        let stdout = child.stdout.take().expect("stdout");
        let (sink, tag) = (log.clone(), name.to_string());
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{tag} stdout] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (sink, tag) = (log.clone(), name.to_string());
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("serving on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                eprintln!("[{tag}] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!("{name} did not start serving: {:?}", log.lock().unwrap());
            }
        };
        Replica {
            name: name.to_string(),
            child,
            base,
            pid,
            log,
            readers: vec![out_reader, err_reader],
        }
    }

    /// SIGKILL: no shutdown, no lease release, no flush beyond what was already durable.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
        // The pipes are closed now; once the readers have drained them the log is complete.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Sends the process a signal (`"TERM"`, `"INT"`), as a supervisor or Ctrl-C would.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{name} {}", self.pid);
    }

    /// How the process ended, if it did within `within`.
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn callback_url(&self, tenant: &str, app: &str) -> String {
        format!("{}/callback/{tenant}/{app}", self.base)
    }

    /// Everything the process printed so far (stderr and stdout lines).
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let reply = http::post(
            &format!("{}{path}", self.base),
            &[("content-type".into(), "application/json".into())],
            body.to_string().into_bytes(),
            Duration::from_secs(30),
        )
        .await;
        parse(reply)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        parse(http::get(&format!("{}{path}", self.base), Duration::from_secs(30)).await)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(reply: http::Reply) -> (u16, Value) {
    let status = reply.status.unwrap_or(0);
    let body = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (status, body)
}

/// Waits until `f` holds, for at most `secs`.
pub async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `{"ok": …}` payload, or a panic that shows the error.
pub fn ok(v: &Value) -> &Value {
    v.get("ok")
        .unwrap_or_else(|| panic!("expected ok, got {v}"))
}
