//! The same `target/imbridge.wasm`, unmodified, under hosts this project did not write: the
//! wasmtime CLI (`wasmtime run -S http -S keyvalue --invoke …`, its own wasi-http and in-memory
//! wasi-keyvalue) and jco in Node (`jco transpile`, preview2-shim, `tests/interop/kv_shim.mjs`).
//! Answers are compared with the reference host's for the same call, and what went over HTTP is
//! checked by the Feishu simulator.
//!
//! Needs `wasmtime` 48 on PATH (or `$WASMTIME`) and `npm ci --prefix tests/interop`; `./dev test`
//! installs both. Fails, never skips, when they are missing.

use imbridge_host::sim::feishu::{FeishuConfig, FeishuSim, crypto};
use imbridge_host::sim::ws_hub::EventSink;
use imbridge_tests::wave::Exports;
use imbridge_tests::{
    Harness, component_path, encrypted_feishu_app, feishu_sim, http_request, ok, signed_hook,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const ENCRYPT_KEY: &str = "other-hosts-encrypt-key";
const TOKEN: &str = "vt-other";
const HOOK_SECRET: &str = "bot-secret";

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn app(api_base: Option<&str>) -> Value {
    json!({"id": "fs", "platform": "feishu", "app_id": "cli_other", "app_secret": "s3cret",
           "encrypt_key": ENCRYPT_KEY, "token": TOKEN, "api_base": api_base})
}

/// An encrypted `url_verification`, as Feishu sends it when the Request URL is saved (never
/// signed).
fn url_verification(token: &str, challenge: &str) -> Value {
    let plain = json!({"challenge": challenge, "token": token, "type": "url_verification"});
    let body = json!({"encrypt": crypto::encrypt(ENCRYPT_KEY, plain.to_string().as_bytes())});
    let headers = [("Content-Type".to_string(), "application/json".to_string())];
    http_request("POST", "", &headers, body.to_string().as_bytes())
}

/// What the reference host answers, in a fresh state directory.
async fn reference(export: &str, args: Value, allow: &[String]) -> Value {
    let h = Harness::new(&["t"], allow).await.expect("reference host");
    h.invoke("t", export, args).await
}

async fn output(cmd: &mut tokio::process::Command, what: &str, install: &str) -> String {
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what} not runnable ({e}); install: {install}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

// ---------------------------------------------------------------------------------------------
// wasmtime CLI
// ---------------------------------------------------------------------------------------------

fn exports() -> &'static Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS.get_or_init(|| Exports::load(&workspace().join("wit")).expect("wit/world.wit"))
}

/// `wasmtime run -S http -S keyvalue --invoke 'export(…)' target/imbridge.wasm`, in the JSON form.
async fn wasmtime_invoke(export: &str, args: &Value) -> Value {
    let call = exports().call(export, args).expect("WAVE call");
    let bin = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let printed = output(
        tokio::process::Command::new(&bin)
            .args(["run", "-S", "http", "-S", "keyvalue", "--invoke", &call])
            .arg(component_path()),
        "wasmtime",
        "./dev test installs wasmtime-cli 48 (see README, Running on other hosts)",
    )
    .await;
    exports()
        .result(export, &printed)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmtime_cli_decrypts_url_verification_like_the_reference_host() {
    let args = json!({"app": app(None), "request": url_verification(TOKEN, "c-wasmtime-1")});
    let got = wasmtime_invoke("handle-callback", &args).await;
    let out = ok(&got);
    assert_eq!(out["response"]["status"], 200);
    let body: Value = serde_json::from_str(out["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"challenge": "c-wasmtime-1"}));
    assert_eq!(got, reference("handle-callback", args, &[]).await);

    // A wrong Verification Token is the same typed error under both hosts.
    let args = json!({"app": app(None), "request": url_verification("forged", "c-2")});
    let got = wasmtime_invoke("handle-callback", &args).await;
    assert_eq!(got["err"]["kind"], "unauthorized", "{got}");
    assert_eq!(got, reference("handle-callback", args, &[]).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmtime_cli_posts_a_signed_card_the_simulator_accepts() {
    let sim = FeishuSim::start(FeishuConfig {
        hooks: vec![signed_hook("hook1", HOOK_SECRET)],
        ..FeishuConfig::default()
    })
    .await
    .expect("simulator");
    let note = |secret: &str| {
        json!({"app": null, "notification": {
            "target": {"webhook": {"platform": "feishu", "secret": secret,
                "url": format!("{}/open-apis/bot/v2/hook/hook1", sim.base_url())}},
            "title": "workflow #42 failed", "markdown": "**deploy** failed", "level": "failure",
            "link": {"text": "Open", "url": "https://ci.example.com/42"},
            "mentions": [{"id": "ou_bob"}], "mention_all": true}})
    };
    let got = wasmtime_invoke("notify", &note(HOOK_SECRET)).await;
    assert_eq!(got, json!({"ok": {"message_id": null}}));
    {
        let st = sim.state();
        assert_eq!(st.bot_messages.len(), 1);
        let m = &st.bot_messages[0];
        assert_eq!(
            m.code, 0,
            "the simulator verified the signature: {:?}",
            m.body
        );
        assert_eq!(m.body["card"]["header"]["template"], "red");
        let md = m.body["card"]["elements"][0]["content"].as_str().unwrap();
        assert!(md.contains("<at id=ou_bob></at>") && md.contains("<at id=all></at>"));
    }
    // The platform's refusal arrives as the same typed error the reference host returns.
    let got = wasmtime_invoke("notify", &note("wrong")).await;
    let allow = [sim.base_url().trim_start_matches("http://").to_string()];
    let want = reference("notify", note("wrong"), &allow).await;
    assert_eq!(got["err"]["kind"], "platform", "{got}");
    assert_eq!(got["err"]["code"], 19021);
    assert_eq!(got, want);
    assert_eq!(
        sim.state().bot_messages.len(),
        3,
        "one refused post per host"
    );
}

// ---------------------------------------------------------------------------------------------
// jco in Node
// ---------------------------------------------------------------------------------------------

fn interop() -> PathBuf {
    workspace().join("tests/interop")
}

/// `jco transpile`s the component once per test run, into `tests/interop/transpiled/` so Node
/// resolves preview2-shim from `tests/interop/node_modules`.
fn transpiled() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = interop().join("transpiled");
        let _ = std::fs::remove_dir_all(&dir);
        let jco = interop().join("node_modules/@bytecodealliance/jco/dist/jco.js");
        let status = std::process::Command::new("node")
            .arg(&jco)
            .arg("transpile")
            .arg(component_path())
            .args(["--quiet", "-o"])
            .arg(&dir)
            .args(["--map", "wasi:keyvalue/*=../kv_shim.mjs#*"])
            .status()
            .unwrap_or_else(|e| panic!("node not runnable ({e})"));
        assert!(
            status.success(),
            "jco transpile failed (install: npm ci --prefix tests/interop)"
        );
        dir.join("imbridge.js")
    })
}

/// `node tests/interop/jco_host.mjs …`: the export's reply, and the store afterwards.
async fn jco_invoke(export: &str, app: &Value, input: &Value, kv: &Value) -> (Value, Value) {
    let module = transpiled();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, v: &Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let (app, input, seed) = (
        file("app.json", app),
        file("in.json", input),
        file("kv.json", kv),
    );
    let kv_out = dir.path().join("kv-out.json");
    let printed = output(
        tokio::process::Command::new("node")
            .arg(interop().join("jco_host.mjs"))
            .arg(module)
            .arg(export)
            .arg("--app")
            .arg(&app)
            .arg("--input")
            .arg(&input)
            .arg("--kv-seed")
            .arg(&seed)
            .arg("--kv-out")
            .arg(&kv_out),
        "node jco_host.mjs",
        "npm ci --prefix tests/interop",
    )
    .await;
    let reply = serde_json::from_str(&printed).expect("one JSON line");
    let kv = serde_json::from_slice(&std::fs::read(&kv_out).unwrap()).unwrap();
    (reply, kv)
}

#[tokio::test(flavor = "multi_thread")]
async fn jco_in_node_decrypts_url_verification_like_the_reference_host() {
    let request = url_verification(TOKEN, "c-jco-1");
    let (got, _) = jco_invoke("handle-callback", &app(None), &request, &json!({})).await;
    let out = ok(&got);
    let body: Value = serde_json::from_str(out["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"challenge": "c-jco-1"}));
    let args = json!({"app": app(None), "request": request});
    assert_eq!(got, reference("handle-callback", args, &[]).await);

    let request = url_verification("forged", "c-jco-2");
    let (got, _) = jco_invoke("handle-callback", &app(None), &request, &json!({})).await;
    let args = json!({"app": app(None), "request": request});
    assert_eq!(got["err"]["kind"], "unauthorized", "{got}");
    assert_eq!(got, reference("handle-callback", args, &[]).await);
}

/// State moves between hosts: the reference host starts an approval, its key-value state is
/// handed to the component under jco, which applies the approver's signed, encrypted decision
/// events and flips the approval to approved, deduplicating a redelivery.
#[tokio::test(flavor = "multi_thread")]
async fn jco_in_node_decides_an_approval_the_reference_host_started() {
    let fa = encrypted_feishu_app("cli_other", "s3cret", ENCRYPT_KEY, TOKEN);
    let sim = feishu_sim(fa, &["alice", "bob"]).await;
    let base = sim.base_url();
    let app = app(Some(&base));
    let h = Harness::new(&["t"], &[base.trim_start_matches("http://").to_string()])
        .await
        .expect("reference host");
    let started = h
        .invoke(
            "t",
            "start-approval",
            json!({"app": app, "request": {
            "key": "wf-7/deploy", "title": "Deploy?", "initiator": {"id": "ou_alice"},
            "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "or"}],
            "cc": [], "fields": [["env", "prod"]]}}),
        )
        .await;
    let id = ok(&started)["instance_id"].as_str().unwrap().to_string();
    let mut kv = serde_json::Map::new();
    for (k, v) in h.kv_dump("t") {
        kv.insert(k, json!(String::from_utf8(v).expect("text state")));
    }
    let mut kv = Value::Object(kv);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    sim.set_event_sink(
        "cli_other",
        Some(EventSink::new(move |event| {
            let _ = tx.send(event);
        })),
    );
    sim.decide(&id, "ou_bob", true, Some("ship it"))
        .await
        .unwrap();
    let mut pushes = Vec::new();
    while let Ok(payload) = rx.try_recv() {
        pushes.push(sim.build_push("cli_other", &payload).unwrap());
    }
    assert!(!pushes.is_empty(), "the decision produced events");

    let mut updates = Vec::new();
    for p in pushes.iter().chain(pushes.last()) {
        let req = http_request("POST", "", &p.headers, &p.body);
        let (reply, after) = jco_invoke("handle-callback", &app, &req, &kv).await;
        assert_eq!(ok(&reply)["response"]["status"], 200, "{reply}");
        updates.push(ok(&reply)["updates"].clone());
        kv = after;
    }
    // The task event records the decision, the instance event the outcome; the redelivered
    // last event changes nothing.
    let decided: Vec<&Value> = updates.iter().flat_map(|u| u.as_array().unwrap()).collect();
    let statuses: Vec<&str> = decided
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["pending", "approved"], "{updates:?}");
    let last = decided.last().unwrap();
    assert_eq!(last["instance_id"], id.as_str());
    assert_eq!(last["decisions"][0]["user"], "ou_bob");
    assert_eq!(last["decisions"][0]["approved"], true);
    assert_eq!(updates.last().unwrap(), &json!([]));
    // The stored record says approved too: the shim's store is what the component wrote.
    let stored: Vec<&str> = kv
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_str)
        .filter(|v| v.contains(&id) && v.contains("\"approved\""))
        .collect();
    assert_eq!(stored.len(), 1, "{kv}");
}
