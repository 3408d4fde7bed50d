//! DingTalk Stream-mode simulator: `POST /v1.0/gateway/connections/open` and a WebSocket
//! server speaking Stream's JSON frames on loopback.
//!
//! Events go out as `EVENT` frames (`headers.eventType`, `data` = the event JSON as a string)
//! and stay queued until acked with `{"status": "SUCCESS"}`; un-acked events are redelivered
//! on reconnect and when their ack is overdue ([`DingtalkStreamSim::set_redeliver_after`]).
//! Tests can send `SYSTEM` pings (answered with code 200, the same `messageId` and the same
//! `data`), ask the client to reconnect (`disconnect`), or drop the connection, and read back
//! what clients sent ([`DingtalkStreamSim::open_requests`], [`DingtalkStreamSim::client_frames`],
//! [`DingtalkStreamSim::sent_frame`]) to compare clients. [`DingtalkStreamSim::attach`]
//! routes a [`DingtalkSim`]'s approval events here instead of to a callback URL.

use super::dingtalk::DingtalkSim;
use super::http::{Faults, Handler, Request, Response, Server};
pub use super::ws_hub::ConnStats;
use super::ws_hub::{EventSink, Hub, OnMessage};
use rand::Rng as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// One `POST /v1.0/gateway/connections/open` as received, with the answer's HTTP status and
/// the ticket it issued (`None` when refused).
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// The `Accept` header: the gateway answers XML unless asked for JSON.
    pub accept: Option<String>,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    pub status: u16,
    pub ticket: Option<String>,
}

/// Everything that crossed the simulator, for comparing clients' behaviour.
#[derive(Default)]
struct Log {
    opens: Vec<OpenRequest>,
    /// Frames sent (events and pings), per message id.
    sent: HashMap<String, Value>,
    /// Text messages received, per app, as the client wrote them.
    received: HashMap<String, Vec<String>>,
}

struct Inner {
    /// clientId (AppKey) → clientSecret.
    apps: HashMap<String, String>,
    hub: Arc<Hub>,
    ws_addr: SocketAddr,
    log: Mutex<Log>,
}

impl Inner {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running Stream gateway; stops when dropped.
pub struct DingtalkStreamSim {
    server: Server,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Drop for DingtalkStreamSim {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn id() -> String {
    format!("{:032x}", rand::thread_rng().r#gen::<u128>())
}

impl DingtalkStreamSim {
    /// `apps`: `(clientId, clientSecret)` pairs allowed to connect.
    pub async fn start(apps: &[(&str, &str)]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = listener.local_addr()?;
        let hub = Arc::new(Hub::default());
        let inner = Arc::new(Inner {
            apps: apps
                .iter()
                .map(|(a, s)| (a.to_string(), s.to_string()))
                .collect(),
            hub: hub.clone(),
            ws_addr,
            log: Mutex::default(),
        });
        let on_message: OnMessage = {
            let inner = inner.clone();
            Arc::new(move |hub, app, _tx, m| on_client_message(&inner, hub, app, m))
        };
        let accept = hub.serve(listener, on_message);
        let handler_inner = inner.clone();
        let handler: Handler = Arc::new(move |req: Request| {
            let inner = handler_inner.clone();
            Box::pin(async move { open(&inner, req) })
        });
        let server = Server::start(handler, Arc::new(Mutex::new(Faults::default()))).await?;
        Ok(DingtalkStreamSim {
            server,
            inner,
            accept,
        })
    }

    /// The gateway base (`{base}/v1.0/gateway/connections/open`).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Delivers an event in the decrypted-callback shape (`EventType` + fields) as an
    /// `EVENT` frame; returns its message id.
    pub fn push_event(&self, app_key: &str, event: &Value) -> String {
        push_event(&self.inner, app_key, event)
    }

    /// Routes `sim`'s events for `app_key` here instead of to a callback URL.
    pub fn attach(&self, sim: &DingtalkSim, app_key: &str) {
        let app = app_key.to_string();
        let inner = self.inner.clone();
        let sink = EventSink::new(move |ev| {
            push_event(&inner, &app, &ev);
        });
        sim.set_event_sink(app_key, Some(sink));
    }

    /// Sends a `SYSTEM` ping; an answer with code 200, its `messageId` and its `data` is
    /// counted in [`ConnStats::pings`]. Returns the ping's message id, `None` when the app
    /// has no connection.
    pub fn ping(&self, app_key: &str) -> Option<String> {
        let message_id = id();
        let frame = json!({"specVersion": "1.0", "type": "SYSTEM",
            "headers": {"contentType": "application/json", "messageId": message_id,
                        "topic": "ping", "time": now_ms().to_string()},
            "data": json!({"opaque": id()}).to_string()});
        // Logged first: the answer may come back before `send` returns.
        self.inner
            .log()
            .sent
            .insert(message_id.clone(), frame.clone());
        let sent = self
            .inner
            .hub
            .send(app_key, Message::Text(frame.to_string().into()));
        sent.then_some(message_id)
    }

    /// Tells the client the server will close soon (it should reconnect).
    pub fn send_disconnect(&self, app_key: &str) -> bool {
        let frame = json!({"specVersion": "1.0", "type": "SYSTEM",
            "headers": {"contentType": "application/json", "messageId": id(),
                        "topic": "disconnect"},
            "data": json!({"reason": "server restart"}).to_string()});
        self.inner
            .hub
            .send(app_key, Message::Text(frame.to_string().into()))
    }

    /// See [`Hub::freeze_connections`].
    pub fn freeze_connections(&self, app_key: &str) {
        self.inner.hub.freeze_connections(app_key);
    }

    pub fn drop_connections(&self, app_key: &str) {
        self.inner.hub.drop_connections(app_key);
    }

    pub fn stats(&self, app_key: &str) -> ConnStats {
        self.inner.hub.stats(app_key)
    }

    pub fn pending(&self, app_key: &str) -> usize {
        self.inner.hub.pending(app_key)
    }

    pub fn live(&self, app_key: &str) -> usize {
        self.inner.hub.live(app_key)
    }

    /// How long an un-acked event waits on a live connection before it is pushed again.
    pub fn set_redeliver_after(&self, after: std::time::Duration) {
        self.inner.hub.set_redeliver_after(after);
    }

    /// Drops the app's next `n` success acks, so those events are redelivered.
    pub fn lose_acks(&self, app_key: &str, n: usize) {
        self.inner.hub.lose_acks(app_key, n);
    }

    /// Every `connections/open` request, in order.
    pub fn open_requests(&self) -> Vec<OpenRequest> {
        self.inner.log().opens.clone()
    }

    /// The frame (event or ping) the simulator sent as message `message_id`.
    pub fn sent_frame(&self, message_id: &str) -> Option<Value> {
        self.inner.log().sent.get(message_id).cloned()
    }

    /// Every text message the app's clients sent (acks, ping answers), as received.
    pub fn client_frames(&self, app_key: &str) -> Vec<String> {
        self.inner
            .log()
            .received
            .get(app_key)
            .cloned()
            .unwrap_or_default()
    }
}

fn now_ms() -> u64 {
    crate::persistent::lease::now_ms()
}

fn push_event(inner: &Inner, app_key: &str, event: &Value) -> String {
    let message_id = id();
    let mut data = event.clone();
    let event_type = data
        .as_object_mut()
        .and_then(|o| o.remove("EventType"))
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let frame = json!({
        "specVersion": "1.0",
        "type": "EVENT",
        "headers": {
            "appId": app_key, "connectionId": id(), "contentType": "application/json",
            "eventBornTime": now_ms().to_string(), "eventCorpId": "ding-corp",
            "eventId": id(), "eventType": event_type, "eventUnifiedAppId": app_key,
            "messageId": message_id, "time": now_ms().to_string(), "topic": "*",
        },
        "data": data.to_string(),
    });
    inner.log().sent.insert(message_id.clone(), frame.clone());
    inner.hub.enqueue(
        app_key,
        &message_id,
        vec![Message::Text(frame.to_string().into())],
    );
    message_id
}

fn open(inner: &Inner, req: Request) -> Response {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let (response, ticket) = answer_open(inner, &req, &body);
    inner.log().opens.push(OpenRequest {
        accept: req.header("accept").map(String::from),
        content_type: req.header("content-type").map(String::from),
        body,
        status: response.status,
        ticket,
    });
    response
}

fn answer_open(inner: &Inner, req: &Request, body: &Value) -> (Response, Option<String>) {
    if req.method != "POST" || req.path != "/v1.0/gateway/connections/open" {
        let r = Response::json(404, &json!({"code": "NotFound", "message": "not found"}));
        return (r, None);
    }
    let (Some(id), Some(secret)) = (body["clientId"].as_str(), body["clientSecret"].as_str())
    else {
        let r = Response::json(
            400,
            &json!({"code": "InvalidParameter", "message": "missing"}),
        );
        return (r, None);
    };
    if inner.apps.get(id).map(String::as_str) != Some(secret) {
        let r = Response::json(
            401,
            &json!({"code": "InvalidAuthentication", "message": "bad client"}),
        );
        return (r, None);
    }
    let subscribed = body["subscriptions"]
        .as_array()
        .is_some_and(|s| s.iter().any(|x| x["type"] == "EVENT" && x["topic"] == "*"));
    if !subscribed {
        let r = Response::json(
            400,
            &json!({"code": "InvalidParameter", "message": "subscriptions"}),
        );
        return (r, None);
    }
    let ticket = inner.hub.issue_ticket(id);
    let endpoint = format!("ws://{}/connect", inner.ws_addr);
    // The gateway answers XML unless asked for JSON: both official SDKs (Node `dingtalk-stream`,
    // Python `dingtalk-stream`) send `Accept: application/json`, the Node one saying so.
    let wants_json = req
        .header("accept")
        .is_some_and(|a| a.contains("application/json"));
    let r = if wants_json {
        Response::json(200, &json!({"endpoint": endpoint, "ticket": ticket}))
    } else {
        Response {
            status: 200,
            headers: vec![(
                "Content-Type".into(),
                "application/xml;charset=utf-8".into(),
            )],
            body: format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                 <ConnectionOpenResponse><endpoint>{endpoint}</endpoint>\
                 <ticket>{ticket}</ticket></ConnectionOpenResponse>"
            )
            .into_bytes(),
        }
    };
    (r, Some(ticket))
}

fn on_client_message(inner: &Inner, hub: &Hub, app: &str, m: Message) {
    let Message::Text(text) = m else { return };
    inner
        .log()
        .received
        .entry(app.into())
        .or_default()
        .push(text.to_string());
    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
        return;
    };
    let id = v["headers"]["messageId"].as_str().unwrap_or("");
    let sent = inner.log().sent.get(id).cloned();
    if let Some(ping) = sent.filter(|f| f["type"] == "SYSTEM") {
        // A ping is answered when its data comes back under its messageId with code 200.
        if v["code"] == 200 && v["data"] == ping["data"] {
            hub.count_ping(app);
        }
        return;
    }
    let data: Value = v["data"]
        .as_str()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null);
    hub.answer(app, id, v["code"] == 200 && data["status"] == "SUCCESS");
}
