//! Several `imbridge-host serve` replicas on one Redis: the real binary, a real
//! `redis-server` on loopback, the Feishu simulators.

mod replica;

use imbridge_host::redis_server::RedisServer;
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::feishu_ws::{FeishuWsConfig, FeishuWsSim};
use imbridge_host::sim::http;
use replica::{Replica, ok, until};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const APP: &str = "cli_rep";
const SECRET: &str = "rep-secret";
const ENCRYPT_KEY: &str = "rep-encrypt-key";
const TOKEN: &str = "vt-rep";

struct Fixture {
    redis: RedisServer,
    sim: FeishuSim,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

/// Redis, the Feishu simulator with `users`, and a serve config for tenant `t1`, app `fs`
/// (`persistent`: over the long-connection simulator instead of HTTP callbacks).
async fn fixture(users: &[&str], persistent: Option<&FeishuWsSim>) -> Fixture {
    let redis = RedisServer::start().expect("redis-server");
    let mut fa = FeishuApp::new(APP, SECRET);
    fa.encrypt_key = Some(ENCRYPT_KEY.into());
    fa.verification_token = TOKEN.into();
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![fa],
        users: users.iter().map(|u| FeishuUser::new(u)).collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let mut app = json!({"id": "fs", "platform": "feishu", "app_id": APP, "app_secret": SECRET,
        "encrypt_key": ENCRYPT_KEY, "token": TOKEN, "api_base": sim.base_url()});
    if let Some(ws) = persistent {
        ws.attach(&sim, APP);
        app["callback"] = json!("persistent");
        app["endpoint_base"] = json!(ws.base_url());
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.json");
    let cfg = json!({
        "listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": dir.path().join("state"), "cache_dir": replica::cache_dir(),
        "store": {"redis": redis.url()}, "lease_ttl_secs": 2,
        "tenants": [{"id": "t1", "apps": [app],
            "allow_hosts": [sim.base_url().trim_start_matches("http://")]}],
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    Fixture {
        redis,
        sim,
        _dir: dir,
        config,
    }
}

fn request(key: &str, nodes: Value) -> Value {
    json!({"key": key, "title": "Deploy?", "initiator": {"id": "ou_alice"}, "nodes": nodes})
}

async fn start(r: &Replica, body: &Value) -> String {
    let (status, v) = r.post("/api/t1/fs/approvals", body).await;
    assert_eq!(status, 200, "{v}");
    ok(&v)["instance_id"].as_str().unwrap().to_string()
}

async fn approval(r: &Replica, id: &str) -> Value {
    let (status, v) = r.get(&format!("/api/t1/fs/approvals/{id}")).await;
    assert_eq!(status, 200, "{v}");
    ok(&v).clone()
}

fn deciders(a: &Value) -> Vec<String> {
    let mut who: Vec<String> = a["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user"].as_str().unwrap().to_string())
        .collect();
    who.sort();
    who
}

/// Outbox records (without acknowledging any), as `(instance_id, approval)`.
async fn updates(r: &Replica) -> Vec<(String, Value)> {
    let (status, v) = r.get("/api/t1/updates").await;
    assert_eq!(status, 200, "{v}");
    v["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let a = u["approval"].clone();
            (a["instance_id"].as_str().unwrap().to_string(), a)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_started_on_one_replica_is_decided_through_the_other() {
    let fx = fixture(&["alice", "bob", "carol", "dave"], None).await;
    let a = Replica::spawn("a", &fx.config);
    let b = Replica::spawn("b", &fx.config);
    let body = request(
        "wf-1",
        json!([{"approvers": [{"id": "ou_bob"}, {"id": "ou_carol"}], "mode": "and"},
               {"approvers": [{"id": "ou_dave"}], "mode": "or"}]),
    );
    let id = start(&a, &body).await;
    let creates = fx.sim.calls("POST /open-apis/approval/v4/instances");
    assert_eq!(creates, 1);

    // The engine retries the start on the other replica: the same approval, nothing created.
    assert_eq!(start(&b, &body).await, id);
    assert_eq!(
        fx.sim.calls("POST /open-apis/approval/v4/instances"),
        creates
    );
    assert_eq!(fx.sim.state().instances.len(), 1);

    // The platform calls replica B; A reads the result.
    fx.sim
        .set_callback_url(APP, Some(&b.callback_url("t1", "fs")));
    for approver in ["ou_bob", "ou_carol", "ou_dave"] {
        let d = fx.sim.decide(&id, approver, true, None).await.unwrap();
        assert!(!d.reports.is_empty());
        assert!(d.reports.iter().all(|r| r.delivered), "{:?}", d.reports);
    }
    let got = approval(&a, &id).await;
    assert_eq!(got["status"], "approved", "{got}");
    assert_eq!(deciders(&got), ["ou_bob", "ou_carol", "ou_dave"]);
    // B's callbacks' updates are in the shared outbox, so A serves them to the engine.
    let ups = updates(&a).await;
    assert!(!ups.is_empty());
    assert_eq!(ups.last().unwrap().1["status"], "approved");
    assert_eq!(ups, updates(&b).await);
}

/// With `wait_replicas` and no replica following, a start still goes through: its claim and
/// its commit stand on the primary and are logged, since failing them would leave the
/// start's retry facing its own claim (before, the start failed with a `storage` error and
/// its key stayed claimed). A callback is answered 500 instead, so the platform sends it
/// again; its write stands on the primary all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_replicas_asked_for_starts_go_through_and_callbacks_are_refused() {
    let fx = fixture(&["alice", "bob"], None).await;
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&fx.config).unwrap()).unwrap();
    cfg["store"]["wait_replicas"] = json!(1);
    std::fs::write(&fx.config, cfg.to_string()).unwrap();
    let a = Replica::spawn("a", &fx.config);
    let body = request(
        "wf-w",
        json!([{"approvers": [{"id": "ou_bob"}], "mode": "and"}]),
    );
    let id = start(&a, &body).await;
    assert_eq!(fx.sim.calls("POST /open-apis/approval/v4/instances"), 1);
    assert_eq!(
        start(&a, &body).await,
        id,
        "the retry finds the same approval"
    );
    fx.sim
        .set_callback_url(APP, Some(&a.callback_url("t1", "fs")));
    let d = fx.sim.decide(&id, "ou_bob", true, None).await.unwrap();
    let refused_first = d
        .reports
        .iter()
        .filter(|r| r.attempts.first().and_then(|a| a.status) == Some(500))
        .count();
    assert!(refused_first > 0, "{:?}", d.reports);
    // The simulator's next attempt finds the write done: nothing to commit, so 200.
    assert!(d.reports.iter().all(|r| r.delivered), "{:?}", d.reports);
    assert_eq!(approval(&a, &id).await["status"], "approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callback_delivered_to_both_replicas_at_once_is_applied_once() {
    let approvers: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let mut users: Vec<&str> = vec!["alice"];
    users.extend(approvers.iter().map(String::as_str));
    let fx = fixture(&users, None).await;
    let a = Replica::spawn("a", &fx.config);
    let b = Replica::spawn("b", &fx.config);
    let nodes = json!([{"mode": "and", "approvers": approvers.iter()
        .map(|u| json!({"id": format!("ou_{u}")})).collect::<Vec<_>>()}]);
    let id = start(&a, &request("wf-2", nodes)).await;

    // No callback URL: the simulator keeps the events, and the test delivers each one to both
    // replicas at the same moment, as a platform retry racing the original would.
    let mut delivered = 0;
    for u in &approvers {
        let d = fx
            .sim
            .decide(&id, &format!("ou_{u}"), true, None)
            .await
            .unwrap();
        for payload in &d.events {
            let push = fx.sim.build_push(APP, payload).unwrap();
            let (url_a, url_b) = (a.callback_url("t1", "fs"), b.callback_url("t1", "fs"));
            let timeout = Duration::from_secs(30);
            let (ra, rb) = tokio::join!(
                http::post(&url_a, &push.headers, push.body.clone(), timeout),
                http::post(&url_b, &push.headers, push.body.clone(), timeout),
            );
            assert_eq!(ra.status, Some(200), "{}", ra.body_text());
            assert_eq!(rb.status, Some(200), "{}", rb.body_text());
            delivered += 1;
        }
    }

    let got = approval(&b, &id).await;
    assert_eq!(got["status"], "approved", "{got}");
    let mut want: Vec<String> = approvers.iter().map(|u| format!("ou_{u}")).collect();
    want.sort();
    assert_eq!(deciders(&got), want, "every decision exactly once");

    // Exactly one update per change: a double apply would record the same state twice.
    let ups = updates(&a).await;
    let states: BTreeSet<String> = ups
        .iter()
        .map(|(_, a)| format!("{}{:?}", a["status"], deciders(a)))
        .collect();
    assert_eq!(
        ups.len(),
        states.len(),
        "updates recorded twice; the distinct ones: {states:?}"
    );
    // One per decision, plus at most one for the instance's own APPROVED event.
    assert!(
        ups.len() == approvers.len() || ups.len() == approvers.len() + 1,
        "{} updates for {} decisions",
        ups.len(),
        approvers.len()
    );
    let conflicts = a.log_count("conflicted with a concurrent call")
        + b.log_count("conflicted with a concurrent call");
    eprintln!(
        "{delivered} callbacks each delivered to both replicas at once: {} updates, \
         {conflicts} commits re-run after a conflict",
        ups.len()
    );
}

/// Which replica holds the app's lease, by the owner id (`pid-random`) in Redis.
fn lease_holder(redis: &RedisServer) -> Option<u32> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let owner: Option<String> = redis::cmd("GET")
        .arg("imbridge:lease:t1/fs")
        .query(&mut con)
        .unwrap();
    owner.and_then(|o| o.split('-').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_connection_moves_to_the_other_replica_when_its_holder_is_killed() {
    let ws = FeishuWsSim::start(&[(APP, SECRET)], FeishuWsConfig::default())
        .await
        .expect("ws sim");
    let fx = fixture(&["alice", "bob"], Some(&ws)).await;
    let a = Replica::spawn("a", &fx.config);
    let b = Replica::spawn("b", &fx.config);
    until("one replica connected", 60, || ws.live(APP) == 1).await;
    let holder = lease_holder(&fx.redis).expect("lease held");
    let (mut dead, survivor) = if holder == a.pid { (a, b) } else { (b, a) };
    assert_eq!(holder, dead.pid);
    // The other replica waits on the lease: it has asked for it and been refused (it says so
    // once), and there is still one connection.
    until("the other replica refused the lease", 30, || {
        survivor.log_count("persistent connection held by another host; waiting") == 1
    })
    .await;
    assert_eq!(ws.stats(APP).connects, 1);

    dead.kill();
    let killed = Instant::now();
    until("the survivor connected", 30, || {
        ws.stats(APP).connects == 2 && ws.live(APP) == 1
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(lease_holder(&fx.redis), Some(survivor.pid));
    assert_eq!(ws.stats(APP).max_live, 1, "never two connections at once");
    eprintln!(
        "{} killed; {} took the long connection over after {:.1} s (lease TTL 2 s)",
        dead.name,
        survivor.name,
        took.as_secs_f64()
    );

    // And it works: a decision arrives over the survivor's connection.
    let body = request(
        "wf-3",
        json!([{"approvers": [{"id": "ou_bob"}], "mode": "or"}]),
    );
    let id = start(&survivor, &body).await;
    fx.sim.decide(&id, "ou_bob", true, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = approval(&survivor, &id).await;
        if got["status"] == "approved" {
            break;
        }
        assert!(Instant::now() < deadline, "not applied: {got}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until("every event acknowledged", 20, || ws.pending(APP) == 0).await;
    assert!(ws.stats(APP).nacks.is_empty());
}
