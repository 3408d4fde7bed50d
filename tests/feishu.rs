//! Feishu end to end: the built component in the reference host, talking to the Feishu
//! simulator over loopback, with callbacks delivered through `imbridge-host serve`.

use imbridge_host::config::ServeConfig;
use imbridge_host::server::{ServerHandle, serve_with};
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_tests::{Harness, err_kind, err_message, http_request, ok, signed_hook};
use serde_json::{Value, json};
use std::time::Duration;

const ENCRYPT_KEY: &str = "demo-encrypt-key";
const TOKEN: &str = "vt-demo";
const HOOK_SECRET: &str = "bot-secret";

type Headers = Vec<(String, String)>;

struct Fixture {
    sim: FeishuSim,
    h: Harness,
    server: ServerHandle,
    app: Value,
}

impl Fixture {
    async fn new() -> Fixture {
        let mut fa = FeishuApp::new("cli_demo", "demo-secret");
        fa.encrypt_key = Some(ENCRYPT_KEY.into());
        fa.verification_token = TOKEN.into();
        let mut erin = FeishuUser::new("erin");
        erin.mobile = Some("+8613800000005".into());
        let sim = FeishuSim::start(FeishuConfig {
            apps: vec![fa],
            users: ["alice", "bob", "carol", "dave"]
                .into_iter()
                .map(FeishuUser::new)
                .chain([erin])
                .collect(),
            chats: vec!["oc_ops".into()],
            hooks: vec![signed_hook("hook1", HOOK_SECRET)],
            ..FeishuConfig::default()
        })
        .await
        .expect("sim");
        let base = sim.base_url();
        let allow = base.trim_start_matches("http://").to_string();
        let h = Harness::new(&["t1", "t2"], &[allow])
            .await
            .expect("harness");
        let app = json!({
            "id": "fs", "platform": "feishu", "app_id": "cli_demo", "app_secret": "demo-secret",
            "encrypt_key": ENCRYPT_KEY, "token": TOKEN, "api_base": base,
        });
        let cfg = json!({
            "listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
            "state_dir": h.dir.path().join("serve"),
            "tenants": [{"id": "t1", "apps": [app]}],
        });
        let cfg = ServeConfig::parse(&cfg.to_string(), h.dir.path()).expect("config");
        let server = serve_with(h.host.clone(), cfg).await.expect("serve");
        sim.set_callback_url(
            "cli_demo",
            Some(&format!("http://{}/callback/t1/fs", server.addr())),
        );
        Fixture {
            sim,
            h,
            server,
            app,
        }
    }

    async fn start(&self, tenant: &str, key: &str) -> Value {
        let request = json!({
            "key": key, "title": "Deploy to prod?",
            "initiator": {"email": "alice@example.com"},
            "nodes": [
                {"approvers": [{"id": "ou_bob"}, {"email": "carol@example.com"}], "mode": "and"},
                {"approvers": [{"id": "ou_dave"}, {"mobile": "+8613800000005"}], "mode": "or"},
            ],
            "cc": [{"id": "ou_alice"}],
            "fields": [["workflow", "release #42"], ["env", "prod"]],
            "detail_url": "https://ci.example.com/wf/42",
        });
        self.h
            .invoke(
                tenant,
                "start-approval",
                json!({"app": self.app, "request": request}),
            )
            .await
    }

    async fn get(&self, tenant: &str, id: &str, refresh: bool) -> Value {
        self.h
            .invoke(
                tenant,
                "get-approval",
                json!({"app": self.app, "instance_id": id, "refresh": refresh}),
            )
            .await
    }

    async fn callback(&self, headers: &[(String, String)], body: &[u8]) -> Value {
        let req = http_request("POST", "", headers, body);
        self.h
            .invoke(
                "t1",
                "handle-callback",
                json!({"app": self.app, "request": req}),
            )
            .await
    }
}

fn instance_id(reply: &Value) -> String {
    ok(reply)["instance_id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn and_then_or_approval_is_decided_by_encrypted_signed_callbacks() {
    let f = Fixture::new().await;
    let url = format!("http://{}/callback/t1/fs", f.server.addr());
    let v = f.sim.url_verification("cli_demo", &url).await.unwrap();
    assert!(
        v.echoed,
        "url_verification must echo the challenge: {:?}",
        v.reply
    );

    let started = f.start("t1", "wf-42/deploy").await;
    let id = instance_id(&started);
    assert_eq!(ok(&started)["status"], "pending");
    {
        let st = f.sim.state();
        let inst = &st.instances[&id];
        let nodes: Vec<(String, Vec<String>)> = inst
            .node_approvers
            .iter()
            .map(|(n, ids)| (n.node_type.clone(), ids.clone()))
            .collect();
        assert_eq!(
            nodes,
            [
                (
                    "AND".to_string(),
                    vec!["ou_bob".to_string(), "ou_carol".to_string()]
                ),
                (
                    "OR".to_string(),
                    vec!["ou_dave".to_string(), "ou_erin".to_string()]
                ),
            ]
        );
        assert_eq!(inst.open_id, "ou_alice");
        assert_eq!(inst.cc, ["ou_alice"]);
        assert_eq!(inst.title.as_deref(), Some("Deploy to prod?"));
        assert!(inst.form.contains("release #42"));
        let def = &st.definitions[&inst.approval_code];
        assert_eq!(
            def.subscribers,
            ["cli_demo"],
            "the app must subscribe to the definition to get its events"
        );
    }

    for (who, expect) in [
        ("ou_bob", "pending"),
        ("ou_carol", "pending"),
        ("ou_dave", "approved"),
    ] {
        let asked = f.sim.state().requests.len();
        let d = f.sim.decide(&id, who, true, Some("ok")).await.unwrap();
        // Handling a callback asks the platform nothing (it must answer within Feishu's 3 s).
        assert_eq!(f.sim.state().requests.len(), asked);
        assert!(!d.reports.is_empty(), "the decision pushed nothing");
        for r in &d.reports {
            assert!(r.delivered, "push not accepted: {:?}", r.attempts);
            assert_eq!(r.attempts.len(), 1, "no retries needed");
        }
        let got = f.get("t1", &id, false).await;
        assert_eq!(ok(&got)["status"], expect, "after {who}");
    }
    let got = f.get("t1", &id, false).await;
    let users: Vec<&str> = ok(&got)["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["ou_bob", "ou_carol", "ou_dave"]);

    // The same plugin file for another tenant sees none of it.
    let other = f.get("t2", &id, false).await;
    assert_eq!(err_kind(&other), "invalid-input");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_is_idempotent_per_key_and_tenant() {
    let f = Fixture::new().await;
    let a = instance_id(&f.start("t1", "k1").await);
    let b = instance_id(&f.start("t1", "k1").await);
    assert_eq!(a, b);
    let c = instance_id(&f.start("t1", "k2").await);
    assert_ne!(a, c);
    assert_eq!(f.sim.state().instances.len(), 2);
    // One definition per node shape, created and subscribed once.
    assert_eq!(f.sim.calls("POST /open-apis/approval/v4/approvals"), 1);
    assert_eq!(
        f.sim
            .calls("POST /open-apis/approval/v4/approvals/{approval_code}/subscribe"),
        1
    );
    // One tenant token for all of it.
    assert_eq!(
        f.sim
            .calls("POST /open-apis/auth/v3/tenant_access_token/internal"),
        1
    );
}

/// Feishu keeps a create's uuid unique across the whole company. A second store (a host
/// tenant here; another engine alike) with the same Feishu app, app id and key used to get
/// Feishu's "uuid used", read the first store's instance back and take it as its own,
/// already approved. Now it refuses (retryable, naming both causes); with its own app id it gets
/// its own approval. (A lost create answer is recovered by uuid in faults.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn stores_sharing_a_feishu_company_never_adopt_each_others_approvals() {
    let f = Fixture::new().await;
    let first = instance_id(&f.start("t1", "wf-42/deploy").await);
    for who in ["ou_bob", "ou_carol", "ou_dave"] {
        f.sim.decide(&first, who, true, None).await.unwrap();
    }
    assert_eq!(ok(&f.get("t1", &first, true).await)["status"], "approved");
    let other = f.start("t2", "wf-42/deploy").await;
    assert_eq!(err_kind(&other), "platform", "{other}");
    assert_eq!(other["err"]["code"], 60012, "{other}");
    assert_eq!(other["err"]["retryable"], true, "{other}");
    assert!(err_message(&other).contains("different ids"), "{other}");
    assert_eq!(f.sim.state().instances.len(), 1);
    // With an app id of its own, the second store's uuid is its own.
    let mut app = f.app.clone();
    app["id"] = json!("fs-staging");
    let own = f
        .h
        .invoke(
            "t2",
            "start-approval",
            json!({"app": app, "request": {
                "key": "wf-42/deploy", "title": "Deploy to prod?", "initiator": {"id": "ou_alice"},
                "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}], "cc": [], "fields": []}}),
        )
        .await;
    assert_eq!(ok(&own)["status"], "pending", "{own}");
    assert_ne!(instance_id(&own), first);
    // The first store's retry still finds its own.
    assert_eq!(instance_id(&f.start("t1", "wf-42/deploy").await), first);
}

/// A create whose answer was lost, then its definition deleted in the console before the
/// engine's retry: the retry makes a new definition, Feishu answers 60012 for the key's uuid
/// (the instance it holds is on the old definition), and the plugin adopts that instance, the
/// one its approvers see. It used to refuse it on every retry ("another store").
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_create_is_adopted_after_its_definition_is_replaced() {
    let f = Fixture::new().await;
    f.sim
        .faults()
        .lose_answers("/open-apis/approval/v4/instances", 1);
    let lost = f.start("t1", "wf-7/deploy").await;
    assert_eq!(err_kind(&lost), "transport", "{lost}");
    let (created, old) = {
        let st = f.sim.state();
        assert_eq!(st.instances.len(), 1);
        let inst = st.instances.values().next().unwrap();
        (inst.instance_code.clone(), inst.approval_code.clone())
    };
    f.sim.state().definitions.remove(&old);

    let retry = f.start("t1", "wf-7/deploy").await;
    assert_eq!(instance_id(&retry), created, "{retry}");
    assert_eq!(f.sim.calls("POST /open-apis/approval/v4/approvals"), 2);
    assert_eq!(f.sim.state().instances.len(), 1, "no second approval");
    assert_eq!(ok(&f.get("t1", &created, true).await)["status"], "pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn rejection_and_withdrawal_reach_the_engine() {
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "rej").await);
    f.sim
        .decide(&id, "ou_bob", false, Some("not today"))
        .await
        .unwrap();
    let got = f.get("t1", &id, false).await;
    assert_eq!(ok(&got)["status"], "rejected");
    assert_eq!(ok(&got)["decisions"][0]["approved"], false);

    let id2 = instance_id(&f.start("t1", "withdraw").await);
    f.sim.withdraw(&id2).await.unwrap();
    assert_eq!(ok(&f.get("t1", &id2, false).await)["status"], "canceled");
    // Terminal states stick even if the platform later says otherwise.
    f.sim.state().instances.get_mut(&id2).unwrap().status = "APPROVED".into();
    assert_eq!(ok(&f.get("t1", &id2, true).await)["status"], "canceled");
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_is_the_safety_net_when_callbacks_are_lost() {
    let f = Fixture::new().await;
    f.sim.set_callback_url("cli_demo", None);
    let id = instance_id(&f.start("t1", "poll").await);
    f.sim.decide(&id, "ou_bob", true, None).await.unwrap();
    f.sim.decide(&id, "ou_carol", true, None).await.unwrap();
    f.sim
        .decide(&id, "ou_erin", true, Some("ship it"))
        .await
        .unwrap();
    assert_eq!(ok(&f.get("t1", &id, false).await)["status"], "pending");
    let got = f.get("t1", &id, true).await;
    assert_eq!(ok(&got)["status"], "approved");
    assert_eq!(ok(&got)["decisions"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_withdraws_on_the_platform() {
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "cancel").await);
    let r =
        f.h.invoke(
            "t1",
            "cancel-approval",
            json!({"app": f.app, "instance_id": id, "reason": "workflow aborted"}),
        )
        .await;
    assert_eq!(ok(&r)["status"], "canceled");
    assert_eq!(f.sim.state().instances[&id].status, "CANCELED");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_and_unrelated_callbacks_change_nothing() {
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "dup").await);
    let event = f
        .sim
        .envelope_v1(
            "cli_demo",
            json!({"type": "approval_instance", "instance_code": id, "status": "APPROVED",
                   "operate_time": "1700000000000"}),
        )
        .unwrap();
    let push = f.sim.build_push("cli_demo", &event).unwrap();
    let first = f.callback(&push.headers, &push.body).await;
    assert_eq!(ok(&first)["updates"].as_array().unwrap().len(), 1);
    let before = f.h.kv_dump("t1");
    let again = f.callback(&push.headers, &push.body).await;
    assert_eq!(ok(&again)["response"]["status"], 200);
    assert!(ok(&again)["updates"].as_array().unwrap().is_empty());
    assert_eq!(f.h.kv_dump("t1"), before);

    let msg = f
        .sim
        .envelope_v2(
            "cli_demo",
            "im.message.receive_v1",
            json!({"message": {"message_id": "om_1"}}),
        )
        .unwrap();
    let push = f.sim.build_push("cli_demo", &msg).unwrap();
    let r = f.callback(&push.headers, &push.body).await;
    assert_eq!(ok(&r)["response"]["status"], 200);
    assert!(ok(&r)["updates"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn notifications_via_signed_webhook_and_app_messages() {
    let f = Fixture::new().await;
    let note = |target: Value| {
        json!({"target": target, "title": "workflow #42 failed", "markdown": "**deploy** failed",
               "level": "failure", "link": {"text": "Open", "url": "https://ci.example.com/42"},
               "mentions": [{"id": "ou_bob"}], "mention_all": true})
    };
    let hook = json!({"webhook": {"platform": "feishu",
        "url": format!("{}/open-apis/bot/v2/hook/hook1", f.sim.base_url()), "secret": HOOK_SECRET}});
    let r =
        f.h.invoke(
            "t1",
            "notify",
            json!({"app": null, "notification": note(hook)}),
        )
        .await;
    ok(&r);
    {
        let st = f.sim.state();
        let m = st.bot_messages.last().unwrap();
        assert_eq!(m.code, 0, "the simulator verified the signature");
        assert_eq!(m.body["card"]["header"]["template"], "red");
        let md = m.body["card"]["elements"][0]["content"].as_str().unwrap();
        assert!(md.contains("<at id=ou_bob></at>") && md.contains("<at id=all></at>"));
    }
    // A wrong secret is the platform's error, typed, not a silent success.
    let bad = json!({"webhook": {"platform": "feishu",
        "url": format!("{}/open-apis/bot/v2/hook/hook1", f.sim.base_url()), "secret": "wrong"}});
    let r =
        f.h.invoke(
            "t1",
            "notify",
            json!({"app": null, "notification": note(bad)}),
        )
        .await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["code"], 19021);

    let r =
        f.h.invoke(
            "t1",
            "notify",
            json!({"app": f.app, "notification": note(json!({"chat": "oc_ops"}))}),
        )
        .await;
    assert!(ok(&r)["message_id"].as_str().unwrap().starts_with("om_"));
    let users = json!({"users": [{"email": "carol@example.com"}, {"id": "ou_dave"}]});
    let r =
        f.h.invoke(
            "t1",
            "notify",
            json!({"app": f.app, "notification": note(users)}),
        )
        .await;
    ok(&r);
    let st = f.sim.state();
    let to: Vec<&str> = st.messages.iter().map(|m| m.receive_id.as_str()).collect();
    assert_eq!(to, ["oc_ops", "ou_carol", "ou_dave"]);
}

/// A notify request for a failure message to the users `ids`, by id.
fn to_users(f: &Fixture, ids: &[&str], title: &str) -> Value {
    let users: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    json!({"app": f.app, "notification": {"target": {"users": users}, "title": title,
        "markdown": "deploy failed", "level": "failure"}})
}

/// A message to several users that fails part-way (Feishu's rate limit on the second) is an
/// error the engine retries; the retry reaches only the users the first call missed. Before,
/// the first user got the message twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_notification_reaches_each_user_once() {
    let f = Fixture::new().await;
    let notify = to_users(&f, &["ou_alice", "ou_bob", "ou_carol"], "wf #7 failed");
    let rate_limited = imbridge_host::sim::http::Response::json(
        429,
        &json!({"code": 99991400, "msg": "request trigger frequency limit"}),
    );
    f.sim
        .faults()
        .fail_after("/open-apis/im/v1/messages", 1, 1, rate_limited);
    let r = f.h.invoke("t1", "notify", notify.clone()).await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    let r = f.h.invoke("t1", "notify", notify.clone()).await;
    ok(&r);
    let to = |f: &Fixture| -> Vec<String> {
        let st = f.sim.state();
        st.messages.iter().map(|m| m.receive_id.clone()).collect()
    };
    assert_eq!(to(&f), ["ou_alice", "ou_bob", "ou_carol"]);
    // Sent again later, the whole notification goes out again.
    ok(&f.h.invoke("t1", "notify", notify).await);
    assert_eq!(to(&f).len(), 6);
}

/// A user outside the app's availability (Feishu refuses with 230013) does not keep the users
/// after them from the message; the error names the refusal and is not retryable. Before, the
/// users after the refused one were never sent to.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_feishu_refuses_keeps_no_one_else_from_the_message() {
    let f = Fixture::new().await;
    let notify = to_users(&f, &["ou_alice", "ou_stranger", "ou_carol"], "wf #9 failed");
    let r = f.h.invoke("t1", "notify", notify).await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["code"], 230013, "{r}");
    assert_eq!(r["err"]["retryable"], false, "{r}");
    assert!(
        err_message(&r).ends_with("(1 of 3 messages refused)"),
        "{r}"
    );
    let st = f.sim.state();
    let to: Vec<&str> = st.messages.iter().map(|m| m.receive_id.as_str()).collect();
    assert_eq!(to, ["ou_alice", "ou_carol"]);
}

/// The first of three messages reaches Feishu but its answer is lost: the notification fails
/// with a transport error (which engines retry), and the engine's retry sends that message again under
/// the same uuid, which Feishu drops. Each user has the message once; before, the first user
/// got it twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_answer_was_lost_is_not_delivered_twice() {
    let f = Fixture::new().await;
    let notify = to_users(&f, &["ou_alice", "ou_bob", "ou_carol"], "wf #8 failed");
    f.sim.faults().lose_answers("/open-apis/im/v1/messages", 1);
    let r = f.h.invoke("t1", "notify", notify.clone()).await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    let r = f.h.invoke("t1", "notify", notify).await;
    ok(&r);
    let st = f.sim.state();
    let to: Vec<&str> = st.messages.iter().map(|m| m.receive_id.as_str()).collect();
    assert_eq!(to, ["ou_alice", "ou_bob", "ou_carol"]);
    assert_eq!(
        st.calls("POST /open-apis/im/v1/messages"),
        4,
        "the first message was sent twice, once dropped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_are_refreshed_once() {
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "tok").await);
    f.sim.expire_all_tokens();
    ok(&f.get("t1", &id, true).await);
    assert_eq!(
        f.sim
            .calls("POST /open-apis/auth/v3/tenant_access_token/internal"),
        2
    );
}

/// Every malformed or forged callback ends in a typed error and leaves the state untouched.
#[tokio::test(flavor = "multi_thread")]
async fn bad_callbacks_are_typed_errors_without_state_change() {
    use imbridge_host::sim::feishu::crypto;
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "bad").await);
    let event = f
        .sim
        .envelope_v1(
            "cli_demo",
            json!({"type": "approval_instance", "instance_code": id, "status": "APPROVED"}),
        )
        .unwrap();
    let good = f.sim.build_push("cli_demo", &event).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |body: Vec<u8>, ts: u64| {
        let ts = ts.to_string();
        let sig = crypto::signature(&ts, "n", ENCRYPT_KEY, &body);
        (
            vec![
                ("X-Lark-Signature".to_string(), sig),
                ("X-Lark-Request-Timestamp".to_string(), ts),
                ("X-Lark-Request-Nonce".to_string(), "n".to_string()),
            ],
            body,
        )
    };
    let enc_body = |plain: &[u8]| {
        json!({"encrypt": crypto::encrypt(ENCRYPT_KEY, plain)})
            .to_string()
            .into_bytes()
    };
    let before = f.h.kv_dump("t1");

    let mut cases: Vec<(&str, Headers, Vec<u8>, &str)> = Vec::new();
    let (h, b) = signed(br#"{"encrypt":"%%%not base64%%%"}"#.to_vec(), now);
    cases.push(("bad base64", h, b, "invalid-input"));
    // 17 bytes after the IV: not a whole block.
    let (h, b) = signed(
        json!({"encrypt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})
            .to_string()
            .into_bytes(),
        now,
    );
    cases.push(("wrong padding / length", h, b, "invalid-input"));
    let mut h = good.headers.clone();
    for (k, v) in h.iter_mut() {
        if k.eq_ignore_ascii_case("x-lark-signature") {
            *v = "f".repeat(64);
        }
    }
    cases.push(("wrong signature", h, good.body.clone(), "unauthorized"));
    // Feishu's default window (8 h) spans its retries, the last about 7.1 h after the push.
    let (h, b) = signed(good.body.clone(), now - 9 * 3600);
    cases.push(("stale timestamp", h, b, "unauthorized"));
    let mut wrong_token = event.clone();
    wrong_token["token"] = json!("not-the-token");
    let (h, b) = signed(enc_body(wrong_token.to_string().as_bytes()), now);
    cases.push(("wrong token", h, b, "unauthorized"));
    let (h, b) = signed(enc_body(b"this is not json"), now);
    cases.push(("non-JSON plaintext", h, b, "invalid-input"));
    let (h, b) = signed(vec![b' '; (1 << 20) + 1], now);
    cases.push(("oversized body", h, b, "invalid-input"));
    cases.push(("unsigned event", vec![], good.body.clone(), "unauthorized"));
    cases.push((
        "plain event with a key set",
        vec![],
        event.to_string().into_bytes(),
        "unauthorized",
    ));

    for (name, headers, body, kind) in cases {
        let r = f.callback(&headers, &body).await;
        assert_eq!(err_kind(&r), kind, "{name}: {r}");
        let msg = err_message(&r);
        assert!(
            !msg.contains(ENCRYPT_KEY) && !msg.contains("demo-secret"),
            "{name} leaks a secret"
        );
        assert_eq!(f.h.kv_dump("t1"), before, "{name} changed state");
    }
    assert_eq!(ok(&f.get("t1", &id, false).await)["status"], "pending");

    // Through the HTTP endpoint, errors are 4xx so the platform's retry logic sees them.
    let url = format!("http://{}/callback/t1/fs", f.server.addr());
    let r = imbridge_host::sim::http::post(
        &url,
        &[],
        b"{\"encrypt\":\"AAAA\"}".to_vec(),
        Duration::from_secs(5),
    )
    .await;
    // Unsigned: refused as unauthorized, 401, and only the kind goes back to the sender.
    assert_eq!(r.status, Some(401), "{:?}", r);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"error": "unauthorized"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_errors_timeouts_and_bad_config_are_typed() {
    let f = Fixture::new().await;
    // An unknown platform error code: not retryable, code preserved.
    f.sim.fail_next(
        "/open-apis/approval/v4/instances",
        1,
        200,
        1234567,
        "mystery",
    );
    let r = f.start("t1", "err").await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["code"], 1234567);
    assert_eq!(r["err"]["retryable"], false);
    // A rate limit is retryable; the failed attempt did not burn the key.
    f.sim.fail_next(
        "/open-apis/approval/v4/instances",
        1,
        429,
        99991400,
        "too many",
    );
    let r = f.start("t1", "err").await;
    assert_eq!(r["err"]["retryable"], true);
    ok(&f.start("t1", "err").await);

    // Missing credentials.
    let mut app = f.app.clone();
    app["app_secret"] = json!("");
    let r =
        f.h.invoke(
            "t1",
            "get-approval",
            json!({"app": app, "instance_id": "x", "refresh": false}),
        )
        .await;
    assert_eq!(
        err_kind(&r),
        "invalid-input",
        "unknown instance is checked first: {r}"
    );
    let r =
        f.h.invoke(
            "t1",
            "start-approval",
            json!({"app": app, "request": {
            "key": "nocreds", "title": "t", "initiator": {"id": "ou_alice"},
            "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}], "cc": [], "fields": []}}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-config");

    // The platform stops answering: the plugin's own 10 s timeout fires, well inside the
    // host's deadline, as a retryable transport error.
    f.sim.set_delay(
        "/open-apis/approval/v4/instances",
        Some(Duration::from_secs(15)),
    );
    let r = f.start("t1", "slow").await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    // The create was at Feishu when the answer timed out: it may have been acted on.
    assert!(err_message(&r).ends_with("timed out"), "{r}");
}

/// The official SDK (lark-oapi) produces the encrypted, signed push; the plugin must accept it
/// and apply it. `./dev test` installs tests/interop/requirements.txt, so this always runs.
#[tokio::test(flavor = "multi_thread")]
async fn events_produced_by_the_official_sdk_are_accepted() {
    let f = Fixture::new().await;
    let id = instance_id(&f.start("t1", "sdk").await);
    let event = json!({"uuid": "sdk-1", "token": TOKEN, "ts": "1", "type": "event_callback",
        "event": {"type": "approval_instance", "instance_code": id, "status": "APPROVED",
                  "operate_time": "1700000000000"}});
    let ev_path = f.h.dir.path().join("event.json");
    std::fs::write(&ev_path, event.to_string()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/feishu_events.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([
            "produce",
            "--encrypt-key",
            ENCRYPT_KEY,
            "--token",
            TOKEN,
            "--event",
        ])
        .arg(&ev_path)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "lark-oapi interop script failed (is tests/interop/requirements.txt installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let produced: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(produced["sdk_self_check"]["accepted"], true);
    let headers: Vec<(String, String)> = produced["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let r = f
        .callback(&headers, produced["body"].as_str().unwrap().as_bytes())
        .await;
    assert_eq!(ok(&r)["updates"][0]["status"], "approved", "{r}");
}
