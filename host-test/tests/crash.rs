//! Crash safety: `kill -9` of `imbridge-host serve` in the middle of a burst of callbacks and
//! approval starts, then a restart on the same state. Run against the embedded store and
//! against Redis.
//!
//! What must hold after the restart:
//! - every callback that got its 200 is applied, and its update is in the outbox (the
//!   engine's notification is durable with it);
//! - the platform redelivering everything changes nothing that was already applied;
//! - every approval key maps to exactly one instance on the platform (none started twice),
//!   and starts that answered before the crash answer the same instance after it.

mod replica;

use imbridge_host::redis_server::RedisServer;
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::http;
use replica::{Replica, ok};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const APP: &str = "cli_crash";
const SECRET: &str = "crash-secret";
const ENCRYPT_KEY: &str = "crash-encrypt-key";
const TOKEN: &str = "vt-crash";
/// Approvals decided during the burst (two approvers each: 4 callbacks per approval).
const DECIDED: usize = 8;
/// Approvals started during the burst.
const STARTED: usize = 24;

fn request(key: &str) -> Value {
    json!({"key": key, "title": "Deploy?", "initiator": {"id": "ou_alice"},
        "nodes": [{"approvers": [{"id": "ou_bob"}, {"id": "ou_carol"}], "mode": "and"}]})
}

async fn start(r: &Replica, key: &str) -> Result<String, String> {
    let (status, v) = r.post("/api/t1/fs/approvals", &request(key)).await;
    match v["ok"]["instance_id"].as_str() {
        Some(id) if status == 200 => Ok(id.to_string()),
        _ => Err(format!("{status} {v}")),
    }
}

/// What an event, once applied, must have changed: `(instance, Some(user))` for an approved
/// task, `(instance, None)` for the instance's APPROVED status; `None` for events that change
/// nothing (the PENDING tasks Feishu re-sends).
fn effect(payload: &Value) -> Option<(String, Option<String>)> {
    let e = &payload["event"];
    let instance = e["instance_code"].as_str()?.to_string();
    match (e["type"].as_str()?, e["status"].as_str()?) {
        ("approval_task", "APPROVED") => Some((instance, Some(e["open_id"].as_str()?.into()))),
        ("approval_instance", "APPROVED") => Some((instance, None)),
        _ => None,
    }
}

fn satisfied(approval: &Value, user: &Option<String>) -> bool {
    match user {
        Some(u) => approval["decisions"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["user"] == u.as_str())),
        None => approval["status"] == "approved",
    }
}

async fn crash_in_a_burst(store: Value, dir: &Path) {
    let mut fa = FeishuApp::new(APP, SECRET);
    fa.encrypt_key = Some(ENCRYPT_KEY.into());
    fa.verification_token = TOKEN.into();
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![fa],
        users: ["alice", "bob", "carol"].map(FeishuUser::new).to_vec(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let app = json!({"id": "fs", "platform": "feishu", "app_id": APP, "app_secret": SECRET,
        "encrypt_key": ENCRYPT_KEY, "token": TOKEN, "api_base": sim.base_url()});
    let config = dir.join("serve.json");
    let mut cfg = json!({
        "listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": dir.join("state"), "cache_dir": replica::cache_dir(),
        "tenants": [{"id": "t1", "apps": [app],
            "allow_hosts": [sim.base_url().trim_start_matches("http://")]}],
    });
    if !store.is_null() {
        cfg["store"] = store;
    }
    std::fs::write(&config, cfg.to_string()).unwrap();

    let mut before = Replica::spawn("before", &config);
    let mut ids = Vec::new();
    for i in 0..DECIDED {
        ids.push(start(&before, &format!("decided-{i}")).await.unwrap());
    }
    // Decide everything on the platform first; the test delivers the events itself.
    let mut pushes = Vec::new();
    for id in &ids {
        for who in ["ou_bob", "ou_carol"] {
            for payload in sim.decide(id, who, true, None).await.unwrap().events {
                pushes.push((sim.build_push(APP, &payload).unwrap(), effect(&payload)));
            }
        }
    }

    // The burst: the starts, then (once some have reached the platform) every callback; the
    // host dies when half of the callbacks have been answered, with starts still in flight.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let base = before.base.clone();
    for i in 0..STARTED {
        let (tx, base) = (tx.clone(), base.clone());
        tokio::spawn(async move {
            let r = http::post(
                &format!("{base}/api/t1/fs/approvals"),
                &[("content-type".into(), "application/json".into())],
                request(&format!("burst-{i}")).to_string().into_bytes(),
                Duration::from_secs(30),
            )
            .await;
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let id = v["ok"]["instance_id"].as_str().unwrap_or("").to_string();
            let _ = tx.send((None, r.status == Some(200) && !id.is_empty(), id));
        });
    }
    replica::until("starts reach the platform", 60, || {
        sim.state().instances.len() >= DECIDED + 3
    })
    .await;
    let url = before.callback_url("t1", "fs");
    for (i, (push, _)) in pushes.iter().enumerate() {
        let (tx, url, push) = (tx.clone(), url.clone(), push.clone());
        tokio::spawn(async move {
            let r = http::post(&url, &push.headers, push.body, Duration::from_secs(30)).await;
            let _ = tx.send((Some(i), r.status == Some(200), String::new()));
        });
    }
    drop(tx);
    let mut accepted = BTreeSet::new();
    // Instances whose start was answered before the kill.
    let mut ids_before = BTreeSet::new();
    let mut answered = 0;
    let mut killed = false;
    let mut created_at_kill = 0;
    while let Some((callback, good, id)) = rx.recv().await {
        match callback {
            Some(i) => {
                answered += 1;
                if good {
                    accepted.insert(i);
                }
            }
            None => {
                if good {
                    ids_before.insert(id);
                }
            }
        }
        if !killed && answered * 2 >= pushes.len() {
            before.kill();
            killed = true;
            created_at_kill = sim.state().instances.len() - DECIDED;
        }
    }
    assert!(killed);

    let after = Replica::spawn("after", &config);
    // 1. Every acknowledged callback is applied, and the outbox has its update.
    let updates = {
        let (status, v) = after.get("/api/t1/updates").await;
        assert_eq!(status, 200, "{v}");
        v["updates"].as_array().unwrap().clone()
    };
    let mut found = 0;
    for i in &accepted {
        let Some((instance, user)) = &pushes[*i].1 else {
            continue;
        };
        let (_, a) = after.get(&format!("/api/t1/fs/approvals/{instance}")).await;
        assert!(satisfied(ok(&a), user), "acked callback #{i} lost: {a}");
        let notified = updates.iter().any(|u| {
            u["approval"]["instance_id"] == instance.as_str() && satisfied(&u["approval"], user)
        });
        assert!(notified, "acked callback #{i} has no outbox update");
        found += 1;
    }
    assert!(
        found > 0,
        "no callback with an effect was acknowledged before the kill: nothing was checked"
    );

    // 2. The platform redelivers everything (it retries what it saw fail): all applied once.
    for (push, _) in &pushes {
        let r = http::post(
            &after.callback_url("t1", "fs"),
            &push.headers,
            push.body.clone(),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(r.status, Some(200), "{}", r.body_text());
    }
    let (_, v) = after.get("/api/t1/updates").await;
    let all = v["updates"].as_array().unwrap();
    let states: BTreeSet<String> = all
        .iter()
        .map(|u| {
            let a = &u["approval"];
            format!(
                "{} {} {}",
                a["instance_id"],
                a["status"],
                a["decisions"].as_array().map_or(0, Vec::len)
            )
        })
        .collect();
    assert_eq!(states.len(), all.len(), "an update recorded twice: {all:?}");
    for id in &ids {
        let (_, a) = after.get(&format!("/api/t1/fs/approvals/{id}")).await;
        assert_eq!(ok(&a)["status"], "approved", "{a}");
        assert_eq!(ok(&a)["decisions"].as_array().unwrap().len(), 2, "{a}");
    }

    // 3. Every start retried: one instance per key on the platform, the same as answered.
    let mut by_key = BTreeMap::new();
    for i in 0..STARTED {
        let key = format!("burst-{i}");
        let id = start(&after, &key)
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        by_key.insert(key, id);
    }
    let after_ids: BTreeSet<String> = by_key.values().cloned().collect();
    assert_eq!(
        after_ids.len(),
        STARTED,
        "two keys got one instance: {by_key:?}"
    );
    assert!(
        ids_before.is_subset(&after_ids),
        "{ids_before:?} vs {by_key:?}"
    );
    let instances = sim.state().instances.len();
    assert_eq!(
        instances,
        DECIDED + STARTED,
        "an approval was created twice"
    );

    eprintln!(
        "crash ({}): {} callbacks in the burst, {} acknowledged before kill -9 ({} with an \
         effect, all {} found after restart); {} starts in the burst, {} created on the \
         platform and {} answered before the kill; {} instances on the platform for {} keys",
        cfg.get("store")
            .map_or("embedded".into(), |s| s.to_string()),
        pushes.len(),
        accepted.len(),
        found,
        found,
        STARTED,
        created_at_kill,
        ids_before.len(),
        instances,
        DECIDED + STARTED,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_burst_loses_no_acknowledged_callback_embedded() {
    let dir = tempfile::tempdir().unwrap();
    crash_in_a_burst(Value::Null, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_burst_loses_no_acknowledged_callback_redis() {
    let redis = RedisServer::start().expect("redis-server");
    let dir = tempfile::tempdir().unwrap();
    crash_in_a_burst(json!({"redis": redis.url()}), dir.path()).await;
}
