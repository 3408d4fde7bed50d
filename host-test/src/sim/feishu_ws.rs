//! Feishu long-connection simulator: the endpoint API (`POST /callback/ws/endpoint`) and a
//! WebSocket server speaking protobuf `pbbp2` frames on loopback.
//!
//! Like the real service it answers the client's pings with `pong` + `ClientConfig`, splits
//! large payloads into `sum`/`seq` fragments, requires an ack (`{"code": 200}`) per message and
//! redelivers an un-acked message when the app reconnects and when its ack is overdue
//! ([`FeishuWsConfig::redeliver_after`]). Tests can drop the connection or lose acks at any
//! moment, and read back every frame sent and received ([`FeishuWsSim::sent_frames`],
//! [`FeishuWsSim::client_frames`]) to compare clients. [`FeishuWsSim::attach`] routes a
//! [`FeishuSim`]'s approval events here instead of to a callback URL. The connection
//! bookkeeping ([`Hub`]) is shared with the DingTalk Stream simulator.

use super::feishu::FeishuSim;
use super::http::{Faults, Handler, Request, Response, Server};
pub use super::ws_hub::ConnStats;
use super::ws_hub::{DEFAULT_REDELIVER_AFTER, EventSink, Hub, OnMessage};
use crate::persistent::feishu::{Frame, METHOD_CONTROL, METHOD_DATA};
use rand::Rng as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
/// What [`FeishuWsSim::send_raw`] takes.
pub use tokio_tungstenite::tungstenite::Message;

/// Timing and framing of the simulated service.
#[derive(Debug, Clone)]
pub struct FeishuWsConfig {
    /// `ClientConfig.PingInterval` (seconds) sent with the endpoint and every pong.
    pub ping_interval_secs: u64,
    /// `ClientConfig.ReconnectInterval` (seconds).
    pub reconnect_interval_secs: u64,
    /// Payloads longer than this are split into fragments.
    pub fragment_size: usize,
    /// An event not acked this long after it went out is pushed again (Feishu: 3 s).
    pub redeliver_after: Duration,
}

impl Default for FeishuWsConfig {
    fn default() -> Self {
        FeishuWsConfig {
            ping_interval_secs: 120,
            reconnect_interval_secs: 1,
            fragment_size: 64 * 1024,
            redeliver_after: DEFAULT_REDELIVER_AFTER,
        }
    }
}

/// Every frame that crossed the simulator, for comparing clients' behaviour.
#[derive(Default)]
struct FrameLog {
    /// Data frames sent, per message id (each fragment once).
    sent: HashMap<String, Vec<Frame>>,
    /// Binary messages received, per app, as the client encoded them.
    received: HashMap<String, Vec<Vec<u8>>>,
}

struct Inner {
    apps: HashMap<String, String>,
    config: Mutex<FeishuWsConfig>,
    hub: Arc<Hub>,
    ws_addr: SocketAddr,
    log: Mutex<FrameLog>,
}

impl Inner {
    fn log(&self) -> std::sync::MutexGuard<'_, FrameLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running long-connection service; stops when dropped.
pub struct FeishuWsSim {
    server: Server,
    faults: Arc<Mutex<Faults>>,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Drop for FeishuWsSim {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FeishuWsSim {
    /// `apps`: `(App ID, App Secret)` pairs allowed to connect.
    pub async fn start(apps: &[(&str, &str)], config: FeishuWsConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = listener.local_addr()?;
        let hub = Arc::new(Hub::default());
        hub.set_redeliver_after(config.redeliver_after);
        let inner = Arc::new(Inner {
            apps: apps
                .iter()
                .map(|(a, s)| (a.to_string(), s.to_string()))
                .collect(),
            config: Mutex::new(config),
            hub: hub.clone(),
            ws_addr,
            log: Mutex::default(),
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
        let faults = Arc::new(Mutex::new(Faults::default()));
        let server = Server::start(handler, faults.clone()).await?;
        Ok(FeishuWsSim {
            server,
            faults,
            inner,
            accept,
        })
    }

    /// Where clients ask for the endpoint (`{base}/callback/ws/endpoint`).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Fault injection for the endpoint API (e.g. to keep a client from reconnecting).
    pub fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_config(&self, config: FeishuWsConfig) {
        self.inner.hub.set_redeliver_after(config.redeliver_after);
        *self.inner.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Delivers an event envelope (plaintext JSON) to the app; returns its message id.
    pub fn push_event(&self, app_id: &str, event: &Value) -> String {
        push_event(&self.inner, app_id, event)
    }

    /// Like [`Self::push_event`], with `payload` as the frames' bytes whatever they hold.
    pub fn push_payload(&self, app_id: &str, payload: &[u8]) -> String {
        push_payload(&self.inner, app_id, payload)
    }

    /// Sends `message` as it is on the app's newest connection, outside the event queue (no
    /// ack expected): for frames a client must survive. False when the app has no connection.
    pub fn send_raw(&self, app_id: &str, message: Message) -> bool {
        self.inner.hub.send(app_id, message)
    }

    /// Routes `sim`'s events for `app_id` here (as long connection deliveries) instead of to
    /// a callback URL.
    pub fn attach(&self, sim: &FeishuSim, app_id: &str) {
        let app = app_id.to_string();
        let inner = self.inner.clone();
        let sink = EventSink::new(move |ev| {
            push_event(&inner, &app, &ev);
        });
        sim.set_event_sink(app_id, Some(sink));
    }

    /// Cuts the app's connections now (no close frame).
    /// See [`Hub::freeze_connections`].
    pub fn freeze_connections(&self, app_id: &str) {
        self.inner.hub.freeze_connections(app_id);
    }

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

    /// Drops the app's next `n` success acks (the client sent them; the service never got
    /// them), so those events are redelivered.
    pub fn lose_acks(&self, app_id: &str, n: usize) {
        self.inner.hub.lose_acks(app_id, n);
    }

    /// The data frames that carried message `message_id`, one per fragment.
    pub fn sent_frames(&self, message_id: &str) -> Vec<Frame> {
        self.inner
            .log()
            .sent
            .get(message_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Every binary message the app's clients sent (pings, acks), bytes as received.
    pub fn client_frames(&self, app_id: &str) -> Vec<Vec<u8>> {
        self.inner
            .log()
            .received
            .get(app_id)
            .cloned()
            .unwrap_or_default()
    }
}

fn push_event(inner: &Inner, app_id: &str, event: &Value) -> String {
    push_payload(inner, app_id, event.to_string().as_bytes())
}

fn push_payload(inner: &Inner, app_id: &str, payload: &[u8]) -> String {
    let message_id = format!("msg_{:016x}", rand::thread_rng().r#gen::<u64>());
    let size = inner
        .config
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fragment_size
        .max(1);
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let trace = format!("{:016x}", rand::thread_rng().r#gen::<u64>());
    let frames: Vec<Frame> = chunks
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
            f
        })
        .collect();
    let messages = frames
        .iter()
        .map(|f| Message::Binary(f.encode().into()))
        .collect();
    inner.log().sent.insert(message_id.clone(), frames);
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
    inner
        .log()
        .received
        .entry(app.into())
        .or_default()
        .push(bytes.to_vec());
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
