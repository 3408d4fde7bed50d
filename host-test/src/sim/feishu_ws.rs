//! Feishu long-connection simulator: the endpoint API (`POST /callback/ws/endpoint`) and a
//! WebSocket server speaking protobuf `pbbp2` frames on loopback.
//!
//! Like the real service it answers the client's pings with `pong` + `ClientConfig`, splits
//! large payloads into `sum`/`seq` fragments, requires an ack (`{"code": 200}`) per message and
//! redelivers every un-acked message when the app reconnects. Tests can drop the connection at
//! any moment. [`FeishuWsSim::attach`] routes a [`FeishuSim`]'s approval events here instead of
//! to a callback URL. The generic connection bookkeeping ([`Hub`]) is shared with the DingTalk
//! Stream simulator.

use super::feishu::FeishuSim;
use super::http::{Faults, Handler, Request, Response, Server};
use crate::persistent::feishu::{Frame, METHOD_CONTROL, METHOD_DATA};
use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// Message ids acknowledged with success, in order (redeliveries acked again appear again).
    pub acks: Vec<String>,
    /// Message ids answered with a failure code.
    pub nacks: Vec<String>,
    /// Messages sent (first deliveries and redeliveries).
    pub deliveries: usize,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// Makes the connection task drop the socket.
    kill: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct HubState {
    /// Un-acked messages per app: `(message id, the WebSocket messages carrying it)`.
    pending: HashMap<String, VecDeque<(String, Vec<Message>)>>,
    conns: HashMap<String, Vec<Conn>>,
    tickets: HashMap<String, String>,
    stats: HashMap<String, ConnStats>,
    next_id: u64,
}

/// Connection bookkeeping shared by the persistent-connection simulators.
#[derive(Default)]
pub struct Hub {
    state: Mutex<HubState>,
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

    /// Queues a message until acked and sends it on the app's newest connection, if any.
    pub fn enqueue(&self, app: &str, id: &str, messages: Vec<Message>) {
        let mut s = self.lock();
        s.pending
            .entry(app.into())
            .or_default()
            .push_back((id.into(), messages.clone()));
        let sent = s
            .conns
            .get(app)
            .and_then(|c| c.last())
            .map(|c| messages.into_iter().all(|m| c.tx.send(m).is_ok()))
            .unwrap_or(false);
        if sent {
            s.stats.entry(app.into()).or_default().deliveries += 1;
        }
    }

    /// Records the client's answer to message `id`; a success removes it from the queue.
    pub fn answer(&self, app: &str, id: &str, ok: bool) {
        let mut s = self.lock();
        let stats = s.stats.entry(app.into()).or_default();
        if ok {
            stats.acks.push(id.into());
            if let Some(q) = s.pending.get_mut(app) {
                q.retain(|(m, _)| m != id);
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

    /// Accepts WebSocket clients on `listener`; `?ticket=` names the app.
    pub fn serve(self: &Arc<Self>, listener: TcpListener, on_message: OnMessage) -> JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hub = hub.clone();
                let on_message = on_message.clone();
                tokio::spawn(async move {
                    let mut query = String::new();
                    let ws = tokio_tungstenite::accept_hdr_async(
                        stream,
                        // tungstenite fixes the callback's error type; it is never returned here.
                        #[allow(clippy::result_large_err)]
                        |req: &WsRequest, resp: WsResponse| {
                            query = req.uri().query().unwrap_or("").to_string();
                            Ok(resp)
                        },
                    )
                    .await;
                    let Ok(ws) = ws else { return };
                    let ticket = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("ticket="))
                        .unwrap_or("")
                        .to_string();
                    let Some(app) = hub.lock().tickets.remove(&ticket) else {
                        return; // unknown ticket: just hang up
                    };
                    let (mut sink, mut stream) = ws.split();
                    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
                    let kill = Arc::new(tokio::sync::Notify::new());
                    let id = hub.register(&app, tx.clone(), kill.clone());
                    let writer = tokio::spawn(async move {
                        while let Some(m) = rx.recv().await {
                            if sink.send(m).await.is_err() {
                                break;
                            }
                        }
                        sink
                    });
                    loop {
                        let m = tokio::select! {
                            _ = kill.notified() => break,
                            m = stream.next() => m,
                        };
                        match m {
                            Some(Ok(m)) if !m.is_close() => on_message(&hub, &app, &tx, m),
                            _ => break,
                        }
                    }
                    // Dropping both halves closes the TCP connection without a close frame.
                    writer.abort();
                    hub.unregister(&app, id);
                });
            }
        })
    }

    fn register(
        &self,
        app: &str,
        tx: mpsc::UnboundedSender<Message>,
        kill: Arc<tokio::sync::Notify>,
    ) -> u64 {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        let conns = s.conns.entry(app.into()).or_default();
        conns.push(Conn {
            id,
            tx: tx.clone(),
            kill,
        });
        let live = conns.len();
        let backlog: Vec<Message> = s
            .pending
            .get(app)
            .map(|q| q.iter().flat_map(|(_, m)| m.clone()).collect())
            .unwrap_or_default();
        let redelivered = s.pending.get(app).map_or(0, VecDeque::len);
        let stats = s.stats.entry(app.into()).or_default();
        stats.connects += 1;
        stats.max_live = stats.max_live.max(live);
        stats.deliveries += redelivered;
        // Everything not acked yet goes out again on the new connection, in order.
        for m in backlog {
            let _ = tx.send(m);
        }
        id
    }

    fn unregister(&self, app: &str, id: u64) {
        if let Some(c) = self.lock().conns.get_mut(app) {
            c.retain(|c| c.id != id);
        }
    }
}

/// Timing and framing of the simulated service.
#[derive(Debug, Clone)]
pub struct FeishuWsConfig {
    /// `ClientConfig.PingInterval` (seconds) sent with the endpoint and every pong.
    pub ping_interval_secs: u64,
    /// `ClientConfig.ReconnectInterval` (seconds).
    pub reconnect_interval_secs: u64,
    /// Payloads longer than this are split into fragments.
    pub fragment_size: usize,
}

impl Default for FeishuWsConfig {
    fn default() -> Self {
        FeishuWsConfig {
            ping_interval_secs: 120,
            reconnect_interval_secs: 1,
            fragment_size: 64 * 1024,
        }
    }
}

struct Inner {
    apps: HashMap<String, String>,
    config: Mutex<FeishuWsConfig>,
    hub: Arc<Hub>,
    ws_addr: SocketAddr,
}

/// A running long-connection service; stops when dropped.
pub struct FeishuWsSim {
    server: Server,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
    forwarders: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for FeishuWsSim {
    fn drop(&mut self) {
        self.accept.abort();
        for f in self
            .forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            f.abort();
        }
    }
}

impl FeishuWsSim {
    /// `apps`: `(App ID, App Secret)` pairs allowed to connect.
    pub async fn start(apps: &[(&str, &str)], config: FeishuWsConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = listener.local_addr()?;
        let hub = Arc::new(Hub::default());
        let inner = Arc::new(Inner {
            apps: apps
                .iter()
                .map(|(a, s)| (a.to_string(), s.to_string()))
                .collect(),
            config: Mutex::new(config),
            hub: hub.clone(),
            ws_addr,
        });
        let on_message: OnMessage = {
            let inner = inner.clone();
            Arc::new(move |hub, app, tx, m| on_client_message(&inner, hub, app, tx, m))
        };
        let accept = hub.serve(listener, on_message);
        let handler_inner = inner.clone();
        let handler: Handler = Arc::new(move |req: Request| {
            let inner = handler_inner.clone();
            Box::pin(async move { endpoint(&inner, req) })
        });
        let server = Server::start(handler, Arc::new(Mutex::new(Faults::default()))).await?;
        Ok(FeishuWsSim {
            server,
            inner,
            accept,
            forwarders: Mutex::new(Vec::new()),
        })
    }

    /// Where clients ask for the endpoint (`{base}/callback/ws/endpoint`).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    pub fn set_config(&self, config: FeishuWsConfig) {
        *self.inner.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Delivers an event envelope (plaintext JSON) to the app; returns its message id.
    pub fn push_event(&self, app_id: &str, event: &Value) -> String {
        push_event(&self.inner, app_id, event)
    }

    /// Routes `sim`'s events for `app_id` here (as long connection deliveries) instead of to
    /// a callback URL.
    pub fn attach(&self, sim: &FeishuSim, app_id: &str) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        sim.set_event_sink(app_id, Some(tx));
        let app = app_id.to_string();
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                push_event(&inner, &app, &ev);
            }
        });
        self.forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Cuts the app's connections now (no close frame).
    pub fn drop_connections(&self, app_id: &str) {
        self.inner.hub.drop_connections(app_id);
    }

    pub fn stats(&self, app_id: &str) -> ConnStats {
        self.inner.hub.stats(app_id)
    }

    /// Messages not acked yet.
    pub fn pending(&self, app_id: &str) -> usize {
        self.inner.hub.pending(app_id)
    }

    /// Connections open now.
    pub fn live(&self, app_id: &str) -> usize {
        self.inner.hub.live(app_id)
    }
}

fn push_event(inner: &Inner, app_id: &str, event: &Value) -> String {
    let message_id = format!("msg_{:016x}", rand::thread_rng().r#gen::<u64>());
    let payload = event.to_string().into_bytes();
    let size = inner
        .config
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fragment_size
        .max(1);
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let trace = format!("{:016x}", rand::thread_rng().r#gen::<u64>());
    let messages = chunks
        .iter()
        .enumerate()
        .map(|(seq, chunk)| {
            let mut f = Frame {
                method: METHOD_DATA,
                service: 1,
                seq_id: seq as u64,
                log_id: rand::thread_rng().r#gen(),
                payload: Some(chunk.to_vec()),
                ..Frame::default()
            };
            for (k, v) in [
                ("type", "event"),
                ("message_id", message_id.as_str()),
                ("sum", &chunks.len().to_string()),
                ("seq", &seq.to_string()),
                ("trace_id", &trace),
            ] {
                f.set_header(k, v);
            }
            Message::Binary(f.encode().into())
        })
        .collect();
    inner.hub.enqueue(app_id, &message_id, messages);
    message_id
}

fn client_config(inner: &Inner) -> Value {
    let c = inner
        .config
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    json!({"ReconnectCount": -1, "ReconnectInterval": c.reconnect_interval_secs,
           "ReconnectNonce": 0, "PingInterval": c.ping_interval_secs})
}

fn endpoint(inner: &Inner, req: Request) -> Response {
    if req.method != "POST" || req.path != "/callback/ws/endpoint" {
        return Response::json(404, &json!({"code": 404, "msg": "not found"}));
    }
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let (Some(app), Some(secret)) = (body["AppID"].as_str(), body["AppSecret"].as_str()) else {
        return Response::json(200, &json!({"code": 1000040344, "msg": "invalid param"}));
    };
    if inner.apps.get(app).map(String::as_str) != Some(secret) {
        return Response::json(
            200,
            &json!({"code": 1000040345, "msg": "app secret invalid"}),
        );
    }
    let ticket = inner.hub.issue_ticket(app);
    let url = format!(
        "ws://{}/ws/v2?fpid=1&aid=1&device_id={:x}&access_key=x&service_id=42&ticket={ticket}",
        inner.ws_addr,
        rand::thread_rng().r#gen::<u64>()
    );
    Response::json(
        200,
        &json!({"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": client_config(inner)}}),
    )
}

fn on_client_message(
    inner: &Inner,
    hub: &Hub,
    app: &str,
    tx: &mpsc::UnboundedSender<Message>,
    m: Message,
) {
    let Message::Binary(bytes) = m else { return };
    // A client's garbage is its problem: ignore what does not decode.
    let Ok(frame) = Frame::decode(&bytes) else {
        return;
    };
    match (frame.method, frame.header("type")) {
        (METHOD_CONTROL, Some("ping")) => {
            hub.count_ping(app);
            let mut pong = Frame::control(frame.service, "pong");
            pong.payload = Some(client_config(inner).to_string().into_bytes());
            let _ = tx.send(Message::Binary(pong.encode().into()));
        }
        (METHOD_DATA, _) => {
            let id = frame.header("message_id").unwrap_or("");
            let code = frame
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                .and_then(|v| v["code"].as_i64());
            hub.answer(app, id, code == Some(200));
        }
        _ => {}
    }
}
