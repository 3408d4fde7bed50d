//! The host with the real component (`target/imbridge.wasm`). Fails, saying so, until the
//! component has been built.

mod replica;

use imbridge_host::{Host, HostConfig, TenantPolicy};
use replica::component;
use serde_json::json;
use std::path::PathBuf;

/// Compiled once for all tests (and test runs) instead of once per host.
fn config(dir: &std::path::Path) -> HostConfig {
    let mut cfg = HostConfig::new(dir);
    cfg.cache_dir = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("imbridge-cwasm"));
    cfg
}

#[tokio::test]
async fn feishu_url_verification() {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(config(dir.path())).unwrap();
    host.load_tenant("acme", &wasm, TenantPolicy::default())
        .await
        .unwrap();
    let app = json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s",
                     "token": "tok"});
    let body = r#"{"challenge":"c1","token":"tok","type":"url_verification"}"#;
    let out = host
        .invoke_json(
            "acme",
            "handle-callback",
            json!({"app": app, "request": {"method": "POST", "path": "/callback/acme/a1",
                   "query": "", "headers": [["content-type", "application/json"]],
                   "body": body}}),
        )
        .await
        .unwrap();
    let response = &out["ok"]["response"];
    assert_eq!(response["status"], 200, "{out}");
    let reply: serde_json::Value =
        serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    assert_eq!(reply, json!({"challenge": "c1"}));
    assert_eq!(out["ok"]["updates"], json!([]));

    // A wrong token is the plugin's typed error, not a host failure.
    let bad = r#"{"challenge":"c1","token":"nope","type":"url_verification"}"#;
    let out = host
        .invoke_json(
            "acme",
            "handle-callback",
            json!({"app": app, "request": {"body": bad}}),
        )
        .await
        .unwrap();
    assert!(out.get("err").is_some(), "{out}");
}

#[tokio::test]
async fn same_plugin_two_tenants_separate_state() {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(config(dir.path())).unwrap();
    for t in ["a", "b"] {
        host.load_tenant(t, &wasm, TenantPolicy::default())
            .await
            .unwrap();
    }
    host.kv_set("a", "probe", b"1").unwrap();
    assert_eq!(
        host.kv_get("a", "probe").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(host.kv_get("b", "probe").unwrap(), None);
    assert!(host.kv_keys("b").unwrap().is_empty());
}

fn notify_webhook(url: &str) -> serde_json::Value {
    json!({"app": null, "notification": {
        "target": {"webhook": {"platform": "feishu", "url": url}},
        "title": "t", "markdown": "m", "level": "info"}})
}

#[tokio::test]
async fn hosts_off_the_allow_list_are_refused() {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();
    let host = Host::new(config(dir.path())).unwrap();
    host.load_tenant("t", &wasm, TenantPolicy::default())
        .await
        .unwrap();
    let out = host
        .invoke_json(
            "t",
            "notify",
            notify_webhook("http://127.0.0.1:9/hook/SECRETKEY"),
        )
        .await
        .unwrap();
    assert_eq!(out["err"]["kind"], "transport", "{out}");
    assert!(
        out["err"]["message"].as_str().unwrap().contains("denied"),
        "{out}"
    );
}

/// A start against `api_base` on a host with a 2 s call deadline: the plugin's typed error,
/// and how long it took.
async fn start_against(api_base: String) -> (serde_json::Value, std::time::Duration) {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.call_timeout = std::time::Duration::from_secs(2);
    let host = Host::new(cfg).unwrap();
    host.load_tenant("t", &wasm, TenantPolicy::default())
        .await
        .unwrap();
    let app = json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s",
                     "api_base": api_base});
    let started = std::time::Instant::now();
    let out = host
        .invoke_json(
            "t",
            "start-approval",
            json!({"app": app, "request": {"key": "k", "title": "t",
                   "initiator": {"id": "u"},
                   "nodes": [{"approvers": [{"id": "u2"}], "mode": "and"}]}}),
        )
        .await
        .expect("the plugin answers before the host's deadline");
    (out, started.elapsed())
}

/// A server that accepts connections and never says anything.
async fn silent_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A TLS handshake has no timeout of its own in wasmtime-wasi-http: a server that accepts and
/// never answers it used to hold the call until the host's deadline stopped it, untyped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_a_transport_error_before_the_deadline() {
    let addr = silent_server().await;
    let (out, took) = start_against(format!("https://{addr}")).await;
    assert_eq!(out["err"]["kind"], "transport", "{out}");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
}

/// A response that drips one byte at a time never trips the between-bytes timeout, which
/// restarts with every chunk; the body still ends, as a read timeout, before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_response_is_a_transport_error_before_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _drip = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                            content-length: 100000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if s.write_all(b" ").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (out, took) = start_against(format!("http://{addr}")).await;
    assert_eq!(out["err"]["kind"], "transport", "{out}");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_platform_is_a_transport_error_before_the_deadline() {
    let addr = silent_server().await;
    let (out, took) = start_against(format!("http://{addr}")).await;
    assert_eq!(out["err"]["kind"], "transport", "{out}");
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
}
