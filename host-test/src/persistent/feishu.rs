//! Feishu / Lark long connection ("长连接"): `POST {base}/callback/ws/endpoint` with the App ID
//! and Secret gives a WebSocket URL and reconnect hints; the socket carries protobuf `pbbp2`
//! frames. The client pings (control frame, `type: ping`) and the server answers `pong`,
//! possibly with new hints; data frames (`type: event`) carry the same event JSON a webhook
//! would, split into `sum` fragments (`seq` 0..sum) for large payloads; every data frame is
//! answered with the same frame whose payload is `{"code": 200}` (or 500 to have it redelivered)
//! and a `biz_rt` header (processing time in ms).

use super::{
    Hints, MAX_IN_FLIGHT, Session, SessionEnd, Verdict, end, keepalive, post_json, received,
    silent_for,
};
use crate::bindings::types::Platform;
use crate::log;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// `pbbp2.Header`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

/// `pbbp2.Frame` (proto2: the required fields are always encoded, which the official SDKs'
/// decoders insist on).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(uint64, required, tag = "1")]
    pub seq_id: u64,
    #[prost(uint64, required, tag = "2")]
    pub log_id: u64,
    #[prost(int32, required, tag = "3")]
    pub service: i32,
    #[prost(int32, required, tag = "4")]
    pub method: i32,
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<Header>,
    #[prost(string, optional, tag = "6")]
    pub payload_encoding: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub payload_type: Option<String>,
    #[prost(bytes = "vec", optional, tag = "8")]
    pub payload: Option<Vec<u8>>,
    #[prost(string, optional, tag = "9")]
    pub log_id_new: Option<String>,
}

/// `method` of control frames (ping, pong).
pub const METHOD_CONTROL: i32 = 0;
/// `method` of data frames (event, card).
pub const METHOD_DATA: i32 = 1;

impl Frame {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_str())
    }

    pub fn set_header(&mut self, key: &str, value: &str) {
        match self.headers.iter_mut().find(|h| h.key == key) {
            Some(h) => h.value = value.to_string(),
            None => self.headers.push(Header {
                key: key.into(),
                value: value.into(),
            }),
        }
    }

    pub fn header_int(&self, key: &str) -> Option<i64> {
        self.header(key).and_then(|v| v.parse().ok())
    }

    /// A control frame of `kind` (`ping` / `pong`).
    pub fn control(service: i32, kind: &str) -> Frame {
        let mut f = Frame {
            method: METHOD_CONTROL,
            service,
            ..Frame::default()
        };
        f.set_header("type", kind);
        f
    }

    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame, prost::DecodeError> {
        <Frame as prost::Message>::decode(bytes)
    }
}

/// Most fragments one message may announce, and the largest reassembled payload.
const MAX_FRAGMENTS: i64 = 64;
const MAX_PAYLOAD: usize = 4 << 20;
/// Fragments of a message whose next fragment does not come within this are dropped (the
/// platform redelivers the un-acked message). Counted from the latest fragment, as lark-oapi
/// does: from the first, a message arriving slowly was dropped each time it was redelivered.
const FRAGMENT_TTL: Duration = Duration::from_secs(5);

/// Most messages in fragments at once, and the most bytes they may hold together. Feishu
/// splits only payloads over its frame size, one message after another; these only keep a
/// connection from buffering without bound whatever it is sent.
const MAX_PARTIAL: usize = 16;
const MAX_BUFFERED: usize = 2 * MAX_PAYLOAD;

/// When a message's latest fragment arrived, and the fragments so far (by `seq`).
type Partial = (Instant, Vec<Option<Vec<u8>>>);

fn size(p: &Partial) -> usize {
    p.1.iter().flatten().map(Vec::len).sum()
}

/// Collects the fragments of split messages.
#[derive(Default)]
pub struct Reassembler {
    parts: HashMap<String, Partial>,
}

impl Reassembler {
    /// Adds one fragment; returns the whole payload once every fragment is there. Bad
    /// fragment headers are an `Err` with a reason for the log.
    pub fn add(
        &mut self,
        message_id: &str,
        sum: i64,
        seq: i64,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, String> {
        self.add_at(Instant::now(), message_id, sum, seq, payload)
    }

    fn add_at(
        &mut self,
        now: Instant,
        message_id: &str,
        sum: i64,
        seq: i64,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, String> {
        self.parts
            .retain(|_, (latest, _)| now.duration_since(*latest) < FRAGMENT_TTL);
        if sum <= 1 {
            return Ok(Some(payload));
        }
        if sum > MAX_FRAGMENTS || seq < 0 || seq >= sum {
            return Err(format!("fragment {seq} of {sum} is out of range"));
        }
        if self.parts.len() >= MAX_PARTIAL && !self.parts.contains_key(message_id) {
            return Err(format!("{MAX_PARTIAL} other messages are in fragments"));
        }
        let entry = self
            .parts
            .entry(message_id.to_string())
            .or_insert_with(|| (now, vec![None; sum as usize]));
        if entry.1.len() != sum as usize {
            self.parts.remove(message_id);
            return Err("fragments disagree on their count".into());
        }
        entry.0 = now;
        entry.1[seq as usize] = Some(payload);
        if size(entry) > MAX_PAYLOAD {
            self.parts.remove(message_id);
            return Err(format!("message exceeds {MAX_PAYLOAD} bytes"));
        }
        if self.held() > MAX_BUFFERED {
            self.parts.remove(message_id);
            return Err(format!(
                "messages in fragments would hold over {MAX_BUFFERED} bytes"
            ));
        }
        let entry = &self.parts[message_id];
        if entry.1.iter().any(Option::is_none) {
            return Ok(None);
        }
        let parts = self
            .parts
            .remove(message_id)
            .map(|(_, p)| p)
            .unwrap_or_default();
        Ok(Some(parts.into_iter().flatten().flatten().collect()))
    }

    /// Bytes held in fragments of messages not yet complete.
    fn held(&self) -> usize {
        self.parts.values().map(size).sum()
    }
}

fn default_base(platform: Platform) -> &'static str {
    match platform {
        Platform::Lark => "https://open.larksuite.com",
        _ => "https://open.feishu.cn",
    }
}

/// Longest interval a `ClientConfig` hint may set: Feishu's own are minutes, and a huge one
/// overflowed the deadline arithmetic, panicking the app's connection task, which nothing
/// restarts.
const MAX_HINT: Duration = Duration::from_secs(3600);

/// Applies a `ClientConfig` object (seconds; 0 or absent means "no advice"), each hint at
/// most [`MAX_HINT`].
fn apply_client_config(hints: &mut Hints, config: &Value) {
    let secs = |k: &str| {
        config
            .get(k)
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s).min(MAX_HINT))
    };
    if let Some(d) = secs("ReconnectInterval") {
        hints.reconnect_interval = Some(d);
    }
    if let Some(d) = secs("ReconnectNonce") {
        hints.reconnect_nonce = Some(d);
    }
    if let Some(d) = secs("PingInterval") {
        hints.ping_interval = Some(d);
    }
}

/// Default ping interval when the platform gives none (the SDKs use two minutes).
const DEFAULT_PING: Duration = Duration::from_secs(120);

/// One connection: endpoint, socket, frames, until it closes.
pub async fn run(session: &Session<'_>, hints: &mut Hints) -> SessionEnd {
    let app = session.app;
    let url = format!(
        "{}/callback/ws/endpoint",
        session.base(default_base(app.platform))
    );
    let body = json!({"AppID": app.app_id, "AppSecret": app.app_secret});
    let answer = match post_json(&url, &body).await {
        Ok((200, v)) => v,
        Ok((status, v)) => {
            return end(format!(
                "endpoint answered HTTP {status} (code {})",
                v["code"]
            ));
        }
        Err(e) => return end(format!("endpoint request failed: {e:#}")),
    };
    if answer["code"].as_i64() != Some(0) {
        // `msg` is the platform's own text (e.g. "app secret invalid"), not the secret.
        return end(format!(
            "endpoint refused: code {} {}",
            answer["code"],
            answer["msg"].as_str().unwrap_or("")
        ));
    }
    apply_client_config(hints, &answer["data"]["ClientConfig"]);
    let Some(ws_url) = answer["data"]["URL"].as_str() else {
        return end("endpoint answer has no URL");
    };
    // The service id goes into every ping; it is a query parameter of the URL.
    let service = ws_url
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("service_id="))
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    let ws = match session.open_ws(ws_url).await {
        Ok(ws) => ws,
        Err(why) => return end(why),
    };
    log!(
        "tenant={} app={} Feishu long connection open",
        session.tenant,
        app.id
    );
    let (mut tx, mut rx) = ws.split();
    let mut fragments = Reassembler::default();
    let mut ping_every = hints.ping_interval.unwrap_or(DEFAULT_PING);
    let mut next_ping = tokio::time::Instant::now();
    let mut last_seen = tokio::time::Instant::now();
    // Events run while the loop keeps reading: a slow plugin call (up to the host's deadline,
    // plus the wait for a free slot) must not hold up the pings, nor the events after it,
    // which Feishu wants answered within 3 s.
    let mut in_flight = FuturesUnordered::new();
    let mut pings = keepalive(session.keepalive);
    loop {
        // Silence for three of Feishu's ping intervals, or four WebSocket pings, means the
        // connection is dead without a close.
        let dead_after = (ping_every * 3).min(session.keepalive * 4);
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(last_seen + dead_after) => return silent_for(dead_after),
            _ = pings.tick() => {
                if let Err(e) = tx.send(Message::Ping(Default::default())).await {
                    return end(format!("sending a WebSocket ping failed: {e}"));
                }
                continue;
            }
            _ = tokio::time::sleep_until(next_ping) => {
                next_ping = tokio::time::Instant::now() + ping_every;
                let ping = Frame::control(service, "ping").encode();
                if let Err(e) = tx.send(Message::Binary(ping.into())).await {
                    return end(format!("sending ping failed: {e}"));
                }
                continue;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (mut ack, started, verdict): (Frame, Instant, Verdict) = done;
                let code = match verdict {
                    Verdict::Ack => 200,
                    Verdict::Retry => 500,
                };
                ack.payload = Some(json!({"code": code}).to_string().into_bytes());
                ack.set_header("biz_rt", &started.elapsed().as_millis().to_string());
                if let Err(e) = tx.send(Message::Binary(ack.encode().into())).await {
                    return end(format!("sending ack failed: {e}"));
                }
                continue;
            }
            msg = rx.next() => msg,
        };
        let msg = match received(msg, &mut last_seen) {
            Ok(m) => m,
            Err(ended) => return ended,
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            // WebSocket-level pings are answered by tungstenite when it next writes.
            // (`received` has turned a close into the session's end.)
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_) => continue,
            Message::Text(_) => {
                log!("Feishu long connection: ignoring a text message");
                continue;
            }
        };
        let frame = match Frame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                log!("Feishu long connection: undecodable frame ignored: {e}");
                continue;
            }
        };
        if frame.method == METHOD_CONTROL {
            // A ping from the server is not answered: Feishu's SDKs ignore it too, and the
            // client's own pings keep the connection alive.
            if frame.header("type") == Some("pong")
                && let Some(config) = frame
                    .payload
                    .as_deref()
                    .filter(|p| !p.is_empty())
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            {
                apply_client_config(hints, &config);
                ping_every = hints.ping_interval.unwrap_or(DEFAULT_PING);
            }
            continue;
        }
        if frame.method != METHOD_DATA {
            continue;
        }
        let message_id = frame.header("message_id").unwrap_or("").to_string();
        let sum = frame.header_int("sum").unwrap_or(1);
        let seq = frame.header_int("seq").unwrap_or(0);
        let started = Instant::now();
        let payload = frame.payload.clone().unwrap_or_default();
        let payload = match fragments.add(&message_id, sum, seq, payload) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(reason) => {
                log!("Feishu long connection: message {message_id} dropped: {reason}");
                continue;
            }
        };
        if frame.header("type") != Some("event") {
            // Card callbacks are not ours to answer; the SDKs leave them unanswered too.
            continue;
        }
        if in_flight.len() >= MAX_IN_FLIGHT {
            log!(
                "Feishu long connection: message {message_id} left for redelivery: {MAX_IN_FLIGHT} events in flight"
            );
            continue;
        }
        in_flight.push(async move {
            let verdict = session
                .dispatcher
                .dispatch(session.tenant, app, payload)
                .await;
            (frame, started, verdict)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hints are taken in seconds, 0 meaning none, and capped: a huge one overflowed the
    /// ping and reconnect arithmetic and panicked the connection task.
    #[test]
    fn client_config_hints_are_capped() {
        let mut hints = Hints::default();
        apply_client_config(
            &mut hints,
            &serde_json::json!({"ReconnectInterval": u64::MAX, "ReconnectNonce": 30,
                                "PingInterval": 7_000_000_000_000_000_000u64}),
        );
        assert_eq!(hints.reconnect_interval, Some(MAX_HINT));
        assert_eq!(hints.reconnect_nonce, Some(Duration::from_secs(30)));
        assert_eq!(hints.ping_interval, Some(MAX_HINT));
        // The deadline arithmetic the hints feed stays in range.
        let _ = tokio::time::Instant::now() + hints.ping_interval.unwrap() * 3;
        apply_client_config(&mut hints, &serde_json::json!({"PingInterval": 0}));
        assert_eq!(hints.ping_interval, Some(MAX_HINT), "0 is no advice");
    }

    #[test]
    fn frames_roundtrip_and_keep_zero_required_fields() {
        let mut f = Frame::control(0, "ping");
        f.payload = Some(b"{}".to_vec());
        let bytes = f.encode();
        // Tags 1-4 are present even though they are zero (proto2 `required`).
        assert_eq!(&bytes[..8], &[0x08, 0, 0x10, 0, 0x18, 0, 0x20, 0]);
        assert_eq!(Frame::decode(&bytes).unwrap(), f);
        assert!(Frame::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn reassembles_fragments_in_any_order_and_rejects_nonsense() {
        let mut r = Reassembler::default();
        assert_eq!(r.add("m", 3, 2, b"c".to_vec()).unwrap(), None);
        assert_eq!(r.add("m", 3, 0, b"a".to_vec()).unwrap(), None);
        assert_eq!(
            r.add("m", 3, 1, b"b".to_vec()).unwrap(),
            Some(b"abc".to_vec())
        );
        assert_eq!(
            r.add("x", 1, 0, b"x".to_vec()).unwrap(),
            Some(b"x".to_vec())
        );
        assert!(r.add("m", 3, 3, vec![]).is_err());
        assert!(r.add("m", 1000, 0, vec![]).is_err());
        assert!(r.add("m", 3, -1, vec![]).is_err());
    }

    /// A message whose fragments keep coming is kept however long it takes in all; one whose
    /// next fragment is over five seconds late is dropped (and then starts anew).
    #[test]
    fn fragments_expire_five_seconds_after_the_latest() {
        let mut r = Reassembler::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(r.add_at(at(0), "slow", 3, 0, b"a".to_vec()).unwrap(), None);
        assert_eq!(r.add_at(at(4), "slow", 3, 1, b"b".to_vec()).unwrap(), None);
        assert_eq!(
            r.add_at(at(8), "slow", 3, 2, b"c".to_vec()).unwrap(),
            Some(b"abc".to_vec())
        );
        assert_eq!(r.add_at(at(10), "late", 2, 0, b"a".to_vec()).unwrap(), None);
        assert_eq!(r.add_at(at(16), "late", 2, 1, b"b".to_vec()).unwrap(), None);
        assert_eq!(r.held(), 1, "only the late fragment, as a new message");
    }

    /// A connection sent fragments of many messages, or of large ones, that never complete
    /// holds a bounded amount until they expire; a complete message still gets through.
    #[test]
    fn partial_messages_are_bounded_in_number_and_bytes() {
        let mut r = Reassembler::default();
        for i in 0..MAX_PARTIAL {
            assert_eq!(r.add(&format!("m{i}"), 2, 0, vec![0; 8]).unwrap(), None);
        }
        assert!(r.add("one more", 2, 0, vec![]).is_err());
        // Another fragment of a message already held is still taken.
        assert_eq!(r.add("m0", 2, 1, b"!".to_vec()).unwrap().unwrap().len(), 9);
        assert_eq!(
            r.add("single", 1, 0, b"s".to_vec()).unwrap(),
            Some(b"s".to_vec())
        );

        let mut r = Reassembler::default();
        let big = MAX_PAYLOAD / 2;
        for i in 0..2 {
            assert_eq!(r.add(&format!("b{i}"), 3, 0, vec![0; big]).unwrap(), None);
            assert_eq!(r.add(&format!("b{i}"), 3, 1, vec![0; big]).unwrap(), None);
        }
        // Four half-payload fragments fill MAX_BUFFERED; a fifth is refused and takes its
        // message with it, so what is held stays within the bound.
        assert!(r.add("b2", 3, 0, vec![0; big]).is_err());
        assert_eq!(r.held(), MAX_BUFFERED);
        assert!(r.parts.contains_key("b0") && r.parts.contains_key("b1"));
        assert!(!r.parts.contains_key("b2"));
    }
}
