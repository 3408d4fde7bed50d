//! Persistent connections for engines the platforms cannot reach: the host dials out and
//! receives the events over a WebSocket (Feishu's long connection, DingTalk's Stream mode)
//! instead of serving a callback URL.
//!
//! Per app configured with `"callback": "persistent"`, one task:
//! 1. takes the app's [`Lease`] (so only one host process holds the connection; the others
//!    wait for it to expire or be released),
//! 2. asks the platform for an endpoint and opens the WebSocket ([`feishu`], [`dingtalk`]),
//! 3. hands every event to the plugin's `handle-event` and acknowledges it only after the
//!    plugin's writes and the outbox records are durable: an event the host could not process
//!    stays un-acked and the platform redelivers it (the plugin deduplicates redeliveries),
//! 4. renews the lease while connected and reconnects with exponential backoff and jitter,
//!    never sooner than the platform asks.

pub mod dingtalk;
pub mod feishu;
pub mod lease;

pub use lease::{Lease, LeaseStore};

use crate::bindings::types::{Approval, Error as PluginError, ImApp, Platform};
use crate::call::Reply;
use crate::config::PersistentApp;
use crate::host::Host;
use crate::log;
use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rand::Rng as _;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// What to do with an event after the plugin saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Processed (or never processable): acknowledge.
    Ack,
    /// Not durable: leave un-acked so the platform redelivers it.
    Retry,
}

/// Called with the approvals an event changed; must make them durable (the outbox) before
/// returning `Ok`.
pub type UpdateSink = Arc<dyn Fn(&str, &str, &[Approval]) -> Result<()> + Send + Sync>;

/// Hands events to the plugin and their updates to the sink.
#[derive(Clone)]
pub struct Dispatcher {
    host: Host,
    sink: UpdateSink,
}

impl Dispatcher {
    pub fn new(host: Host, sink: UpdateSink) -> Dispatcher {
        Dispatcher { host, sink }
    }

    pub async fn dispatch(&self, tenant: &str, app: &ImApp, event: Vec<u8>) -> Verdict {
        match self.host.handle_event(tenant, app.clone(), event).await {
            Ok(Reply::Event(Ok(updates))) => {
                if updates.is_empty() {
                    return Verdict::Ack;
                }
                match (self.sink)(tenant, &app.id, &updates) {
                    Ok(()) => Verdict::Ack,
                    Err(e) => {
                        log!("tenant={tenant} app={} outbox write failed: {e:#}", app.id);
                        Verdict::Retry
                    }
                }
            }
            // Malformed or foreign events never get better by redelivery: acknowledge them so
            // the platform does not send them forever.
            Ok(Reply::Event(Err(PluginError::InvalidInput(_)))) => Verdict::Ack,
            // The host already logged the error kind; the platform will redeliver.
            Ok(_) | Err(_) => Verdict::Retry,
        }
    }
}

/// Timing of the connection tasks.
#[derive(Clone, Debug)]
pub struct Options {
    /// This process's lease owner id.
    pub owner: String,
    pub lease_ttl: Duration,
    /// How often a host that does not hold the lease checks it again.
    pub lease_poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often a connection sends a WebSocket ping. The server's pong is a sign of life
    /// like any other frame, and four of these intervals without one mean the connection is
    /// dead, whatever the platform's own pings (the Python SDKs: 20 s, given up after 40 s).
    pub keepalive: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            owner: default_owner(),
            lease_ttl: Duration::from_secs(30),
            lease_poll: Duration::from_secs(5),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(120),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// `pid-random`: unique per process start, so a restarted host is a new owner and waits for
/// (or finds released) the lease of its previous life.
pub fn default_owner() -> String {
    format!(
        "{}-{:08x}",
        std::process::id(),
        rand::thread_rng().r#gen::<u32>()
    )
}

/// Why a session ended, for the reconnect policy.
#[derive(Debug)]
pub struct SessionEnd {
    /// The platform asked to reconnect (DingTalk `disconnect`): no backoff beyond the minimum.
    pub asked_to_reconnect: bool,
    /// What happened, for the log (never carries secrets).
    pub reason: String,
}

/// How a session ended (whether its WebSocket opened is [`Session::opened`]).
fn end(reason: impl Into<String>) -> SessionEnd {
    SessionEnd {
        asked_to_reconnect: false,
        reason: reason.into(),
    }
}

/// WebSocket pings every `every`, from one interval from now.
fn keepalive(every: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// How a session ends that heard nothing for `dead_after`: dead without a close.
fn silent_for(dead_after: Duration) -> SessionEnd {
    end(format!(
        "no frames from the server for {} s",
        dead_after.as_secs()
    ))
}

/// What the socket's read half gave: a message, or how the session ended. Any message is a
/// sign of life, so it moves `last_seen`.
fn received(
    msg: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>,
    last_seen: &mut tokio::time::Instant,
) -> std::result::Result<Message, SessionEnd> {
    match msg {
        None | Some(Ok(Message::Close(_))) => Err(end("closed by the server")),
        Some(Err(e)) => Err(end(format!("read failed: {e}"))),
        Some(Ok(m)) => {
            *last_seen = tokio::time::Instant::now();
            Ok(m)
        }
    }
}

/// Reconnect hints the platform sent (Feishu `ClientConfig`).
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub reconnect_interval: Option<Duration>,
    pub reconnect_nonce: Option<Duration>,
    pub ping_interval: Option<Duration>,
}

/// The running connection tasks; dropping them (or [`Connections::shutdown`]) stops them.
pub struct Connections {
    tasks: Vec<(JoinHandle<()>, Lease)>,
}

impl Connections {
    /// Stops every connection and releases the leases, so another host can take over at once.
    /// The releases go out together and are waited for [`RELEASE_LIMIT`] at most: one by one,
    /// a store that does not answer held the stop for its timeout per app.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for (task, _) in &tasks {
            task.abort();
        }
        let releases = tasks.into_iter().map(|(task, lease)| async move {
            let _ = task.await;
            match tokio::task::spawn_blocking(move || lease.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log!("lease release failed: {e:#}"),
                Err(e) => log!("lease release failed: {e}"),
            }
        });
        let all = futures_util::future::join_all(releases);
        if tokio::time::timeout(RELEASE_LIMIT, all).await.is_err() {
            log!(
                "lease release unanswered after {} s: the leases lapse on their own",
                RELEASE_LIMIT.as_secs()
            );
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        for (task, _) in &self.tasks {
            task.abort();
        }
    }
}

/// How long a stop waits for the store to release the leases (they lapse after their TTL
/// anyway, and a released one can never be taken back by this process).
pub const RELEASE_LIMIT: Duration = Duration::from_secs(5);

/// Why an app on a platform without a persistent-connection mode cannot have one.
const NO_PERSISTENT_MODE: &str = "WeCom has no persistent connection mode (only Feishu/Lark \
    and DingTalk do): configure this app with \"callback\": \"http\"";

/// Refuses apps whose platform only delivers events as HTTP callbacks (WeCom), so a
/// misconfiguration fails at load time instead of waiting for events that never come.
pub fn check_platform(app: &ImApp) -> Result<()> {
    match app.platform {
        Platform::Feishu | Platform::Lark | Platform::Dingtalk => Ok(()),
        Platform::Wecom => Err(anyhow!(NO_PERSISTENT_MODE)),
    }
}

/// Starts one connection task per app.
pub fn spawn(
    apps: Vec<PersistentApp>,
    dispatcher: Dispatcher,
    leases: Arc<dyn LeaseStore>,
    options: Options,
) -> Connections {
    let mut tasks = Vec::new();
    for p in apps {
        let name = format!("{}/{}", p.tenant, p.app.id);
        let lease = Lease::new(leases.clone(), &name, &options.owner, options.lease_ttl);
        let task = tokio::spawn(run_app(
            p,
            dispatcher.clone(),
            lease.clone(),
            options.clone(),
        ));
        tasks.push((task, lease));
    }
    Connections { tasks }
}

/// Holds one app's connection forever: lease, connect, serve, back off, again.
async fn run_app(p: PersistentApp, dispatcher: Dispatcher, lease: Lease, options: Options) {
    let (tenant, app) = (p.tenant.as_str(), &p.app);
    let tag = format!("tenant={tenant} app={}", app.id);
    // The configuration loaders refuse these already; a library caller gets one log line.
    if let Err(e) = check_platform(app) {
        log!("{tag} no persistent connection: {e}");
        return;
    }
    let mut hints = Hints::default();
    let mut failures: u32 = 0;
    let mut waiting_logged = false;
    loop {
        let asked = Instant::now();
        match acquire(&lease).await {
            Ok(true) => waiting_logged = false,
            Ok(false) => {
                if !waiting_logged {
                    log!("{tag} persistent connection held by another host; waiting");
                    waiting_logged = true;
                }
                tokio::time::sleep(options.lease_poll).await;
                continue;
            }
            Err(e) => {
                log!("{tag} lease check failed: {e:#}");
                tokio::time::sleep(options.lease_poll).await;
                continue;
            }
        }
        let session = Session {
            tenant,
            app,
            dispatcher: &dispatcher,
            base: p.endpoint_base.clone(),
            keepalive: options.keepalive,
            opened: std::sync::OnceLock::new(),
        };
        let end = tokio::select! {
            end = run_session(&session, &mut hints) => end,
            lost = keep_lease(&lease, asked) => SessionEnd {
                asked_to_reconnect: false,
                reason: lost,
            },
        };
        log!("{tag} persistent connection ended: {}", end.reason);
        // Only a connection that stayed up for a keepalive interval resets the backoff: one
        // that a proxy or the server closes straight after the upgrade is a failure too, or
        // the host would open a connection (posting the app secret) every second for ever.
        let opened = session.opened.get();
        let lasted = opened.is_some_and(|at| at.elapsed() >= options.keepalive);
        failures = if lasted { 0 } else { failures + 1 };
        let delay = if end.asked_to_reconnect {
            options.backoff_min
        } else {
            reconnect_delay(&options, &hints, failures, opened.is_some())
        };
        tokio::time::sleep(delay).await;
    }
}

async fn acquire(lease: &Lease) -> Result<bool> {
    let lease = lease.clone();
    tokio::task::spawn_blocking(move || lease.acquire())
        .await
        .context("lease task failed")?
}

/// Renews the lease (taken when `asked`) every third of its TTL; returns when it is lost, or
/// about to lapse because renewals keep failing or do not answer.
async fn keep_lease(lease: &Lease, asked: Instant) -> String {
    let every = lease.ttl() / 3;
    // Counted from before each request, so the store's expiry is never earlier than this.
    let mut held_until = asked + lease.ttl();
    // Also counted from the request, not its answer: a grant that took most of the TTL
    // (a slow store) used to be followed by a full `every` of sleep, and the connection
    // outlived the lease while another host took it and connected.
    let mut renew_at = asked + every;
    loop {
        tokio::time::sleep_until(renew_at.into()).await;
        let asked = Instant::now();
        // A renewal that has not answered by the time the lease lapses (a store behind a
        // dead link: several timeouts in a row) must not keep the connection past it, when
        // another host may already hold the lease and be connected.
        let lapses = held_until.checked_sub(every / 2).unwrap_or(held_until);
        if asked >= lapses {
            return "lease about to expire before its renewal was due (the store answers slowly)"
                .into();
        }
        let renewed = tokio::select! {
            renewed = acquire(lease) => renewed,
            () = tokio::time::sleep_until(lapses.into()) => {
                return "lease about to expire, its renewal unanswered".into();
            }
        };
        match renewed {
            Ok(true) => {
                held_until = asked + lease.ttl();
                renew_at = asked + every;
            }
            Ok(false) => return "lease taken over by another host".into(),
            // A store hiccup is not a reason to drop a healthy connection yet: the lease stays
            // ours until it expires, and the next renewal may succeed. Once it would lapse
            // before the next try, another host may take it and connect: two connections
            // split the platform's events, and this one may not reach the store at all.
            Err(e) => {
                log!("lease renewal failed: {e:#}");
                if Instant::now() + every >= held_until {
                    return format!("lease about to expire, renewals failing: {e:#}");
                }
                renew_at = Instant::now() + every;
            }
        }
    }
}

/// Exponential backoff with full jitter, plus the platform's random nonce. The platform's
/// reconnect interval is the least wait between failed attempts only: after a connection
/// that worked, the first attempt waits just the nonce (as Feishu's own SDKs do), since
/// every second of the gap is a second without events.
/// The wait before the next attempt after `failures` in a row; `connected` says whether the
/// last one got as far as an open WebSocket, which the platform's `ReconnectInterval` (meant
/// for attempts that fail) does not apply to.
fn reconnect_delay(options: &Options, hints: &Hints, failures: u32, connected: bool) -> Duration {
    let exp = options
        .backoff_min
        .saturating_mul(1u32 << failures.min(16))
        .min(options.backoff_max);
    let mut rng = rand::thread_rng();
    let jittered = options.backoff_min
        + exp
            .saturating_sub(options.backoff_min)
            .mul_f64(rng.r#gen::<f64>());
    let floor = match failures {
        _ if connected => Duration::ZERO,
        0 => Duration::ZERO,
        _ => hints.reconnect_interval.unwrap_or_default(),
    };
    let nonce = hints
        .reconnect_nonce
        .map(|n| n.mul_f64(rng.r#gen::<f64>()))
        .unwrap_or_default();
    jittered.max(floor) + nonce
}

/// One connection attempt's context.
pub struct Session<'a> {
    pub tenant: &'a str,
    pub app: &'a ImApp,
    pub dispatcher: &'a Dispatcher,
    /// Overrides where the endpoint is requested (default: the app's api-base, else the
    /// platform's public API host).
    pub base: Option<String>,
    /// [`Options::keepalive`].
    pub keepalive: Duration,
    /// When the WebSocket opened, if it did.
    pub opened: std::sync::OnceLock<Instant>,
}

impl Session<'_> {
    /// Opens the session's WebSocket, noting when.
    async fn open_ws(&self, url: &str) -> std::result::Result<WebSocket, String> {
        let ws = open_ws(url).await?;
        let _ = self.opened.set(Instant::now());
        Ok(ws)
    }
}

impl Session<'_> {
    fn base(&self, default: &str) -> String {
        self.base
            .clone()
            .or_else(|| self.app.api_base.clone())
            .unwrap_or_else(|| default.to_string())
            .trim_end_matches('/')
            .to_string()
    }
}

async fn run_session(session: &Session<'_>, hints: &mut Hints) -> SessionEnd {
    match session.app.platform {
        Platform::Feishu | Platform::Lark => feishu::run(session, hints).await,
        Platform::Dingtalk => dingtalk::run(session).await,
        // Never started (see `check_platform`).
        Platform::Wecom => SessionEnd {
            asked_to_reconnect: false,
            reason: NO_PERSISTENT_MODE.into(),
        },
    }
}

/// Events handed to the plugin at once per connection. The connection keeps reading (pings,
/// pongs, the platform's keep-alives) while they run; an event beyond this many is left
/// unacknowledged, so the platform sends it again later.
pub const MAX_IN_FLIGHT: usize = 64;

/// How long a WebSocket upgrade may take, as in the official Python SDKs (the `websockets`
/// library's default): a proxy or NAT that accepts the connection and never answers would
/// otherwise keep the session, and with it the lease, waiting for good.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `url`; the error says why not (never the URL, which carries an
/// access ticket).
async fn open_ws(url: &str) -> std::result::Result<WebSocket, String> {
    use tokio_tungstenite::tungstenite::Error;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(url)).await {
        Err(_) => Err(format!(
            "WebSocket handshake unanswered after {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        Ok(Ok((ws, _))) => Ok(ws),
        // Feishu says why it refused an upgrade (bad ticket, too many connections) in these
        // headers, as its SDKs read them.
        Ok(Err(Error::Http(answer))) => {
            let why: Vec<String> = ["handshake-status", "handshake-msg", "handshake-autherrcode"]
                .iter()
                .filter_map(|h| Some(format!("{h}={}", answer.headers().get(*h)?.to_str().ok()?)))
                .collect();
            Err(format!(
                "WebSocket upgrade refused: HTTP {} {}",
                answer.status().as_u16(),
                why.join(" ")
            ))
        }
        Ok(Err(e)) => Err(format!("WebSocket connect failed: {e}")),
    }
}

/// The largest endpoint answer read (Feishu's and DingTalk's are a few hundred bytes).
const MAX_ENDPOINT_ANSWER: usize = 64 << 10;

/// How long asking for a connection endpoint may take in all, as the Feishu Node SDK allows.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(15);

/// POSTs JSON and returns the status and the JSON answer, within [`ENDPOINT_TIMEOUT`]. The
/// body carries credentials and is never logged.
async fn post_json(url: &str, body: &Value) -> Result<(u16, Value)> {
    post_json_within(url, body, ENDPOINT_TIMEOUT).await
}

/// wasmtime-wasi-http bounds the connect, the HTTP handshake and each wait for bytes, but not
/// the TLS handshake: a peer that accepts the connection and then says nothing (a firewall
/// that drops rather than resets, a stuck proxy) held the session there for ever, its lease
/// renewed, so no replica took over and no event came until a restart. One bound for the
/// whole exchange makes that a failed attempt like any other.
async fn post_json_within(url: &str, body: &Value, limit: Duration) -> Result<(u16, Value)> {
    match tokio::time::timeout(limit, exchange_json(url, body)).await {
        Ok(answer) => answer,
        Err(_) => anyhow::bail!(
            "no answer from the endpoint within {}s",
            limit.as_secs_f32()
        ),
    }
}

async fn exchange_json(url: &str, body: &Value) -> Result<(u16, Value)> {
    let uri: http::Uri = url.parse().context("endpoint URL is invalid")?;
    let authority = uri
        .authority()
        .context("endpoint URL has no host")?
        .to_string();
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} });
    let request = http::Request::post(uri)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        // DingTalk's gateway answers XML without it (its official SDKs all send it).
        .header(http::header::ACCEPT, "application/json")
        .header("locale", "zh")
        .header(http::header::USER_AGENT, "imbridge-host")
        .body(body)?;
    let timeout = Some(Duration::from_secs(10));
    let options = wasmtime_wasi_http::RequestOptions {
        connect_timeout: timeout,
        first_byte_timeout: timeout,
        between_bytes_timeout: timeout,
    };
    let (response, io) = wasmtime_wasi_http::default_send_request(request, Some(options))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // `io` drives the connection: without it only a body that arrived together with the
    // headers is ever read (not a chunked one, nor one in a later TCP or TLS record). Aborted
    // on drop, so a timed-out exchange leaves no task behind.
    let _io = crate::AbortOnDrop(tokio::spawn(io));
    let status = response.status().as_u16();
    // The answer is an endpoint and a ticket: a proxy that streams on (or anyone on the path
    // of an http:// `endpoint_base`) is cut off there, not buffered for 10 s.
    let body = http_body_util::Limited::new(response.into_body(), MAX_ENDPOINT_ANSWER);
    let bytes = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .context("endpoint answer timed out")?
        .map_err(|e| anyhow!("reading endpoint answer: {e}"))?
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Grants the lease once; every renewal then fails at once (`hang: None`, a replica cut
    /// off from Redis) or hangs for that long and succeeds (a store behind a dead link).
    struct CutOff {
        hang: Option<Duration>,
        granted: std::sync::atomic::AtomicBool,
        /// How long the first grant takes.
        slow_grant: Duration,
    }

    impl LeaseStore for CutOff {
        fn try_acquire(&self, _: &str, _: &str, _: Duration) -> Result<bool> {
            if self.granted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                match self.hang {
                    None => anyhow::bail!("store unreachable"),
                    Some(hang) => std::thread::sleep(hang),
                }
            } else {
                std::thread::sleep(self.slow_grant);
            }
            Ok(true)
        }
        fn release(&self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        fn holder(&self, _: &str) -> Result<Option<(String, u64)>> {
            Ok(None)
        }
    }

    /// A listener on a free loopback port, and the `scheme` URL of `path_and_query` on it.
    async fn loopback(scheme: &str, path_and_query: &str) -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "{scheme}://{}{path_and_query}",
            listener.local_addr().unwrap()
        );
        (listener, url)
    }

    /// A store whose releases wait while `gate` is held.
    #[derive(Default)]
    struct SlowRelease {
        gate: crate::store::Gate,
    }

    impl LeaseStore for SlowRelease {
        fn try_acquire(&self, _: &str, _: &str, _: Duration) -> Result<bool> {
            Ok(true)
        }
        fn release(&self, _: &str, _: &str) -> Result<()> {
            self.gate.pass();
            Ok(())
        }
        fn holder(&self, _: &str) -> Result<Option<(String, u64)>> {
            Ok(None)
        }
    }

    /// A stop releases every app's lease at once and waits no longer than [`RELEASE_LIMIT`]
    /// for a store that does not answer; before, it released them one by one, each waiting
    /// for the store's timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_releases_the_leases_together_within_its_bound() {
        let store = Arc::new(SlowRelease::default());
        store.gate.hold();
        // Opened however the test ends: a release still held would keep the runtime from
        // shutting down, and the test would hang instead of failing.
        struct Open(Arc<SlowRelease>);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.gate.release();
            }
        }
        let _open = Open(store.clone());
        let tasks = (0..3)
            .map(|i| {
                let lease = Lease::new(
                    store.clone(),
                    &format!("t/a{i}"),
                    "me",
                    Duration::from_secs(30),
                );
                (tokio::spawn(std::future::pending::<()>()), lease)
            })
            .collect();
        let stop = tokio::spawn(Connections { tasks }.shutdown());
        let s = store.clone();
        let together =
            tokio::task::spawn_blocking(move || s.gate.wait_for(3, Duration::from_secs(10)));
        assert!(
            together.await.unwrap(),
            "three releases at the store at once"
        );
        tokio::time::timeout(RELEASE_LIMIT + Duration::from_secs(10), stop)
            .await
            .expect("the stop is bounded")
            .unwrap();
    }

    /// How `keep_lease` ends for a lease of `ttl` on a [`CutOff`] store, checking that it
    /// ends before the lease lapses.
    async fn lease_kept(ttl: Duration, hang: Option<Duration>, slow_grant: Duration) -> String {
        let store = CutOff {
            hang,
            granted: Default::default(),
            slow_grant,
        };
        let lease = Lease::new(Arc::new(store), "t/a", "me", ttl);
        let asked = Instant::now();
        assert!(acquire(&lease).await.unwrap());
        let reason = tokio::time::timeout(2 * ttl, keep_lease(&lease, asked))
            .await
            .expect("keep_lease went on past the lease");
        assert!(asked.elapsed() < ttl, "{:?}", asked.elapsed());
        reason
    }

    /// A holder whose renewals fail gives the connection up before its lease can pass to
    /// another host; it used to keep it for ever.
    #[tokio::test]
    async fn a_lease_that_cannot_be_renewed_ends_the_connection_before_it_lapses() {
        let reason = lease_kept(Duration::from_secs(3), None, Duration::ZERO).await;
        assert!(reason.contains("about to expire"), "{reason}");
    }

    /// A renewal that takes longer than the lease has left ends the connection before the
    /// lease lapses; before, the connection went on until the renewal answered, alongside
    /// the one another host opened meanwhile.
    #[tokio::test]
    async fn a_renewal_that_hangs_ends_the_connection_before_the_lease_lapses() {
        let reason = lease_kept(
            Duration::from_secs(3),
            Some(Duration::from_secs(5)),
            Duration::ZERO,
        )
        .await;
        assert!(reason.contains("about to expire"), "{reason}");
    }

    /// A grant that took most of the TTL is renewed at once, or given up before it lapses;
    /// before, a full third of the TTL was slept first, past the lease's end.
    #[tokio::test]
    async fn a_slow_grant_is_not_kept_past_its_lease() {
        let ttl = Duration::from_secs(3);
        let reason = lease_kept(ttl, None, Duration::from_millis(2_500)).await;
        assert!(reason.contains("about to expire"), "{reason}");
    }

    /// Feishu asks for 120 s between attempts and up to 30 s of random delay: a connection
    /// that worked and ended is tried again within the nonce, failed attempts after that
    /// wait the interval. Before, every reconnect waited at least 120 s.
    #[test]
    fn the_reconnect_interval_applies_between_failed_attempts() {
        let options = Options::default();
        let hints = Hints {
            reconnect_interval: Some(Duration::from_secs(120)),
            reconnect_nonce: Some(Duration::from_secs(30)),
            ping_interval: None,
        };
        for _ in 0..100 {
            let first = reconnect_delay(&options, &hints, 0, true);
            assert!(first >= options.backoff_min, "{first:?}");
            assert!(
                first <= options.backoff_min + Duration::from_secs(30),
                "{first:?}"
            );
            let later = reconnect_delay(&options, &hints, 1, false);
            assert!(later >= Duration::from_secs(120), "{later:?}");
            assert!(later <= Duration::from_secs(150), "{later:?}");
            // A connection that opened and closed soon is a failure for the backoff, but the
            // interval is for attempts that fail: it waits a doubled range and the nonce.
            let short = reconnect_delay(&options, &hints, 1, true);
            assert!(
                short <= 2 * options.backoff_min + Duration::from_secs(30),
                "{short:?}"
            );
        }
    }

    /// A server that accepts the connection and never answers the upgrade (a stuck proxy)
    /// ends the attempt; it used to hold the session, and the lease, until a restart.
    #[tokio::test]
    async fn an_unanswered_websocket_handshake_ends_the_attempt() {
        let (listener, url) = loopback("ws", "/ws?ticket=secret").await;
        let silent = tokio::spawn(async move {
            let (_sock, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(300)).await;
        });
        let began = Instant::now();
        let err = tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, open_ws(&url))
            .await
            .expect("the attempt ends")
            .unwrap_err();
        assert!(began.elapsed() >= HANDSHAKE_TIMEOUT, "{err}");
        assert!(err.contains("unanswered"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        silent.abort();
    }

    /// Feishu's reasons for refusing an upgrade reach the log.
    #[tokio::test]
    async fn a_refused_upgrade_says_why() {
        let (listener, url) = loopback("ws", "/ws?ticket=secret").await;
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap();
            sock.write_all(
                b"HTTP/1.1 403 Forbidden\r\nhandshake-status: 403\r\n\
                  handshake-msg: exceed connection limit\r\n\
                  handshake-autherrcode: 1000040350\r\ncontent-length: 0\r\n\r\n",
            )
            .await
            .unwrap();
        });
        let err = open_ws(&url).await.unwrap_err();
        assert!(err.contains("HTTP 403"), "{err}");
        assert!(
            err.contains("handshake-msg=exceed connection limit"),
            "{err}"
        );
        assert!(err.contains("handshake-autherrcode=1000040350"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    /// The endpoint's answer chunked and written in pieces, as a real gateway may send it.
    #[tokio::test]
    async fn reads_an_answer_that_arrives_in_pieces() {
        let (listener, url) = loopback("http", "/callback/ws/endpoint").await;
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            let _ = head_tx.send(String::from_utf8_lossy(&got).to_ascii_lowercase());
            let pieces: [&[u8]; 4] = [
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                b"8\r\n{\"code\":\r\n",
                b"2\r\n0}\r\n",
                b"0\r\n\r\n",
            ];
            for piece in pieces {
                sock.write_all(piece).await.unwrap();
                sock.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let (status, json) = tokio::time::timeout(
            Duration::from_secs(5),
            post_json(&url, &serde_json::json!({"x": 1})),
        )
        .await
        .expect("answered within 5 s")
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(json, serde_json::json!({"code": 0}));
        let head = head_rx.await.unwrap();
        assert!(head.contains("\r\naccept: application/json\r\n"), "{head}");
    }

    /// An endpoint answer past 64 KiB is a failed attempt, read no further; before, it was
    /// buffered whole for up to 10 s, however large.
    #[tokio::test]
    async fn an_endpoint_answer_is_read_up_to_64_kib() {
        let (listener, url) = loopback("http", "/endpoint").await;
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = sent.clone();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap();
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n";
            sock.write_all(head).await.unwrap();
            let chunk = vec![b' '; 64 << 10];
            // 100 MiB announced; written until the client stops reading.
            while sock.write_all(&chunk).await.is_ok() {
                count.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
            }
        });
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            post_json(&url, &serde_json::json!({"x": 1})),
        )
        .await
        .expect("ends without reading 100 MiB")
        .expect_err("refused");
        assert!(format!("{e:#}").contains("length limit"), "{e:#}");
        let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(sent < 16 << 20, "{sent} bytes taken");
    }

    /// An https endpoint that accepts the connection and never answers its TLS handshake:
    /// the request fails within its bound instead of hanging the session (and its lease) for
    /// ever, which it did, as the TLS handshake had no timeout of its own.
    #[tokio::test]
    async fn an_endpoint_silent_in_its_tls_handshake_is_a_failed_attempt() {
        let (listener, url) = loopback("https", "/callback/ws/endpoint").await;
        let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            // A TLS handshake record: the ClientHello came, and nothing goes back.
            let _ = hello_tx.send(buf[..n].first() == Some(&0x16));
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let limit = Duration::from_millis(500);
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            post_json_within(&url, &serde_json::json!({"x": 1}), limit),
        )
        .await
        .expect("the request is bounded");
        let e = outcome.expect_err("no answer came");
        assert!(format!("{e:#}").contains("no answer"), "{e:#}");
        assert!(
            hello_rx.await.unwrap(),
            "the client was in its TLS handshake"
        );
    }
}
