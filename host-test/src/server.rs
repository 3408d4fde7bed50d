//! `imbridge-host serve`: platform callbacks in, a small JSON API for engines.
//!
//! Routes:
//! - `GET|POST /callback/{tenant}/{app}`: the address platforms call; answered with the
//!   plugin's response. Approval updates go to a durable outbox (in the same commit as the
//!   plugin's writes, before the answer goes out) and, when the tenant has an
//!   `engine_webhook`, are POSTed there.
//! - `POST /api/{tenant}/{app}/approvals` (body: approval-request)
//! - `GET  /api/{tenant}/{app}/approvals/{instance-id}?refresh=true` (an approval the refresh
//!   changed goes to the outbox too)
//! - `POST /api/{tenant}/{app}/approvals/{instance-id}/cancel` (body: `{"reason": ...}`)
//! - `POST /api/{tenant}/notify` (body: `{"app_id": ..., "notification": ...}`)
//! - `GET  /api/{tenant}/updates?after=N`: up to [`UPDATES_PAGE`] outbox records after `N`
//!   (`"more": true` when there are others), acknowledging those up to `N` (for engines that
//!   poll instead of taking the webhook); 409 for an `N` past the newest record's sequence
//!   number
//!
//! - `GET  /healthz`: 200 while the store takes a write (at most one at a time and one per
//!   second), else 503 (also once the server is stopping)
//!
//! The API answers `{"ok": ...}` / `{"err": ...}` exactly as `invoke` prints them.

use crate::AbortOnDrop;
use crate::bindings::types::{
    ApprovalRequest, Error as PluginError, HttpRequest, ImApp, Notification,
};
use crate::call::{Call, Reply};
use crate::config::{Config, PersistentApp, ServeConfig, TenantConfig};
use crate::host::{Host, HostConfig};
use crate::json::{self, Json as _};
use crate::log;
use crate::store::{Backend, Commit, blocking};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::JoinHandle;

/// Largest request body accepted; platforms' callbacks are a few KiB.
pub const MAX_BODY: usize = 1 << 20;

/// Most updates one `GET /updates` answer carries (`"more": true` says there are others), and
/// the webhook delivery's batch: a long backlog must not be read into memory at once.
pub const UPDATES_PAGE: usize = 1000;

/// How often undelivered outbox records are retried.
const REDELIVERY: Duration = Duration::from_secs(30);

/// The longest one webhook POST may take, TLS handshake included (wasmtime-wasi-http's
/// client bounds connecting and each read, but not the handshake): an engine that accepts
/// connections and never answers must not hold its tenant's deliveries.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server waits for its connections to write the answers of finished
/// calls.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a `/healthz` store probe's answer, success or failure, answers for the probes
/// after it.
const PROBE_ANSWERS_FOR: Duration = Duration::from_secs(1);

/// A request's headers must arrive within this (also how long an idle keep-alive connection
/// stays open), and its body within this after them. Platforms send a few KiB at once; a
/// client trickling bytes must not hold a connection and its buffers for ever.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A write to a client that makes no progress for this long ends its connection: a client
/// that sends requests and never reads the answers must not hold a connection for ever.
pub const WRITE_TIMEOUT: Duration = READ_TIMEOUT;

/// Plugin calls the server runs or queues at once, including those whose clients have hung
/// up; further requests wait for one to end. As many as open connections: a client waits
/// here only after others have hung up on that many calls still running.
pub const MAX_CALLS: usize = MAX_CONNECTIONS;

/// Open connections at most; more wait in the listen backlog until one closes. With
/// [`READ_TIMEOUT`] this bounds what slow or idle clients can hold (each at most
/// [`MAX_BODY`] plus hyper's read buffer).
pub const MAX_CONNECTIONS: usize = 1024;

type Response = http::Response<Full<Bytes>>;

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    host: Host,
    shutdown: Option<oneshot::Sender<()>>,
    /// The accept loop; it ends with what closes the connections it served.
    task: JoinHandle<GracefulShutdown>,
    /// The persistent connections (apps with `"callback": "persistent"`).
    connections: Option<crate::persistent::Connections>,
    /// One permit per plugin call the server runs; see [`State::detached`].
    in_flight: Arc<Semaphore>,
    /// Requests waiting for a permit.
    waiting: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

impl ServerHandle {
    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Stops accepting connections and waits for the accept loop to end; closes the
    /// persistent connections and releases their leases; then waits for the plugin calls
    /// still running (each ends by the host's call deadline), so that stopping the server
    /// does not cut a start off between its create and its commit.
    ///
    /// From its start, requests that would run a plugin call are answered 503, also on
    /// connections that stay open: a call started while the process exits could be cut off
    /// just the same. Last, the connections finish writing their answers (at most 5 s) and
    /// close.
    pub async fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(c) = self.connections.take() {
            c.shutdown().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let connections = (&mut self.task).await;
        // A request that passed the flag just before it was set queues behind this (the
        // semaphore is fair) and is refused by the close.
        let _all = self.in_flight.acquire_many(MAX_CALLS as u32).await;
        self.in_flight.close();
        // A call's permit comes back just before its answer is written: the connections
        // finish writing what they answer (idle ones close at once), so a process that exits
        // next does not drop the answer of a finished call (a notify the engine would send
        // again). Bounded: a client that does not read its answer does not hold the exit.
        if let Ok(connections) = connections {
            let _ = tokio::time::timeout(CLOSE_GRACE, connections.shutdown()).await;
        }
    }

    /// Plugin calls running or waiting for a call slot, including engine API calls whose
    /// clients have hung up; at most [`MAX_CALLS`].
    pub fn calls_in_flight(&self) -> usize {
        MAX_CALLS - self.in_flight.available_permits()
    }

    /// Requests waiting for a call slot while their clients wait; one whose client hangs up
    /// stops waiting.
    pub fn calls_waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Runs until the accept loop ends (it does not end on its own).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Creates the host, loads the configured component for every tenant and starts serving,
/// HTTP callbacks and persistent connections alike.
pub async fn serve_config(config: Config) -> Result<ServerHandle> {
    let host = load_host(&config.serve).await?;
    let mut options = crate::persistent::Options::default();
    if let Some(ttl) = config.serve.lease_ttl {
        // A waiting replica looks often enough to take over soon after the expiry.
        options.lease_poll = options.lease_poll.min(ttl / 6);
        options.lease_ttl = ttl;
    }
    serve_with_persistent(host, config.serve, config.persistent, options).await
}

/// Creates the host, loads the configured component for every tenant and starts serving.
pub async fn serve(config: ServeConfig) -> Result<ServerHandle> {
    let host = load_host(&config).await?;
    serve_with(host, config).await
}

async fn load_host(config: &ServeConfig) -> Result<Host> {
    let mut host_cfg = HostConfig::new(&config.state_dir);
    host_cfg.store = config.store.clone();
    host_cfg.cache_dir = config.cache_dir.clone();
    if let Some(t) = config.call_timeout {
        host_cfg.call_timeout = t;
    }
    if let Some(n) = config.max_concurrent_calls {
        host_cfg.max_concurrent_calls = n;
    }
    host_cfg.max_calls_per_tenant = config.max_calls_per_tenant;
    let host = Host::new(host_cfg)?;
    let mut read = HashMap::new();
    for t in &config.tenants {
        let wasm = component_of(config, t, &mut read).await?;
        host.load_tenant_bytes(&t.id, wasm, t.policy.clone())
            .await
            .with_context(|| format!("loading tenant `{}`", t.id))?;
    }
    Ok(host)
}

/// The bytes of tenant `t`'s plugin: its own `component`, else the server's. `read` keeps
/// the files read so far, so tenants sharing one read it once.
async fn component_of(
    config: &ServeConfig,
    t: &TenantConfig,
    read: &mut HashMap<PathBuf, Vec<u8>>,
) -> Result<Vec<u8>> {
    let path = t
        .component
        .as_ref()
        .or(config.component.as_ref())
        .with_context(|| format!("no component configured for tenant `{}`", t.id))?;
    if let Some(wasm) = read.get(path) {
        return Ok(wasm.clone());
    }
    let wasm = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading component {}", path.display()))?;
    read.insert(path.clone(), wasm.clone());
    Ok(wasm)
}

/// Loads again the plugin of every running tenant whose component file (per `config`, the
/// configuration read anew) now holds another version, as `serve` does on SIGHUP; the
/// others are left alone. A version that does not read, compile or instantiate is refused
/// and its tenant keeps running the one it has. Other settings (apps, tokens, new or removed
/// tenants) take a restart, and are not looked at. Returns the tenants replaced; `Err` names
/// each tenant that kept its version, and why.
pub async fn reload_components(host: &Host, config: &ServeConfig) -> Result<Vec<String>> {
    let running = host.tenants();
    let mut read = HashMap::new();
    let (mut replaced, mut kept) = (Vec::new(), Vec::new());
    for t in config.tenants.iter().filter(|t| running.contains(&t.id)) {
        let loaded = async {
            let wasm = component_of(config, t, &mut read).await?;
            let digest = crate::engine::digest(&wasm);
            if host.tenant_digest(&t.id).as_deref() == Some(digest.as_str()) {
                return Ok(false);
            }
            let policy = host
                .tenant_policy(&t.id)
                .unwrap_or_else(|| t.policy.clone());
            host.load_tenant_bytes(&t.id, wasm, policy).await?;
            Ok::<_, anyhow::Error>(true)
        };
        match loaded.await {
            Ok(true) => replaced.push(t.id.clone()),
            Ok(false) => {}
            Err(e) => kept.push(format!("tenant `{}` keeps its version: {e:#}", t.id)),
        }
    }
    if kept.is_empty() {
        Ok(replaced)
    } else {
        Err(anyhow::anyhow!("{}", kept.join("; ")))
    }
}

/// Serves `config` with an existing host whose tenants are already loaded.
pub async fn serve_with(host: Host, config: ServeConfig) -> Result<ServerHandle> {
    serve_with_persistent(host, config, Vec::new(), Default::default()).await
}

/// [`serve_with`], plus a persistent connection for each of `persistent` (which must be
/// among `config`'s apps). Their updates go to the same outbox and engine webhook as HTTP
/// callbacks'.
pub async fn serve_with_persistent(
    host: Host,
    config: ServeConfig,
    persistent: Vec<PersistentApp>,
    options: crate::persistent::Options,
) -> Result<ServerHandle> {
    for p in &persistent {
        anyhow::ensure!(
            config
                .tenant(&p.tenant)
                .and_then(|t| t.app(&p.app.id))
                .is_some(),
            "persistent app `{}` of tenant `{}` is not in the configuration",
            p.app.id,
            p.tenant
        );
        crate::persistent::check_platform(&p.app)
            .with_context(|| format!("persistent app `{}` of tenant `{}`", p.app.id, p.tenant))?;
    }
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    host.enable_outbox();
    if config.api_token.is_none() {
        // Open by configuration, but an operator should see it rather than find out.
        for t in config.tenants.iter().filter(|t| t.api_token.is_none()) {
            log!("tenant={} engine API open: no api_token configured", t.id);
        }
    }
    let delivery = config
        .tenants
        .iter()
        .filter_map(|t| {
            let hook = Webhook {
                url: t.engine_webhook.clone()?,
                secret: t.engine_webhook_secret.clone(),
            };
            Some((t.id.clone(), (hook, Arc::new(Notify::new()))))
        })
        .collect();
    let in_flight = Arc::new(Semaphore::new(MAX_CALLS));
    let waiting = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let state = Arc::new(State {
        host: host.clone(),
        config,
        delivery,
        in_flight: in_flight.clone(),
        waiting: waiting.clone(),
        stopping: stopping.clone(),
        health: Arc::new(std::sync::Mutex::new(Health::Unknown)),
    });
    let deliveries: Vec<AbortOnDrop<()>> = state
        .delivery
        .iter()
        .map(|(tenant, (hook, wake))| {
            AbortOnDrop(tokio::spawn(deliver_updates(
                Arc::downgrade(&state),
                tenant.clone(),
                hook.clone(),
                wake.clone(),
            )))
        })
        .collect();
    let connections = (!persistent.is_empty()).then(|| {
        let weak = Arc::downgrade(&state);
        // The host has already put the updates in the outbox, in the event's own commit.
        let sink: crate::persistent::UpdateSink = Arc::new(move |tenant, _app_id, _updates| {
            let state = weak.upgrade().context("server stopped")?;
            state.wake_delivery(tenant);
            Ok(())
        });
        let leases: Arc<dyn crate::persistent::LeaseStore> = host.store().clone();
        crate::persistent::spawn(
            persistent,
            crate::persistent::Dispatcher::new(host.clone(), sink),
            leases,
            options,
        )
    });
    let (tx, mut rx) = oneshot::channel();
    // Records left over from a failed delivery (or a restart) go out on this timer as well as
    // with the next callback.
    let redelivery = {
        let state = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REDELIVERY);
            loop {
                tick.tick().await;
                let Some(state) = state.upgrade() else { break };
                for t in &state.config.tenants {
                    state.wake_delivery(&t.id);
                }
            }
        })
    };
    let task = tokio::spawn(async move {
        let _redelivery = AbortOnDrop(redelivery);
        let _deliveries = deliveries;
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let graceful = GracefulShutdown::new();
        loop {
            let permit = tokio::select! {
                _ = &mut rx => break,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        log!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let state = state.clone();
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(state.handle(req).await) }
            });
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let connection = graceful.watch(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(TokioIo::new(Box::pin(stream)), service),
            );
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = connection.await
                    // hyper's header timeout also ends every idle keep-alive connection (and one
                    // whose client stalls mid-header, which is not news either).
                    && !e.is_timeout()
                {
                    log!("connection from {peer}: {e}");
                }
            });
        }
        graceful
    });
    log!("serving on http://{addr}");
    Ok(ServerHandle {
        addr,
        host,
        shutdown: Some(tx),
        task,
        connections,
        in_flight,
        waiting,
        stopping,
    })
}

struct State {
    host: Host,
    config: ServeConfig,
    /// Each tenant with an `engine_webhook`: the URL, and what wakes its delivery task. One
    /// task per tenant, so its records go out once and in order, and any number of wake-ups
    /// while it works (every callback with updates, every refresh, the timer) make one more
    /// pass, not a queue of waiting tasks.
    delivery: HashMap<String, (Webhook, Arc<Notify>)>,
    in_flight: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    /// Set when shutdown begins: no plugin call starts after it.
    stopping: Arc<AtomicBool>,
    /// What `/healthz` last found, or the store probe it is waiting for.
    health: Arc<std::sync::Mutex<Health>>,
}

/// What a `/healthz` store probe found: `Err` holds why the store is unavailable.
type Probe = std::result::Result<(), String>;

enum Health {
    /// No probe yet, or the last one's task ended without an answer.
    Unknown,
    /// A store probe is running; its answer comes here.
    Probing(tokio::sync::watch::Receiver<Option<Probe>>),
    /// When the last probe ended, and what it found.
    Found(Instant, Probe),
}

impl State {
    /// A permit for one plugin call, taken while its client still waits: so clients that
    /// hang up cannot leave more than [`MAX_CALLS`] calls behind, and shutdown can wait for
    /// the calls in flight.
    async fn running(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        anyhow::ensure!(
            !self.stopping.load(Ordering::SeqCst),
            "the server is stopping"
        );
        // Counted while it waits, also when hyper drops it because its client left.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        self.in_flight
            .clone()
            .acquire_owned()
            .await
            .context("the server is stopping")
    }

    /// Runs an engine API call to its end even when the client that asked for it goes away:
    /// hyper drops a request's future when its connection closes, and a call dropped midway
    /// commits only its counters. A DingTalk or WeCom start cut off after its create would
    /// hold its key for an hour and leave the new approval without a record, so its
    /// decisions would be dropped; an engine client's timeout is enough to cause that.
    /// (Callbacks run in the request's own task: one cut off commits nothing and was not
    /// acknowledged, so the platform sends it again; a task per callback cost throughput.)
    async fn detached<T: Send + 'static>(
        running: tokio::sync::OwnedSemaphorePermit,
        call: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        tokio::spawn(async move {
            let _running = running;
            call.await
        })
        .await
        .context("the call's task failed")?
    }

    async fn handle(self: &Arc<Self>, req: http::Request<Incoming>) -> Response {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (&method, segs.as_slice()) {
            (&Method::GET | &Method::POST, ["callback", tenant, app]) => {
                self.callback(tenant, app, req).await
            }
            (_, ["callback", _, _]) => {
                let mut resp = status_json(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
                resp.headers_mut()
                    .insert(header::ALLOW, http::HeaderValue::from_static("GET, POST"));
                resp
            }
            // A request address pasted with a trailing slash, or cut short: no such route.
            (_, ["callback", ..]) => status_json(
                StatusCode::NOT_FOUND,
                "not found: callback addresses are /callback/{tenant}/{app-id}",
            ),
            (&Method::GET, ["healthz"]) => self.healthz().await,
            (_, ["api", tenant, ..]) => {
                if !self.authorized(&req, tenant) {
                    return status_json(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                }
                self.api(&method, &segs, req).await
            }
            _ => status_json(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// The server-wide token opens every tenant; a tenant's own token opens only that tenant.
    /// With neither configured the API is open, as before tokens existed.
    fn authorized(&self, req: &http::Request<Incoming>, tenant: &str) -> bool {
        let own = self
            .config
            .tenant(tenant)
            .and_then(|t| t.api_token.as_ref());
        let accepted: Vec<&String> = self.config.api_token.iter().chain(own).collect();
        if accepted.is_empty() {
            return true;
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme's name is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token);
        // Each compared in full, so the time does not say which one matched.
        accepted.iter().fold(false, |ok, t| {
            constant_time_eq(given.as_bytes(), t.as_bytes()) | ok
        })
    }

    fn app(&self, tenant: &str, app: &str) -> Option<&ImApp> {
        self.config.tenant(tenant)?.app(app)
    }

    async fn callback(
        self: &Arc<Self>,
        tenant: &str,
        app_id: &str,
        req: http::Request<Incoming>,
    ) -> Response {
        let Some(app) = self.app(tenant, app_id).cloned() else {
            return status_json(StatusCode::NOT_FOUND, "unknown tenant or app");
        };
        let (parts, body) = req.into_parts();
        let body = match read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let request = HttpRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        let Ok(_running) = self.running().await else {
            return status_json(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        };
        let outcome = match self.host.handle_callback(tenant, app, request).await {
            Ok(Reply::Callback(Ok(outcome))) => outcome,
            Ok(Reply::Callback(Err(e))) => return plugin_error(&e),
            Ok(_) => return status_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            Err(e) if e.is::<crate::host::Busy>() => return busy(&e),
            // Already logged by the host; the platform learns nothing beyond the status.
            Err(_) => return status_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        };
        // The updates are already in the outbox: the host committed them with the plugin's
        // writes, so nothing between here and the answer can lose them.
        if !outcome.updates.is_empty() {
            self.wake_delivery(tenant);
        }
        let r = outcome.response;
        let mut builder = http::Response::builder().status(r.status);
        for (k, v) in &r.headers {
            // Framing is hyper's job; the plugin cannot know how the body is sent.
            let k = k.to_ascii_lowercase();
            if matches!(
                k.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                continue;
            }
            builder = builder.header(k, v);
        }
        builder
            .body(Full::new(Bytes::from(r.body)))
            .unwrap_or_else(|_| {
                log!("tenant={tenant} app={app_id} plugin returned an invalid HTTP response");
                status_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            })
    }

    /// 200 while the store takes a write, else 503 naming why. A server whose store fails
    /// cannot take a callback, and the embedded store stays failed after an I/O error (a full
    /// disk, say) until the process restarts: a supervisor restarts only what fails its
    /// health check.
    async fn healthz(&self) -> Response {
        // A server shutting down takes no new work: its supervisor should route elsewhere.
        if self.stopping.load(Ordering::SeqCst) {
            return status_json(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        }
        // The route is open to anyone who reaches the server, and a commit to a dead Redis
        // holds a blocking thread (the pool the callbacks' commits need) for seconds: so one
        // probe at a time, whose answer, good or bad, serves every probe until
        // PROBE_ANSWERS_FOR after it ends.
        let mut answer = {
            let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
            match &*health {
                Health::Found(at, found) if at.elapsed() < PROBE_ANSWERS_FOR => {
                    return health_response(found);
                }
                Health::Probing(answer) => answer.clone(),
                _ => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    *health = Health::Probing(rx.clone());
                    // Its own task: a prober that hangs up must not cut the probe off and let
                    // the next one start another while the first still holds its thread.
                    tokio::spawn(probe_store(
                        self.host.store().clone(),
                        self.health.clone(),
                        tx,
                    ));
                    rx
                }
            }
        };
        let found = answer
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|found| found.clone())
            .unwrap_or_else(|| Err("the store probe failed".into()));
        health_response(&found)
    }

    /// Has the tenant's delivery task send its pending outbox records to its engine webhook.
    fn wake_delivery(&self, tenant: &str) {
        if let Some((_, wake)) = self.delivery.get(tenant) {
            wake.notify_one();
        }
    }

    async fn api(
        self: &Arc<Self>,
        method: &Method,
        segs: &[&str],
        req: http::Request<Incoming>,
    ) -> Response {
        let query = req.uri().query().unwrap_or("").to_string();
        if let (&Method::GET, ["api", tenant, "updates"]) = (method, segs) {
            return self.updates(tenant, &query).await;
        }
        let (parts, body) = req.into_parts();
        let body = match read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let (tenant, call) = match self.api_call(method, segs, &query, &body) {
            Ok(c) => c,
            Err(reject) => return reject.into_response(),
        };
        // A refresh, or a cancel, may have put what it found in the outbox.
        let wake = matches!(
            call,
            Call::GetApproval { refresh: true, .. } | Call::CancelApproval { .. }
        );
        let host = self.host.clone();
        let id = tenant.clone();
        let Ok(running) = self.running().await else {
            return status_json(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        };
        match Self::detached(running, async move { host.call(&id, &call).await }).await {
            Ok(reply) => {
                if wake {
                    self.wake_delivery(&tenant);
                }
                json_response(StatusCode::OK, &json::reply_to_json(&reply))
            }
            // Busy: the plugin never ran, so the same request may simply be sent again.
            Err(e) if e.is::<crate::host::Busy>() => busy(&e),
            // The outermost message says what failed (trap, deadline); the host log has the rest.
            Err(e) => status_json(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    /// Maps an engine API request to the tenant and the export call it asks for.
    fn api_call(
        &self,
        method: &Method,
        segs: &[&str],
        query: &str,
        body: &[u8],
    ) -> Result<(String, Call), Reject> {
        let json_body = || -> Result<Value, Reject> {
            if body.is_empty() {
                return Ok(json!({}));
            }
            serde_json::from_slice(body).map_err(|e| Reject::bad(format!("body is not JSON: {e}")))
        };
        let call = match (method, segs) {
            (&Method::POST, ["api", tenant, app, "approvals"]) => {
                let body = json_body()?;
                let app = self.configured_app(tenant, app)?;
                Call::StartApproval {
                    app,
                    request: ApprovalRequest::from_json(&body, "body").map_err(Reject::invalid)?,
                }
            }
            (&Method::GET, ["api", tenant, app, "approvals", id]) => Call::GetApproval {
                app: self.configured_app(tenant, app)?,
                instance_id: id.to_string(),
                refresh: query_param(query, "refresh").is_some_and(|v| v == "true" || v == "1"),
            },
            (&Method::POST, ["api", tenant, app, "approvals", id, "cancel"]) => {
                let body = json_body()?;
                let app = self.configured_app(tenant, app)?;
                crate::json::only_fields(&body, "body", &["reason"]).map_err(Reject::invalid)?;
                let reason = match body.get("reason") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(String::from_json(v, "reason").map_err(Reject::invalid)?),
                };
                Call::CancelApproval {
                    app,
                    instance_id: id.to_string(),
                    reason,
                }
            }
            (&Method::POST, ["api", tenant, "notify"]) => {
                self.notify_call(tenant, &json_body()?)?
            }
            _ => return Err(Reject::not_found("not found")),
        };
        Ok((segs[1].to_string(), call))
    }

    fn configured_app(&self, tenant: &str, app: &str) -> Result<ImApp, Reject> {
        self.app(tenant, app)
            .cloned()
            .ok_or_else(|| Reject::not_found("unknown tenant or app"))
    }

    fn notify_call(&self, tenant: &str, body: &Value) -> Result<Call, Reject> {
        let t = self
            .config
            .tenant(tenant)
            .ok_or_else(|| Reject::not_found("unknown tenant"))?;
        crate::json::only_fields(body, "body", &["app_id", "notification"])
            .map_err(Reject::invalid)?;
        let app = match body.get("app_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(self.configured_app(&t.id, id)?),
            Some(_) => return Err(Reject::bad("`app_id` must be a string".into())),
        };
        let notification = body
            .get("notification")
            .ok_or_else(|| anyhow::anyhow!("missing `notification`"))
            .and_then(|n| Notification::from_json(n, "notification"))
            .map_err(Reject::invalid)?;
        Ok(Call::Notify { app, notification })
    }

    async fn updates(&self, tenant: &str, query: &str) -> Response {
        if self.config.tenant(tenant).is_none() {
            return status_json(StatusCode::NOT_FOUND, "unknown tenant");
        }
        let after = match query_param(query, "after").map(|v| v.parse::<u64>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return status_json(StatusCode::BAD_REQUEST, "`after` must be a number");
            }
        };
        let store = self.host.store().clone();
        let owned = tenant.to_string();
        // On a blocking thread: a store that hangs (Redis behind a dead link) must not hold an
        // async worker, which callbacks, pings and timers of every tenant share.
        let read = blocking(
            move || -> Result<std::result::Result<(Vec<Value>, bool), u64>> {
                // A cursor past every sequence number given out comes from another store (one
                // restored from an older backup, a clock set back): acknowledging up to it would
                // drop records never returned.
                let last = store.outbox_last_seq(&owned)?;
                if after > last {
                    return Ok(Err(last));
                }
                if after > 0 {
                    store.outbox_remove_through(&owned, after)?;
                }
                let mut page = store.outbox_page(&owned, after, UPDATES_PAGE + 1)?;
                let more = page.len() > UPDATES_PAGE;
                page.truncate(UPDATES_PAGE);
                let updates = page
                    .into_iter()
                    .map(|(seq, record)| with_seq(&record, seq))
                    .collect();
                Ok(Ok((updates, more)))
            },
        )
        .await;
        match read {
            Ok(Ok((updates, more))) => {
                json_response(StatusCode::OK, &json!({"updates": updates, "more": more}))
            }
            Ok(Err(last)) => status_json(
                StatusCode::CONFLICT,
                &format!(
                    "`after` is {after} but the newest update here is {last}: this cursor is \
                     not from this store; read from after=0 (which acknowledges nothing) and \
                     go on from the updates' seq"
                ),
            ),
            Err(e) => {
                log!("tenant={tenant} outbox read failed: {e:#}");
                status_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// The tenant's delivery task: on each wake-up, POSTs its pending outbox records to `url`,
/// oldest first, stopping at the first failure; what is left goes out on the next wake-up.
/// After a failure the next try waits, 1 s doubling up to the redelivery timer's period:
/// every callback wakes the task, and an engine that is down would otherwise get a POST (and
/// the log a line) per callback.
/// A tenant's `engine_webhook` and its signing secret.
#[derive(Clone)]
struct Webhook {
    url: String,
    secret: Option<String>,
}

async fn deliver_updates(state: Weak<State>, tenant: String, hook: Webhook, wake: Arc<Notify>) {
    let mut pause = Duration::ZERO;
    loop {
        // Wake-ups during the pause are kept (one permit), so none is lost.
        tokio::time::sleep(pause).await;
        wake.notified().await;
        let Some(store) = state.upgrade().map(|s| s.host.store().clone()) else {
            return;
        };
        pause = match deliver_pending(&store, &tenant, &hook).await {
            Ok(()) => Duration::ZERO,
            Err(e) => {
                log!("tenant={tenant} {e:#}");
                (pause * 2).clamp(Duration::from_secs(1), REDELIVERY)
            }
        };
    }
}

async fn deliver_pending(store: &Arc<dyn Backend>, tenant: &str, hook: &Webhook) -> Result<()> {
    loop {
        let (s, t) = (store.clone(), tenant.to_string());
        let pending = blocking(move || s.outbox_page(&t, 0, UPDATES_PAGE))
            .await
            .context("outbox read failed")?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut delivered = None;
        let mut failure = None;
        for (seq, record) in pending {
            let update = with_seq(&record, seq);
            match tokio::time::timeout(WEBHOOK_TIMEOUT, post_json(hook, &update)).await {
                Ok(Ok(())) => delivered = Some(seq),
                Ok(Err(e)) => {
                    failure = Some(e.context(format!("webhook delivery of #{seq} failed")))
                }
                Err(_) => {
                    failure = Some(anyhow::anyhow!(
                        "webhook delivery of #{seq} failed: no answer within {} s",
                        WEBHOOK_TIMEOUT.as_secs()
                    ))
                }
            }
            if failure.is_some() {
                break;
            }
        }
        // Oldest first, so every record up to the last delivered one has gone out: one
        // removal per page rather than a durable commit per record.
        if let Some(seq) = delivered {
            let (s, t) = (store.clone(), tenant.to_string());
            blocking(move || s.outbox_remove_through(&t, seq))
                .await
                .context("outbox remove failed")?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
}

/// An outbox record as the engine gets it: the update with its sequence number.
fn with_seq(record: &[u8], seq: u64) -> Value {
    let mut v: Value = serde_json::from_slice(record).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("seq".into(), json!(seq));
    }
    v
}

/// A request the API turns away before calling the plugin.
struct Reject {
    status: StatusCode,
    message: String,
}

impl Reject {
    fn bad(message: String) -> Reject {
        Reject {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    /// A body that is JSON but not the expected shape; the message names the field only.
    fn invalid(e: anyhow::Error) -> Reject {
        Reject::bad(format!("{e:#}"))
    }

    fn not_found(message: &str) -> Reject {
        Reject {
            status: StatusCode::NOT_FOUND,
            message: message.to_string(),
        }
    }

    fn into_response(self) -> Response {
        status_json(self.status, &self.message)
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes, answering 413 for larger ones without reading
/// them (when the length is declared) or as soon as the limit is crossed.
async fn read_body(headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(status_json(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
    }
    let Ok(read) = tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await
    else {
        return Err(status_json(
            StatusCode::REQUEST_TIMEOUT,
            "body not received in time",
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(status_json(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))
        }
        Err(_) => Err(status_json(StatusCode::BAD_REQUEST, "could not read body")),
    }
}

/// 503 with `Retry-After`, for a call that found no free slot and never ran.
fn busy(e: &anyhow::Error) -> Response {
    let mut r = status_json(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    r
}

/// Maps a plugin error to an HTTP status for the platform. Only the kind is sent back: the
/// message is for the operator's log, and platforms need nothing more than the status.
fn plugin_error(e: &PluginError) -> Response {
    let status = match e {
        PluginError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        PluginError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_response(status, &json!({"error": e.kind()}))
}

/// Commits a `/healthz` probe, as every call ends with one: after a failed write the embedded
/// store refuses all writes until a restart while reads keep coming from its cache, so a read
/// probe said "ok" to a server that could take no callback.
async fn probe_store(
    store: Arc<dyn Backend>,
    health: Arc<std::sync::Mutex<Health>>,
    answer: tokio::sync::watch::Sender<Option<Probe>>,
) {
    // Should this task end without an answer, the next probe starts afresh rather than
    // waiting on it for ever.
    struct Ended(Arc<std::sync::Mutex<Health>>);
    impl Drop for Ended {
        fn drop(&mut self) {
            let mut health = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*health, Health::Probing(_)) {
                *health = Health::Unknown;
            }
        }
    }
    let ended = Ended(health);
    // '#' cannot occur in a tenant id, so the probe touches no tenant's key.
    let write = Commit {
        reads: Vec::new(),
        writes: vec![("probe".into(), Some(b"ok".to_vec()))],
        outbox: Vec::new(),
    };
    let found = crate::host::commit_once(&store, &Arc::from("#health"), write)
        .await
        .map(|_| ())
        .map_err(|e| format!("store unavailable: {e:#}"));
    *ended.0.lock().unwrap_or_else(|e| e.into_inner()) =
        Health::Found(Instant::now(), found.clone());
    answer.send_replace(Some(found));
}

fn health_response(found: &Probe) -> Response {
    match found {
        Ok(()) => status_json(StatusCode::OK, "ok"),
        Err(why) => status_json(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

fn status_json(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message}))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes (and `+` is left alone: path segments, not forms). Invalid escapes
/// are kept literally.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    // Digests first, so the comparison's time does not tell the token's length either.
    bool::from(Sha256::digest(a).ct_eq(&Sha256::digest(b)))
}

/// The `X-Imbridge-Signature` of `body` sent at `timestamp` (Unix seconds): `sha256=` and the
/// hex HMAC-SHA256, keyed with the secret, of `{timestamp}.{body}`. The timestamp is signed so
/// that an engine can refuse an old delivery replayed by someone who recorded it.
pub fn webhook_signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac as _};
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// POSTs JSON to the webhook (http or https), signed when it has a secret, and expects a 2xx
/// answer.
///
/// Uses wasmtime-wasi-http's client, which already carries TLS with the webpki roots.
async fn post_json(hook: &Webhook, body: &Value) -> Result<()> {
    let uri: http::Uri = hook.url.parse().context("engine_webhook is not a URL")?;
    let authority = uri
        .authority()
        .context("engine_webhook has no host")?
        .to_string();
    let body = Bytes::from(body.to_string());
    let mut request = http::Request::post(uri)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &hook.secret {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        request = request
            .header("x-imbridge-timestamp", now.to_string())
            .header(
                "x-imbridge-signature",
                webhook_signature(secret, now, &body),
            );
    }
    let body = Full::new(body)
        .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} });
    let request = request.body(body)?;
    let timeout = Some(Duration::from_secs(10));
    let options = wasmtime_wasi_http::RequestOptions {
        connect_timeout: timeout,
        first_byte_timeout: timeout,
        between_bytes_timeout: timeout,
    };
    let (response, _io) = wasmtime_wasi_http::default_send_request(request, Some(options))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "engine answered {}",
        response.status()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(
            query_param("a=1&refresh=true", "refresh").as_deref(),
            Some("true")
        );
        assert_eq!(query_param("after=5", "refresh"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
