//! The host with the real component (`target/imbridge.wasm`). Fails, saying so, until the
//! component has been built.

mod replica;

use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
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
    assert_eq!(out["err"]["kind"], "unauthorized", "{out}");
}

/// One plugin, two tenants with the same app: an approval started in one is unknown to the
/// other, whose plugin reads and writes only its own tenant's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_plugin_two_tenants_separate_state() {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![FeishuApp::new("cli_x", "s")],
        users: ["alice", "bob"].map(FeishuUser::new).to_vec(),
        ..FeishuConfig::default()
    })
    .await
    .unwrap();
    let host = Host::new(config(dir.path())).unwrap();
    for t in ["a", "b"] {
        host.load_tenant(t, &wasm, TenantPolicy::default())
            .await
            .unwrap();
    }
    let app = json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s",
                     "api_base": sim.base_url()});
    let started = host
        .invoke_json(
            "a",
            "start-approval",
            json!({"app": app, "request": {"key": "k", "title": "t",
                   "initiator": {"id": "ou_alice"},
                   "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}}),
        )
        .await
        .unwrap();
    let id = started["ok"]["instance_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_string();
    let get = |tenant: &'static str| {
        host.invoke_json(
            tenant,
            "get-approval",
            json!({"app": app, "instance_id": id, "refresh": false}),
        )
    };
    assert_eq!(get("a").await.unwrap()["ok"], started["ok"]);
    assert_eq!(
        get("b").await.unwrap(),
        json!({"err": {"kind": "invalid-input",
               "message": format!("no approval {id:?} was started through app \"a1\"")}})
    );
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

/// A start against `api_base` on a host with a 2 s call deadline: the plugin's typed error.
async fn start_against(api_base: String) -> serde_json::Value {
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
    host.invoke_json(
        "t",
        "start-approval",
        json!({"app": app, "request": {"key": "k", "title": "t",
                   "initiator": {"id": "u"},
                   "nodes": [{"approvers": [{"id": "u2"}], "mode": "and"}]}}),
    )
    .await
    .expect("the plugin answers before the host's deadline")
}

/// A TCP server on loopback that hands each connection to `serve`, for the rest of the test.
async fn raw_server<F>(serve: fn(tokio::net::TcpStream) -> F) -> std::net::SocketAddr
where
    F: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// A server that accepts connections and never says anything.
async fn silent_server() -> std::net::SocketAddr {
    raw_server(|s| async move {
        let _held = s;
        std::future::pending::<()>().await
    })
    .await
}

/// A TLS handshake has no timeout of its own in wasmtime-wasi-http: a server that accepts and
/// never answers it used to hold the call until the host's deadline stopped it, untyped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_a_transport_error_before_the_deadline() {
    let addr = silent_server().await;
    let out = start_against(format!("https://{addr}")).await;
    // Timed out connecting, so certainly not sent (a start may be retried).
    let message = format!("request to {addr}: timed out (not sent)");
    assert_eq!(
        out,
        json!({"err": {"kind": "transport", "message": message}})
    );
}

/// A transport failure without words of its own is named as wasi:http names its code: here
/// a server that answers with something other than HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_failure_is_named_by_its_wasi_http_code() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = raw_server(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"SMTP ready\r\n\r\n").await;
        // Read to the end before closing: unread bytes would make the close a reset, which
        // the host may report as another error.
        let _ = s.shutdown().await;
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let out = start_against(format!("http://{addr}")).await;
    let message = format!("request to {addr}: HTTP-protocol-error");
    assert_eq!(
        out,
        json!({"err": {"kind": "transport", "message": message}})
    );
}

/// A response that drips one byte at a time never trips the between-bytes timeout, which
/// restarts with every chunk; the body still ends, as a read timeout, before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_response_is_a_transport_error_before_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = raw_server(|mut s| async move {
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
    })
    .await;
    let out = start_against(format!("http://{addr}")).await;
    // The headers came in time; the body is what timed out.
    let read = format!("reading the response from {addr} failed or timed out");
    assert_eq!(out, json!({"err": {"kind": "transport", "message": read}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_platform_is_a_transport_error_before_the_deadline() {
    let addr = silent_server().await;
    let out = start_against(format!("http://{addr}")).await;
    // Connected and sent, then no answer: the start may have taken effect.
    assert_eq!(
        out,
        json!({"err": {"kind": "transport", "message": format!("request to {addr}: timed out")}})
    );
}
