//! DingTalk end to end: the built component in the reference host, against the DingTalk
//! simulator, with callbacks pushed by the simulator through a relay that calls
//! `handle-callback` exactly as an engine's HTTP endpoint would.

use imbridge_tests::imbridge_host::sim::dingtalk::{
    DingtalkApp, DingtalkConfig, DingtalkSim, DingtalkUser, PushRequest, REVOKE_AFTER, Robot,
    crypto,
};
use imbridge_tests::imbridge_host::sim::http::{Faults, Handler, Request, Response, Server};
use imbridge_tests::{Harness, err_kind, err_message, http_request, ok};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TENANT: &str = "t1";
const APP_KEY: &str = "dingappkey1";

struct Fx {
    sim: DingtalkSim,
    h: Harness,
    app: Value,
    /// Keeps the callback relay running.
    _relay: Server,
    relay_url: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn fixture() -> Fx {
    let app = DingtalkApp::new(APP_KEY);
    let users = ["orig", "a", "b", "c", "d", "cc1"]
        .iter()
        .enumerate()
        .map(|(i, u)| DingtalkUser::new(u, Some(&format!("1380000000{i}"))))
        .collect();
    let sim = DingtalkSim::start(DingtalkConfig {
        apps: vec![app.clone()],
        users,
        robots: vec![
            Robot {
                access_token: "signed".into(),
                secret: Some("SECtest".into()),
            },
            Robot {
                access_token: "plain".into(),
                secret: None,
            },
        ],
        ..Default::default()
    })
    .await
    .expect("sim");
    let allow = vec![sim.base_url().trim_start_matches("http://").to_string()];
    let h = Harness::new(&[TENANT], &allow).await.expect("harness");
    let app_json = json!({
        "id": "dt", "platform": "dingtalk", "app_id": app.app_key, "app_secret": app.app_secret,
        "agent_id": app.agent_id.to_string(), "encrypt_key": app.aes_key, "token": app.token,
        "api_base": sim.base_url(),
    });
    // The relay: what an engine mounts at its callback URL.
    let host = h.host.clone();
    let relay_app = app_json.clone();
    let handler: Handler = Arc::new(move |req: Request| {
        let host = host.clone();
        let app = relay_app.clone();
        Box::pin(async move {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let input = json!({"app": app,
                "request": http_request(&req.method, &req.query, &headers, &req.body)});
            match host.invoke_json(TENANT, "handle-callback", input).await {
                Ok(v) => match v.get("ok") {
                    Some(o) => Response {
                        status: o["response"]["status"].as_u64().unwrap_or(500) as u16,
                        headers: vec![("content-type".into(), "application/json".into())],
                        body: o["response"]["body"]
                            .as_str()
                            .unwrap_or("")
                            .as_bytes()
                            .to_vec(),
                    },
                    None => Response::json(400, &v),
                },
                Err(e) => Response::json(500, &json!({"host": e.to_string()})),
            }
        })
    });
    let relay = Server::start(handler, Arc::new(Mutex::new(Faults::default())))
        .await
        .expect("relay");
    let relay_url = format!("{}/callback/{TENANT}/dt", relay.base_url());
    sim.set_callback_url(APP_KEY, Some(&relay_url));
    Fx {
        sim,
        h,
        app: app_json,
        _relay: relay,
        relay_url,
    }
}

impl Fx {
    fn start_input(&self, key: &str, nodes: Value) -> Value {
        json!({"app": self.app, "request": {
            "key": key, "title": "Deploy wf-42", "initiator": {"mobile": "13800000000"},
            "nodes": nodes, "cc": [{"id": "cc1"}],
            "fields": [["env", "prod"], ["by", "ci"]], "detail_url": "https://engine/wf/42",
        }})
    }

    async fn start(&self, key: &str, nodes: Value) -> Value {
        let req = self.start_input(key, nodes);
        ok(&self.h.invoke(TENANT, "start-approval", req).await).clone()
    }

    async fn get(&self, id: &str, refresh: bool) -> Value {
        self.h
            .invoke(
                TENANT,
                "get-approval",
                json!({"app": self.app, "instance_id": id, "refresh": refresh}),
            )
            .await
    }

    async fn callback(&self, push: &PushRequest) -> Value {
        let req = http_request("POST", &push.query, &[], &push.body);
        self.h
            .invoke(
                TENANT,
                "handle-callback",
                json!({"app": self.app, "request": req}),
            )
            .await
    }
}

fn and_then_or() -> Value {
    json!([
        {"approvers": [{"id": "a"}, {"id": "b"}], "mode": "and"},
        {"approvers": [{"id": "c"}, {"id": "d"}], "mode": "or"},
    ])
}

fn all_delivered(reports: &[imbridge_tests::imbridge_host::sim::dingtalk::PushReport]) {
    assert!(!reports.is_empty());
    for r in reports {
        assert!(
            r.delivered,
            "push not accepted: {} -> {:?}",
            r.request.plaintext,
            r.attempts.last().map(|a| a.body_text())
        );
    }
}

#[tokio::test]
async fn and_then_or_is_decided_by_pushed_events() {
    let fx = fixture().await;
    // DingTalk checks the URL when it is saved.
    let check = fx.sim.check_url(APP_KEY, &fx.relay_url).await.unwrap();
    assert!(check.delivered, "{:?}", check.attempts);

    let a = fx.start("k-and-or", and_then_or()).await;
    assert_eq!(a["status"], "pending");
    let id = a["instance_id"].as_str().unwrap().to_string();
    {
        let s = fx.sim.state();
        let inst = &s.instances[&id];
        assert_eq!(inst.originator, "orig");
        assert_eq!(inst.nodes[0].action_type, "AND");
        assert_eq!(inst.nodes[1].action_type, "OR");
        assert_eq!(inst.cc, ["cc1"]);
        let text = inst.form_values[0]["value"].as_str().unwrap();
        assert!(text.contains("env: prod") && text.contains("https://engine/wf/42"));
    }
    // Creation's start events are acknowledged and change nothing.
    all_delivered(&fx.sim.flush_events().await);

    let asked = fx.sim.state().requests.len();
    all_delivered(&fx.sim.decide(&id, "a", true, "ok").await.unwrap());
    all_delivered(&fx.sim.decide(&id, "b", true, "").await.unwrap());
    // Handling a push asks DingTalk nothing (it must answer within 1.5 s).
    assert_eq!(fx.sim.state().requests.len(), asked);
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "pending");
    all_delivered(&fx.sim.decide(&id, "d", true, "go").await.unwrap());
    let got = fx.get(&id, false).await;
    let got = ok(&got);
    assert_eq!(got["status"], "approved");
    let users: Vec<&str> = got["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["a", "b", "d"]);
    // A second start with the same key is the same instance, not a second approval.
    let again = fx.start("k-and-or", and_then_or()).await;
    assert_eq!(again["instance_id"], id.as_str());
    assert_eq!(fx.sim.state().instances.len(), 1);
    // The form was created once.
    assert_eq!(fx.sim.calls("/v1.0/workflow/forms"), 1);
}

#[tokio::test]
async fn refusal_rejects() {
    let fx = fixture().await;
    let a = fx.start("k-refuse", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.discard_events();
    all_delivered(&fx.sim.decide(&id, "b", false, "no").await.unwrap());
    let got = fx.get(&id, false).await;
    assert_eq!(ok(&got)["status"], "rejected");
    assert_eq!(ok(&got)["decisions"][0]["comment"], "no");
}

/// An approver who adds a signer after themselves (加签) completes every node laid out at
/// start, but DingTalk waits for the added person, who may still refuse.
#[tokio::test]
async fn an_added_signer_keeps_the_approval_pending() {
    let fx = fixture().await;
    let nodes = json!([{"approvers": [{"id": "a"}, {"id": "b"}], "mode": "or"}]);
    let a = fx.start("k-add-sign", nodes).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.discard_events();
    all_delivered(&fx.sim.agree_adding_signer(&id, "a", "d").await.unwrap());
    let got = fx.get(&id, false).await;
    assert_eq!(ok(&got)["status"], "pending", "{got}");
    assert_eq!(ok(&got)["decisions"][0]["user"], "a");
    assert_eq!(ok(&fx.get(&id, true).await)["status"], "pending");
    all_delivered(&fx.sim.decide(&id, "d", false, "not today").await.unwrap());
    let got = fx.get(&id, false).await;
    assert_eq!(ok(&got)["status"], "rejected", "{got}");
    assert_eq!(fx.sim.state().instances[&id].result, "refuse");
}

/// A decision pushed after DingTalk answered the create but before the start saved its record
/// (here while the start's read-back is at DingTalk) is refused, so DingTalk pushes it again,
/// and a push after the start's commit records it. Before, it was acknowledged and dropped,
/// and the approval stayed pending in the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_decision_pushed_before_its_start_saved_is_taken_when_pushed_again() {
    let fx = fixture().await;
    let path = "/v1.0/workflow/processInstances";
    // The create goes through; the read-back waits and then fails, so that only the push can
    // tell the plugin of the refusal.
    let unavailable = Response::json(503, &json!({"code": "ServiceUnavailable"}));
    fx.sim.faults().fail_after(path, 1, 1, unavailable);
    fx.sim.set_delay(path, Some(Duration::from_millis(1500)));
    let (host, input) = (fx.h.host.clone(), fx.start_input("k-early", and_then_or()));
    let start =
        tokio::spawn(async move { host.invoke_json(TENANT, "start-approval", input).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while fx.sim.faults().delayed(path) < 2 {
        assert!(
            Instant::now() < deadline && !start.is_finished(),
            "no read-back reached DingTalk (a start over 5 s skips it)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let id = fx.sim.state().instances.keys().next().unwrap().clone();
    fx.sim.discard_events();
    let reports = fx.sim.decide(&id, "b", false, "no").await.unwrap();
    let first = reports[0].attempts[0].body_text();
    assert!(first.contains("still being started"), "{first}");

    let started = start.await.unwrap().unwrap();
    assert_eq!(ok(&started)["status"], "pending", "{started}");
    let refused: Vec<_> = reports.iter().filter(|r| !r.delivered).collect();
    assert!(!refused.is_empty(), "the push during the start was refused");
    for r in refused {
        ok(&fx.callback(&r.request).await);
    }
    let got = fx.get(&id, false).await;
    assert_eq!(ok(&got)["status"], "rejected", "{got}");
    assert_eq!(ok(&got)["decisions"][0]["comment"], "no");
}

#[tokio::test]
async fn revoke_in_the_app_cancels() {
    let fx = fixture().await;
    let a = fx.start("k-revoke", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    all_delivered(&fx.sim.revoke(&id).await.unwrap());
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "canceled");
}

#[tokio::test]
async fn polling_with_refresh_finds_the_outcome() {
    let fx = fixture().await;
    fx.sim.set_callback_url(APP_KEY, None);
    let a = fx.start("k-poll", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.decide(&id, "a", true, "").await.unwrap();
    fx.sim.decide(&id, "b", true, "").await.unwrap();
    assert_eq!(ok(&fx.get(&id, true).await)["status"], "pending");
    fx.sim.decide(&id, "c", true, "fine").await.unwrap();
    let got = fx.get(&id, true).await;
    let got = ok(&got);
    assert_eq!(got["status"], "approved");
    assert_eq!(got["decisions"].as_array().unwrap().len(), 3);

    // A revoke seen only by polling.
    let b = fx.start("k-poll-2", and_then_or()).await;
    let id2 = b["instance_id"].as_str().unwrap().to_string();
    fx.sim.revoke(&id2).await.unwrap();
    assert_eq!(ok(&fx.get(&id2, true).await)["status"], "canceled");
}

#[tokio::test]
async fn cancel_terminates_on_the_platform() {
    let fx = fixture().await;
    let a = fx.start("k-cancel", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    // Longer than the 1,024 characters DingTalk takes as a remark: sent cut, not refused.
    let reason = format!("workflow aborted: {}", "日志".repeat(600));
    let cancel = || {
        fx.h.invoke(
            TENANT,
            "cancel-approval",
            json!({"app": fx.app, "instance_id": id, "reason": reason}),
        )
    };
    // In an approval's first 15 s DingTalk refuses to withdraw it: a retryable refusal, and
    // the approval stays pending. Before, the refusal was final.
    let early = cancel().await;
    assert_eq!(err_kind(&early), "platform", "{early}");
    assert_eq!(early["err"]["retryable"], true, "{early}");
    assert!(err_message(&early).contains("first 15 s"), "{early}");
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "pending");
    assert_eq!(fx.sim.state().instances[&id].status, "RUNNING");
    // Fifteen seconds on.
    fx.sim.state().instances.get_mut(&id).unwrap().create_ms -= REVOKE_AFTER.as_millis() as u64;

    // A 200 that says the instance was not terminated is an error, and the approval stays
    // pending. Before, any 2xx marked it canceled for good while approvers could still decide.
    let terminate = "/v1.0/workflow/processInstances/terminate";
    fx.sim.faults().fail_next(
        terminate,
        1,
        Response::json(200, &json!({"success": true, "result": false})),
    );
    let refused = cancel().await;
    assert_eq!(err_kind(&refused), "platform", "{refused}");
    assert!(
        err_message(&refused).contains("did not terminate"),
        "{refused}"
    );
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "pending");
    assert_eq!(fx.sim.state().instances[&id].status, "RUNNING");

    let c = cancel().await;
    assert_eq!(ok(&c)["status"], "canceled");
    assert_eq!(fx.sim.state().instances[&id].status, "TERMINATED");
    let body: Value = serde_json::from_slice(
        &fx.sim
            .state()
            .requests
            .iter()
            .rev()
            .find(|r| r.path == "/v1.0/workflow/processInstances/terminate")
            .unwrap()
            .body,
    )
    .unwrap();
    let remark = body["remark"].as_str().unwrap();
    assert!(reason.starts_with(remark) && remark.chars().count() == 1024);
    assert_eq!(body["isSystem"], true);
    // The platform's terminate event arrives afterwards and is acknowledged.
    all_delivered(&fx.sim.flush_events().await);
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "canceled");
}

/// An approval decided on DingTalk whose callback has not arrived: DingTalk refuses to
/// withdraw it, and the cancel answers with how it ended instead of an error.
#[tokio::test]
async fn cancelling_an_approval_that_ended_unseen_returns_how_it_ended() {
    let fx = fixture().await;
    let a = fx.start("k-ended", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.state().instances.get_mut(&id).unwrap().create_ms -= REVOKE_AFTER.as_millis() as u64;
    fx.sim.set_callback_url(APP_KEY, None);
    fx.sim.decide(&id, "a", false, "no").await.unwrap();
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "pending");
    let terminate = "/v1.0/workflow/processInstances/terminate";
    let tried = fx.sim.calls(terminate);
    let c =
        fx.h.invoke(
            TENANT,
            "cancel-approval",
            json!({"app": fx.app, "instance_id": id, "reason": null}),
        )
        .await;
    assert_eq!(ok(&c)["status"], "rejected", "{c}");
    assert_eq!(ok(&c)["decisions"][0]["user"], "a", "{c}");
    assert_eq!(fx.sim.calls(terminate), tried + 1, "it did ask");
    assert_eq!(fx.sim.state().instances[&id].status, "COMPLETED");
    assert_eq!(ok(&fx.get(&id, false).await)["status"], "rejected");
}

#[tokio::test]
async fn duplicate_push_changes_nothing() {
    let fx = fixture().await;
    let a = fx.start("k-dup", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.discard_events();
    let reports = fx.sim.decide(&id, "a", true, "").await.unwrap();
    all_delivered(&reports);
    let before = fx.h.kv_dump(TENANT);
    // DingTalk retries with the same bytes: still answered with "success", but no update.
    let again = fx
        .sim
        .send(APP_KEY, &fx.relay_url, reports[0].request.clone())
        .await
        .unwrap();
    assert!(again.delivered);
    let direct = fx.callback(&reports[0].request).await;
    assert_eq!(ok(&direct)["updates"], json!([]));
    assert_eq!(fx.h.kv_dump(TENANT), before);
}

#[tokio::test]
async fn robot_with_signing_and_work_notice() {
    let fx = fixture().await;
    let hook = |token: &str, secret: Option<&str>| {
        json!({"webhook": {"platform": "dingtalk",
            "url": format!("{}/robot/send?access_token={token}", fx.sim.base_url()),
            "secret": secret}})
    };
    let note = |target: Value, link: Option<Value>| {
        json!({"target": target, "title": "Deploy failed", "markdown": "**wf 42** failed",
            "level": "failure", "link": link,
            "mentions": [{"mobile": "13800000001"}, {"id": "b"}], "mention_all": false})
    };
    let r =
        fx.h.invoke(
            TENANT,
            "notify",
            json!({"app": null, "notification": note(hook("signed", Some("SECtest")), None)}),
        )
        .await;
    ok(&r);
    let r =
        fx.h.invoke(
            TENANT,
            "notify",
            json!({"app": null, "notification": note(hook("plain", None),
                Some(json!({"text": "Open", "url": "https://engine/wf/42"})))}),
        )
        .await;
    ok(&r);
    {
        let s = fx.sim.state();
        assert_eq!(s.robot_messages.len(), 2);
        let m = &s.robot_messages[0];
        assert_eq!(m.errcode, 0);
        assert_eq!(m.body["msgtype"], "markdown");
        assert_eq!(m.body["at"]["atMobiles"], json!(["13800000001"]));
        assert!(
            m.body["markdown"]["text"]
                .as_str()
                .unwrap()
                .contains("@13800000001")
        );
        // With a link and mentions: markdown, where DingTalk's `at` works, the link in the text.
        let m = &s.robot_messages[1];
        assert_eq!(
            (m.errcode, m.body["msgtype"].as_str()),
            (0, Some("markdown"))
        );
        assert!(
            m.body["markdown"]["text"]
                .as_str()
                .unwrap()
                .contains("[Open](https://engine/wf/42)")
        );
    }
    // A wrong secret is refused by the simulator's 加签 check: a typed platform error.
    let r =
        fx.h.invoke(
            TENANT,
            "notify",
            json!({"app": null, "notification": note(hook("signed", Some("SECwrong")), None)}),
        )
        .await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["code"], 310000);

    // Work notification to users (one by mobile).
    let r =
        fx.h.invoke(
            TENANT,
            "notify",
            json!({"app": fx.app, "notification": note(
                json!({"users": [{"id": "a"}, {"mobile": "13800000003"}]}), None)}),
        )
        .await;
    let receipt = ok(&r);
    let s = fx.sim.state();
    assert_eq!(s.notices.len(), 1);
    assert_eq!(s.notices[0].userids, ["a", "c"]);
    assert_eq!(
        receipt["message_id"],
        s.notices[0].task_id.to_string().as_str()
    );
}

#[tokio::test]
async fn bad_callbacks_are_typed_errors_and_change_nothing() {
    let fx = fixture().await;
    let a = fx.start("k-bad", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    fx.sim.discard_events();
    let sim_app_key = |owner: &str| {
        let aes = fx.app["encrypt_key"].as_str().unwrap().to_string();
        let ev = json!({"EventType": "bpms_instance_change", "processInstanceId": id,
            "type": "finish", "result": "agree"});
        crypto::encrypt(&aes, ev.to_string().as_bytes(), owner)
    };
    let aes = fx.app["encrypt_key"].as_str().unwrap().to_string();
    let now = now_ms();
    let good = fx
        .sim
        .build_raw_push(APP_KEY, &sim_app_key(APP_KEY), now)
        .unwrap();

    let mut cases: Vec<(&str, PushRequest, &str)> = Vec::new();
    cases.push((
        "bad base64",
        fx.sim
            .build_raw_push(APP_KEY, "%%%not-base64%%%", now)
            .unwrap(),
        "invalid-input",
    ));
    // A 32-byte block whose last byte (0) is not valid PKCS#7.
    cases.push((
        "wrong padding",
        fx.sim
            .build_raw_push(APP_KEY, &crypto::encrypt_raw(&aes, &[0u8; 32]), now)
            .unwrap(),
        "invalid-input",
    ));
    let mut wrong_sig = good.clone();
    wrong_sig.query = wrong_sig.query.replacen("signature=", "signature=0", 1);
    cases.push(("wrong signature", wrong_sig, "unauthorized"));
    cases.push((
        "stale timestamp",
        fx.sim
            .build_raw_push(APP_KEY, &sim_app_key(APP_KEY), now - 3_600_000)
            .unwrap(),
        "unauthorized",
    ));
    cases.push((
        "wrong owner key",
        fx.sim
            .build_raw_push(APP_KEY, &sim_app_key("another-app"), now)
            .unwrap(),
        // The same answer as any unreadable ciphertext (no padding oracle).
        "invalid-input",
    ));
    cases.push((
        "non-JSON plaintext",
        fx.sim
            .build_raw_push(
                APP_KEY,
                &crypto::encrypt(&aes, b"<xml>not json</xml>", APP_KEY),
                now,
            )
            .unwrap(),
        "invalid-input",
    ));
    let mut oversized = good.clone();
    oversized.body = vec![b' '; 2 << 20];
    cases.push(("oversized body", oversized, "invalid-input"));

    let before = fx.h.kv_dump(TENANT);
    for (name, push, want) in &cases {
        let r = fx.callback(push).await;
        assert_eq!(&err_kind(&r), want, "{name}: {r}");
        assert_eq!(fx.h.kv_dump(TENANT), before, "{name} changed state");
    }
    // Missing credentials: no token / no aes key configured.
    for field in ["token", "encrypt_key"] {
        let mut app = fx.app.clone();
        app[field] = Value::Null;
        let req = http_request("POST", &good.query, &[], &good.body);
        let r =
            fx.h.invoke(
                TENANT,
                "handle-callback",
                json!({"app": app, "request": req}),
            )
            .await;
        assert_eq!(err_kind(&r), "invalid-config", "{field}");
    }
    assert_eq!(fx.h.kv_dump(TENANT), before);
    // The untampered push is still accepted afterwards.
    let r = fx.callback(&good).await;
    assert_eq!(ok(&r)["updates"][0]["status"], "approved");
}

#[tokio::test]
async fn platform_and_transport_errors_are_typed() {
    let fx = fixture().await;
    let a = fx.start("k-err", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    let before = fx.h.kv_dump(TENANT);

    // An error code the plugin has never heard of.
    fx.sim.fail_next(
        "/v1.0/workflow/processInstances",
        1,
        400,
        json!({"code": "Brand.NewError", "message": "something new", "requestid": "x"}),
    );
    let r = fx.get(&id, true).await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["retryable"], false);
    assert!(err_message(&r).contains("Brand.NewError"));
    // Throttling is retryable (the plugin's own three attempts all throttled).
    fx.sim.clear_faults();
    fx.sim.fail_next(
        "/v1.0/workflow/processInstances",
        3,
        403,
        json!({"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
               "message": "The request has exceeded the QPS limit"}),
    );
    let r = fx.get(&id, true).await;
    assert_eq!(err_kind(&r), "platform");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    let path = "/v1.0/workflow/processInstances";
    let faults = {
        let f = fx.sim.faults();
        (f.served(path), f.pending(path))
    };
    assert_eq!(faults, (3, 0));
    assert_eq!(fx.h.kv_dump(TENANT), before);

    // Nothing listening: a transport error. (A hanging platform would take the plugin's
    // 10 s HTTP timeout to surface, too slow for this suite, so it is not exercised here.)
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let h2 = Harness::new(&[TENANT], &[format!("127.0.0.1:{port}")])
        .await
        .unwrap();
    let mut app = fx.app.clone();
    app["api_base"] = json!(format!("http://127.0.0.1:{port}"));
    let r = h2
        .invoke(
            TENANT,
            "start-approval",
            json!({"app": app, "request": {"key": "k", "title": "t",
                "initiator": {"id": "orig"}, "nodes": [{"approvers": [{"id": "a"}], "mode": "and"}]}}),
        )
        .await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    // Refused before anything was sent: the engine is told so.
    assert!(
        err_message(&r).ends_with("connection refused (not sent)"),
        "{r}"
    );

    // Missing credentials.
    let mut app = fx.app.clone();
    app["app_secret"] = json!("");
    let r =
        fx.h.invoke(
            TENANT,
            "get-approval",
            json!({"app": app, "instance_id": id, "refresh": true}),
        )
        .await;
    assert_eq!(err_kind(&r), "invalid-config");
    assert_eq!(fx.h.kv_dump(TENANT), before);
}

/// A form deleted in DingTalk's console heals: the start it refuses is retryable and the
/// retry makes the form again. A refusal for another reason keeps the form.
#[tokio::test]
async fn a_deleted_form_is_made_again() {
    let fx = fixture().await;
    let start = |key: &str, approver: &str| {
        let req = json!({"app": fx.app, "request": {
            "key": key, "title": "Deploy", "initiator": {"id": "orig"},
            "nodes": [{"approvers": [{"id": approver}], "mode": "and"}],
        }});
        fx.h.invoke(TENANT, "start-approval", req)
    };
    ok(&start("k1", "a").await);
    let forms = || fx.sim.state().forms.keys().cloned().collect::<Vec<_>>();
    let first = forms();
    assert_eq!(first.len(), 1);

    // Refused for an unknown approver: the form exists, so the refusal stands and the form
    // is kept.
    let r = start("k2", "nobody").await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], false, "{r}");
    assert!(!err_message(&r).contains("gone"), "{r}");
    assert_eq!(forms(), first);
    let checks = || {
        let state = fx.sim.state();
        let schema = "/v1.0/workflow/forms/schemas/processCodes";
        state.requests.iter().filter(|r| r.path == schema).count()
    };
    assert_eq!(
        checks(),
        1,
        "the refusal asked whether the form is gone: {r}"
    );

    fx.sim.state().forms.clear();
    let r = start("k3", "a").await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    assert!(
        err_message(&r)
            .ends_with("the form it used is gone from the platform, a retry makes it again"),
        "{r}"
    );
    assert!(forms().is_empty(), "nothing made before the retry");
    let id = ok(&start("k3", "a").await)["instance_id"].clone();
    let second = forms();
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    let state = fx.sim.state();
    assert_eq!(
        state.instances[id.as_str().unwrap()].process_code,
        second[0]
    );
}

/// wechatpy's WX crypto (PrpCrypto, with the AppKey as receive id) produces a push the
/// plugin must accept, and opens the plugin's encrypted "success".
#[tokio::test]
async fn interop_with_wechatpy() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/dingtalk_callback.py");
    // Fails, never skips, without the SDK: the only check of DingTalk's callback crypto and
    // encrypted reply by code no one on this project wrote.
    let probe = std::process::Command::new("python3")
        .args(["-c", "import wechatpy"])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with wechatpy is missing; {}",
        imbridge_host::sim::INTEROP_SDKS
    );
    let fx = fixture().await;
    let a = fx.start("k-interop", and_then_or()).await;
    let id = a["instance_id"].as_str().unwrap().to_string();
    let creds = [
        "--token",
        fx.app["token"].as_str().unwrap(),
        "--aes-key",
        fx.app["encrypt_key"].as_str().unwrap(),
        "--app-key",
        APP_KEY,
    ];
    let ev = json!({"EventType": "bpms_instance_change", "processInstanceId": id,
        "type": "finish", "result": "refuse", "staffId": "orig"})
    .to_string();
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("produce")
        .args(creds)
        .args(["--event", &ev])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let produced: Value = serde_json::from_slice(&out.stdout).unwrap();
    let push = PushRequest {
        query: produced["query"].as_str().unwrap().into(),
        body: produced["body"].as_str().unwrap().as_bytes().to_vec(),
        plaintext: ev,
    };
    let r = fx.callback(&push).await;
    let outcome = ok(&r);
    assert_eq!(outcome["updates"][0]["status"], "rejected");
    let reply = outcome["response"]["body"].as_str().unwrap();
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("open-reply")
        .args(creds)
        .args(["--reply", reply])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(opened["signature_ok"], true, "{opened}");
    assert_eq!(opened["plaintext"], "success", "{opened}");
    // The same reply addressed to another AppKey is refused by wechatpy too.
    let mut other = creds.to_vec();
    other[5] = "someone-else";
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("open-reply")
        .args(&other)
        .args(["--reply", reply])
        .output()
        .unwrap();
    let opened: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(opened["plaintext"].is_null(), "{opened}");
}
