//! No secret ever reaches the host's output: `imbridge-host urls` and `serve` run as the real
//! binary, with the real component, against the three simulators; callbacks (genuine and
//! forged), engine API calls, a refused webhook and platform errors go through it, and then
//! its stdout, its log (stderr) and every HTTP answer it gave are searched for each app
//! secret, encrypt key, verification token, issued access token, webhook token and the API
//! bearer token. Fails, saying so, until the component has been built.

mod replica;

use imbridge_host::sim::dingtalk::{DingtalkApp, DingtalkConfig, DingtalkSim, DingtalkUser};
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::http::{self, Reply};
use imbridge_host::sim::wecom::{WecomApp, WecomConfig, WecomSim, WecomUser};
use replica::{Replica, component};
use serde_json::{Value, json};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_imbridge-host");
const API_TOKEN: &str = "bearer-s3cret-api-token";
const HOOK_TOKEN: &str = "hook-access-token-s3cret";
const HOOK_SECRET: &str = "SEChook-signing-s3cret";
const ENGINE_HOOK_SECRET: &str = "engine-webhook-s3cret";

async fn api(base: &str, method: &str, path: &str, body: Value, bearer: bool) -> Reply {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if bearer {
        headers.push(("authorization".into(), format!("Bearer {API_TOKEN}")));
    }
    let url = format!("{base}{path}");
    match method {
        "GET" => http::get_with(&url, &headers, Duration::from_secs(40)).await,
        _ => {
            http::post(
                &url,
                &headers,
                body.to_string().into_bytes(),
                Duration::from_secs(40),
            )
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_errors_or_urls() {
    let wasm = component();
    let dir = tempfile::tempdir().unwrap();

    let mut fa = FeishuApp::new("cli_secrets", "feishu-app-s3cret");
    fa.encrypt_key = Some("feishu-encrypt-key-s3cret".into());
    fa.verification_token = "feishu-verification-s3cret".into();
    let feishu = FeishuSim::start(FeishuConfig {
        apps: vec![fa.clone()],
        users: ["alice", "bob"].into_iter().map(FeishuUser::new).collect(),
        ..FeishuConfig::default()
    })
    .await
    .unwrap();
    let wa = WecomApp::new("wwsecrets1", "wecom-app-s3cret", 1000002);
    let wecom = WecomSim::start(WecomConfig {
        apps: vec![wa.clone()],
        users: vec![WecomUser::new("u1")],
        ..Default::default()
    })
    .await
    .unwrap();
    let da = DingtalkApp::new("dingsecrets");
    let dingtalk = DingtalkSim::start(DingtalkConfig {
        apps: vec![da.clone()],
        users: vec![DingtalkUser::new("a", None)],
        ..Default::default()
    })
    .await
    .unwrap();

    let authority = |base: String| base.trim_start_matches("http://").to_string();
    let config = json!({
        "listen": "127.0.0.1:0",
        "public_url": "https://ci.example.com",
        "state_dir": dir.path().join("state"),
        "component": wasm,
        "api_token": API_TOKEN,
        "tenants": [{
            "id": "acme",
            // Refused connections: every delivery fails and is logged.
            "engine_webhook": "http://127.0.0.1:1/imbridge",
            "engine_webhook_secret": ENGINE_HOOK_SECRET,
            "allow_hosts": [authority(feishu.base_url()), authority(wecom.base_url()),
                            authority(dingtalk.base_url())],
            "apps": [
                {"id": "fs", "platform": "feishu", "app_id": fa.app_id, "app_secret": fa.app_secret,
                 "encrypt_key": fa.encrypt_key, "token": fa.verification_token,
                 "api_base": feishu.base_url()},
                {"id": "wa", "platform": "wecom", "app_id": wa.corp_id, "app_secret": wa.secret,
                 "agent_id": wa.agent_id.to_string(), "encrypt_key": wa.encoding_aes_key,
                 "token": wa.token, "api_base": wecom.base_url()},
                {"id": "dt", "platform": "dingtalk", "app_id": da.app_key,
                 "app_secret": da.app_secret, "agent_id": da.agent_id.to_string(),
                 "encrypt_key": da.aes_key, "token": da.token, "api_base": dingtalk.base_url()},
            ],
        }],
    });
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();

    // `urls`: the addresses to paste into the consoles, and nothing else.
    let urls = Command::new(BIN)
        .args(["urls", "--config"])
        .arg(&config_path)
        .output()
        .expect("run urls");
    assert!(urls.status.success());
    let urls_out =
        String::from_utf8_lossy(&urls.stdout).into_owned() + &String::from_utf8_lossy(&urls.stderr);
    assert!(
        urls_out.contains("https://ci.example.com/callback/acme/fs"),
        "{urls_out}"
    );

    let mut served = Replica::spawn("serve", &config_path);
    let base = served.base.clone();
    let mut answers: Vec<Reply> = Vec::new();

    // Genuine traffic: handshakes of all three platforms, an approval through its decision.
    let cb = |app: &str| format!("{base}/callback/acme/{app}");
    let v = feishu
        .url_verification(&fa.app_id, &cb("fs"))
        .await
        .unwrap();
    assert!(v.echoed, "{v:?}");
    answers.push(v.reply.clone());
    let check = wecom.url_check(wa.agent_id, &cb("wa")).await.unwrap();
    assert!(check.verified, "{check:?}");
    answers.push(check.reply.clone());
    let check = dingtalk.check_url(&da.app_key, &cb("dt")).await.unwrap();
    assert!(check.delivered, "{check:?}");
    feishu.set_callback_url(&fa.app_id, Some(&cb("fs")));
    let started = api(
        &base,
        "POST",
        "/api/acme/fs/approvals",
        json!({"key": "wf-1", "title": "Deploy?", "initiator": {"id": "ou_alice"},
               "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}),
        true,
    )
    .await;
    let reply: Value = serde_json::from_slice(&started.body).unwrap();
    let refresh = async |id: &str| {
        let path = format!("/api/acme/fs/approvals/{id}?refresh=true");
        api(&base, "GET", &path, json!({}), true).await
    };
    let instance = reply["ok"]["instance_id"]
        .as_str()
        .expect("started")
        .to_string();
    answers.push(started);
    let decided = feishu
        .decide(&instance, "ou_bob", true, None)
        .await
        .unwrap();
    assert!(!decided.reports.is_empty(), "the decision pushed nothing");
    assert!(decided.reports.iter().all(|r| r.delivered), "{decided:?}");
    answers.push(refresh(&instance).await);

    // Hostile and failing traffic: forged callbacks, no bearer token, a webhook whose host is
    // not allowed (its URL carries the hook's token), a platform error on refresh.
    answers.push(
        http::post(
            &cb("fs"),
            &[
                ("X-Lark-Signature".into(), "00".into()),
                ("X-Lark-Request-Timestamp".into(), "1".into()),
                ("X-Lark-Request-Nonce".into(), "n".into()),
            ],
            br#"{"encrypt":"AAAA"}"#.to_vec(),
            Duration::from_secs(10),
        )
        .await,
    );
    answers.push(
        http::get(
            &format!(
                "{}?msg_signature=00&timestamp=1&nonce=n&echostr=AAAA",
                cb("wa")
            ),
            Duration::from_secs(10),
        )
        .await,
    );
    answers.push(
        http::post(
            &format!("{}?signature=00&timestamp=1&nonce=n", cb("dt")),
            &[],
            br#"{"encrypt":"AAAA"}"#.to_vec(),
            Duration::from_secs(10),
        )
        .await,
    );
    answers.push(api(&base, "POST", "/api/acme/fs/approvals", json!({}), false).await);
    let hook = api(
        &base,
        "POST",
        "/api/acme/notify",
        json!({"notification": {"target": {"webhook": {"platform": "dingtalk",
            "url": format!("https://hooks.example.invalid/robot/send?access_token={HOOK_TOKEN}"),
            "secret": HOOK_SECRET}}, "title": "t", "markdown": "m", "level": "info"}}),
        true,
    )
    .await;
    let hook_reply: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(hook_reply["err"]["kind"], "transport", "{hook_reply}");
    answers.push(hook);
    feishu.fail_next(
        &format!("/open-apis/approval/v4/instances/{instance}"),
        3,
        400,
        99991672,
        "no permission",
    );
    answers.push(refresh(&instance).await);
    served.kill();

    // Every secret, including the access tokens the simulators issued during the run.
    let mut secrets: Vec<String> = vec![
        API_TOKEN.into(),
        HOOK_TOKEN.into(),
        HOOK_SECRET.into(),
        ENGINE_HOOK_SECRET.into(),
        fa.app_secret.clone(),
        fa.encrypt_key.clone().unwrap(),
        fa.verification_token.clone(),
        wa.secret.clone(),
        wa.encoding_aes_key.clone(),
        wa.token.clone(),
        da.app_secret.clone(),
        da.aes_key.clone(),
        da.token.clone(),
    ];
    for r in &feishu.state().requests {
        for (k, v) in &r.headers {
            if k.eq_ignore_ascii_case("authorization") {
                secrets.push(v.trim_start_matches("Bearer ").to_string());
            }
        }
    }
    secrets.extend(
        wecom
            .state()
            .requests
            .iter()
            .filter_map(|r| r.access_token.clone()),
    );
    assert!(secrets.len() > 12, "the run used access tokens");
    let log = served.log_text();
    assert!(
        log.contains("tenant=acme call=handle-callback"),
        "the log has per-call lines: {log}"
    );
    assert!(
        log.contains("http denied host=hooks.example.invalid"),
        "{log}"
    );
    let answered: String = answers
        .iter()
        .map(|a| format!("{:?} {}\n", a.status, String::from_utf8_lossy(&a.body)))
        .collect();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        for (what, text) in [
            ("urls output", &urls_out),
            ("host log", &log),
            ("HTTP answers", &answered),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret appears in the {what}:\n{text}"
            );
        }
    }
}
