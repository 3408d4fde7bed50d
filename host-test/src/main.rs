//! `imbridge-host`: call the plugin from the command line, or serve it over HTTP.

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use imbridge_host::config::Config;
use imbridge_host::json::Json as _;
use imbridge_host::{Export, Host, HostConfig, TenantPolicy, server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Every call allocates and frees a request, a reply, KV values and a store's context on the
/// tokio workers; mimalloc's thread-local free lists serve that with 8-11% more durable
/// callbacks/s through `serve` than glibc's allocator (interleaved load tests, issue 7), and a
/// single-threaded instantiate + call loop is no slower with it (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the build puts the component, relative to the workspace root.
const COMPONENT: &str = "target/imbridge.wasm";
/// Default state directory for `invoke`, relative to the workspace root.
const STATE: &str = "target/imbridge-state";

#[derive(Parser)]
#[command(
    name = "imbridge-host",
    version,
    about = "Reference wasmtime host for the imbridge plugin"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call one export and print `{"ok": ...}` or `{"err": ...}` as one JSON line.
    ///
    /// Exits 0 whenever the plugin answered (ok or err), non-zero when the host failed.
    Invoke {
        /// start-approval, get-approval, cancel-approval, notify, handle-callback or
        /// handle-event
        export: String,
        /// The im-app JSON file.
        #[arg(long)]
        app: Option<PathBuf>,
        /// The arguments: for handle-callback the http-request, for handle-event the event
        /// JSON, otherwise an object keyed by parameter name (e.g. {"request": ...}). `-` reads
        /// standard input.
        #[arg(long)]
        input: Option<PathBuf>,
        /// State directory [default: target/imbridge-state in the workspace]
        #[arg(long)]
        state: Option<PathBuf>,
        /// Start the plugin's wall clock at this Unix time (replaying captured callbacks).
        #[arg(long)]
        now: Option<u64>,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The component [default: target/imbridge.wasm in the workspace]
        #[arg(long, env = "IMBRIDGE_COMPONENT")]
        component: Option<PathBuf>,
        /// Extra host the plugin may call (repeatable): `example.com` or `127.0.0.1:8080`.
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Call deadline in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Serve platform callbacks and the engine JSON API.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's `component`.
        #[arg(long, env = "IMBRIDGE_COMPONENT")]
        component: Option<PathBuf>,
    },
    /// Print each app's callback address, to paste into the platform's developer console.
    Urls {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the end-to-end demo.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime waits for every blocking task, such as a lease release or a
    // commit still waiting on a store that does not answer: a stop would hang there after
    // the server had finished.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Invoke {
            export,
            app,
            input,
            state,
            now,
            tenant,
            component,
            allow_hosts,
            timeout,
        } => {
            let export: Export = export.parse()?;
            let app = app.map(|p| read_json(&p)).transpose()?;
            let input = match input {
                Some(p) => read_json(&p)?,
                None => Value::Object(Default::default()),
            };
            let args = merge_args(export, app, input)?;
            let component = component.unwrap_or_else(|| workspace_path(COMPONENT));
            let state = state.unwrap_or_else(|| workspace_path(STATE));

            let mut cfg = HostConfig::new(state);
            cfg.now_unix_secs = now;
            cfg.call_timeout = Duration::from_secs(timeout.max(1));
            let host = Host::new(cfg)?;
            host.load_tenant(&tenant, &component, TenantPolicy { allow_hosts })
                .await
                .with_context(|| component_hint(&component))?;
            let out = host.invoke_json(&tenant, export.name(), args).await?;
            println!("{}", serde_json::to_string(&out)?);
            Ok(())
        }
        Command::Serve {
            config: config_path,
            component,
        } => {
            let mut config = Config::load(&config_path)?;
            let cli_component = component;
            let component = server_component(
                &mut config,
                cli_component.as_deref(),
                &workspace_path(COMPONENT),
            );
            // Installed before the server starts, and kept: a SIGHUP that came before would
            // have ended the process (its default action), and a signal's stream keeps one
            // that arrives while nothing is waiting on it.
            use tokio::signal::unix::{SignalKind, signal};
            let mut int = signal(SignalKind::interrupt()).context("listening for Ctrl-C")?;
            let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
            let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
            // The server logs the address it bound; Ctrl-C or SIGTERM (a supervisor's stop)
            // stops it: no new connections, the persistent connections' leases released, and
            // the calls still running finished.
            let handle = server::serve_config(config)
                .await
                .with_context(|| component_hint(&component))?;
            'serving: loop {
                tokio::select! {
                    _ = int.recv() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => {
                        // A stop asked for during a reload (compiles, trial instances) is not
                        // kept waiting for it.
                        let reloading =
                            reload(&handle, &config_path, cli_component.as_deref(), &component);
                        tokio::select! {
                            () = reloading => {}
                            _ = int.recv() => break 'serving,
                            _ = term.recv() => break 'serving,
                        }
                    }
                }
            }
            imbridge_host::log!(
                "stopping: finishing the calls in flight (a second Ctrl-C or SIGTERM stops at once)"
            );
            // The signal handlers stay installed for the process's life, so without this a
            // second signal did nothing and a drain waiting on a slow platform (up to the call
            // timeout) could only be ended with SIGKILL.
            tokio::select! {
                () = handle.shutdown() => Ok(()),
                _ = int.recv() => stop_now(),
                _ = term.recv() => stop_now(),
            }
        }
        Command::Urls { config } => {
            let Config {
                serve: config,
                persistent,
            } = Config::load(&config)?;
            for t in &config.tenants {
                for app in &t.apps {
                    if persistent
                        .iter()
                        .any(|p| p.tenant == t.id && p.app.id == app.id)
                    {
                        println!(
                            "{} {} persistent connection (no callback address)",
                            t.id, app.id
                        );
                        continue;
                    }
                    let platform = app.platform.to_json();
                    let platform = platform.as_str().unwrap_or("?");
                    println!(
                        "{} {} {platform}  {}",
                        t.id,
                        app.id,
                        config.callback_url(&t.id, &app.id)
                    );
                }
            }
            Ok(())
        }
        Command::Demo => {
            let component = workspace_path(COMPONENT);
            imbridge_host::demo::run(&component)
                .await
                .with_context(|| component_hint(&component))
        }
    }
}

/// Builds the export's argument object from `--app` and `--input`.
fn merge_args(export: Export, app: Option<Value>, input: Value) -> Result<Value> {
    if export == Export::HandleCallback {
        let Some(app) = app else {
            bail!("handle-callback needs --app");
        };
        return Ok(serde_json::json!({"app": app, "request": input}));
    }
    if export == Export::HandleEvent {
        let Some(app) = app else {
            bail!("handle-event needs --app");
        };
        return Ok(serde_json::json!({"app": app, "event": input}));
    }
    let Value::Object(mut args) = input else {
        bail!("--input must hold a JSON object keyed by parameter name");
    };
    if let Some(app) = app {
        args.insert("app".into(), app);
    }
    Ok(Value::Object(args))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    // serde_json's syntax errors give a position, never the offending text.
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// `relative` under the nearest ancestor of the current directory that has a
/// `target/imbridge.wasm`, so the CLI works from anywhere inside the workspace.
fn workspace_path(relative: &str) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let root = cwd
        .ancestors()
        .find(|dir| dir.join(COMPONENT).is_file())
        .unwrap_or(&cwd);
    root.join(relative)
}

/// SIGHUP: reads the configuration file again and loads each tenant's component anew where
/// it changed (`server::reload_components`); everything else in the file takes a restart.
async fn reload(
    handle: &server::ServerHandle,
    config_path: &Path,
    cli_component: Option<&Path>,
    default_component: &Path,
) {
    imbridge_host::log!("SIGHUP: reloading the tenants' components");
    let mut config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            imbridge_host::log!("reload: nothing changed, the configuration is refused: {e:#}");
            return;
        }
    };
    server_component(&mut config, cli_component, default_component);
    match server::reload_components(handle.host(), &config.serve).await {
        Ok(replaced) if replaced.is_empty() => {
            imbridge_host::log!("reload: no component changed")
        }
        Ok(replaced) => imbridge_host::log!("reload: replaced {}", replaced.join(", ")),
        Err(e) => imbridge_host::log!("reload: {e:#}"),
    }
}

/// Settles the server's component in `config`, and returns it: `--component` wins over the
/// file's, and without either it is `default`. Start-up and SIGHUP settle it the same way.
fn server_component(config: &mut Config, cli: Option<&Path>, default: &Path) -> PathBuf {
    let component = cli
        .map(Path::to_path_buf)
        .or_else(|| config.serve.component.clone())
        .unwrap_or_else(|| default.to_path_buf());
    config.serve.component = Some(component.clone());
    component
}

/// Ends the process without waiting for the calls in flight: what they committed stays, the
/// platforms send their unanswered callbacks again, and a start cut off after its create
/// holds its key (README, "start-approval").
fn stop_now() -> Result<()> {
    imbridge_host::log!("second signal: stopping now, without the calls still in flight");
    std::process::exit(130)
}

fn component_hint(component: &Path) -> String {
    if component.exists() {
        format!("loading {}", component.display())
    } else {
        format!(
            "loading {} (build the component first, or pass --component / IMBRIDGE_COMPONENT)",
            component.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge() {
        let app = json!({"id": "a"});
        let v = merge_args(
            Export::HandleCallback,
            Some(app.clone()),
            json!({"body": "x"}),
        )
        .unwrap();
        assert_eq!(v, json!({"app": {"id": "a"}, "request": {"body": "x"}}));
        let v = merge_args(Export::GetApproval, Some(app), json!({"instance_id": "i"})).unwrap();
        assert_eq!(v, json!({"app": {"id": "a"}, "instance_id": "i"}));
        assert!(merge_args(Export::HandleCallback, None, json!({})).is_err());
        assert!(merge_args(Export::Notify, None, json!([])).is_err());
    }
}
