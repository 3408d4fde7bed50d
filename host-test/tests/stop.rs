//! Signals to `imbridge-host serve` (the real binary): the first Ctrl-C or SIGTERM finishes
//! the calls in flight, a second one stops at once; SIGHUP loads changed components anew.

mod common;
mod replica;

use replica::Replica;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A call waiting on a webhook that never answers holds the first stop until it gives up;
/// the second signal ends the process at once, with status 130. Before, the signal handlers stayed
/// installed and swallowed it: only SIGKILL ended the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let (silent_addr, accepted) = common::silent_listener().await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.json");
    let cfg = json!({
        "listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": dir.path().join("state"), "cache_dir": replica::cache_dir(),
        "call_timeout_secs": 120,
        "tenants": [{"id": "t1", "allow_hosts": [silent_addr.to_string()]}],
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    let mut r = Replica::spawn("stop", &config);

    let notify = json!({"app_id": null, "notification": {
        "target": {"webhook": {"platform": "feishu", "url": format!("http://{silent_addr}/hook")}},
        "title": "wf-42 failed"}});
    let base = r.base.clone();
    tokio::spawn(async move {
        let _ = imbridge_host::sim::http::post(
            &format!("{base}/api/t1/notify"),
            &[("content-type".into(), "application/json".into())],
            notify.to_string().into_bytes(),
            Duration::from_secs(300),
        )
        .await;
    });
    replica::until("the webhook request sent", 60, || {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;

    r.signal("TERM");
    replica::until("stopping", 20, || r.log_count("stopping: finishing") == 1).await;
    // Draining: the call still waits on the webhook (the plugin gives up on it after 10 s).
    assert_eq!(r.exited(Duration::from_secs(1)).await, None);
    r.signal("TERM");
    let status = r
        .exited(Duration::from_secs(20))
        .await
        .expect("a second SIGTERM stops the process");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(r.log_count("second signal: stopping now"), 1);
}

/// `component` with a custom section appended: a new version (another digest) of the same code.
fn another_version(component: &[u8], tag: &str) -> Vec<u8> {
    let mut payload = vec![u8::try_from(tag.len()).unwrap()];
    payload.extend_from_slice(tag.as_bytes());
    assert!(payload.len() < 128, "one-byte LEB128 size");
    let mut wasm = component.to_vec();
    wasm.push(0);
    wasm.push(u8::try_from(payload.len()).unwrap());
    wasm.extend_from_slice(&payload);
    wasm
}

/// SIGHUP swaps a tenant's plugin without a restart: a changed component file is loaded, a
/// broken one leaves the tenant on its version, and the server answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_changed_component() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(replica::component()).unwrap();
    let own = dir.path().join("t1.wasm");
    std::fs::write(&own, &real).unwrap();
    let config = dir.path().join("serve.json");
    let cfg = json!({
        "listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": dir.path().join("state"), "cache_dir": replica::cache_dir(),
        "tenants": [{"id": "t1", "component": own}, {"id": "t2"}],
    });
    std::fs::write(&config, cfg.to_string()).unwrap();
    let r = Replica::spawn("hup", &config);

    std::fs::write(&own, another_version(&real, "imbridge-test-v2")).unwrap();
    r.signal("HUP");
    replica::until("t1 replaced", 120, || {
        r.log_count("reload: replaced t1") == 1
    })
    .await;
    assert_eq!(
        r.log_count("plugin replaced"),
        1,
        "t2's component did not change"
    );

    std::fs::write(&own, b"not a component").unwrap();
    r.signal("HUP");
    replica::until("the broken version refused", 60, || {
        r.log_count("reload: tenant `t1` keeps its version") == 1
    })
    .await;
    let (status, _) = r.get("/healthz").await;
    assert_eq!(status, 200);
}
