//! DingTalk Stream mode: `POST {base}/v1.0/gateway/connections/open` with the app's client id
//! (AppKey) and secret and the subscriptions gives `{endpoint, ticket}`; the socket at
//! `endpoint?ticket=` carries JSON frames `{specVersion, type, headers, data}`. `SYSTEM`
//! frames: `ping` is answered with the same `messageId` and `data`, `disconnect` announces that
//! the server will close (reconnect now). `EVENT` frames carry the event's JSON in `data` and
//! its type in `headers.eventType`; they are acknowledged with `{"status": "SUCCESS"}`.

use super::{
    MAX_IN_FLIGHT, Session, SessionEnd, Verdict, end, keepalive, post_json, received, silent_for,
};
use crate::log;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

const DEFAULT_BASE: &str = "https://api.dingtalk.com";
/// An event's acknowledgement data.
const SUCCESS: &str = r#"{"status":"SUCCESS"}"#;
/// How long a connection told to `disconnect` stays to finish and acknowledge the events it is
/// handling. DingTalk closes it itself some seconds later; an event cut off there is
/// redelivered (and dropped as a duplicate if it was applied), only a minute late.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The acknowledgement frame for `message_id` carrying `data`.
pub fn ack(message_id: &str, data: &str) -> Value {
    json!({
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": message_id},
        "message": "OK",
        "data": data,
    })
}

/// The decrypted-callback shape the plugin parses: the frame's `data` object plus
/// `EventType` from `headers.eventType`.
pub fn event_json(headers: &Value, data: &Value) -> Option<Vec<u8>> {
    let event_type = headers.get("eventType")?.as_str()?;
    let data: Value = match data {
        Value::String(s) => serde_json::from_str(s).ok()?,
        v => v.clone(),
    };
    let mut obj: Map<String, Value> = data.as_object()?.clone();
    obj.insert("EventType".into(), json!(event_type));
    Some(Value::Object(obj).to_string().into_bytes())
}

pub async fn run(session: &Session<'_>) -> SessionEnd {
    let app = session.app;
    let url = format!(
        "{}/v1.0/gateway/connections/open",
        session.base(DEFAULT_BASE)
    );
    let body = json!({
        "clientId": app.app_id,
        "clientSecret": app.app_secret,
        "subscriptions": [{"type": "EVENT", "topic": "*"}],
        "ua": concat!("imbridge-host/", env!("CARGO_PKG_VERSION")),
    });
    let answer = match post_json(&url, &body).await {
        Ok((200, v)) => v,
        Ok((status, v)) => {
            return end(format!(
                "connections/open answered HTTP {status} ({})",
                v["code"]
            ));
        }
        Err(e) => return end(format!("connections/open failed: {e:#}")),
    };
    let (Some(endpoint), Some(ticket)) = (answer["endpoint"].as_str(), answer["ticket"].as_str())
    else {
        return end("connections/open answer lacks endpoint or ticket");
    };
    let ws_url = format!("{endpoint}?ticket={}", form_encode(ticket));
    let ws = match session.open_ws(&ws_url).await {
        Ok(ws) => ws,
        Err(why) => return end(why),
    };
    log!(
        "tenant={} app={} DingTalk Stream connection open",
        session.tenant,
        app.id
    );
    let (mut tx, mut rx) = ws.split();
    // Events run while the loop keeps reading, so a slow plugin call holds up neither the
    // server's pings nor the events after it.
    let mut in_flight = FuturesUnordered::new();
    let mut last_seen = tokio::time::Instant::now();
    let mut pings = keepalive(session.keepalive);
    let dead_after = session.keepalive * 4;
    // Set by `disconnect`: no new events, and the session ends once those in flight are
    // acknowledged or the deadline passes. Ending at once dropped their acks, so each
    // rotation delayed every event in flight by DingTalk's redelivery, a minute.
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        if draining.is_some() && in_flight.is_empty() {
            return asked_to_reconnect("server asked to reconnect");
        }
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(last_seen + dead_after) => return silent_for(dead_after),
            _ = tokio::time::sleep_until(draining.unwrap_or(last_seen)), if draining.is_some() => {
                return asked_to_reconnect(format!(
                    "server asked to reconnect; {} events still in flight after {} s are left for redelivery",
                    in_flight.len(),
                    DRAIN.as_secs()
                ));
            }
            _ = pings.tick() => {
                if let Err(e) = tx.send(Message::Ping(Default::default())).await {
                    return end(format!("sending a WebSocket ping failed: {e}"));
                }
                continue;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (message_id, verdict): (String, Verdict) = done;
                // No ack for a retry: DingTalk redelivers what was not acknowledged.
                if verdict == Verdict::Ack
                    && let Err(e) = tx.send(Message::Text(ack(&message_id, SUCCESS).to_string().into())).await
                {
                    return end(format!("sending ack failed: {e}"));
                }
                continue;
            }
            msg = rx.next() => msg,
        };
        let msg = match received(msg, &mut last_seen) {
            Ok(m) => m,
            Err(ended) => {
                return SessionEnd {
                    asked_to_reconnect: draining.is_some(),
                    ..ended
                };
            }
        };
        let text = match msg {
            Message::Text(t) => t,
            _ => continue,
        };
        let frame: Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(e) => {
                log!("DingTalk Stream: unparsable frame ignored: {e}");
                continue;
            }
        };
        let headers = &frame["headers"];
        let message_id = headers["messageId"].as_str().unwrap_or("").to_string();
        let reply = match (frame["type"].as_str(), headers["topic"].as_str()) {
            (Some("SYSTEM"), Some("ping")) => {
                Some(ack(&message_id, frame["data"].as_str().unwrap_or("")))
            }
            (Some("SYSTEM"), Some("disconnect")) => {
                draining.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN);
                None
            }
            (Some("EVENT"), _) if draining.is_some() => {
                log!(
                    "DingTalk Stream: event {message_id} left for redelivery: the connection is closing"
                );
                None
            }
            (Some("EVENT"), _) => match event_json(headers, &frame["data"]) {
                None => {
                    log!("DingTalk Stream: event {message_id} without eventType/data acked");
                    Some(ack(&message_id, SUCCESS))
                }
                Some(_) if in_flight.len() >= MAX_IN_FLIGHT => {
                    log!(
                        "DingTalk Stream: event {message_id} left for redelivery: {MAX_IN_FLIGHT} events in flight"
                    );
                    None
                }
                Some(event) => {
                    in_flight.push(async move {
                        let verdict = session
                            .dispatcher
                            .dispatch(session.tenant, app, event)
                            .await;
                        (message_id, verdict)
                    });
                    None
                }
            },
            // What the SDKs take quietly: the connection's own life, not ours to answer.
            (Some("SYSTEM"), Some("CONNECTED" | "REGISTERED" | "KEEPALIVE")) => None,
            (kind, topic) => {
                log!(
                    "DingTalk Stream: ignoring {} frame (topic {})",
                    kind.unwrap_or("?"),
                    topic.unwrap_or("?")
                );
                None
            }
        };
        if let Some(reply) = reply
            && let Err(e) = tx.send(Message::Text(reply.to_string().into())).await
        {
            return end(format!("sending ack failed: {e}"));
        }
    }
}

fn asked_to_reconnect(reason: impl Into<String>) -> SessionEnd {
    SessionEnd {
        asked_to_reconnect: true,
        reason: reason.into(),
    }
}

/// Percent-encodes a query value (tickets are opaque tokens).
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_adds_the_type() {
        let headers = json!({"eventType": "bpms_task_change", "messageId": "m"});
        let data = json!(r#"{"processInstanceId": "p1", "type": "finish"}"#);
        let ev: Value = serde_json::from_slice(&event_json(&headers, &data).unwrap()).unwrap();
        assert_eq!(ev["EventType"], "bpms_task_change");
        assert_eq!(ev["processInstanceId"], "p1");
        assert!(event_json(&json!({}), &data).is_none());
        assert!(event_json(&headers, &json!("not json")).is_none());
        assert_eq!(form_encode("a+b/c="), "a%2Bb%2Fc%3D");
    }
}
