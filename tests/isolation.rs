//! Tenant isolation and the outbound fence, with the built component: two tenants of one host,
//! each with its own allow-list and its own simulator. A tenant's plugin cannot reach a host
//! only the other tenant allows, never reaches link-local addresses (the cloud metadata
//! service) even when its operator allow-listed one, and neither tenant sees or changes the
//! other's keys — while the other keeps being served.

use imbridge_host::TenantPolicy;
use imbridge_host::sim::feishu::{BotHook, FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_tests::{Harness, component_path, err_kind, err_message, ok};
use serde_json::{Value, json};

async fn sim(app_id: &str) -> FeishuSim {
    FeishuSim::start(FeishuConfig {
        apps: vec![FeishuApp::new(app_id, "s3cr3t")],
        users: ["alice", "bob"].into_iter().map(FeishuUser::new).collect(),
        hooks: vec![BotHook {
            token: "hook1".into(),
            ..BotHook::default()
        }],
        ..FeishuConfig::default()
    })
    .await
    .expect("sim")
}

fn authority(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

fn webhook(url: &str) -> Value {
    json!({"app": null, "notification": {"target": {"webhook": {"platform": "feishu", "url": url}},
        "title": "t", "markdown": "m", "level": "info"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_cannot_reach_each_others_hosts_or_keys() {
    let sim_a = sim("cli_a").await;
    let sim_b = sim("cli_b").await;
    let h = Harness::new(&[], &[]).await.expect("harness");
    let wasm = component_path();
    // A's operator even allow-listed the metadata address; it stays refused.
    h.host
        .load_tenant(
            "a",
            &wasm,
            TenantPolicy {
                allow_hosts: vec![authority(&sim_a.base_url()), "169.254.169.254:80".into()],
            },
        )
        .await
        .unwrap();
    h.host
        .load_tenant(
            "b",
            &wasm,
            TenantPolicy {
                allow_hosts: vec![authority(&sim_b.base_url())],
            },
        )
        .await
        .unwrap();
    let hook_b = format!("{}/open-apis/bot/v2/hook/hook1", sim_b.base_url());

    // B reaches its own host; A, asking for the same URL, is refused before anything is sent.
    ok(&h.invoke("b", "notify", webhook(&hook_b)).await);
    let r = h.invoke("a", "notify", webhook(&hook_b)).await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    assert!(err_message(&r).contains("not on the allow-list"), "{r}");
    assert_eq!(
        sim_b.state().bot_messages.len(),
        1,
        "only B's message arrived"
    );

    // The metadata service, allow-listed or not, by address in any spelling.
    for url in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://169.254.169.254:80/computeMetadata/v1/",
    ] {
        let r = h.invoke("a", "notify", webhook(url)).await;
        assert_eq!(err_kind(&r), "transport", "{url}: {r}");
        let msg = err_message(&r);
        assert!(msg.contains("link-local"), "{url}: {msg}");
        // B is served in between.
        ok(&h.invoke("b", "notify", webhook(&hook_b)).await);
    }
    assert_eq!(sim_b.state().bot_messages.len(), 4);

    // Keys: each tenant's approvals live in its own namespace.
    let app = |sim: &FeishuSim, id: &str| {
        json!({"id": "fs", "platform": "feishu", "app_id": id, "app_secret": "s3cr3t",
               "api_base": sim.base_url()})
    };
    let start = |app: Value| {
        json!({"app": app, "request": {"key": "wf-1", "title": "Deploy?",
            "initiator": {"id": "ou_alice"}, "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}})
    };
    let b_before = h.kv_dump("b");
    let a_started = h
        .invoke("a", "start-approval", start(app(&sim_a, "cli_a")))
        .await;
    let a_id = ok(&a_started)["instance_id"].as_str().unwrap().to_string();
    let a_keys = h.kv_dump("a");
    assert!(
        a_keys
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(a_id.as_str())),
        "A keeps its approval"
    );
    assert_eq!(
        h.kv_dump("b"),
        b_before,
        "A's start wrote nothing to B's store"
    );
    // B, with the same app id and key, sees nothing of A's approval and cannot touch it.
    let r = h
        .invoke(
            "b",
            "get-approval",
            json!({"app": app(&sim_b, "cli_a"), "instance_id": a_id, "refresh": true}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-input", "{r}");
    let r = h
        .invoke(
            "b",
            "cancel-approval",
            json!({"app": app(&sim_b, "cli_a"), "instance_id": a_id}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-input", "{r}");
    assert_eq!(sim_a.state().instances[&a_id].status, "PENDING");
    // B's plugin calling A's simulator is refused too (only A allows it; B's call names its own
    // api-base).
    let r = h
        .invoke(
            "b",
            "notify",
            webhook(&format!("{}/open-apis/bot/v2/hook/hook1", sim_a.base_url())),
        )
        .await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    assert_eq!(
        h.kv_dump("a"),
        a_keys,
        "A's keys are unchanged by B's calls"
    );
    assert_eq!(sim_a.state().bot_messages.len(), 0);
}

/// A deliberately hostile plugin (`tests/hostile`, built by `./dev build`) in one tenant, the
/// real component in another: every abuse is stopped by the host with a clear error, and the
/// other tenant is served in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_plugin_is_stopped_and_other_tenants_keep_being_served() {
    use imbridge_host::sim::http::{Faults, Handler, Response, Server};
    use std::sync::{Arc, Mutex};

    let hostile = component_path().with_file_name("hostile.wasm");
    assert!(
        hostile.exists(),
        "{} is missing: run `./dev build` first",
        hostile.display()
    );
    // Where the hostile plugin is allowed to send: a sink that answers 200 to anything, after
    // 100 ms on `/slow`, counting how many of those it has in hand at once.
    let in_hand = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most_in_hand = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (now, most) = (in_hand.clone(), most_in_hand.clone());
    let handler: Handler = Arc::new(move |req| {
        let (now, most) = (now.clone(), most.clone());
        Box::pin(async move {
            use std::sync::atomic::Ordering::SeqCst;
            if req.path == "/slow" {
                most.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                now.fetch_sub(1, SeqCst);
            }
            Response::json(200, &json!({}))
        })
    });
    let sink = Server::start(handler, Arc::new(Mutex::new(Faults::default())))
        .await
        .unwrap();
    let sim_good = sim("cli_good").await;
    let h = Harness::new(&[], &[]).await.expect("harness");
    h.host
        .load_tenant(
            "evil",
            &hostile,
            TenantPolicy {
                allow_hosts: vec![
                    authority(&sink.base_url()),
                    "169.254.169.254".into(),
                    "2852039166".into(),
                ],
            },
        )
        .await
        .unwrap();
    h.host
        .load_tenant(
            "good",
            &component_path(),
            TenantPolicy {
                allow_hosts: vec![authority(&sim_good.base_url())],
            },
        )
        .await
        .unwrap();
    let hook_good = format!("{}/open-apis/bot/v2/hook/hook1", sim_good.base_url());
    let good_app = json!({"id": "fs", "platform": "feishu", "app_id": "cli_good",
                          "app_secret": "s3cr3t", "api_base": sim_good.base_url()});
    let started = h
        .invoke(
            "good",
            "start-approval",
            json!({"app": good_app, "request": {"key": "wf-1", "title": "Deploy?",
                "initiator": {"id": "ou_alice"},
                "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}}),
        )
        .await;
    ok(&started);
    let good_keys = h.kv_dump("good");
    let evil_app = json!({"id": "x", "platform": "feishu", "app_id": "x", "app_secret": "x",
                          "api_base": sink.base_url()});
    let serve_good = async || ok(&h.invoke("good", "notify", webhook(&hook_good)).await).clone();
    let message = |r: &Value| r["err"]["message"].as_str().unwrap_or_default().to_string();

    // A 100 MB body, streamed: cut off at the host's cap.
    let r = h
        .invoke(
            "evil",
            "notify",
            webhook(&format!("{}/upload", sink.base_url())),
        )
        .await;
    assert!(message(&r).contains("HttpRequestBodySize"), "{r}");
    serve_good().await;

    // 1 MiB of headers: wasmtime-wasi-http stops the instance (a trap, not a typed error)
    // once the fields pass its 128 KiB limit; the host reports why and lives on.
    let e = h
        .host
        .invoke_json(
            "evil",
            "start-approval",
            json!({"app": evil_app, "request": {"key": "k", "title": "t",
                "initiator": {"id": "u"}}}),
        )
        .await
        .expect_err("the instance is stopped");
    assert!(
        format!("{e:#}").contains("total size of fields exceeds limit"),
        "{e:#}"
    );
    serve_good().await;

    // The metadata service, although the operator allow-listed it.
    let r = h
        .invoke(
            "evil",
            "get-approval",
            json!({"app": evil_app, "instance_id": "http://169.254.169.254/latest/meta-data/"}),
        )
        .await;
    assert!(message(&r).contains("DestinationIpProhibited"), "{r}");
    // The same address as one number, which the system resolver reads as 169.254.169.254.
    let r = h
        .invoke(
            "evil",
            "get-approval",
            json!({"app": evil_app, "instance_id": "http://2852039166/latest/meta-data/"}),
        )
        .await;
    assert!(message(&r).contains("DestinationIpProhibited"), "{r}");
    serve_good().await;

    // 64 requests opened at once: they are all answered, but never more than the per-call
    // bound of connections is open at a time; the rest wait their turn.
    let r = h
        .invoke(
            "evil",
            "handle-event",
            json!({"app": evil_app, "event": format!("64 {}/slow", sink.base_url())}),
        )
        .await;
    assert_eq!(message(&r), "answered=64 other=None", "{r}");
    let most = most_in_hand.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=imbridge_host::wasi_http::MAX_CONNECTIONS_PER_CALL).contains(&most),
        "{most} requests in hand at once"
    );
    serve_good().await;

    // The other tenant's keys: a key the good tenant holds reads as absent, a write lands in
    // the hostile tenant's own namespace, and no other bucket opens.
    let (key, _) = good_keys.first().expect("good has keys").clone();
    let r = h
        .invoke(
            "evil",
            "cancel-approval",
            json!({"app": evil_app, "instance_id": key, "reason": "good"}),
        )
        .await;
    assert_eq!(
        message(&r),
        "read=Ok(None) wrote=true other_bucket_opened=Some(false)",
        "{r}"
    );
    assert_eq!(
        h.kv_dump("good"),
        good_keys,
        "the good tenant's keys are untouched"
    );
    assert_eq!(
        h.host.kv_get("evil", &key).expect("kv"),
        Some(b"hostile was here".to_vec())
    );
    // A callback that writes and then fails leaves nothing behind (the platform redelivers
    // it), unlike the cancel above, which had acted on the platform.
    let r = h
        .invoke(
            "evil",
            "handle-callback",
            json!({"app": evil_app, "request": {"path": "half", "body": ""}}),
        )
        .await;
    assert_eq!(message(&r), "x", "{r}");
    assert_eq!(h.host.kv_get("evil", "half").expect("kv"), None);
    serve_good().await;
    assert_eq!(
        sim_good.state().bot_messages.len(),
        5,
        "good was served throughout"
    );
}
