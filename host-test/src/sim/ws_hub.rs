//! Connection bookkeeping shared by the persistent-connection simulators (Feishu long
//! connection, DingTalk Stream): tickets, live WebSockets per app, the queue of un-acked
//! messages and their redelivery.
//!
//! Like the real services, a message stays queued until the client acknowledges it, and an
//! un-acked one goes out again both when the app reconnects and, while it stays connected,
//! once it has waited [`Hub::set_redeliver_after`] for its ack (Feishu re-pushes an event
//! not processed within 3 s). Tests can also lose the client's next acks on the way, to see
//! a redelivery of an event the client did process.

use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};

/// What happened on one app's connections.
#[derive(Debug, Default, Clone)]
pub struct ConnStats {
    /// WebSocket connections accepted.
    pub connects: usize,
    /// Most connections of the app open at the same time.
    pub max_live: usize,
    /// Client pings answered (Feishu) / server pings the client answered (DingTalk).
    pub pings: usize,
    /// WebSocket-level pings from the client (tungstenite answers them).
    pub ws_pings: usize,
    /// Message ids acknowledged with success, in order (redeliveries acked again appear again).
    pub acks: Vec<String>,
    /// Message ids answered with a failure code.
    pub nacks: Vec<String>,
    /// Message ids whose success ack the simulator dropped ([`Hub::lose_acks`]).
    pub lost_acks: Vec<String>,
    /// Message ids sent again (on reconnect or after waiting too long for the ack), in order.
    pub redelivered: Vec<String>,
    /// Messages sent (first deliveries and redeliveries).
    pub deliveries: usize,
    /// Request targets (path and query) of the accepted WebSocket connections, in order.
    pub targets: Vec<String>,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// Makes the connection task drop the socket.
    kill: Arc<tokio::sync::Notify>,
}

/// One un-acked message.
struct Pending {
    id: String,
    /// The WebSocket messages carrying it (several for a fragmented Feishu event).
    messages: Vec<Message>,
    /// When it last went out; `None` while the app had no connection.
    sent_at: Option<Instant>,
}

struct HubState {
    pending: HashMap<String, VecDeque<Pending>>,
    conns: HashMap<String, Vec<Conn>>,
    tickets: HashMap<String, String>,
    stats: HashMap<String, ConnStats>,
    /// Success acks still to drop, per app.
    lose_acks: HashMap<String, usize>,
    redeliver_after: Duration,
    next_id: u64,
    /// Connections that no longer read nor answer anything ([`Hub::freeze_connections`]).
    frozen: std::collections::HashSet<u64>,
}

/// Connection bookkeeping shared by the persistent-connection simulators.
pub struct Hub {
    state: Mutex<HubState>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub {
            state: Mutex::new(HubState {
                pending: HashMap::new(),
                conns: HashMap::new(),
                tickets: HashMap::new(),
                stats: HashMap::new(),
                lose_acks: HashMap::new(),
                redeliver_after: DEFAULT_REDELIVER_AFTER,
                next_id: 0,
                frozen: Default::default(),
            }),
        }
    }
}

/// How long an un-acked message waits before it is sent again on the same connection
/// (Feishu's documented processing limit).
pub const DEFAULT_REDELIVER_AFTER: Duration = Duration::from_secs(3);

/// Where a platform simulator hands an app's events when they go over a persistent
/// connection instead of to a callback URL; called synchronously, so an event is queued
/// for the connection by the time the platform simulator's call returns.
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn(serde_json::Value) + Send + Sync>);

impl EventSink {
    pub fn new(f: impl Fn(serde_json::Value) + Send + Sync + 'static) -> EventSink {
        EventSink(Arc::new(f))
    }

    pub fn send(&self, event: serde_json::Value) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// Decides what to do with a message a client sent.
pub type OnMessage =
    Arc<dyn Fn(&Hub, &str, &mpsc::UnboundedSender<Message>, Message) + Send + Sync>;

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A one-time ticket that identifies `app` when it connects.
    pub fn issue_ticket(&self, app: &str) -> String {
        let ticket = format!("{:032x}", rand::thread_rng().r#gen::<u128>());
        self.lock().tickets.insert(ticket.clone(), app.into());
        ticket
    }

    /// How long an un-acked message waits on a live connection before it is sent again.
    pub fn set_redeliver_after(&self, after: Duration) {
        self.lock().redeliver_after = after;
    }

    /// Drops the app's next `n` success acks as if lost on the network: the messages stay
    /// queued and are redelivered.
    pub fn lose_acks(&self, app: &str, n: usize) {
        *self.lock().lose_acks.entry(app.into()).or_default() += n;
    }

    /// Queues a message until acked and sends it on the app's newest connection, if any.
    pub fn enqueue(&self, app: &str, id: &str, messages: Vec<Message>) {
        let mut s = self.lock();
        let sent = s
            .conns
            .get(app)
            .and_then(|c| c.last())
            .is_some_and(|c| messages.iter().all(|m| c.tx.send(m.clone()).is_ok()));
        if sent {
            s.stats.entry(app.into()).or_default().deliveries += 1;
        }
        s.pending.entry(app.into()).or_default().push_back(Pending {
            id: id.into(),
            messages,
            sent_at: sent.then(Instant::now),
        });
    }

    /// Records the client's answer to message `id`; a success removes it from the queue
    /// (unless the test asked for it to be lost).
    pub fn answer(&self, app: &str, id: &str, ok: bool) {
        let mut s = self.lock();
        let lose = ok
            && s.lose_acks.get_mut(app).is_some_and(|n| {
                let lose = *n > 0;
                *n = n.saturating_sub(1);
                lose
            });
        let stats = s.stats.entry(app.into()).or_default();
        if lose {
            stats.lost_acks.push(id.into());
        } else if ok {
            stats.acks.push(id.into());
            if let Some(q) = s.pending.get_mut(app) {
                q.retain(|p| p.id != id);
            }
        } else {
            stats.nacks.push(id.into());
        }
    }

    pub fn count_ping(&self, app: &str) {
        self.lock().stats.entry(app.into()).or_default().pings += 1;
    }

    /// Sends a message on the app's newest connection (not queued: control traffic).
    pub fn send(&self, app: &str, message: Message) -> bool {
        let s = self.lock();
        s.conns
            .get(app)
            .and_then(|c| c.last())
            .is_some_and(|c| c.tx.send(message).is_ok())
    }

    /// Cuts every connection of the app at once, without a close frame (like a network drop).
    /// The app's connections go silent without closing, as behind a dead NAT or a peer
    /// that hangs: they stop reading, so no pong answers the client's pings, and send
    /// nothing more. New connections are not affected.
    pub fn freeze_connections(&self, app: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let ids: Vec<u64> = s
            .conns
            .get(app)
            .into_iter()
            .flatten()
            .map(|c| c.id)
            .collect();
        s.frozen.extend(ids);
    }

    pub fn drop_connections(&self, app: &str) {
        let conns = self.lock().conns.remove(app).unwrap_or_default();
        for c in conns {
            c.kill.notify_one();
        }
    }

    pub fn stats(&self, app: &str) -> ConnStats {
        self.lock().stats.get(app).cloned().unwrap_or_default()
    }

    pub fn pending(&self, app: &str) -> usize {
        self.lock().pending.get(app).map_or(0, VecDeque::len)
    }

    pub fn live(&self, app: &str) -> usize {
        self.lock().conns.get(app).map_or(0, Vec::len)
    }

    /// Accepts WebSocket clients on `listener` (`?ticket=` names the app) and redelivers
    /// overdue messages, until the returned task is aborted.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, on_message: OnMessage) -> JoinHandle<()> {
        let accept = self.clone().accept(listener, on_message);
        let redeliver = self.clone().redeliver_loop();
        tokio::spawn(async move {
            tokio::join!(accept, redeliver);
        })
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, on_message: OnMessage) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(self.clone().connection(stream, on_message.clone()));
        }
    }

    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream, on_message: OnMessage) {
        let mut target = String::new();
        let ws = tokio_tungstenite::accept_hdr_async(
            stream,
            // tungstenite fixes the callback's error type; it is never returned here.
            #[allow(clippy::result_large_err)]
            |req: &WsRequest, resp: WsResponse| {
                target = req.uri().to_string();
                Ok(resp)
            },
        )
        .await;
        let Ok(ws) = ws else { return };
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let ticket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("ticket="))
            .unwrap_or("")
            .to_string();
        let Some(app) = self.lock().tickets.remove(&ticket) else {
            return; // unknown ticket: just hang up
        };
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let kill = Arc::new(tokio::sync::Notify::new());
        let id = self.register(&app, &target, tx.clone(), kill.clone());
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            sink
        });
        loop {
            if self.lock().frozen.contains(&id) {
                kill.notified().await;
                break;
            }
            let m = tokio::select! {
                _ = kill.notified() => break,
                m = stream.next() => m,
            };
            match m {
                Some(Ok(m)) if m.is_ping() => {
                    self.lock().stats.entry(app.clone()).or_default().ws_pings += 1;
                }
                Some(Ok(m)) if !m.is_close() => on_message(&self, &app, &tx, m),
                _ => break,
            }
        }
        // Dropping both halves closes the TCP connection without a close frame.
        writer.abort();
        self.unregister(&app, id);
    }

    /// Sends again, on the app's newest connection, every message that has waited too long
    /// for its ack.
    async fn redeliver_loop(self: Arc<Self>) {
        loop {
            // Short ticks, so a changed setting takes effect at once.
            let after = self.lock().redeliver_after;
            let tick = (after / 4).clamp(Duration::from_millis(10), Duration::from_millis(100));
            tokio::time::sleep(tick).await;
            self.redeliver_overdue(Instant::now());
        }
    }

    fn redeliver_overdue(&self, now: Instant) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let after = s.redeliver_after;
        for (app, queue) in &mut s.pending {
            let Some(conn) = s.conns.get(app).and_then(|c| c.last()) else {
                continue;
            };
            for p in queue.iter_mut() {
                if p.sent_at.is_some_and(|t| now.duration_since(t) < after) {
                    continue;
                }
                if p.messages.iter().all(|m| conn.tx.send(m.clone()).is_ok()) {
                    p.sent_at = Some(now);
                    let stats = s.stats.entry(app.clone()).or_default();
                    stats.deliveries += 1;
                    stats.redelivered.push(p.id.clone());
                }
            }
        }
    }

    fn register(
        &self,
        app: &str,
        target: &str,
        tx: mpsc::UnboundedSender<Message>,
        kill: Arc<tokio::sync::Notify>,
    ) -> u64 {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.next_id += 1;
        let id = s.next_id;
        let conns = s.conns.entry(app.into()).or_default();
        conns.push(Conn {
            id,
            tx: tx.clone(),
            kill,
        });
        let live = conns.len();
        let stats = s.stats.entry(app.into()).or_default();
        stats.connects += 1;
        stats.max_live = stats.max_live.max(live);
        stats.targets.push(target.into());
        // Everything not acked yet goes out again on the new connection, in order.
        let now = Instant::now();
        for p in s.pending.get_mut(app).into_iter().flatten() {
            for m in &p.messages {
                let _ = tx.send(m.clone());
            }
            if p.sent_at.replace(now).is_some() {
                stats.redelivered.push(p.id.clone());
            }
            stats.deliveries += 1;
        }
        id
    }

    fn unregister(&self, app: &str, id: u64) {
        if let Some(c) = self.lock().conns.get_mut(app) {
            c.retain(|c| c.id != id);
        }
    }
}
