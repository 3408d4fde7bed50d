//! Stopping `imbridge-host serve` (the real binary): the first Ctrl-C or SIGTERM finishes the
//! calls in flight, a second one stops at once.

mod replica;

use replica::Replica;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A call waiting on a webhook that never answers holds the first stop until it gives up;
/// the second signal ends the process at once, with status 130. Before, the signal handlers stayed
/// installed and swallowed it: only SIGKILL ended the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    // Takes connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });

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
