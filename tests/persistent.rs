//! Persistent connections end to end: the built component in the reference host, receiving
//! approval events over the Feishu long-connection and DingTalk Stream simulators, and the
//! official Feishu Node SDK's long-connection client against the same simulator.

use imbridge_host::config::ServeConfig;
use imbridge_host::persistent::Options;
use imbridge_host::persistent::dingtalk::ack;
use imbridge_host::persistent::feishu::{Frame, METHOD_CONTROL, METHOD_DATA};
use imbridge_host::server::{ServerHandle, serve_with_persistent};
use imbridge_host::sim::dingtalk::{DingtalkApp, DingtalkSim};
use imbridge_host::sim::dingtalk_stream::DingtalkStreamSim;
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::feishu_ws::{FeishuWsConfig, FeishuWsSim, Message};
use imbridge_host::sim::http::Response;
use imbridge_tests::{Harness, dingtalk_sim, ok};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Keeps Feishu long-connection clients from reconnecting until `ws.faults().clear()`: their
/// endpoint requests (where they ask for a WebSocket address) are answered 503.
fn refuse_reconnects(ws: &FeishuWsSim) {
    let unavailable = Response::json(503, &json!({"code": 1, "msg": "unavailable"}));
    ws.faults()
        .fail_next("/callback/ws/endpoint", 10_000, unavailable);
}

/// Waits until `f` holds, for at most `secs`.
async fn until(what: &str, secs: u64, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast(owner: &str) -> Options {
    Options {
        owner: owner.into(),
        lease_ttl: Duration::from_secs(3),
        lease_poll: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..Options::default()
    }
}

/// Serves `app` for tenant `t1` in persistent mode, its endpoint asked from `endpoint_base`.
async fn serve(h: &Harness, app: &Value, endpoint_base: &str, owner: &str) -> ServerHandle {
    let mut persistent_app = app.clone();
    persistent_app["callback"] = json!("persistent");
    persistent_app["endpoint_base"] = json!(endpoint_base);
    let cfg = json!({"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": h.dir.path().join("serve"),
        "tenants": [{"id": "t1", "apps": [persistent_app]}]});
    let cfg = imbridge_host::config::Config::parse(&cfg.to_string(), h.dir.path()).unwrap();
    assert_eq!(cfg.persistent.len(), 1);
    assert!(ServeConfig::parse(&json!({}).to_string(), h.dir.path()).is_err());
    serve_with_persistent(h.host.clone(), cfg.serve, cfg.persistent, fast(owner))
        .await
        .expect("serve")
}

async fn get(h: &Harness, app: &Value, id: &str) -> Value {
    let v = h
        .invoke(
            "t1",
            "get-approval",
            json!({"app": app, "instance_id": id, "refresh": false}),
        )
        .await;
    ok(&v).clone()
}

fn deciders(approval: &Value) -> Vec<String> {
    approval["decisions"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x["user"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

struct Feishu {
    sim: FeishuSim,
    ws: FeishuWsSim,
    h: Harness,
    app: Value,
}

async fn feishu(ws_config: FeishuWsConfig) -> Feishu {
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![FeishuApp::new("cli_ws", "ws-secret")],
        users: ["alice", "bob", "carol", "dave"]
            .into_iter()
            .map(FeishuUser::new)
            .collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let ws = FeishuWsSim::start(&[("cli_ws", "ws-secret")], ws_config)
        .await
        .expect("ws sim");
    ws.attach(&sim, "cli_ws");
    let allow = sim.base_url().trim_start_matches("http://").to_string();
    let h = Harness::new(&["t1"], &[allow]).await.expect("harness");
    let app = json!({"id": "fs", "platform": "feishu", "app_id": "cli_ws",
        "app_secret": "ws-secret", "token": "vt-cli_ws", "api_base": sim.base_url()});
    Feishu { sim, ws, h, app }
}

impl Feishu {
    async fn start(&self, key: &str) -> String {
        let req = json!({"app": self.app, "request": {
            "key": key, "title": "Deploy?", "initiator": {"id": "ou_alice"},
            "nodes": [{"approvers": [{"id": "ou_bob"}, {"id": "ou_carol"}], "mode": "and"},
                      {"approvers": [{"id": "ou_dave"}], "mode": "or"}]}});
        let a = ok(&self.h.invoke("t1", "start-approval", req).await).clone();
        a["instance_id"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feishu_long_connection_survives_a_drop_and_applies_each_decision_once() {
    // Small fragments: every event arrives split into several frames; a 1 s ping interval:
    // the host pings during the test.
    let fx = feishu(FeishuWsConfig {
        ping_interval_secs: 1,
        reconnect_interval_secs: 1,
        fragment_size: 100,
        ..FeishuWsConfig::default()
    })
    .await;
    let server = serve(&fx.h, &fx.app, &fx.ws.base_url(), "host-a").await;
    until("connected", 10, || fx.ws.live("cli_ws") == 1).await;
    let id = fx.start("wf-1").await;

    // Decided while connected: delivered (in fragments), applied, acked.
    fx.sim
        .decide(&id, "ou_bob", true, Some("ok"))
        .await
        .unwrap();
    until("bob's events acked", 10, || {
        fx.ws.pending("cli_ws") == 0 && !fx.ws.stats("cli_ws").acks.is_empty()
    })
    .await;
    assert_eq!(deciders(&get(&fx.h, &fx.app, &id).await), ["ou_bob"]);

    // Dropped; carol decides while the host is away (its endpoint requests refused, so it
    // cannot be back yet); the host reconnects and gets it.
    refuse_reconnects(&fx.ws);
    fx.ws.drop_connections("cli_ws");
    fx.sim.decide(&id, "ou_carol", true, None).await.unwrap();
    assert!(fx.ws.pending("cli_ws") > 0, "queued while disconnected");
    assert_eq!(fx.ws.live("cli_ws"), 0);
    fx.ws.faults().clear();
    until("redelivered and acked", 15, || fx.ws.pending("cli_ws") == 0).await;
    assert_eq!(
        deciders(&get(&fx.h, &fx.app, &id).await),
        ["ou_bob", "ou_carol"]
    );

    // The platform redelivers an event the host already applied: acked, changes nothing.
    let events: Vec<Value> = fx
        .sim
        .state()
        .events
        .iter()
        .map(|e| e.payload.clone())
        .collect();
    let outbox_before = fx.h.host.store().outbox_list("t1", 0).unwrap().len();
    for ev in &events {
        fx.ws.push_event("cli_ws", ev);
    }
    until("duplicates acked", 10, || fx.ws.pending("cli_ws") == 0).await;
    assert_eq!(
        fx.h.host.store().outbox_list("t1", 0).unwrap().len(),
        outbox_before
    );

    fx.sim.decide(&id, "ou_dave", true, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = get(&fx.h, &fx.app, &id).await;
        if a["status"] == "approved" || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(a["status"], "approved");
    assert_eq!(deciders(&a), ["ou_bob", "ou_carol", "ou_dave"]);
    // Every change went to the outbox, as HTTP callbacks' do.
    assert!(!fx.h.host.store().outbox_list("t1", 0).unwrap().is_empty());

    let stats = fx.ws.stats("cli_ws");
    assert_eq!(stats.connects, 2, "{stats:?}");
    assert_eq!(stats.max_live, 1, "{stats:?}");
    assert!(stats.pings >= 1, "the host pings: {stats:?}");
    assert!(stats.nacks.is_empty(), "{stats:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feishu_bad_frames_and_foreign_events_do_not_break_the_connection() {
    let fx = feishu(FeishuWsConfig::default()).await;
    let server = serve(&fx.h, &fx.app, &fx.ws.base_url(), "host-a").await;
    until("connected", 10, || fx.ws.live("cli_ws") == 1).await;
    // An event the plugin does not handle (a chat message) is acked, not redelivered forever.
    fx.ws.push_event(
        "cli_ws",
        &json!({"schema": "2.0", "header": {"event_id": "e1", "event_type": "im.message.receive_v1",
            "token": "vt-cli_ws", "app_id": "cli_ws", "create_time": "1"}, "event": {}}),
    );
    // Garbage that is not JSON at all is invalid input: acked too, once.
    let garbage = fx.ws.push_payload("cli_ws", b"not an event {");
    until("acked", 10, || fx.ws.pending("cli_ws") == 0).await;
    let stats = fx.ws.stats("cli_ws");
    assert_eq!(
        stats.acks.iter().filter(|m| **m == garbage).count(),
        1,
        "{stats:?}"
    );
    // Frames that are not Feishu's: bytes that are no protobuf frame, a text message, and a
    // data frame whose fragment number is beyond its count. Each is ignored.
    let mut stray = Frame {
        method: METHOD_DATA,
        service: 1,
        payload: Some(b"{}".to_vec()),
        ..Frame::default()
    };
    for (k, v) in [
        ("type", "event"),
        ("message_id", "m"),
        ("sum", "2"),
        ("seq", "5"),
    ] {
        stray.set_header(k, v);
    }
    for message in [
        Message::Binary(vec![0xff, 0x00, 0x13, 0x37].into()),
        Message::Text("hello".into()),
        Message::Binary(stray.encode().into()),
    ] {
        assert!(fx.ws.send_raw("cli_ws", message));
    }
    // The connection still applies what comes after them.
    let id = fx.start("wf-stray").await;
    fx.sim.decide(&id, "ou_bob", true, None).await.unwrap();
    until("applied", 10, || fx.ws.pending("cli_ws") == 0).await;
    assert_eq!(deciders(&get(&fx.h, &fx.app, &id).await), ["ou_bob"]);
    let stats = fx.ws.stats("cli_ws");
    assert_eq!((stats.connects, fx.ws.live("cli_ws")), (1, 1), "{stats:?}");
    assert!(stats.nacks.is_empty(), "{stats:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_connection_per_app_across_two_owners() {
    let fx = feishu(FeishuWsConfig::default()).await;
    let a = serve(&fx.h, &fx.app, &fx.ws.base_url(), "host-a").await;
    until("a connected", 10, || fx.ws.live("cli_ws") == 1).await;
    // A second owner on the same state: waits for the lease instead of connecting.
    let b = serve(&fx.h, &fx.app, &fx.ws.base_url(), "host-b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fx.ws.stats("cli_ws").connects, 1);
    // The first one stops (releasing its lease): the second takes over.
    a.shutdown().await;
    until("b connected", 10, || fx.ws.stats("cli_ws").connects == 2).await;
    until("one live", 10, || fx.ws.live("cli_ws") == 1).await;
    assert_eq!(fx.ws.stats("cli_ws").max_live, 1);
    b.shutdown().await;
}

struct Dingtalk {
    sim: DingtalkSim,
    stream: DingtalkStreamSim,
    h: Harness,
    app: Value,
    key: String,
}

async fn dingtalk() -> Dingtalk {
    let app = DingtalkApp::new("ding_stream");
    let sim = dingtalk_sim(&app, &["orig", "a", "b"]).await;
    let stream = DingtalkStreamSim::start(&[(&app.app_key, &app.app_secret)])
        .await
        .expect("stream sim");
    stream.attach(&sim, &app.app_key);
    let allow = sim.base_url().trim_start_matches("http://").to_string();
    let h = Harness::new(&["t1"], &[allow]).await.expect("harness");
    let app_json = json!({"id": "dt", "platform": "dingtalk", "app_id": app.app_key,
        "app_secret": app.app_secret, "agent_id": app.agent_id.to_string(),
        "encrypt_key": app.aes_key, "token": app.token, "api_base": sim.base_url()});
    Dingtalk {
        sim,
        stream,
        h,
        app: app_json,
        key: app.app_key,
    }
}

impl Dingtalk {
    /// Starts an approval: a AND b.
    async fn start(&self, key: &str) -> String {
        let req = json!({"app": self.app, "request": {
            "key": key, "title": "Deploy", "initiator": {"id": "orig"},
            "nodes": [{"approvers": [{"id": "a"}, {"id": "b"}], "mode": "and"}]}});
        ok(&self.h.invoke("t1", "start-approval", req).await)["instance_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_stream_end_to_end() {
    let dt = dingtalk().await;
    let (stream, sim, h, app_json) = (&dt.stream, &dt.sim, &dt.h, &dt.app);
    let server = serve(h, app_json, &stream.base_url(), "host-a").await;
    let key = dt.key.as_str();
    until("connected", 10, || stream.live(key) == 1).await;
    // Asked for JSON (the gateway answers XML otherwise), then dialled with the ticket.
    let open = &stream.open_requests()[0];
    assert_eq!(open.accept.as_deref(), Some("application/json"), "{open:?}");
    let ticket = open.ticket.as_deref().expect("ticket issued");
    assert_eq!(
        stream.stats(key).targets,
        [format!("/connect?ticket={ticket}")]
    );

    assert!(stream.ping(key).is_some());
    until("ping answered", 10, || stream.stats(key).pings == 1).await;

    let id = dt.start("wf-9").await;
    sim.decide(&id, "a", true, "ok").await.unwrap();
    until("a acked", 10, || {
        stream.pending(key) == 0 && !stream.stats(key).acks.is_empty()
    })
    .await;

    // Disconnected by the server's request, then dropped: b's decision still arrives.
    assert!(stream.send_disconnect(key));
    until("reconnected", 10, || {
        stream.stats(key).connects == 2 && stream.live(key) == 1
    })
    .await;
    stream.drop_connections(key);
    sim.decide(&id, "b", true, "").await.unwrap();
    until("redelivered", 15, || {
        stream.pending(key) == 0 && stream.stats(key).connects >= 3
    })
    .await;

    let a = get(h, app_json, &id).await;
    assert_eq!(a["status"], "approved", "{a}");
    let mut who = deciders(&a);
    who.sort();
    assert_eq!(who, ["a", "b"]);
    assert!(stream.stats(key).nacks.is_empty());
    server.shutdown().await;
}

/// Number of outbox records of tenant `t1` (one per approval change the host recorded).
fn outbox_len(h: &Harness) -> usize {
    h.host.store().outbox_list("t1", 0).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feishu_event_whose_ack_is_lost_is_redelivered_on_a_timer_and_applied_once() {
    let fx = feishu(FeishuWsConfig {
        redeliver_after: Duration::from_millis(300),
        ..FeishuWsConfig::default()
    })
    .await;
    let server = serve(&fx.h, &fx.app, &fx.ws.base_url(), "host-a").await;
    until("connected", 10, || fx.ws.live("cli_ws") == 1).await;
    let id = fx.start("wf-lost").await;
    // Whatever the start produced is delivered and acked before the ack loss is armed.
    fx.sim.flush_events().await;
    until("earlier events acked", 10, || fx.ws.pending("cli_ws") == 0).await;
    let before = outbox_len(&fx.h);

    // The host applies bob's decision and acks it, but the ack never reaches the service.
    fx.ws.lose_acks("cli_ws", 1);
    fx.sim.decide(&id, "ou_bob", true, None).await.unwrap();
    until("ack lost", 10, || {
        fx.ws.stats("cli_ws").lost_acks.len() == 1
    })
    .await;
    let lost = fx.ws.stats("cli_ws").lost_acks[0].clone();
    // The lost ack is the one of bob's decision (the first event the decision produced).
    let payload: Vec<u8> = fx
        .ws
        .sent_frames(&lost)
        .into_iter()
        .flat_map(|f| f.payload.unwrap_or_default())
        .collect();
    let event: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (&event["event"]["open_id"], &event["event"]["status"]),
        (&json!("ou_bob"), &json!("APPROVED"))
    );
    // Still connected: the service pushes it again once the ack is overdue.
    until("redelivered and acked", 10, || {
        fx.ws.pending("cli_ws") == 0 && fx.ws.stats("cli_ws").acks.contains(&lost)
    })
    .await;
    let stats = fx.ws.stats("cli_ws");
    assert!(stats.redelivered.contains(&lost), "{stats:?}");
    assert_eq!(
        stats.connects, 1,
        "redelivered on the same connection: {stats:?}"
    );
    assert!(stats.nacks.is_empty(), "{stats:?}");
    // Applied once: one decision, one outbox record.
    assert_eq!(deciders(&get(&fx.h, &fx.app, &id).await), ["ou_bob"]);
    assert_eq!(outbox_len(&fx.h), before + 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_event_whose_ack_is_lost_is_redelivered_on_a_timer_and_applied_once() {
    let dt = dingtalk().await;
    dt.stream.set_redeliver_after(Duration::from_millis(300));
    let key = dt.key.as_str();
    let server = serve(&dt.h, &dt.app, &dt.stream.base_url(), "host-a").await;
    until("connected", 10, || dt.stream.live(key) == 1).await;
    let id = dt.start("wf-lost").await;
    // The start's events are delivered and acked before the ack loss is armed.
    dt.sim.flush_events().await;
    until("earlier events acked", 10, || dt.stream.pending(key) == 0).await;
    let before = outbox_len(&dt.h);
    let acked_before = dt.stream.stats(key).acks.len();

    dt.stream.lose_acks(key, 1);
    dt.sim.decide(&id, "a", true, "ok").await.unwrap();
    until("ack lost", 10, || dt.stream.stats(key).lost_acks.len() == 1).await;
    let lost = dt.stream.stats(key).lost_acks[0].clone();
    until("redelivered and acked", 10, || {
        dt.stream.pending(key) == 0 && dt.stream.stats(key).acks.contains(&lost)
    })
    .await;
    let stats = dt.stream.stats(key);
    assert!(stats.redelivered.contains(&lost), "{stats:?}");
    assert_eq!(stats.connects, 1, "{stats:?}");
    assert!(stats.acks.len() > acked_before);
    assert!(stats.nacks.is_empty(), "{stats:?}");
    let a = get(&dt.h, &dt.app, &id).await;
    assert_eq!(deciders(&a), ["a"], "{a}");
    assert_eq!(a["status"], "pending");
    assert_eq!(outbox_len(&dt.h), before + 1);
    server.shutdown().await;
}

/// An official Node SDK run by one of the scripts in `tests/interop` as a live peer: the
/// Feishu SDK's long-connection client (`WSClient` + `EventDispatcher` from
/// `@larksuiteoapi/node-sdk`, `feishu_ws_client.mjs`) or the DingTalk Stream SDK (`DWClient`
/// from `dingtalk-stream`, `dingtalk_stream_client.mjs`).
struct NodeSdk {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// `{"heartbeat": n}` lines seen so far (keepalive pongs), which `next` skips.
    heartbeats: usize,
}

impl NodeSdk {
    /// Fails (never skips) when node or the SDK is missing, naming the install step.
    fn start(domain: &str, app_id: &str, secret: &str, fail_once: &str) -> NodeSdk {
        NodeSdk::run("feishu_ws_client.mjs", &[domain, app_id, secret, fail_once])
    }

    fn run(script: &str, args: &[&str]) -> NodeSdk {
        use tokio::io::AsyncBufReadExt as _;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(script)
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        // axios would send even loopback requests through a configured proxy.
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            cmd.env_remove(var).env_remove(var.to_lowercase());
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "node not runnable ({e}); install the interop peers: npm ci --prefix tests/interop"
            )
        });
        let stdout = child.stdout.take().expect("piped stdout");
        NodeSdk {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
            heartbeats: 0,
        }
    }

    async fn line(&mut self, what: &str) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the SDK printed nothing for 30 s: {what}"))
            .expect("reading the SDK's output")
            .expect("the SDK script exited; is it installed? npm ci --prefix tests/interop");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("SDK printed {line:?}: {e}"))
    }

    /// The next JSON line the SDK script printed (`what` we wait for, for the failure),
    /// heartbeats aside.
    async fn next(&mut self, what: &str) -> Value {
        loop {
            let v = self.line(what).await;
            if v.get("heartbeat").is_none() {
                return v;
            }
            self.heartbeats += 1;
        }
    }

    /// Waits until the SDK reported `n` keepalive pongs; nothing else may come meanwhile.
    async fn heartbeats(&mut self, n: usize) {
        while self.heartbeats < n {
            let v = self.line("a keepalive pong").await;
            assert!(v.get("heartbeat").is_some(), "unexpected {v}");
            self.heartbeats += 1;
        }
    }

    /// Closes its stdin: the script closes the client and exits.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the SDK script exits when its stdin closes")
            .expect("waiting for node");
        assert!(status.success(), "{status}");
    }
}

/// How a client echoed a frame's 64-bit `LogID` in its ack.
#[derive(Debug, PartialEq)]
enum LogId {
    Exact,
    /// Rounded to the nearest double: JavaScript clients decode uint64 into a `Number`.
    AsDouble,
}

/// The pings and acks in `frames` (a client's binary messages, as received). Every ping must be
/// the one Feishu's SDKs send (`type: ping` control frame for the URL's `service_id`, which
/// the simulator sets to 42); every ack must be the message's last fragment sent back
/// unchanged (ids, service, method, headers) plus a `biz_rt` header, with `{"code": …}` as
/// payload. Returns the number of pings and `(message id, code, how LogID came back)` per ack.
fn check_client_frames(ws: &FeishuWsSim, frames: &[Vec<u8>]) -> (usize, Vec<(String, i64, LogId)>) {
    let ping = Frame::control(42, "ping").encode();
    let (mut pings, mut acks) = (0, Vec::new());
    for raw in frames {
        let ack = Frame::decode(raw).expect("client frames decode as pbbp2.Frame");
        if ack.method == METHOD_CONTROL {
            assert_eq!(raw, &ping, "ping frame {ack:?}");
            pings += 1;
            continue;
        }
        assert_eq!(ack.method, METHOD_DATA, "{ack:?}");
        let id = ack
            .header("message_id")
            .expect("ack has message_id")
            .to_string();
        let sent = ws.sent_frames(&id);
        let last = sent.last().expect("ack of a message the simulator sent");
        let biz_rt = ack.header("biz_rt").expect("ack has biz_rt");
        assert!(biz_rt.parse::<i64>().is_ok(), "biz_rt {biz_rt:?}");
        let payload: Value =
            serde_json::from_slice(ack.payload.as_deref().unwrap_or_default()).expect("JSON");
        let code = payload["code"].as_i64().expect("payload has a code");
        assert_eq!(payload, json!({"code": code}), "nothing but the code");
        let log_id = if ack.log_id == last.log_id {
            LogId::Exact
        } else {
            assert_eq!(ack.log_id, last.log_id as f64 as u64, "LogID of {id}");
            LogId::AsDouble
        };
        let mut expected = last.clone();
        expected.set_header("biz_rt", biz_rt);
        expected.payload = ack.payload.clone();
        expected.log_id = ack.log_id;
        assert_eq!(ack, expected, "ack of {id}");
        acks.push((id, code, log_id));
    }
    (pings, acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_sdk_and_the_host_speak_the_same_long_connection_frames() {
    // The SDK insists on a real-looking App ID (cli_ + 16 hex digits).
    const APP: &str = "cli_a1b2c3d4e5f60718";
    let config = FeishuWsConfig {
        ping_interval_secs: 1,
        reconnect_interval_secs: 1,
        // Every event below arrives in several frames, split inside UTF-8 characters.
        fragment_size: 100,
        // Short, so the step that wants a redelivery does not wait long.
        redeliver_after: Duration::from_secs(1),
    };
    let ws = FeishuWsSim::start(&[(APP, "sdk-secret")], config.clone())
        .await
        .expect("ws sim");
    let text = "审批通过 ✅ ".repeat(40);
    let message = |event_id: &str| {
        json!({"schema": "2.0", "header": {"event_id": event_id,
            "event_type": "im.message.receive_v1", "token": "vt", "app_id": APP,
            "create_time": "1700000000000", "tenant_key": "tk"},
            "event": {"message": {"message_id": "om_1", "message_type": "text",
                "content": json!({"text": text}).to_string()}}})
    };
    let approval = json!({"uuid": "u-1", "token": "vt", "ts": "1700000000.0",
        "type": "event_callback", "event": {"type": "approval_instance", "app_id": APP,
        "instance_code": "INST-1", "status": "APPROVED", "note": text}});

    let mut sdk = NodeSdk::start(&ws.base_url(), APP, "sdk-secret", "approval_instance");
    let ready = sdk.next("ready").await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert!(ready["sdk_version"].is_string(), "{ready}");
    until("SDK connected", 10, || ws.live(APP) == 1).await;

    // A fragmented v2 event: the SDK reassembles it byte for byte.
    let m1 = ws.push_event(APP, &message("ev-1"));
    assert!(ws.sent_frames(&m1).len() > 5);
    let got = sdk.next("the fragmented event").await;
    assert_eq!(got["event"], "im.message.receive_v1", "{got}");
    assert_eq!(got["data"]["event_id"], "ev-1");
    let content: Value = serde_json::from_str(got["data"]["message"]["content"].as_str().unwrap())
        .expect("content is JSON");
    assert_eq!(content["text"], text.as_str());

    // A v1 event whose handler throws once: the SDK answers code 500, the service keeps it
    // and pushes it again when the ack is overdue; the second attempt is acked.
    let m2 = ws.push_event(APP, &approval);
    let first = sdk.next("the first attempt").await;
    assert_eq!(
        (first["event"].as_str(), first["attempt"].as_i64()),
        (Some("approval_instance"), Some(1))
    );
    assert_eq!(first["data"]["instance_code"], "INST-1");
    let second = sdk.next("the redelivery").await;
    assert_eq!(second["attempt"], 2, "{second}");
    until("all acked", 10, || ws.pending(APP) == 0).await;
    let stats = ws.stats(APP);
    assert_eq!(stats.nacks, std::slice::from_ref(&m2), "{stats:?}");
    assert!(stats.redelivered.contains(&m2), "{stats:?}");
    // The SDK took the ping interval from the endpoint's ClientConfig (its own default is
    // two minutes) and pings again.
    until("SDK pinged twice", 10, || ws.stats(APP).pings >= 2).await;

    // A connection dropped without a close frame: the SDK reconnects through the endpoint
    // again and gets what was queued meanwhile. (SDK 1.74.0 attaches its message listener
    // only after the socket's `open` promise settled, so it misses frames that arrive with
    // the handshake answer — the simulator sends the backlog at once — and gets them from
    // the overdue-ack redelivery, as it would from Feishu.)
    ws.drop_connections(APP);
    let m3 = ws.push_event(APP, &message("ev-3"));
    let got = sdk.next("the event after the reconnect").await;
    assert_eq!(got["data"]["event_id"], "ev-3", "{got}");
    until("acked after reconnect", 10, || ws.pending(APP) == 0).await;
    assert_eq!(ws.stats(APP).connects, 2);
    sdk.stop().await;

    let sdk_frames = ws.client_frames(APP);
    let (sdk_pings, sdk_acks) = check_client_frames(&ws, &sdk_frames);
    assert!(sdk_pings >= 2);
    let sdk_acks: Vec<(String, i64)> = sdk_acks.into_iter().map(|(m, c, _)| (m, c)).collect();
    assert_eq!(
        sdk_acks,
        [(m1, 200), (m2.clone(), 500), (m2, 200), (m3, 200)],
        "one ack per message (after its last fragment), 500 when the handler threw"
    );

    // The host on the same service: its pings and acks pass the same checks, byte for byte
    // for pings. (A long redelivery delay: one ack per message even on a slow machine.)
    ws.set_config(FeishuWsConfig {
        redeliver_after: Duration::from_secs(60),
        ..config
    });
    let h = Harness::new(&["t1"], &[]).await.expect("harness");
    let app = json!({"id": "fs", "platform": "feishu", "app_id": APP,
        "app_secret": "sdk-secret", "token": "vt"});
    let server = serve(&h, &app, &ws.base_url(), "host-a").await;
    until("host connected", 10, || ws.live(APP) == 1).await;
    let m4 = ws.push_event(APP, &message("ev-4"));
    until("host acked", 10, || ws.pending(APP) == 0).await;
    until("host pinged", 10, || ws.stats(APP).pings > sdk_pings).await;
    // Unlike the SDK, the host reads the backlog that comes with the handshake answer. (Its
    // endpoint requests are refused until ev-5 is queued, so ev-5 is in that backlog.)
    refuse_reconnects(&ws);
    ws.drop_connections(APP);
    let m5 = ws.push_event(APP, &message("ev-5"));
    assert_eq!(ws.live(APP), 0);
    ws.faults().clear();
    until("host acked after reconnect", 15, || ws.pending(APP) == 0).await;
    assert!(
        !ws.stats(APP).redelivered.contains(&m5),
        "{:?}",
        ws.stats(APP)
    );
    server.shutdown().await;
    let host_frames = ws.client_frames(APP)[sdk_frames.len()..].to_vec();
    let (host_pings, host_acks) = check_client_frames(&ws, &host_frames);
    assert!(host_pings >= 1);
    assert_eq!(
        host_acks,
        [(m4, 200, LogId::Exact), (m5, 200, LogId::Exact)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_dingtalk_stream_sdk_opens_acks_and_answers_pings_as_the_host_does() {
    let dt = dingtalk().await;
    let (stream, key) = (&dt.stream, dt.key.as_str());
    let secret = dt.app["app_secret"].as_str().unwrap();
    // Short, so the event the SDK answers LATER comes again soon.
    stream.set_redeliver_after(Duration::from_secs(1));
    let id = dt.start("wf-sdk").await;
    // Only the decisions below go to the SDK: each produces a known set of events.
    dt.sim.discard_events();

    let mut sdk = NodeSdk::run(
        "dingtalk_stream_client.mjs",
        &[&stream.base_url(), key, secret, "bpms_task_change"],
    );
    let ready = sdk.next("ready").await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert!(ready["sdk_version"].is_string(), "{ready}");
    // The gateway URL the SDK has built in; the host's default base and path are the same.
    assert_eq!(
        ready["gateway_url"],
        "https://api.dingtalk.com/v1.0/gateway/connections/open"
    );
    until("SDK connected", 10, || stream.live(key) == 1).await;

    // connections/open: accepted, asked for JSON, with the SDK's default subscription.
    let opens = stream.open_requests();
    assert_eq!(opens.len(), 1, "{opens:?}");
    let open = &opens[0];
    assert_eq!(open.status, 200, "{open:?}");
    assert_eq!(open.accept.as_deref(), Some("application/json"), "{open:?}");
    assert_eq!(open.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        open.body,
        json!({"clientId": key, "clientSecret": secret, "ua": "",
            "subscriptions": [{"type": "EVENT", "topic": "*"}]})
    );
    // The socket was dialled at the endpoint with the ticket that answer issued.
    let ticket = open.ticket.clone().expect("a ticket issued");
    assert_eq!(
        stream.stats(key).targets,
        [format!("/connect?ticket={ticket}")]
    );

    // A SYSTEM ping is answered.
    let ping = stream.ping(key).expect("SDK connected");
    until("ping answered", 10, || stream.stats(key).pings == 1).await;

    // An approval event: the listener answers LATER, the gateway pushes it again once the
    // ack is overdue, and the second attempt is acked SUCCESS.
    dt.sim.decide(&id, "a", true, "ok").await.unwrap();
    let first = sdk.next("a's decision").await;
    assert_eq!(
        (first["event"].as_str(), first["attempt"].as_i64()),
        (Some("bpms_task_change"), Some(1))
    );
    let data = &first["data"];
    assert_eq!(data["processInstanceId"], id.as_str(), "{first}");
    assert_eq!(
        (&data["type"], &data["staffId"], &data["result"]),
        (&json!("finish"), &json!("a"), &json!("agree"))
    );
    let m_a = first["message_id"].as_str().unwrap().to_string();
    let second = sdk.next("the redelivery").await;
    assert_eq!(
        (second["attempt"].as_i64(), second["message_id"].as_str()),
        (Some(2), Some(m_a.as_str())),
        "{second}"
    );
    until("a acked", 10, || stream.stats(key).acks.contains(&m_a)).await;
    // Long again: one delivery per event from here on, even on a slow machine.
    stream.set_redeliver_after(Duration::from_secs(60));

    // b's decision ends the instance: a task event, then the instance event.
    dt.sim.decide(&id, "b", true, "").await.unwrap();
    let task = sdk.next("b's decision").await;
    assert_eq!(
        (task["event"].as_str(), task["data"]["staffId"].as_str()),
        (Some("bpms_task_change"), Some("b"))
    );
    let done = sdk.next("the instance's end").await;
    assert_eq!(done["event"], "bpms_instance_change", "{done}");
    assert_eq!(
        (&done["data"]["type"], &done["data"]["result"]),
        (&json!("finish"), &json!("agree"))
    );
    let m_b = task["message_id"].as_str().unwrap().to_string();
    let m_end = done["message_id"].as_str().unwrap().to_string();
    until("all acked", 10, || stream.pending(key) == 0).await;

    // keepAlive: the SDK pings at the WebSocket level every 8 s and drops the connection
    // when a pong is missing; one pong back means the simulator answers them.
    sdk.heartbeats(1).await;
    let stats = stream.stats(key);
    assert_eq!(stats.connects, 1, "{stats:?}");
    assert_eq!(stats.nacks, std::slice::from_ref(&m_a), "{stats:?}");
    assert!(stats.redelivered.contains(&m_a), "{stats:?}");
    assert_eq!(stats.acks, [m_a.clone(), m_b.clone(), m_end.clone()]);
    sdk.stop().await;

    // Frame for frame: the event acks are the host's (`persistent::dingtalk::ack`, the same
    // messageId, code 200, `{"status":"SUCCESS"}` as data), the LATER answer aside.
    let frames: Vec<Value> = stream
        .client_frames(key)
        .iter()
        .map(|f| serde_json::from_str(f).expect("client frames are JSON"))
        .collect();
    let host_ack = |id: &str| ack(id, r#"{"status":"SUCCESS"}"#);
    let ping_frame = stream.sent_frame(&ping).unwrap();
    let expected = [
        // The SDK echoes all of the ping's headers where the host sends contentType and
        // messageId only; the simulator (like DingTalk) matches on messageId and data.
        json!({"code": 200, "headers": ping_frame["headers"], "message": "OK",
            "data": ping_frame["data"]}),
        ack(&m_a, r#"{"status":"LATER","message":"try again later"}"#),
        host_ack(&m_a),
        host_ack(&m_b),
        host_ack(&m_end),
    ];
    assert_eq!(frames, expected);
    let host_pong = ack(&ping, ping_frame["data"].as_str().unwrap());
    assert_eq!(
        (
            &host_pong["code"],
            &host_pong["headers"]["messageId"],
            &host_pong["data"]
        ),
        (
            &frames[0]["code"],
            &frames[0]["headers"]["messageId"],
            &frames[0]["data"]
        )
    );
}
