//! Persistent connections end to end: the built component in the reference host, receiving
//! approval events over the Feishu long-connection and DingTalk Stream simulators.

use imbridge_host::config::ServeConfig;
use imbridge_host::persistent::{self, Lease, LeaseStore, Options};
use imbridge_host::server::{ServerHandle, serve_with_persistent};
use imbridge_host::sim::dingtalk::{DingtalkApp, DingtalkConfig, DingtalkSim, DingtalkUser};
use imbridge_host::sim::dingtalk_stream::DingtalkStreamSim;
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::feishu_ws::{FeishuWsConfig, FeishuWsSim};
use imbridge_host::store::Store;
use imbridge_tests::{Harness, ok};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    // Dropped; carol decides while the host is away; the host reconnects and gets it.
    fx.ws.drop_connections("cli_ws");
    fx.sim.decide(&id, "ou_carol", true, None).await.unwrap();
    // (The simulator forwards events asynchronously, hence the wait.)
    until("queued while disconnected", 5, || {
        fx.ws.pending("cli_ws") > 0
    })
    .await;
    assert_eq!(fx.ws.live("cli_ws"), 0);
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
    // Garbage that is not JSON at all is invalid input: acked too.
    fx.ws.push_event("cli_ws", &json!("not an event"));
    until("acked", 10, || fx.ws.pending("cli_ws") == 0).await;
    assert_eq!(fx.ws.stats("cli_ws").connects, 1);
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

#[test]
fn lease_passes_to_a_second_owner_only_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn LeaseStore> = Arc::new(Store::open(dir.path()).unwrap());
    let ttl = Duration::from_millis(300);
    let a = Lease::new(store.clone(), "t1/fs", "host-a", ttl);
    let b = Lease::new(store, "t1/fs", "host-b", ttl);
    assert!(a.acquire().unwrap());
    assert!(!b.acquire().unwrap());
    std::thread::sleep(Duration::from_millis(150));
    assert!(a.acquire().unwrap(), "renewed");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!b.acquire().unwrap(), "the renewal moved the expiry");
    std::thread::sleep(Duration::from_millis(150));
    assert!(b.acquire().unwrap(), "expired: b takes over");
    assert!(!a.acquire().unwrap(), "a lost it");
    assert_eq!(b.holder().unwrap().unwrap().0, "host-b");
    let _ = persistent::default_owner();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_stream_end_to_end() {
    let app = DingtalkApp::new("ding_stream");
    let sim = DingtalkSim::start(DingtalkConfig {
        apps: vec![app.clone()],
        users: ["orig", "a", "b"]
            .iter()
            .enumerate()
            .map(|(i, u)| DingtalkUser::new(u, Some(&format!("1380000000{i}"))))
            .collect(),
        ..Default::default()
    })
    .await
    .expect("sim");
    let stream = DingtalkStreamSim::start(&[(&app.app_key, &app.app_secret)])
        .await
        .expect("stream sim");
    stream.attach(&sim, &app.app_key);
    let allow = sim.base_url().trim_start_matches("http://").to_string();
    let h = Harness::new(&["t1"], &[allow]).await.expect("harness");
    let app_json = json!({"id": "dt", "platform": "dingtalk", "app_id": app.app_key,
        "app_secret": app.app_secret, "agent_id": app.agent_id.to_string(),
        "encrypt_key": app.aes_key, "token": app.token, "api_base": sim.base_url()});
    let server = serve(&h, &app_json, &stream.base_url(), "host-a").await;
    let key = app.app_key.as_str();
    until("connected", 10, || stream.live(key) == 1).await;

    assert!(stream.ping(key));
    until("ping answered", 10, || stream.stats(key).pings == 1).await;

    let req = json!({"app": app_json, "request": {
        "key": "wf-9", "title": "Deploy", "initiator": {"id": "orig"},
        "nodes": [{"approvers": [{"id": "a"}, {"id": "b"}], "mode": "and"}]}});
    let id = ok(&h.invoke("t1", "start-approval", req).await)["instance_id"]
        .as_str()
        .unwrap()
        .to_string();
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

    let a = get(&h, &app_json, &id).await;
    assert_eq!(a["status"], "approved", "{a}");
    let mut who = deciders(&a);
    who.sort();
    assert_eq!(who, ["a", "b"]);
    assert!(stream.stats(key).nacks.is_empty());
    server.shutdown().await;
}
