//! End-to-end WeCom tests: the built component in the reference host, against the WeCom
//! simulator on loopback. Callbacks travel the real way (simulator → host's HTTP server →
//! plugin) where that matters, and straight through `handle-callback` for the bad-input list.

use imbridge_host::config::{ServeConfig, TenantConfig};
use imbridge_host::json::Json;
use imbridge_host::server::{ServerHandle, serve_with};
use imbridge_host::sim::wecom::{WecomApp, WecomConfig, WecomSim, WecomUser, crypto};
use imbridge_host::{TenantPolicy, bindings::types::ImApp};
use imbridge_tests::{Harness, err_kind, err_message, http_request, ok};
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

const CORP: &str = "wwcorp0001";
const AGENT_A: u64 = 1000002;
const AGENT_B: u64 = 1000003;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn user(id: &str, mobile: Option<&str>) -> WecomUser {
    WecomUser {
        userid: id.into(),
        mobile: mobile.map(String::from),
        email: Some(format!("{id}@example.com")),
    }
}

struct World {
    sim: WecomSim,
    h: Harness,
    a: WecomApp,
    b: WecomApp,
    server: Option<ServerHandle>,
}

impl World {
    async fn new() -> World {
        let a = WecomApp::new(CORP, "secret-a", AGENT_A);
        let b = WecomApp::new(CORP, "secret-b", AGENT_B);
        let sim = WecomSim::start(WecomConfig {
            apps: vec![a.clone(), b.clone()],
            users: vec![
                user("zhangsan", Some("13800000001")),
                user("u1", None),
                user("u2", None),
                user("u3", None),
                user("u4", None),
                user("u5", Some("13900000005")),
            ],
            chats: vec!["chat1".into()],
            robot_keys: vec!["robot-key".into()],
            ..Default::default()
        })
        .await
        .expect("sim");
        let h = Harness::new(&["t1"], &[sim.server_authority()])
            .await
            .expect("harness");
        World {
            sim,
            h,
            a,
            b,
            server: None,
        }
    }

    fn app_json(&self, id: &str, app: &WecomApp) -> Value {
        json!({
            "id": id, "platform": "wecom", "app_id": app.corp_id, "app_secret": app.secret,
            "agent_id": app.agent_id.to_string(), "encrypt_key": app.encoding_aes_key,
            "token": app.token, "api_base": self.sim.base_url(),
        })
    }

    /// Starts the host's HTTP server for app "wa" and points the simulator's callbacks at it.
    async fn serve(&mut self) -> String {
        let app = ImApp::from_json(&self.app_json("wa", &self.a), "app").expect("app");
        let cfg = ServeConfig {
            listen: "127.0.0.1:0".into(),
            public_url: "http://127.0.0.1".into(),
            state_dir: self.h.dir.path().join("serve"),
            store: Default::default(),
            cache_dir: None,
            lease_ttl: None,
            component: None,
            call_timeout: None,
            max_concurrent_calls: None,
            max_calls_per_tenant: None,
            api_token: None,
            tenants: vec![TenantConfig {
                id: "t1".into(),
                policy: TenantPolicy {
                    allow_hosts: vec![self.sim.server_authority()],
                },
                apps: vec![app],
                engine_webhook: None,
                engine_webhook_secret: None,
                component: None,
                api_token: None,
            }],
        };
        let server = serve_with(self.h.host.clone(), cfg).await.expect("serve");
        let url = format!("http://{}/callback/t1/wa", server.addr());
        self.server = Some(server);
        self.sim.set_callback_url(AGENT_A, Some(&url));
        url
    }

    async fn start(&self, key: &str) -> Value {
        let req = json!({
            "key": key, "title": "Deploy to prod",
            "initiator": {"mobile": "+86 138-0000-0001"},
            "nodes": [
                {"approvers": [{"id": "u1"}, {"id": "u2"}], "mode": "and"},
                {"approvers": [{"id": "u3"}, {"id": "u4"}], "mode": "or"},
            ],
            "cc": [{"id": "u5"}],
            "fields": [["service", "api"], ["version", "1.2.3"]],
            "detail_url": "https://ci.example.com/runs/1",
        });
        let r = self
            .h
            .invoke(
                "t1",
                "start-approval",
                json!({"app": self.app_json("wa", &self.a), "request": req}),
            )
            .await;
        ok(&r).clone()
    }

    async fn get(&self, id: &str, refresh: bool) -> Value {
        self.h
            .invoke(
                "t1",
                "get-approval",
                json!({"app": self.app_json("wa", &self.a), "instance_id": id, "refresh": refresh}),
            )
            .await
    }

    async fn callback(&self, app: &Value, method: &str, query: &str, body: &[u8]) -> Value {
        self.h
            .invoke(
                "t1",
                "handle-callback",
                json!({"app": app, "request": http_request(method, query, &[], body)}),
            )
            .await
    }
}

trait Authority {
    fn server_authority(&self) -> String;
}

impl Authority for WecomSim {
    fn server_authority(&self) -> String {
        self.base_url().trim_start_matches("http://").to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_and_then_or_with_cc_decided_by_pushed_events() {
    let mut w = World::new().await;
    let url = w.serve().await;

    // WeCom checks the URL before saving it.
    let check = w.sim.url_check(AGENT_A, &url).await.unwrap();
    assert!(check.verified, "url check failed: {:?}", check.reply);

    let a = w.start("deploy-1").await;
    let sp_no = a["instance_id"].as_str().unwrap().to_string();
    assert_eq!(a["status"], "pending");
    {
        let st = w.sim.state();
        let inst = &st.instances[&sp_no];
        assert_eq!(inst.creator, "zhangsan");
        assert_eq!(inst.nodes.len(), 2);
        assert_eq!(inst.nodes[0].apv_rel, 1);
        assert_eq!(inst.nodes[1].apv_rel, 2);
        assert_eq!(inst.cc, ["u5"]);
        assert!(inst.text.contains("service: api"));
    }
    // Idempotent per key.
    assert_eq!(w.start("deploy-1").await["instance_id"], sp_no.as_str());
    assert_eq!(w.sim.calls("/cgi-bin/oa/applyevent"), 1);

    let asked = w.sim.state().requests.len();
    let r = w
        .sim
        .decide(&sp_no, "u1", true, "ok")
        .await
        .unwrap()
        .unwrap();
    assert!(r.delivered);
    // Handling a callback asks WeCom nothing (it must answer within 5 s).
    assert_eq!(w.sim.state().requests.len(), asked);
    assert_eq!(ok(&w.get(&sp_no, false).await)["status"], "pending");
    w.sim.decide(&sp_no, "u2", true, "").await.unwrap().unwrap();
    assert_eq!(ok(&w.get(&sp_no, false).await)["status"], "pending");
    let last = w
        .sim
        .decide(&sp_no, "u4", true, "go")
        .await
        .unwrap()
        .unwrap();
    assert!(last.delivered);
    let got = w.get(&sp_no, false).await;
    let got = ok(&got);
    assert_eq!(got["status"], "approved");
    let users: Vec<&str> = got["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user"].as_str().unwrap())
        .collect();
    assert_eq!(users.len(), 3);
    assert!(users.contains(&"u1") && users.contains(&"u2") && users.contains(&"u4"));

    // A retried push (same bytes) is acknowledged and changes nothing: no state, and no
    // second update for the engine.
    let before = w.h.kv_dump("t1");
    let updates = w.h.host.store().outbox_list("t1", 0).unwrap();
    assert!(!updates.is_empty());
    let again = w.sim.send(&url, last.request.clone()).await;
    assert!(again.delivered);
    assert_eq!(w.h.kv_dump("t1"), before);
    assert_eq!(w.h.host.store().outbox_list("t1", 0).unwrap(), updates);

    // Other messages and events get 200 and change nothing.
    for msg in [
        "<xml><ToUserName><![CDATA[c]]></ToUserName><FromUserName><![CDATA[u1]]></FromUserName><CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content><MsgId>77</MsgId><AgentID>1</AgentID></xml>",
        "<xml><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[change_contact]]></Event><ChangeType>update_user</ChangeType></xml>",
    ] {
        let rep = w.sim.push_xml(AGENT_A, &url, msg).await.unwrap();
        assert!(rep.delivered, "{:?}", rep.attempts);
        assert_eq!(rep.attempts.len(), 1);
    }
    assert_eq!(w.h.kv_dump("t1"), before);
    assert_eq!(w.h.host.store().outbox_list("t1", 0).unwrap(), updates);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_revoked_refresh_and_cancel() {
    let mut w = World::new().await;
    w.serve().await;
    let r1 = w.start("k-reject").await;
    let sp1 = r1["instance_id"].as_str().unwrap();
    w.sim.decide(sp1, "u2", false, "no").await.unwrap();
    let g = w.get(sp1, false).await;
    assert_eq!(ok(&g)["status"], "rejected");
    assert_eq!(ok(&g)["decisions"][0]["comment"], "no");

    // Revoked in WeCom, delivered by callback.
    let r2 = w.start("k-revoke").await;
    let sp2 = r2["instance_id"].as_str().unwrap();
    w.sim.withdraw(sp2).await.unwrap().unwrap();
    assert_eq!(ok(&w.get(sp2, false).await)["status"], "canceled");

    // Revoked while callbacks are down: polling is the safety net.
    w.sim.set_callback_url(AGENT_A, None);
    let r3 = w.start("k-poll").await;
    let sp3 = r3["instance_id"].as_str().unwrap().to_string();
    w.sim.decide(&sp3, "u1", true, "").await.unwrap();
    w.sim.withdraw(&sp3).await.unwrap();
    assert_eq!(ok(&w.get(&sp3, false).await)["status"], "pending");
    let g = w.get(&sp3, true).await;
    assert_eq!(ok(&g)["status"], "canceled");
    assert_eq!(ok(&g)["decisions"][0]["user"], "u1");
    // What the refresh found reaches the engine's outbox (the late callback would add
    // nothing); a refresh that finds nothing new adds no record.
    let outbox_for = |id: &str| -> Vec<Value> {
        let store = w.h.host.store();
        let records = store.outbox_list("t1", 0).unwrap();
        records
            .iter()
            .map(|(_, r)| serde_json::from_slice::<Value>(r).unwrap()["approval"].clone())
            .filter(|a| a["instance_id"] == id)
            .collect()
    };
    let found = outbox_for(&sp3);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(&found[0], ok(&g));
    assert_eq!(ok(&w.get(&sp3, true).await), ok(&g));
    assert_eq!(outbox_for(&sp3).len(), 1);

    // cancel-approval: WeCom has no withdraw API; a clear error and no state change.
    let r4 = w.start("k-cancel").await;
    let before = w.h.kv_dump("t1");
    let c =
        w.h.invoke(
            "t1",
            "cancel-approval",
            json!({"app": w.app_json("wa", &w.a), "instance_id": r4["instance_id"], "reason": "x"}),
        )
        .await;
    assert_eq!(err_kind(&c), "platform");
    assert_eq!(c["err"]["retryable"], false);
    assert!(err_message(&c).contains("withdraw"));
    assert_eq!(w.h.kv_dump("t1"), before);
    // Rejected in WeCom, its callback not here (no callback address): the cancel answers with
    // how the approval ended, which its one read of the approval found.
    w.sim.set_callback_url(AGENT_A, None);
    let sp4 = r4["instance_id"].as_str().unwrap();
    w.sim.decide(sp4, "u1", false, "no").await.unwrap();
    let c =
        w.h.invoke(
            "t1",
            "cancel-approval",
            json!({"app": w.app_json("wa", &w.a), "instance_id": sp4, "reason": "x"}),
        )
        .await;
    assert_eq!(ok(&c)["status"], "rejected", "{c}");
    assert_eq!(ok(&w.get(sp4, false).await)["status"], "rejected");
    // It reaches the engine's outbox, as a refresh's news does: the late callback adds nothing.
    let found = outbox_for(sp4);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(&found[0], ok(&c));
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_of_one_corp_never_share_a_token() {
    let w = World::new().await;
    w.start("iso-1").await;
    let n = json!({"target": {"users": [{"id": "u1"}]}, "title": "Hi", "markdown": "**x**",
        "level": "info", "mentions": [], "mention_all": false});
    let r =
        w.h.invoke(
            "t1",
            "notify",
            json!({"app": w.app_json("wb", &w.b), "notification": n}),
        )
        .await;
    ok(&r);
    // And app A again (cached token), then B again.
    w.start("iso-2").await;
    ok(&w
        .h
        .invoke(
            "t1",
            "notify",
            json!({"app": w.app_json("wb", &w.b), "notification": n}),
        )
        .await);
    let st = w.sim.state();
    let issued: Vec<u64> = st.tokens.iter().map(|t| t.agent_id).collect();
    assert_eq!(issued, [AGENT_A, AGENT_B], "one token per app, cached");
    for r in &st.requests {
        let agent = r.token_owner.as_ref().map(|o| o.1);
        match r.path.as_str() {
            "/cgi-bin/oa/applyevent" | "/cgi-bin/oa/approval/create_template" => {
                assert_eq!(agent, Some(AGENT_A))
            }
            "/cgi-bin/message/send" => assert_eq!(agent, Some(AGENT_B)),
            _ => {}
        }
    }
    assert_eq!(st.app_messages.len(), 2);
    assert!(st.app_messages.iter().all(|m| m.body["agentid"] == AGENT_B));
}

#[tokio::test(flavor = "multi_thread")]
async fn url_verification_keeps_plus_and_decodes_once() {
    let w = World::new().await;
    let app = w.app_json("wa", &w.a);
    // Find a ciphertext with a '+' and a '/' so both the raw and %-encoded forms are exercised.
    let mut tried = 0;
    loop {
        tried += 1;
        assert!(tried < 200, "no ciphertext with '+' found");
        let echo = format!("{}", 1_000_000_000_000_000u64 + tried);
        let enc = crypto::encrypt(&w.a.encoding_aes_key, echo.as_bytes(), CORP);
        if !enc.contains('+') {
            continue;
        }
        let ts = now_secs().to_string();
        let sig = crypto::signature(&w.a.token, &ts, "nonce1", &enc);
        // Literal '+' (some proxies leave it), then the %2B form WeCom sends.
        for e in [
            enc.clone(),
            enc.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D"),
        ] {
            let q = format!("msg_signature={sig}&timestamp={ts}&nonce=nonce1&echostr={e}");
            let r = w.callback(&app, "GET", &q, b"").await;
            let resp = &ok(&r)["response"];
            assert_eq!(resp["status"], 200);
            assert_eq!(
                resp["body"],
                echo.as_str(),
                "bare plaintext, no quotes or newline"
            );
        }
        // Decoding twice would turn %252B into '+'; once leaves "%2B", which must fail.
        let twice = enc.replace('+', "%252B");
        let q = format!("msg_signature={sig}&timestamp={ts}&nonce=nonce1&echostr={twice}");
        assert_eq!(
            err_kind(&w.callback(&app, "GET", &q, b"").await),
            "unauthorized"
        );
        break;
    }
}

/// A template deleted in WeCom's console heals: the start it refuses is retryable and the
/// retry makes the template again. A refusal for another reason keeps the template.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_template_is_made_again() {
    let w = World::new().await;
    let start = |key: &str, creator: &str| {
        let req = json!({"key": key, "title": "Deploy", "initiator": {"id": creator},
                         "nodes": [{"approvers": [{"id": "u1"}], "mode": "and"}]});
        w.h.invoke(
            "t1",
            "start-approval",
            json!({"app": w.app_json("wa", &w.a), "request": req}),
        )
    };
    ok(&start("k1", "zhangsan").await);
    let templates = || {
        let state = w.sim.state();
        state
            .templates
            .iter()
            .map(|t| t.template_id.clone())
            .collect::<Vec<_>>()
    };
    let first = templates();
    assert_eq!(first.len(), 1);

    // Refused for an unknown creator: the template exists, so the refusal stands and the
    // template is kept.
    let r = start("k2", "ghost").await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], false, "{r}");
    assert!(!err_message(&r).contains("gone"), "{r}");
    assert_eq!(templates(), first);
    let detail = "/cgi-bin/oa/gettemplatedetail";
    let checks = w
        .sim
        .state()
        .requests
        .iter()
        .filter(|r| r.path == detail)
        .count();
    assert_eq!(checks, 1, "the refusal asked whether the template is gone");

    w.sim.state().templates.clear();
    let r = start("k3", "zhangsan").await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["code"], 301025, "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    assert!(
        err_message(&r)
            .ends_with("the template it used is gone from the platform, a retry makes it again"),
        "{r}"
    );
    assert!(templates().is_empty(), "nothing made before the retry");
    let id = ok(&start("k3", "zhangsan").await)["instance_id"].clone();
    let second = templates();
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    let state = w.sim.state();
    assert_eq!(state.instances[id.as_str().unwrap()].template_id, second[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn robot_and_app_notifications() {
    let w = World::new().await;
    let hook = format!("{}/cgi-bin/webhook/send?key=robot-key", w.sim.base_url());
    let send = |n: Value, app: Option<Value>| {
        let h = &w.h;
        async move {
            h.invoke("t1", "notify", json!({"app": app, "notification": n}))
                .await
        }
    };
    let target = json!({"webhook": {"platform": "wecom", "url": hook}});
    // markdown with <@userid> mentions, coloured by level.
    ok(&send(
        json!({"target": target, "title": "Build failed", "markdown": "**main** broke",
            "level": "failure", "mentions": [{"id": "u1"}], "mention_all": false}),
        None,
    )
    .await);
    // text with mobile mentions and @all.
    ok(&send(
        json!({"target": target, "title": "Deploy", "markdown": "done",
            "level": "success", "mentions": [{"mobile": "+86 139 0000 0005"}, {"id": "u2"}],
            "mention_all": true}),
        None,
    )
    .await);
    // template_card when a link is given.
    ok(&send(
        json!({"target": target, "title": "Approve?", "markdown": "please",
            "level": "info", "link": {"text": "Open", "url": "https://ci.example.com/1"},
            "mentions": [], "mention_all": false}),
        None,
    )
    .await);
    // A wrong key is a platform error (93000).
    let bad = json!({"webhook": {"platform": "wecom",
        "url": format!("{}/cgi-bin/webhook/send?key=nope", w.sim.base_url())}});
    let r = send(
        json!({"target": bad, "title": "x", "markdown": "y", "level": "info",
            "mentions": [], "mention_all": false}),
        None,
    )
    .await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["code"], 93000);
    {
        let st = w.sim.state();
        let m = &st.robot_messages;
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].body["msgtype"], "markdown");
        let c = m[0].body["markdown"]["content"].as_str().unwrap();
        assert!(
            c.contains("<font color=\"warning\">") && c.contains("<@u1>"),
            "{c}"
        );
        assert_eq!(m[1].body["msgtype"], "text");
        assert_eq!(m[1].body["text"]["mentioned_list"], json!(["u2", "@all"]));
        assert_eq!(
            m[1].body["text"]["mentioned_mobile_list"],
            json!(["13900000005"])
        );
        assert_eq!(m[2].body["msgtype"], "template_card");
        assert_eq!(
            m[2].body["template_card"]["jump_list"][0]["url"],
            "https://ci.example.com/1"
        );
    }
    // App message to users (one by mobile) and to a chat.
    let r = send(
        json!({"target": {"users": [{"id": "u1"}, {"mobile": "13800000001"}]}, "title": "T",
            "markdown": "body", "level": "warning", "mentions": [], "mention_all": false}),
        Some(w.app_json("wa", &w.a)),
    )
    .await;
    assert!(ok(&r)["message_id"].is_string());
    ok(&send(
        json!({"target": {"chat": "chat1"}, "title": "T", "markdown": "body",
            "level": "info", "mentions": [], "mention_all": false}),
        Some(w.app_json("wa", &w.a)),
    )
    .await);
    let st = w.sim.state();
    assert_eq!(st.app_messages[0].body["touser"], "u1|zhangsan");
    assert_eq!(st.app_messages[0].body["msgtype"], "markdown");
    assert_eq!(st.app_messages[0].body["agentid"], AGENT_A);
    assert_eq!(st.chat_messages[0].body["chatid"], "chat1");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_typed_and_changes_nothing() {
    let w = World::new().await;
    let app = w.app_json("wa", &w.a);
    let started = w.start("bad-1").await;
    let sp_no = started["instance_id"].as_str().unwrap().to_string();
    let key = &w.a.encoding_aes_key;
    let token = &w.a.token;
    let ts = now_secs().to_string();
    let post = |enc: &str, ts: &str| -> (String, Vec<u8>) {
        let sig = crypto::signature(token, ts, "n", enc);
        (
            format!("msg_signature={sig}&timestamp={ts}&nonce=n"),
            format!("<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt><AgentID>1</AgentID></xml>").into_bytes(),
        )
    };
    let event = w.sim.approval_event_xml(&sp_no, 2).unwrap().replace(
        "<SpStatus>1</SpStatus><TemplateId>",
        "<SpStatus>2</SpStatus><TemplateId>",
    );
    let good_enc = crypto::encrypt_with(key, [5; 16], event.as_bytes(), CORP);
    let before = w.h.kv_dump("t1");

    let mut cases: Vec<(&str, String, Vec<u8>, &str)> = Vec::new();
    let (q, b) = post("!!not base64!!", &ts);
    cases.push(("bad base64", q, b, "invalid-input"));
    // Drop the last block: the new last byte is ciphertext garbage, not 32-byte PKCS#7.
    let raw = base64_decode(&good_enc);
    let truncated = base64_encode(&raw[..raw.len() - 16]);
    let (q, b) = post(&truncated, &ts);
    cases.push(("wrong padding", q, b, "invalid-input"));
    let (q, b) = post(&good_enc, &ts);
    let q_bad = q.replacen("msg_signature=", "msg_signature=00", 1);
    cases.push(("wrong signature", q_bad, b.clone(), "unauthorized"));
    let stale = (now_secs() - 3600).to_string();
    let (q, b) = post(&good_enc, &stale);
    cases.push(("stale timestamp", q, b, "unauthorized"));
    let other_corp = crypto::encrypt(key, event.as_bytes(), "wwother");
    let (q, b) = post(&other_corp, &ts);
    // The same answer as any unreadable ciphertext (no padding oracle).
    cases.push(("wrong CorpID", q, b, "invalid-input"));
    let (q, b) = post(&crypto::encrypt(key, b"just text", CORP), &ts);
    cases.push(("non-XML plaintext", q, b, "invalid-input"));
    let bomb = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">]><xml><Event>&lol1;</Event></xml>";
    let (q, b) = post(&crypto::encrypt(key, bomb.as_bytes(), CORP), &ts);
    cases.push(("entity bomb / DOCTYPE", q, b, "invalid-input"));
    let undeclared = "<xml><Event>&lol1;</Event></xml>";
    let (q, b) = post(&crypto::encrypt(key, undeclared.as_bytes(), CORP), &ts);
    cases.push(("undeclared entity", q, b, "invalid-input"));
    let (q, _) = post(&good_enc, &ts);
    cases.push(("oversized body", q, vec![b'x'; 2 << 20], "invalid-input"));
    cases.push((
        "outer not XML",
        "msg_signature=a&timestamp=1&nonce=n".into(),
        b"<xml><Encrypt>".to_vec(),
        "invalid-input",
    ));

    for (name, q, body, kind) in &cases {
        let r = w.callback(&app, "POST", q, body).await;
        assert_eq!(&err_kind(&r), kind, "{name}: {r}");
        assert_eq!(w.h.kv_dump("t1"), before, "{name} changed state");
    }

    // Missing credentials: no Token / no AES key / no secret.
    let mut no_token = app.clone();
    no_token["token"] = Value::Null;
    let (q, b) = post(&good_enc, &ts);
    assert_eq!(
        err_kind(&w.callback(&no_token, "POST", &q, &b).await),
        "invalid-config"
    );
    let mut no_key = app.clone();
    no_key["encrypt_key"] = Value::Null;
    assert_eq!(
        err_kind(&w.callback(&no_key, "POST", &q, &b).await),
        "invalid-config"
    );
    let mut no_secret = app.clone();
    no_secret["app_secret"] = json!("");
    let r =
        w.h.invoke(
            "t1",
            "get-approval",
            json!({"app": no_secret, "instance_id": sp_no, "refresh": true}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-config");
    let mut no_agent = app.clone();
    no_agent["agent_id"] = Value::Null;
    let r =
        w.h.invoke(
            "t1",
            "notify",
            json!({"app": no_agent, "notification": {"target": {"users": [{"id": "u1"}]},
                "title": "t", "markdown": "m", "level": "info"}}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-config");

    // Unknown platform error on refresh: typed, not retryable, nothing stored.
    w.sim
        .fail_next("/cgi-bin/oa/getapprovaldetail", 1, 200, 12345, "strange");
    let r = w.get(&sp_no, true).await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["code"], 12345);
    assert_eq!(r["err"]["retryable"], false);
    // System busy is retryable (the plugin's own three attempts all busy).
    w.sim.clear_faults();
    w.sim
        .fail_next("/cgi-bin/oa/getapprovaldetail", 3, 200, -1, "system busy");
    let r = w.get(&sp_no, true).await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    let path = "/cgi-bin/oa/getapprovaldetail";
    let faults = {
        let f = w.sim.faults();
        (f.served(path), f.pending(path))
    };
    assert_eq!(faults, (3, 0));
    assert_eq!(w.h.kv_dump("t1"), before);

    // The good event, finally, is accepted (so the cases above failed for their own reason).
    let (q, b) = post(&good_enc, &ts);
    let r = w.callback(&app, "POST", &q, &b).await;
    assert_eq!(ok(&r)["response"]["status"], 200);
    assert_eq!(ok(&r)["updates"][0]["status"], "approved");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use imbridge_host::sim::wecom::b64;
    b64::decode(s)
}

fn base64_encode(b: &[u8]) -> String {
    use imbridge_host::sim::wecom::b64;
    b64::encode(b)
}

/// Runs an interop peer; fails loudly (never skips) when it is missing, naming the install step.
fn peer(cmd: &str, args: &[&str]) -> Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    let out = std::process::Command::new(cmd)
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}); see tests/interop/README.md"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}",
        imbridge_host::sim::INTEROP_SDKS,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("peer prints JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn wechatpy_and_official_wecom_crypto_events_are_accepted() {
    let w = World::new().await;
    let app = w.app_json("wa", &w.a);
    let dir = tempfile::tempdir().unwrap();
    for (i, tool) in ["wechatpy", "@wecom/crypto"].iter().enumerate() {
        let started = w.start(&format!("interop-{i}")).await;
        let sp_no = started["instance_id"].as_str().unwrap().to_string();
        w.sim.set_callback_url(AGENT_A, None);
        w.sim.decide(&sp_no, "u1", true, "").await.unwrap();
        w.sim.decide(&sp_no, "u2", true, "").await.unwrap();
        w.sim.decide(&sp_no, "u3", true, "").await.unwrap();
        let xml = w.sim.approval_event_xml(&sp_no, 2).unwrap();
        let file = dir.path().join(format!("event{i}.xml"));
        std::fs::write(&file, &xml).unwrap();
        let f = file.to_str().unwrap();
        let k = w.a.encoding_aes_key.as_str();
        let req = if i == 0 {
            peer(
                "python3",
                &[
                    "wecom_crypto.py",
                    "produce",
                    "--token",
                    &w.a.token,
                    "--key",
                    k,
                    "--corp",
                    CORP,
                    "--plaintext-file",
                    f,
                ],
            )
        } else {
            peer(
                "node",
                &["wecom_crypto.mjs", "produce", &w.a.token, k, CORP, f],
            )
        };
        let r = w
            .callback(
                &app,
                "POST",
                req["query"].as_str().unwrap(),
                req["body"].as_str().unwrap().as_bytes(),
            )
            .await;
        let out = ok(&r);
        assert_eq!(out["response"]["status"], 200, "{tool}");
        assert_eq!(out["updates"][0]["status"], "approved", "{tool}: {r}");
        assert_eq!(out["updates"][0]["decisions"].as_array().unwrap().len(), 3);
    }
}

const PEER_AES: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const PEER_CORP: &str = "ww_corp";

/// The other direction: what the plugin encrypts, the peers decrypt (wechatpy checks the
/// signature and the CorpID too). Fails, never skips, when the peers are not installed.
#[test]
fn interop_peers_decrypt_plugin_ciphertext() {
    use std::process::Command;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");
    let msg = "<xml><Content><![CDATA[success + 成功]]></Content></xml>";
    let enc = imbridge::crypto::wx::WxKey::new(PEER_AES).unwrap().encrypt(
        [42; 16],
        msg.as_bytes(),
        PEER_CORP,
    );
    let sig = imbridge::crypto::sorted_sha1_hex(&["tok", "1700000000", "n1", &enc]);
    let run = |cmd: &str, args: &[&str]| -> Value {
        let out = Command::new(cmd)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("{cmd} not runnable ({e}): install the interop peers (tests/interop)")
            });
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let py = run(
        "python3",
        &[
            "wecom_crypto.py",
            "decrypt",
            "--token",
            "tok",
            "--key",
            PEER_AES,
            "--corp",
            PEER_CORP,
            "--encrypt",
            &enc,
            "--timestamp",
            "1700000000",
            "--nonce",
            "n1",
            "--signature",
            &sig,
        ],
    );
    assert_eq!(py["plaintext"], msg);
    let js = run("node", &["wecom_crypto.mjs", "decrypt", PEER_AES, &enc]);
    assert_eq!(js["message"], msg);
    assert_eq!(js["id"], PEER_CORP);
}
