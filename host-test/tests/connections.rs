//! The persistent connections against a synthetic plugin whose `handle-event` waits until the
//! test opens its gate: a slow event must not stop the connection from answering the platform.

mod common;

use common::{Behaviour, GATE, plugin, until};
use imbridge_host::bindings::types::{ImApp, Platform};
use imbridge_host::config::PersistentApp;
use imbridge_host::persistent::{self, Connections, Dispatcher, Options, dingtalk};
use imbridge_host::sim::dingtalk_stream::DingtalkStreamSim;
use imbridge_host::sim::feishu_ws::{FeishuWsConfig, FeishuWsSim};
use imbridge_host::store::MemoryStore;
use imbridge_host::{Host, HostConfig, TenantPolicy};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The host's deadline: longer than any wait below, so an event whose gate is closed is
/// certainly still being handled while a test looks.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long a test waits for something the connection should do while an event is handled.
const WAIT: Duration = Duration::from_secs(10);

/// A host (in a state directory of its own) whose tenant `t1` holds each `handle-event` until
/// the gate is open, then fails it as invalid input (which is acknowledged), connected to the
/// platform at `base` as app `app_id`, sending WebSocket pings every `keepalive`; it runs
/// until the value is dropped.
async fn connect(
    platform: Platform,
    app_id: &str,
    base: String,
    keepalive: Duration,
) -> (Connections, tempfile::TempDir, Host) {
    let options = Options {
        owner: "me".into(),
        lease_ttl: Duration::from_secs(30),
        lease_poll: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        keepalive,
    };
    connect_with(platform, app_id, base, options).await
}

async fn connect_with(
    platform: Platform,
    app_id: &str,
    base: String,
    options: Options,
) -> (Connections, tempfile::TempDir, Host) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HostConfig::new(dir.path());
    cfg.call_timeout = DEADLINE;
    let host = Host::new(cfg).unwrap();
    let slow = |export: &str| match export {
        "handle-event" => Behaviour::Gated(&Behaviour::Err),
        _ => Behaviour::Err,
    };
    host.load_tenant_bytes("t1", plugin(slow, "1"), TenantPolicy::default())
        .await
        .unwrap();
    let app = ImApp {
        id: "a1".into(),
        platform,
        app_id: app_id.into(),
        app_secret: "s3cr3t".into(),
        agent_id: None,
        encrypt_key: None,
        token: None,
        api_base: None,
        max_clock_skew_secs: None,
    };
    let dispatcher = Dispatcher::new(host.clone(), Arc::new(|_: &str, _: &str, _: &[_]| Ok(())));
    let apps = vec![PersistentApp {
        tenant: "t1".into(),
        app,
        endpoint_base: Some(base),
    }];
    let conns = persistent::spawn(apps, dispatcher, Arc::new(MemoryStore::new()), options);
    (conns, dir, host)
}

/// DingTalk's `SYSTEM` pings are answered while an event is still being handled; before,
/// the connection read nothing until the call ended, up to the host's deadline.
#[tokio::test(flavor = "multi_thread")]
async fn dingtalk_pings_are_answered_while_an_event_is_handled() {
    let sim = DingtalkStreamSim::start(&[("dingslow", "s3cr3t")])
        .await
        .unwrap();
    let (_conns, _dir, host) = connect(
        Platform::Dingtalk,
        "dingslow",
        sim.base_url(),
        Duration::from_secs(30),
    )
    .await;
    until("connected", Duration::from_secs(10), || {
        sim.live("dingslow") == 1
    })
    .await;

    let event = json!({"EventType": "bpms_task_change", "processInstanceId": "p1"});
    sim.push_event("dingslow", &event);
    // The host reads frames in order: once the event is out, the ping below reaches it only
    // after the event, which is then being handled (held at its gate).
    until("the event delivered", WAIT, || {
        sim.stats("dingslow").deliveries == 1
    })
    .await;
    sim.ping("dingslow").expect("connected");
    until("the ping answered", WAIT, || {
        sim.stats("dingslow").pings == 1
    })
    .await;
    // The event is still being handled: answered neither way.
    let stats = sim.stats("dingslow");
    assert!(stats.acks.is_empty() && stats.nacks.is_empty(), "{stats:?}");
    // Let through, it is answered, once, on the same connection.
    host.kv_set("t1", GATE, b"open").unwrap();
    until("the event acked", WAIT, || {
        sim.stats("dingslow").acks.len() == 1
    })
    .await;
    let stats = sim.stats("dingslow");
    assert_eq!((stats.deliveries, stats.connects), (1, 1), "{stats:?}");
}

/// A DingTalk Stream simulator for app `key`, the host connected to it, and one event pushed
/// and delivered, held at the plugin's gate.
async fn dingtalk_event_in_flight(
    key: &str,
) -> (DingtalkStreamSim, (Connections, tempfile::TempDir, Host)) {
    let sim = DingtalkStreamSim::start(&[(key, "s3cr3t")]).await.unwrap();
    // Only a reconnect sends an unacknowledged event again, so any second delivery is the
    // drain's doing, not a slow machine's.
    sim.set_redeliver_after(Duration::from_secs(600));
    let connected = connect(
        Platform::Dingtalk,
        key,
        sim.base_url(),
        Duration::from_secs(30),
    )
    .await;
    until("connected", WAIT, || sim.live(key) == 1).await;
    let event = json!({"EventType": "bpms_task_change", "processInstanceId": "p1"});
    sim.push_event(key, &event);
    until("the event delivered", WAIT, || {
        sim.stats(key).deliveries == 1
    })
    .await;
    (sim, connected)
}

/// DingTalk's `disconnect` lets the events in flight finish and be acknowledged on the old
/// connection before the host reconnects; before, the session ended at once, the acks were
/// lost, and DingTalk sent those events again (a minute later for real).
#[tokio::test(flavor = "multi_thread")]
async fn dingtalk_disconnect_acknowledges_the_events_in_flight_first() {
    let (sim, (_conns, _dir, host)) = dingtalk_event_in_flight("dingbye").await;

    assert!(sim.send_disconnect("dingbye"));
    // Still reading while it drains: the ping after `disconnect` is answered.
    sim.ping("dingbye").expect("connected");
    until("the ping answered", WAIT, || {
        sim.stats("dingbye").pings == 1
    })
    .await;
    let stats = sim.stats("dingbye");
    assert_eq!((stats.connects, stats.deliveries), (1, 1), "{stats:?}");

    host.kv_set("t1", GATE, b"open").unwrap();
    until("acked, then reconnected", WAIT, || {
        let stats = sim.stats("dingbye");
        stats.acks.len() == 1 && stats.connects == 2 && sim.live("dingbye") == 1
    })
    .await;
    let stats = sim.stats("dingbye");
    assert_eq!(stats.deliveries, 1, "answered where it was sent: {stats:?}");
    assert!(stats.redelivered.is_empty(), "{stats:?}");
    assert_eq!(sim.pending("dingbye"), 0);
}

/// An event still running when the drain's deadline passes is left to DingTalk's redelivery:
/// the connection does not wait on it for longer than [`dingtalk::DRAIN`].
#[tokio::test(flavor = "multi_thread")]
async fn dingtalk_disconnect_waits_no_longer_than_the_drain() {
    let (sim, _connected) = dingtalk_event_in_flight("dingslow2").await;
    let asked = Instant::now();
    assert!(sim.send_disconnect("dingslow2"));
    until("reconnected", dingtalk::DRAIN + WAIT, || {
        sim.stats("dingslow2").connects == 2
    })
    .await;
    assert!(asked.elapsed() >= dingtalk::DRAIN, "{:?}", asked.elapsed());
    // Not acknowledged, so DingTalk sends it again on the new connection.
    until("redelivered", WAIT, || {
        sim.stats("dingslow2").redelivered.len() == 1
    })
    .await;
    assert!(sim.stats("dingslow2").acks.is_empty());
}

/// The long connection keeps pinging Feishu while an event is handled.
#[tokio::test(flavor = "multi_thread")]
async fn feishu_pings_go_on_while_an_event_is_handled() {
    let config = FeishuWsConfig {
        ping_interval_secs: 1,
        ..FeishuWsConfig::default()
    };
    let ws = FeishuWsSim::start(&[("cli_slow", "s3cr3t")], config)
        .await
        .unwrap();
    let (_conns, _dir, host) = connect(
        Platform::Feishu,
        "cli_slow",
        ws.base_url(),
        Duration::from_secs(30),
    )
    .await;
    until("connected", Duration::from_secs(10), || {
        ws.live("cli_slow") == 1
    })
    .await;

    ws.push_event(
        "cli_slow",
        &json!({"schema": "2.0", "header": {"event_type": "x"}}),
    );
    until("the event delivered", WAIT, || {
        ws.stats("cli_slow").deliveries == 1
    })
    .await;
    let before = ws.stats("cli_slow").pings;
    until("two more pings", WAIT, || {
        ws.stats("cli_slow").pings >= before + 2
    })
    .await;
    // The event is still being handled: it has been answered neither way.
    let stats = ws.stats("cli_slow");
    assert!(stats.acks.is_empty() && stats.nacks.is_empty(), "{stats:?}");
    host.kv_set("t1", GATE, b"open").unwrap();
    until("the event acked", WAIT, || {
        ws.stats("cli_slow").acks.len() == 1
    })
    .await;
}

/// Neither simulator sends anything of its own accord here (DingTalk's `SYSTEM` pings only
/// when a test asks, Feishu's pongs only to the client's pings, every 120 s): the
/// connection's own WebSocket pings, and the pongs they get, are what shows it alive. With
/// the pongs it stays up; once the server goes silent without closing (no pong, nothing),
/// four intervals without a frame end it and the host connects again.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_pings_keep_a_quiet_connection_alive() {
    // Dead after 2 s without a frame: a stall of a loaded machine stays well inside it.
    let every = Duration::from_millis(500);
    let ding = DingtalkStreamSim::start(&[("dingquiet", "s3cr3t")])
        .await
        .unwrap();
    let ws = FeishuWsSim::start(&[("cli_quiet", "s3cr3t")], FeishuWsConfig::default())
        .await
        .unwrap();
    let _d = connect(Platform::Dingtalk, "dingquiet", ding.base_url(), every).await;
    let _f = connect(Platform::Feishu, "cli_quiet", ws.base_url(), every).await;
    until("connected", Duration::from_secs(10), || {
        ding.live("dingquiet") == 1 && ws.live("cli_quiet") == 1
    })
    .await;
    // Ten pings take ten intervals, over twice as long as a connection without the pongs
    // lasts.
    until("ten pings on each", Duration::from_secs(30), || {
        ding.stats("dingquiet").ws_pings >= 10 && ws.stats("cli_quiet").ws_pings >= 10
    })
    .await;
    for stats in [ding.stats("dingquiet"), ws.stats("cli_quiet")] {
        assert_eq!(stats.connects, 1, "{stats:?}");
    }

    ding.freeze_connections("dingquiet");
    ws.freeze_connections("cli_quiet");
    until(
        "silent connections replaced",
        Duration::from_secs(30),
        || ding.stats("dingquiet").connects == 2 && ws.stats("cli_quiet").connects == 2,
    )
    .await;
}

/// A gateway that takes the connection and closes it at once (a proxy that refuses WebSocket
/// traffic, say): the backoff keeps growing as for a refused connection. Before, every such
/// session reset it, and the host reconnected (posting the app secret) every backoff_min.
#[tokio::test(flavor = "multi_thread")]
async fn connections_closed_at_once_back_off() {
    let sim = DingtalkStreamSim::start(&[("dingflap", "s3cr3t")])
        .await
        .unwrap();
    let options = Options {
        owner: "me".into(),
        lease_ttl: Duration::from_secs(30),
        lease_poll: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(1000),
        keepalive: Duration::from_secs(30),
    };
    let _conns = connect_with(Platform::Dingtalk, "dingflap", sim.base_url(), options).await;
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        if sim.live("dingflap") > 0 {
            sim.drop_connections("dingflap");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Growing delays up to 1 s average about half a second once grown: a dozen connects in
    // 4 s; without the backoff one every ~60 ms, over sixty.
    let connects = sim.stats("dingflap").connects;
    assert!((2..25).contains(&connects), "{connects} connects in 4 s");
}
