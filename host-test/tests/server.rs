//! `serve` over loopback with the synthetic plugin.

mod common;

use common::{Behaviour, GATE, echoed, plugin, poll_once, silent_listener, until};
use imbridge_host::config::ServeConfig;
use imbridge_host::server::{self, ServerHandle};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn behaviour(name: &str) -> Behaviour {
    match name {
        "handle-callback" => Behaviour::Callback,
        "get-approval" => Behaviour::Trap,
        _ => Behaviour::Echo,
    }
}

/// Tenant acme with one Feishu app, state in `dir`, the plugin in `dir/plugin.wasm`; `extra`
/// replaces or adds top-level fields.
fn config(dir: &Path, extra: Value) -> ServeConfig {
    let mut cfg = json!({
        "listen": "127.0.0.1:0",
        "public_url": "https://ci.example.com",
        "state_dir": "state",
        "component": "plugin.wasm",
        "tenants": [{"id": "acme", "apps": [
            {"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t"}]}],
    });
    if let (Value::Object(c), Value::Object(e)) = (&mut cfg, extra) {
        c.extend(e);
    }
    ServeConfig::parse(&cfg.to_string(), dir).unwrap()
}

async fn start(dir: &Path, extra: Value) -> ServerHandle {
    std::fs::write(dir.join("plugin.wasm"), plugin(behaviour, "1")).unwrap();
    server::serve(config(dir, extra)).await.unwrap()
}

/// A minimal HTTP/1.1 client: one request per connection, whole response read.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) and close before the whole body is sent.
    let _ = stream.write_all(body).await;
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn callback_route_answers_and_records_updates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), json!({})).await;
    let addr = server.addr();

    let (status, body) = request(addr, "POST", "/callback/acme/a1?x=1", "", b"{}").await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (status, body) = request(addr, "GET", "/api/acme/updates", "", b"").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let seq = v["updates"][0]["seq"].as_u64().expect("a seq");
    assert_eq!(v["updates"][0]["approval"]["instance_id"], "i1");
    assert_eq!(v["updates"][0]["approval"]["status"], "approved");
    // A cursor past the newest update (another store's) is refused and acknowledges nothing.
    let past = format!("/api/acme/updates?after={}", seq + 500);
    let (status, body) = request(addr, "GET", &past, "", b"").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains(&format!("newest update here is {seq}")),
        "{body}"
    );
    assert!(body.contains("after=0"), "{body}");
    let (_, body) = request(addr, "GET", "/api/acme/updates", "", b"").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["updates"][0]["seq"],
        seq
    );
    // Acknowledging up to it empties the outbox.
    let acknowledge = format!("/api/acme/updates?after={seq}");
    let (_, body) = request(addr, "GET", &acknowledge, "", b"").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"updates": [], "more": false})
    );
    // A backlog comes in pages, and one call acknowledges everything up to its cursor.
    let backlog = imbridge_host::store::Commit {
        outbox: (0..server::UPDATES_PAGE + 1)
            .map(|i| json!({"n": i}).to_string().into_bytes())
            .collect(),
        ..Default::default()
    };
    let store = server.host().store();
    store.commit("acme", backlog).unwrap();
    let page = |after: u64| async move {
        let path = format!("/api/acme/updates?after={after}");
        let (status, body) = request(addr, "GET", &path, "", b"").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let first = page(seq).await;
    let updates = first["updates"].as_array().unwrap();
    assert_eq!(
        (updates.len(), &first["more"]),
        (server::UPDATES_PAGE, &json!(true))
    );
    // One commit's records are numbered consecutively, above what came before.
    let start = updates[0]["seq"].as_u64().unwrap();
    assert!(start > seq, "{start} <= {seq}");
    assert_eq!(updates[0]["n"], 0);
    let last = start + server::UPDATES_PAGE as u64 - 1;
    assert_eq!(updates[server::UPDATES_PAGE - 1]["seq"], last);
    let second = page(last).await;
    assert_eq!(second["updates"].as_array().unwrap().len(), 1);
    assert_eq!(second["more"], false);
    assert_eq!(store.outbox_list("acme", 0).unwrap().len(), 1);

    for path in [
        "/callback/acme/nope",
        "/callback/nobody/a1",
        "/elsewhere",
        "/callback/acme/a1/",
        "/callback/acme",
    ] {
        let (status, _) = request(addr, "POST", path, "", b"{}").await;
        assert_eq!(status, 404, "{path}");
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PUT /callback/acme/a1 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("allow: get, post"),
        "{text}"
    );
    let big = vec![b'a'; server::MAX_BODY + 1];
    let (status, _) = request(addr, "POST", "/callback/acme/a1", "", &big).await;
    assert_eq!(status, 413);
    server.shutdown().await;
}

#[tokio::test]
async fn engine_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), json!({"api_token": "t0ken"})).await;
    let addr = server.addr();
    let auth = "authorization: Bearer t0ken\r\n";
    let request_body = json!({"key": "k", "title": "t", "initiator": {"id": "u"}}).to_string();

    let (status, _) = request(
        addr,
        "POST",
        "/api/acme/a1/approvals",
        "",
        request_body.as_bytes(),
    )
    .await;
    assert_eq!(status, 401);
    // The scheme's name is case-insensitive; the token is not.
    for (header, want) in [
        ("authorization: bearer t0ken\r\n", 200),
        ("authorization: BEARER t0ken\r\n", 200),
        ("authorization: Bearer T0KEN\r\n", 401),
        ("authorization: Basic t0ken\r\n", 401),
        ("authorization: Bearert0ken\r\n", 401),
    ] {
        let (status, _) = request(
            addr,
            "POST",
            "/api/acme/a1/approvals",
            header,
            request_body.as_bytes(),
        )
        .await;
        assert_eq!(status, want, "{header}");
    }

    // Each route reaches its own export with the app the path names and the body's fields;
    // the plugin echoes both back in its error.
    let call = |path: &'static str, body: String| async move {
        let (status, text) = request(addr, "POST", path, auth, body.as_bytes()).await;
        assert_eq!(status, 200, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["err"]["kind"], "invalid-input", "{path}: {v}");
        echoed(v["err"]["message"].as_str().unwrap())
    };
    let (export, args) = call("/api/acme/a1/approvals", request_body.clone()).await;
    assert_eq!(export, "start-approval");
    assert_eq!(args["app.id"], "a1");
    assert_eq!(args["app.app-id"], "cli_x");
    assert_eq!(args["request.key"], "k");
    assert_eq!(args["request.title"], "t");

    // The id is one path segment, percent-decoded: `i%2F1` is `i/1`.
    let cancel = json!({"reason": "r"}).to_string();
    let (export, args) = call("/api/acme/a1/approvals/i%2F1/cancel", cancel).await;
    assert_eq!(export, "cancel-approval");
    assert_eq!(args["app.id"], "a1");
    assert_eq!(args["instance-id"], "i/1");
    assert_eq!(args["reason"], "r");
    let (_, args) = call("/api/acme/a1/approvals/i1/cancel", "{}".into()).await;
    assert_eq!(
        (args["instance-id"].as_str(), args["reason"].as_str()),
        ("i1", "none")
    );

    let notification = json!({"target": {"chat": "oc"}, "title": "t"});
    let notify = json!({"notification": notification}).to_string();
    let (export, args) = call("/api/acme/notify", notify).await;
    assert_eq!(export, "notify");
    assert_eq!(args["app"], "none");
    assert_eq!(args["notification.title"], "t");
    let notify = json!({"app_id": "a1", "notification": notification}).to_string();
    let (_, args) = call("/api/acme/notify", notify).await;
    assert_eq!(args["app.id"], "a1");

    // A misspelt key in a body read field by field is refused, not dropped (a cancel without
    // its reason, a notify without its app).
    for (path, body, key) in [
        (
            "/api/acme/a1/approvals/i1/cancel",
            json!({"reasn": "r"}),
            "body.reasn",
        ),
        (
            "/api/acme/notify",
            json!({"appId": "a1", "notification": {"target": {"chat": "oc"}, "title": "t"}}),
            "body.appId",
        ),
    ] {
        let (status, text) = request(addr, "POST", path, auth, body.to_string().as_bytes()).await;
        assert_eq!((status, text.contains(key)), (400, true), "{path}: {text}");
    }

    // A trapping plugin is a 500 that carries no secret.
    let (status, body) = request(
        addr,
        "GET",
        "/api/acme/a1/approvals/i1?refresh=true",
        auth,
        b"",
    )
    .await;
    assert_eq!(status, 500);
    assert!(body.contains("trap") && !body.contains("s3cr3t"), "{body}");

    let (status, body) = request(addr, "POST", "/api/acme/a1/approvals", auth, b"{").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = request(addr, "POST", "/api/acme/zz/approvals", auth, b"{}").await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

/// One POST an [`engine_webhook_raw`] received: the status it answered, the request's head
/// (request line and headers) and its body.
struct Posted {
    status: u16,
    head: String,
    body: String,
}

/// A tenant's own `component` runs instead of the server's, and `reload_components` (what
/// SIGHUP does) loads again only the tenants whose component file changed; a file that is
/// not a component leaves its tenant on the version it runs, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_component_is_reloaded_where_its_file_changed() {
    let dir = tempfile::tempdir().unwrap();
    let refuse = |_: &str| Behaviour::Err;
    std::fs::write(dir.path().join("plugin.wasm"), plugin(refuse, "1")).unwrap();
    std::fs::write(dir.path().join("acme.wasm"), plugin(refuse, "1")).unwrap();
    let app = json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t"});
    let cfg = config(
        dir.path(),
        json!({"tenants": [{"id": "acme", "component": "acme.wasm", "apps": [app]},
                           {"id": "beta", "apps": [app]}]}),
    );
    let server = server::serve(cfg).await.unwrap();
    let host = server.host().clone();
    let callback = async |t: &str| {
        request(
            server.addr(),
            "POST",
            &format!("/callback/{t}/a1"),
            "",
            b"{}",
        )
        .await
        .0
    };
    assert_eq!((callback("acme").await, callback("beta").await), (400, 400));
    let beta = host.tenant_digest("beta");

    // acme's file gets a version that answers callbacks; beta's (the server's) stays.
    std::fs::write(dir.path().join("acme.wasm"), plugin(behaviour, "2")).unwrap();
    let cfg = config(
        dir.path(),
        json!({"tenants": [{"id": "acme", "component": "acme.wasm", "apps": [app]},
                           {"id": "beta", "apps": [app]}]}),
    );
    assert_eq!(
        server::reload_components(&host, &cfg).await.unwrap(),
        ["acme"]
    );
    assert_eq!((callback("acme").await, callback("beta").await), (200, 400));
    assert_eq!(host.tenant_digest("beta"), beta);
    // Nothing changed: nothing replaced.
    assert!(
        server::reload_components(&host, &cfg)
            .await
            .unwrap()
            .is_empty()
    );

    std::fs::write(dir.path().join("acme.wasm"), b"not a component").unwrap();
    let err = server::reload_components(&host, &cfg).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("tenant `acme` keeps its version"),
        "{err:#}"
    );
    assert_eq!(callback("acme").await, 200);
    server.shutdown().await;
}

/// Accepts POSTs, answers the first `failures` with a 500 and the rest with a 200, and hands
/// each body over, parsed, with the status it got.
async fn engine_webhook(
    failures: usize,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u16, Value)>,
) {
    let (addr, mut raw) = engine_webhook_raw(failures).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(p) = raw.recv().await {
            let _ = tx.send((
                p.status,
                serde_json::from_str(&p.body).unwrap_or(Value::Null),
            ));
        }
    });
    (addr, rx)
}

/// [`engine_webhook`], handing over each request as it came.
async fn engine_webhook_raw(
    failures: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Posted>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut failures = failures;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let posted = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break Some((head.to_string(), body.to_string()));
                }
            };
            let status = if failures > 0 {
                failures -= 1;
                500
            } else {
                200
            };
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = s.write_all(reply.as_bytes()).await;
            if let Some((head, body)) = posted {
                let _ = tx.send(Posted { status, head, body });
            }
        }
    });
    (addr, rx)
}

/// The server with tenant acme's updates going to `hook`.
async fn start_with_webhook(dir: &Path, hook: SocketAddr) -> ServerHandle {
    start(
        dir,
        json!({"tenants": [{"id": "acme", "engine_webhook": format!("http://{hook}/imbridge"),
            "apps": [{"id": "a1", "platform": "feishu", "app_id": "cli_x",
                      "app_secret": "s3cr3t"}]}]}),
    )
    .await
}

#[tokio::test]
async fn updates_are_posted_to_the_engine_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, mut received) = engine_webhook(0).await;
    let server = start_with_webhook(dir.path(), hook).await;
    let (status, _) = request(server.addr(), "POST", "/callback/acme/a1", "", b"{}").await;
    assert_eq!(status, 200);
    let update = tokio::time::timeout(std::time::Duration::from_secs(10), received.recv())
        .await
        .expect("webhook called")
        .unwrap()
        .1;
    assert_eq!(update["tenant"], "acme");
    assert_eq!(update["app_id"], "a1");
    assert!(update["seq"].as_u64().is_some_and(|s| s > 0), "{update}");
    assert_eq!(update["approval"]["instance_id"], "i1");
    // Delivered records leave the outbox.
    until("the outbox emptied", Duration::from_secs(10), || {
        server
            .host()
            .store()
            .outbox_list("acme", 0)
            .unwrap()
            .is_empty()
    })
    .await;
    server.shutdown().await;
}

/// With `engine_webhook_secret`, every POST carries a timestamp and an HMAC-SHA256 of it and
/// the body, which the engine checks as the README says; without one, neither header.
#[tokio::test]
async fn engine_webhook_posts_are_signed_with_the_tenants_secret() {
    use hmac::{Hmac, Mac as _};
    const SECRET: &str = "whsec-s3cr3t";
    for signed in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (hook, mut received) = engine_webhook_raw(0).await;
        let mut tenant = json!({"id": "acme", "engine_webhook": format!("http://{hook}/imbridge"),
            "apps": [{"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t"}]});
        if signed {
            tenant["engine_webhook_secret"] = json!(SECRET);
        }
        let server = start(dir.path(), json!({"tenants": [tenant]})).await;
        let (status, _) = request(server.addr(), "POST", "/callback/acme/a1", "", b"{}").await;
        assert_eq!(status, 200);
        let posted = tokio::time::timeout(Duration::from_secs(10), received.recv())
            .await
            .expect("webhook called")
            .unwrap();
        let header = |name: &str| {
            posted.head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let (ts, sig) = (
            header("x-imbridge-timestamp"),
            header("x-imbridge-signature"),
        );
        if !signed {
            assert_eq!((ts, sig), (None, None), "{}", posted.head);
            server.shutdown().await;
            continue;
        }
        let ts = ts.expect("timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(ts.parse().unwrap()) < 60, "{ts}");
        // The engine's check, written from the README: HMAC-SHA256 keyed with the secret over
        // "{timestamp}.{raw body}", hex, after "sha256=".
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.{}", posted.body).as_bytes());
        let hex = sig
            .expect("signature")
            .strip_prefix("sha256=")
            .unwrap()
            .to_string();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        mac.verify_slice(&bytes)
            .expect("the signature matches the body");
        let update: Value = serde_json::from_str(&posted.body).unwrap();
        assert_eq!(update["approval"]["instance_id"], "i1");
        server.shutdown().await;
    }
}

/// An engine that fails a delivery loses nothing: the record stays in the outbox (and in
/// `GET /updates`), and the next delivery sends it again before the newer one, in order.
#[tokio::test]
async fn a_failed_delivery_is_kept_and_redelivered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, mut received) = engine_webhook(1).await;
    let server = start_with_webhook(dir.path(), hook).await;
    let mut next = async || {
        tokio::time::timeout(std::time::Duration::from_secs(10), received.recv())
            .await
            .expect("webhook called")
            .unwrap()
    };
    let callback = || request(server.addr(), "POST", "/callback/acme/a1", "", b"{}");
    assert_eq!(callback().await.0, 200);
    let (status, first) = next().await;
    assert_eq!(status, 500);
    let seq = first["seq"].as_u64().unwrap();
    let (status, body) = request(server.addr(), "GET", "/api/acme/updates", "", b"").await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["updates"][0]["seq"], seq, "{listed}");

    assert_eq!(callback().await.0, 200);
    let (s1, again) = next().await;
    let (s2, newer) = next().await;
    assert_eq!((s1, &again["seq"], s2), (200, &json!(seq), 200));
    assert!(newer["seq"].as_u64().unwrap() > seq, "{newer}");
    assert_eq!(again["approval"], first["approval"]);
    server.shutdown().await;
}

/// An engine webhook that keeps failing is not tried again on every callback: after a
/// failure the tenant's delivery pauses (1 s, doubling), while the callbacks go on.
#[tokio::test]
async fn a_failing_webhook_is_not_tried_per_callback() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, mut received) = engine_webhook(usize::MAX).await;
    let server = start_with_webhook(dir.path(), hook).await;
    for _ in 0..30 {
        let (status, _) = request(server.addr(), "POST", "/callback/acme/a1", "", b"{}").await;
        assert_eq!(status, 200);
    }
    let first = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("webhook called");
    assert_eq!(first.unwrap().0, 500);
    let mut attempts = 1;
    while let Ok(Ok((status, _))) = tokio::time::timeout(Duration::from_millis(200), async {
        received.recv().await.ok_or(())
    })
    .await
    {
        assert_eq!(status, 500);
        attempts += 1;
    }
    // One per callback (30) before; one, or two when the pause ended within the burst.
    assert!(attempts <= 3, "{attempts} attempts");
    server.shutdown().await;
}

/// Clients that trickle bytes or sit idle are cut off after `READ_TIMEOUT`: without it each
/// held a connection, its buffers and a file descriptor for ever.
#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), json!({})).await;
    let limit = server::READ_TIMEOUT + std::time::Duration::from_secs(5);
    let connect = || tokio::net::TcpStream::connect(server.addr());

    // Headers that never end, an idle keep-alive connection, and a body that never comes.
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"POST /callback/acme/a1 HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let idle = connect().await.unwrap();
    let mut body = connect().await.unwrap();
    body.write_all(b"POST /callback/acme/a1 HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();

    let read_all = |mut s: tokio::net::TcpStream| async move {
        let mut out = Vec::new();
        tokio::time::timeout(limit, s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    };
    let (partial, idle, body) = tokio::join!(read_all(partial), read_all(idle), read_all(body));
    // hyper answers a header timeout with a bare close (408 at most); the body gets 408.
    assert!(
        partial.is_empty() || partial.starts_with("HTTP/1.1 408"),
        "{partial}"
    );
    assert!(idle.is_empty(), "{idle}");
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");

    // The server still answers.
    let (status, _) = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

/// A client that sends requests and never reads the answers is cut off once the server's
/// writes to it have stalled for `WRITE_TIMEOUT`: without it, the connection (one of
/// `MAX_CONNECTIONS`) was held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), json!({})).await;
    let addr = server.addr();
    // Pipelined requests for a small answer (404), written until the connection fails: once
    // the answers fill the socket buffers the server stops reading, so this write blocks
    // until the server gives up on the connection.
    let (done, cut) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let chunk = b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n".repeat(2048);
        let error = loop {
            if let Err(e) = s.write_all(&chunk) {
                break e;
            }
        };
        let _ = done.send(error.kind());
    });
    let limit = server::WRITE_TIMEOUT + Duration::from_secs(30);
    let cut = tokio::task::spawn_blocking(move || cut.recv_timeout(limit))
        .await
        .unwrap();
    assert!(cut.is_ok(), "the connection is still open after {limit:?}");
    let (status, _) = request(addr, "GET", "/nowhere", "", b"").await;
    assert_eq!(status, 404, "the server still answers");
    server.shutdown().await;
}

/// `/healthz` probes the store, so a server that could not take a callback says so (503) and
/// its supervisor can restart it; it used to answer "ok" whatever the store's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_store_cannot_be_read() {
    let redis = imbridge_host::redis_server::RedisServer::start().expect("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), json!({"store": {"redis": redis.url()}})).await;
    let (status, body) = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(status, 200, "{body}");
    drop(redis);
    // A probe's success answers for a second, so that probes cannot flood the store.
    let (status, _) = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store unavailable"), "{body}");
    server.shutdown().await;
}

/// A store that still reads but refuses every write, as the embedded database does after a
/// failed write or fsync (a full disk) until the process restarts.
struct ReadOnly(imbridge_host::store::MemoryStore);

impl imbridge_host::store::Intercept for ReadOnly {
    fn memory(&self) -> &imbridge_host::store::MemoryStore {
        &self.0
    }
    fn commit(
        &self,
        _: &str,
        _: imbridge_host::store::Commit,
    ) -> anyhow::Result<imbridge_host::store::Outcome> {
        anyhow::bail!("previous I/O error")
    }
    fn increment(
        &self,
        _: &str,
        _: &str,
        _: u64,
        _: imbridge_host::store::Pending,
    ) -> anyhow::Result<u64> {
        anyhow::bail!("previous I/O error")
    }
    fn outbox_remove_through(&self, _: &str, _: u64) -> anyhow::Result<()> {
        anyhow::bail!("previous I/O error")
    }
}

/// `/healthz` commits, as every call does: a store that answers reads but can write nothing
/// takes no callback, and the supervisor must hear so. A read probe said 200.
#[tokio::test]
async fn healthz_fails_while_the_store_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ReadOnly(imbridge_host::store::MemoryStore::new()));
    let host =
        imbridge_host::Host::with_store(imbridge_host::HostConfig::new(dir.path()), store).unwrap();
    let server = server::serve_with(host, config(dir.path(), json!({})))
        .await
        .unwrap();
    let (status, body) = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("previous I/O error"), "{body}");
    server.shutdown().await;
}

/// A store that counts its commits and, while the test holds its gate, holds them there: a
/// slow or dead link. With `fail`, every commit fails once through the gate.
#[derive(Default)]
struct Probed {
    memory: imbridge_host::store::MemoryStore,
    commits: AtomicUsize,
    gate: imbridge_host::store::Gate,
    fail: bool,
}

impl imbridge_host::store::Intercept for Probed {
    fn memory(&self) -> &imbridge_host::store::MemoryStore {
        &self.memory
    }
    fn commit(
        &self,
        ns: &str,
        commit: imbridge_host::store::Commit,
    ) -> anyhow::Result<imbridge_host::store::Outcome> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.gate.pass();
        anyhow::ensure!(!self.fail, "connection refused");
        imbridge_host::store::Backend::commit(&self.memory, ns, commit)
    }
}

async fn serve_probed(dir: &Path, store: Arc<Probed>) -> ServerHandle {
    let host = imbridge_host::Host::with_store(imbridge_host::HostConfig::new(dir), store).unwrap();
    server::serve_with(host, config(dir, json!({})))
        .await
        .unwrap()
}

/// Probes that arrive while one is at the store wait for its answer: each used to start its
/// own commit, so a slow store (a dead Redis takes seconds per commit) had every open
/// connection holding a blocking thread, the pool the callbacks' commits need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_healthz_probes_share_one_store_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Probed::default());
    let server = serve_probed(dir.path(), store.clone()).await;
    // Released also when an assertion fails: the runtime's drop waits for the held commits.
    struct Release(Arc<Probed>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.gate.release();
        }
    }
    store.gate.hold();
    let release = Release(store.clone());
    let probes: Vec<_> = (0..16)
        .map(|_| tokio::spawn(request(server.addr(), "GET", "/healthz", "", b"")))
        .collect();
    let held = store.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let first = held.gate.wait_for(1, Duration::from_secs(30));
        // Time for the other probes to reach the store, if they would.
        (first, held.gate.wait_for(2, Duration::from_millis(500)))
    })
    .await
    .unwrap();
    assert!(first, "no probe reached the store");
    assert!(!second, "a second probe reached the store");
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    drop(release);
    for probe in probes {
        let (status, body) = probe.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    server.shutdown().await;
}

/// A failed probe answers for the probes right after it, as a success does: a dead store
/// must not take a blocking commit per probe.
#[tokio::test]
async fn healthz_caches_a_failed_probe() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Probed {
        fail: true,
        ..Probed::default()
    });
    let server = serve_probed(dir.path(), store.clone()).await;
    let first = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(first.0, 503, "{}", first.1);
    assert!(first.1.contains("store unavailable"), "{}", first.1);
    assert!(first.1.contains("connection refused"), "{}", first.1);
    let second = request(server.addr(), "GET", "/healthz", "", b"").await;
    assert_eq!(second, first);
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

/// A tenant's own token opens only that tenant; the server-wide token opens all.
#[tokio::test]
async fn tenant_tokens_open_only_their_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let app = json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t"});
    let server = start(
        dir.path(),
        json!({"api_token": "operator", "tenants": [
            {"id": "acme", "api_token": "acme-token", "apps": [app]},
            {"id": "beta", "apps": [app]},
        ]}),
    )
    .await;
    let get = |tenant: &'static str, token: &'static str| {
        let addr = server.addr();
        async move {
            let auth = if token.is_empty() {
                String::new()
            } else {
                format!("authorization: Bearer {token}\r\n")
            };
            request(addr, "GET", &format!("/api/{tenant}/updates"), &auth, b"")
                .await
                .0
        }
    };
    assert_eq!(get("acme", "acme-token").await, 200);
    assert_eq!(get("acme", "operator").await, 200);
    assert_eq!(get("acme", "").await, 401);
    assert_eq!(get("acme", "acme-tokenx").await, 401);
    assert_eq!(get("beta", "acme-token").await, 401);
    assert_eq!(get("beta", "operator").await, 200);
    assert_eq!(get("beta", "").await, 401);
    server.shutdown().await;
}

/// The server on a host with one call slot, taken by `get-approval` until [`release_busy`]
/// (or, should a test fail, `deadline`): a callback or cancel sent meanwhile waits for the
/// slot. Both exports count their runs ([`ran`]).
async fn start_busy(dir: &Path, extra: Value, deadline: Duration) -> ServerHandle {
    let behaviour = |name: &str| match name {
        "get-approval" => Behaviour::Counted(&Behaviour::Gated(&Behaviour::Err)),
        "cancel-approval" => Behaviour::Counted(&Behaviour::Err),
        other => behaviour(other),
    };
    let cfg = config(dir, extra);
    let mut host = imbridge_host::HostConfig::new(dir.join("state"));
    host.max_concurrent_calls = 1;
    host.call_timeout = deadline;
    let host = imbridge_host::Host::new(host).unwrap();
    host.load_tenant_bytes(
        "acme",
        plugin(behaviour, "1"),
        imbridge_host::TenantPolicy::default(),
    )
    .await
    .unwrap();
    let server = server::serve_with(host, cfg).await.unwrap();
    let addr = server.addr();
    tokio::spawn(async move { request(addr, "GET", "/api/acme/a1/approvals/x", "", b"").await });
    // Running, so it holds the host's slot.
    assert_eq!(until_ran(&server, "get-approval", 1).await, 1);
    assert_eq!(server.calls_in_flight(), 1);
    server
}

/// Lets the call that `start_busy` started on `host` finish, so it frees the slot.
fn release_busy(host: &imbridge_host::Host) {
    host.kv_set("acme", GATE, b"open").unwrap();
}

/// Hangs up on a request and waits until the server has closed the connection, which it
/// does as it drops the request.
async fn hang_up(mut s: tokio::net::TcpStream) {
    s.shutdown().await.unwrap();
    let closed = async {
        let mut buf = [0; 1024];
        // A reset closes it as well as an end of stream does; an answer would mean the
        // request ran or was refused rather than dropped.
        if let Ok(n) = s.read(&mut buf).await {
            assert_eq!(n, 0, "answered: {}", String::from_utf8_lossy(&buf[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("the server closes a connection whose client hung up");
}

/// Asks to cancel an approval; dropping the connection hangs up before the answer.
async fn cancel(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /api/acme/a1/approvals/x/cancel HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    s
}

/// How many times tenant acme's `export` has run: a `Behaviour::Counted` export's counter.
fn ran(server: &ServerHandle, export: &str) -> u64 {
    server
        .host()
        .kv_get("acme", export)
        .unwrap()
        .map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
}

/// Waits up to 20 s for `export` to have run `n` times.
async fn until_ran(server: &ServerHandle, export: &str, n: u64) -> u64 {
    until(&format!("{export} to run {n} times"), WAIT, || {
        ran(server, export) == n
    })
    .await;
    ran(server, export)
}

/// How long a test waits for the server to get somewhere.
const WAIT: Duration = Duration::from_secs(20);

/// Waits up to 20 s for the server's calls in flight to reach `n`.
async fn until_in_flight(server: &ServerHandle, n: usize) -> usize {
    until(&format!("{n} calls in flight"), WAIT, || {
        server.calls_in_flight() == n
    })
    .await;
    server.calls_in_flight()
}

/// An engine API call whose client hangs up (an engine's request timeout, a proxy's) is not
/// cut off: hyper drops the request's future, and a call dropped midway committed only its
/// counters, so a start could leave an approval it created without a record
/// (tests/faults.rs shows that on a real DingTalk start). Here it stays in flight, waiting for
/// the slot, and runs when the slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_call_outlives_a_client_that_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    // The slow call holds the slot until the client has hung up; the deadline is only a bound
    // should the test fail.
    let server = start_busy(dir.path(), json!({}), Duration::from_secs(60)).await;
    let client = cancel(server.addr()).await;
    assert_eq!(until_in_flight(&server, 2).await, 2, "the cancel waits");
    hang_up(client).await;
    assert_eq!(server.calls_in_flight(), 2, "the cancel still waits");
    assert_eq!(
        ran(&server, "cancel-approval"),
        0,
        "the slot is still taken"
    );
    release_busy(server.host());
    assert_eq!(until_in_flight(&server, 0).await, 0);
    assert_eq!(ran(&server, "cancel-approval"), 1, "the abandoned call ran");
    server.shutdown().await;
}

/// A call that finds no free slot within the call timeout never ran: it answers 503 with
/// `Retry-After`, saying it was busy. Before, it was a 500 whose body named only the tenant
/// and the export, like a call that failed after the plugin ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_no_slot_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    // The only slot is held until the call's 4 s deadline; of the two calls queued behind it,
    // one then takes the slot (and holds it to its own deadline), the other gives up.
    let server = start_busy(dir.path(), json!({}), Duration::from_secs(4)).await;
    let addr = server.addr();
    let get = || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /api/acme/a1/approvals/x HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut s).await
    };
    // Queued two seconds into it, they wait past its end (by 2 s); the one that takes the
    // slot holds it beyond the other's wait (by 2 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = tokio::join!(get(), get());
    let mut answers = [a, b];
    answers.sort_by_key(|r| r.contains(" 503 "));
    let [deadline, busy] = answers;
    assert!(deadline.starts_with("HTTP/1.1 500 "), "{deadline}");
    assert!(deadline.contains("deadline exceeded"), "{deadline}");
    assert!(busy.starts_with("HTTP/1.1 503 "), "{busy}");
    assert!(
        busy.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{busy}"
    );
    assert!(busy.contains("busy: no free call slot"), "{busy}");
    assert!(busy.contains("within 4.0s"), "{busy}");
    assert_eq!(ran(&server, "get-approval"), 2, "the busy call never ran");
    server.shutdown().await;
}

/// One whole response (head and a `content-length` body) from a keep-alive connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Once stopping, the server starts no plugin call, also for requests on connections opened
/// before: they are answered 503. Before, such a request waited for the calls in flight and
/// then started while the process was exiting, where it could be cut off after a create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_open_connections_get_503_while_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_busy(dir.path(), json!({}), Duration::from_secs(3)).await;
    let mut open = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    open.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let ok = read_response(&mut open).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // Polled once, shutdown has set the flag that refuses calls (its first step).
    let mut stopping = Box::pin(server.shutdown());
    poll_once(&mut stopping, "stopped while a call was still running").await;
    for (path, body) in [
        ("/callback/acme/a1", "{}"),
        ("/api/acme/a1/approvals/x/cancel", "{}"),
    ] {
        let req = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{body}");
        open.write_all(req.as_bytes()).await.unwrap();
        let text = tokio::time::timeout(Duration::from_secs(2), read_response(&mut open))
            .await
            .expect("answered at once, not after the calls in flight");
        assert!(text.starts_with("HTTP/1.1 503"), "{path}: {text}");
        assert!(text.contains("stopping"), "{path}: {text}");
    }
    // The supervisor hears it too (its last probe's 200 would otherwise answer for a second).
    open.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let health = read_response(&mut open).await;
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("stopping"), "{health}");
    stopping.await;
}

/// Stopping the server finishes the calls still running (here one still waiting for its
/// slot) before it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_calls_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_busy(dir.path(), json!({}), Duration::from_secs(60)).await;
    let addr = server.addr();
    let client =
        tokio::spawn(async move { request(addr, "POST", "/callback/acme/a1", "", b"{}").await });
    assert_eq!(until_in_flight(&server, 2).await, 2, "the callback waits");
    let store = server.host().store().clone();
    assert!(store.outbox_list("acme", 0).unwrap().is_empty());
    let host = server.host().clone();
    let mut stopping = Box::pin(server.shutdown());
    poll_once(&mut stopping, "stopped while a call was still running").await;
    release_busy(&host);
    stopping.await;
    assert_eq!(store.outbox_list("acme", 0).unwrap().len(), 1);
    assert_eq!(client.await.unwrap().0, 200);
}

/// A process may exit as soon as `shutdown` returns (`serve` drops its runtime then): by
/// that time the answers of the calls that finished during it are written. (A call's permit
/// comes back just before hyper writes its answer; that race was not seen to lose an answer
/// here without the wait for the connections, so this guards the contract rather than
/// reproducing the race.)
#[test]
fn answers_are_written_before_shutdown_returns() {
    use std::io::{Read as _, Write as _};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = rt.block_on(start_busy(dir.path(), json!({}), Duration::from_secs(60)));
    let addr = server.addr();
    let client = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /callback/acme/a1 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    rt.block_on(async {
        assert_eq!(until_in_flight(&server, 2).await, 2, "the callback waits");
        let host = server.host().clone();
        let mut stopping = Box::pin(server.shutdown());
        poll_once(&mut stopping, "stopped while a call was still running").await;
        release_busy(&host);
        stopping.await;
    });
    drop(rt);
    let answer = client.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// However many callbacks arrive while the engine's webhook hangs, the tenant has one
/// delivery task: each callback used to spawn one more, all waiting on the hung delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_webhook_does_not_pile_up_delivery_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, accepted) = silent_listener().await;
    let server = start_with_webhook(dir.path(), hook).await;
    let callback = || request(server.addr(), "POST", "/callback/acme/a1", "", b"{}");
    assert_eq!(callback().await.0, 200);
    while accepted.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    for _ in 0..100 {
        assert_eq!(callback().await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = tasks();
    assert!(after <= before + 5, "{before} tasks before, {after} after");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        server.host().store().outbox_list("acme", 0).unwrap().len(),
        101
    );
    server.shutdown().await;
}

/// A webhook that never completes the TLS handshake fails its delivery after
/// `WEBHOOK_TIMEOUT` (the client's own timeouts do not cover the handshake), and the next
/// delivery tries again instead of waiting behind it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_stuck_in_its_tls_handshake_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, accepted) = silent_listener().await;
    let server = start(
        dir.path(),
        json!({"tenants": [{"id": "acme", "engine_webhook": format!("https://{hook}/imbridge"),
            "apps": [{"id": "a1", "platform": "feishu", "app_id": "cli_x",
                      "app_secret": "s3cr3t"}]}]}),
    )
    .await;
    let callback = || request(server.addr(), "POST", "/callback/acme/a1", "", b"{}");
    assert_eq!(callback().await.0, 200);
    let deadline = std::time::Instant::now() + server::WEBHOOK_TIMEOUT + Duration::from_secs(15);
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second delivery attempt"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(callback().await.0, 200);
    }
    server.shutdown().await;
}

/// Calls whose clients hung up still run, but at most `MAX_CALLS` of them at once: beyond
/// that a request waits while its client does, and one whose client leaves first never runs.
/// Without the bound, each request sent and abandoned would leave a call (and its body)
/// queued, however many arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // The slow call holds the slot until all the requests are in (one at a time: 2.3 s on an
    // idle 2-core machine); the deadline is only a bound should the test fail.
    let server = start_busy(dir.path(), json!({}), Duration::from_secs(120)).await;
    // The slow call holds one permit; each cancel's client hangs up once the server has
    // admitted it, until all the others are taken.
    for admitted in 2..=server::MAX_CALLS {
        let client = cancel(server.addr()).await;
        assert_eq!(until_in_flight(&server, admitted).await, admitted);
        drop(client);
    }
    // Beyond the bound: requests whose clients leave at once, and one whose client waits.
    for _ in 0..6 {
        hang_up(cancel(server.addr()).await).await;
    }
    // Their connections are closed; their requests' futures go with them.
    until("the requests whose clients left are dropped", WAIT, || {
        server.calls_waiting() == 0
    })
    .await;
    let addr = server.addr();
    let waiting = tokio::spawn(async move {
        request(addr, "POST", "/api/acme/a1/approvals/x/cancel", "", b"{}").await
    });
    until("the last request waits", WAIT, || {
        server.calls_waiting() == 1
    })
    .await;
    assert_eq!(
        ran(&server, "cancel-approval"),
        0,
        "the slot is still taken"
    );
    assert_eq!(server.calls_in_flight(), server::MAX_CALLS);
    release_busy(server.host());
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"err": {"kind": "invalid-input", "message": "x"}})
    );
    assert_eq!(until_in_flight(&server, 0).await, 0);
    // The abandoned calls admitted ran, and the waiting one; the six whose clients left
    // before a permit was free never did.
    assert_eq!(ran(&server, "cancel-approval"), server::MAX_CALLS as u64);
    server.shutdown().await;
}
