//! `imbridge-host demo`: approvals and notifications end to end through the sandboxed plugin,
//! against the simulators on loopback: callbacks arriving over HTTP exactly as the platforms
//! send them, and one app in persistent mode (DingTalk Stream) whose events come over the
//! WebSocket the host opens.

use crate::config::Config;
use crate::persistent::Options;
use crate::server::serve_with_persistent;
use crate::sim::dingtalk::{DingtalkApp, DingtalkConfig, DingtalkSim, DingtalkUser, Robot};
use crate::sim::dingtalk_stream::DingtalkStreamSim;
use crate::sim::feishu::{BotHook, FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use crate::sim::wecom::{WecomApp, WecomConfig, WecomSim, WecomUser};
use crate::{Host, HostConfig, TenantPolicy};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Polls `done` until it holds (the persistent connection works in the background).
async fn wait_for(what: &str, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Starts an approval for tenant acme through `app`; returns the instance id.
async fn start_approval(host: &Host, app: &Value, request: Value) -> Result<String> {
    let start = json!({"app": app, "request": request});
    let approval = ok(host.invoke_json("acme", "start-approval", start).await?)?;
    approval["instance_id"]
        .as_str()
        .map(String::from)
        .context("start-approval returned no instance id")
}

fn ok(reply: Value) -> Result<Value> {
    match reply.get("ok") {
        Some(v) => Ok(v.clone()),
        None => bail!("plugin returned {reply}"),
    }
}

pub async fn run(component: &Path) -> Result<()> {
    let state = std::env::temp_dir().join(format!("imbridge-demo-{}", std::process::id()));
    let result = run_in(component, &state).await;
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn run_in(component: &Path, state: &Path) -> Result<()> {
    println!("imbridge demo: approvals and notifications through the sandboxed plugin");
    println!("component: {}", component.display());

    let mut acme = FeishuApp::new("cli_acme", "acme-secret");
    acme.encrypt_key = Some("acme-encrypt-key".into());
    acme.verification_token = "acme-verification-token".into();
    let mut globex = FeishuApp::new("cli_globex", "globex-secret");
    globex.encrypt_key = Some("globex-encrypt-key".into());
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![acme, globex],
        users: ["alice", "bob", "carol", "dave"]
            .into_iter()
            .map(FeishuUser::new)
            .collect(),
        hooks: vec![BotHook {
            token: "ops-room".into(),
            secret: Some("hook-secret".into()),
            keywords: vec![],
        }],
        ..FeishuConfig::default()
    })
    .await?;
    let sim_base = sim.base_url();

    let ding_app = DingtalkApp::new("dingacme");
    let stream_app = DingtalkApp::new("dingstream");
    let ding = DingtalkSim::start(DingtalkConfig {
        apps: vec![ding_app.clone(), stream_app.clone()],
        users: [
            ("alice", "13800000000"),
            ("bob", "13800000001"),
            ("carol", "13800000002"),
        ]
        .iter()
        .map(|(u, m)| DingtalkUser::new(u, Some(m)))
        .collect(),
        robots: vec![Robot {
            access_token: "ops".into(),
            secret: Some("SECdemo".into()),
        }],
        ..DingtalkConfig::default()
    })
    .await?;
    let wecom_app = WecomApp::new("wwacme", "wecom-secret", 1000002);
    let wecom = WecomSim::start(WecomConfig {
        apps: vec![wecom_app.clone()],
        users: ["alice", "bob", "carol"]
            .into_iter()
            .map(WecomUser::new)
            .collect(),
        robot_keys: vec!["ops".into()],
        ..WecomConfig::default()
    })
    .await?;
    // DingTalk's Stream gateway; the `dingstream` app's events go there instead of to a
    // callback address.
    let stream = DingtalkStreamSim::start(&[(&stream_app.app_key, &stream_app.app_secret)]).await?;
    stream.attach(&ding, &stream_app.app_key);
    let ding_base = ding.base_url();
    let wecom_base = wecom.base_url();
    let allow: Vec<String> = [&sim_base, &ding_base, &wecom_base]
        .iter()
        .map(|b| b.trim_start_matches("http://").to_string())
        .collect();

    step(1, "Load the same plugin file for two tenants");
    let host = Host::new(HostConfig::new(state))?;
    let policy = TenantPolicy {
        allow_hosts: allow.clone(),
    };
    for t in ["acme", "globex"] {
        host.load_tenant(t, component, policy.clone()).await?;
    }
    let acme_app = json!({"id": "feishu", "platform": "feishu", "app_id": "cli_acme",
        "app_secret": "acme-secret", "encrypt_key": "acme-encrypt-key",
        "token": "acme-verification-token", "api_base": sim_base});
    let globex_app = json!({"id": "feishu", "platform": "feishu", "app_id": "cli_globex",
        "app_secret": "globex-secret", "encrypt_key": "globex-encrypt-key",
        "api_base": sim_base});
    let ding_json = json!({"id": "dingtalk", "platform": "dingtalk", "app_id": ding_app.app_key,
        "app_secret": ding_app.app_secret, "agent_id": ding_app.agent_id.to_string(),
        "encrypt_key": ding_app.aes_key, "token": ding_app.token, "api_base": ding_base});
    let stream_json = json!({"id": "dingtalk-stream", "platform": "dingtalk",
        "app_id": stream_app.app_key, "app_secret": stream_app.app_secret,
        "agent_id": stream_app.agent_id.to_string(), "api_base": ding_base});
    let wecom_json = json!({"id": "wecom", "platform": "wecom", "app_id": wecom_app.corp_id,
        "app_secret": wecom_app.secret, "agent_id": wecom_app.agent_id.to_string(),
        "encrypt_key": wecom_app.encoding_aes_key, "token": wecom_app.token,
        "api_base": wecom_base});
    // Host-only keys: events over a connection the host opens, and where to ask for it (the
    // simulated gateway instead of api.dingtalk.com).
    let mut stream_cfg = stream_json.clone();
    stream_cfg["callback"] = json!("persistent");
    stream_cfg["endpoint_base"] = json!(stream.base_url());
    let cfg = json!({"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": state, "tenants": [
            {"id": "acme", "allow_hosts": allow, "apps": [acme_app, ding_json, wecom_json,
                stream_cfg]},
            {"id": "globex", "allow_hosts": allow, "apps": [globex_app]}]});
    let cfg = Config::parse(&cfg.to_string(), state)?;
    let server =
        serve_with_persistent(host.clone(), cfg.serve, cfg.persistent, Options::default()).await?;
    let url = format!("http://{}/callback/acme/feishu", server.addr());
    println!(
        "    tenants loaded: acme, globex; callback server on {}",
        server.addr()
    );
    println!("    request address for acme's Feishu app: {url}");

    step(
        2,
        "Feishu checks the request address (encrypted url_verification)",
    );
    sim.set_callback_url("cli_acme", Some(&url));
    let v = sim.url_verification("cli_acme", &url).await?;
    println!(
        "    challenge echoed: {}  (HTTP {})",
        v.echoed,
        v.reply.status.unwrap_or(0)
    );
    if !v.echoed {
        bail!("url_verification failed: {:?}", v.reply);
    }

    step(3, "Notify the ops group through a signed bot webhook");
    let hook = format!("{sim_base}/open-apis/bot/v2/hook/ops-room");
    let note = json!({"app": null, "notification": {
        "target": {"webhook": {"platform": "feishu", "url": hook, "secret": "hook-secret"}},
        "title": "Workflow #42 is waiting for approval", "level": "warning",
        "markdown": "**release-42** wants to deploy to **prod**",
        "link": {"text": "Open workflow", "url": "https://ci.example.com/wf/42"},
        "mentions": [{"id": "ou_bob"}], "mention_all": false}});
    ok(host.invoke_json("acme", "notify", note).await?)?;
    {
        let st = sim.state();
        let m = st.bot_messages.last().context("no bot message")?;
        println!(
            "    Feishu accepted the card (code {}, signature verified), header colour {}",
            m.code, m.body["card"]["header"]["template"]
        );
    }

    step(4, "Start an approval: bob AND carol, then dave OR alice");
    let request = json!({"key": "wf-42/deploy-prod", "title": "Deploy release-42 to prod?",
        "initiator": {"email": "alice@example.com"},
        "nodes": [
            {"approvers": [{"id": "ou_bob"}, {"email": "carol@example.com"}], "mode": "and"},
            {"approvers": [{"id": "ou_dave"}, {"id": "ou_alice"}], "mode": "or"}],
        "cc": [], "fields": [["workflow", "release-42"], ["environment", "prod"]],
        "detail_url": "https://ci.example.com/wf/42"});
    let start = json!({"app": acme_app, "request": request});
    let approval = ok(host
        .invoke_json("acme", "start-approval", start.clone())
        .await?)?;
    let id = approval["instance_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("    instance {id}: {}", approval["status"]);
    let again = ok(host.invoke_json("acme", "start-approval", start).await?)?;
    println!(
        "    retrying the same key returns the same instance: {}",
        again["instance_id"] == approval["instance_id"]
    );

    step(
        5,
        "Approvers decide in Feishu; Feishu pushes encrypted, signed events",
    );
    let get = json!({"app": acme_app, "instance_id": id, "refresh": false});
    for who in ["ou_bob", "ou_carol", "ou_dave"] {
        let d = sim.decide(&id, who, true, Some("looks good")).await?;
        let delivered = d.reports.iter().filter(|r| r.delivered).count();
        let now = ok(host
            .invoke_json("acme", "get-approval", get.clone())
            .await?)?;
        println!(
            "    {who} approves -> {delivered}/{} pushes answered 200 -> approval is {}",
            d.reports.len(),
            now["status"]
        );
    }
    let last = ok(host.invoke_json("acme", "get-approval", get).await?)?;
    if last["status"] != "approved" {
        bail!("expected approved, got {last}");
    }
    let who: Vec<&str> = last["decisions"]
        .as_array()
        .map(|d| d.iter().filter_map(|x| x["user"].as_str()).collect())
        .unwrap_or_default();
    println!("    decisions recorded: {}", who.join(", "));

    step(
        6,
        "Tenant isolation: globex runs the same plugin with other credentials",
    );
    let peek = json!({"app": globex_app, "instance_id": id, "refresh": false});
    let r = host.invoke_json("globex", "get-approval", peek).await?;
    println!(
        "    globex asks for acme's instance -> {}: {}",
        r["err"]["kind"], r["err"]["message"]
    );
    if r.get("ok").is_some() {
        bail!("globex could see acme's approval");
    }

    let addr = server.addr();
    step(
        7,
        "DingTalk: signed robot message, then an approval decided by encrypted pushes",
    );
    let robot = format!("{ding_base}/robot/send?access_token=ops");
    let note = json!({"app": null, "notification": {
        "target": {"webhook": {"platform": "dingtalk", "url": robot, "secret": "SECdemo"}},
        "title": "Workflow #43 is waiting for approval", "level": "info",
        "markdown": "**release-43** wants to deploy", "link": null,
        "mentions": [], "mention_all": false}});
    ok(host.invoke_json("acme", "notify", note).await?)?;
    println!(
        "    DingTalk accepted the robot message (加签 verified): errcode {}",
        ding.state()
            .robot_messages
            .last()
            .map(|m| m.errcode)
            .unwrap_or(-1)
    );
    ding.set_callback_url(
        &ding_app.app_key,
        Some(&format!("http://{addr}/callback/acme/dingtalk")),
    );
    let request = json!({"key": "wf-43/deploy", "title": "Deploy release-43?",
        "initiator": {"mobile": "+86 138 0000 0000"},
        "nodes": [{"approvers": [{"id": "bob"}, {"id": "carol"}], "mode": "and"}],
        "cc": [], "fields": [["workflow", "release-43"]]});
    let id = start_approval(&host, &ding_json, request).await?;
    let get = json!({"app": ding_json, "instance_id": id, "refresh": false});
    for who in ["bob", "carol"] {
        let reports = ding.decide(&id, who, true, "ok").await?;
        let delivered = reports.iter().filter(|r| r.delivered).count();
        let now = ok(host
            .invoke_json("acme", "get-approval", get.clone())
            .await?)?;
        println!(
            "    {who} agrees -> {delivered}/{} pushes answered with an encrypted \"success\" -> {}",
            reports.len(),
            now["status"]
        );
    }
    let last = ok(host.invoke_json("acme", "get-approval", get).await?)?;
    if last["status"] != "approved" {
        bail!("expected the DingTalk approval to be approved, got {last}");
    }

    step(
        8,
        "WeCom: URL check, robot markdown, then an approval decided by encrypted XML",
    );
    let url = format!("http://{addr}/callback/acme/wecom");
    let check = wecom.url_check(wecom_app.agent_id, &url).await?;
    println!(
        "    GET URL verification answered with the bare echostr: {}",
        check.verified
    );
    let robot = format!("{wecom_base}/cgi-bin/webhook/send?key=ops");
    let note = json!({"app": null, "notification": {
        "target": {"webhook": {"platform": "wecom", "url": robot, "secret": null}},
        "title": "Workflow #44 failed", "level": "failure", "markdown": "step **deploy** failed",
        "link": null, "mentions": [{"id": "bob"}], "mention_all": false}});
    ok(host.invoke_json("acme", "notify", note).await?)?;
    println!("    robot message accepted");
    wecom.set_callback_url(wecom_app.agent_id, Some(&url));
    let request = json!({"key": "wf-44/deploy", "title": "Deploy release-44?",
        "initiator": {"id": "alice"},
        "nodes": [{"approvers": [{"id": "bob"}], "mode": "and"},
                  {"approvers": [{"id": "carol"}, {"id": "alice"}], "mode": "or"}],
        "cc": [], "fields": [["workflow", "release-44"]]});
    let id = start_approval(&host, &wecom_json, request).await?;
    let get = json!({"app": wecom_json, "instance_id": id, "refresh": false});
    for who in ["bob", "carol"] {
        let report = wecom.decide(&id, who, true, "ok").await?;
        let delivered = report.as_ref().is_some_and(|r| r.delivered);
        let now = ok(host
            .invoke_json("acme", "get-approval", get.clone())
            .await?)?;
        println!(
            "    {who} approves -> push answered 200: {delivered} -> {}",
            now["status"]
        );
    }
    let last = ok(host.invoke_json("acme", "get-approval", get).await?)?;
    if last["status"] != "approved" {
        bail!("expected the WeCom approval to be approved, got {last}");
    }

    step(
        9,
        "DingTalk Stream mode: no callback address; the host dials out and holds a WebSocket",
    );
    let key = stream_app.app_key.as_str();
    wait_for("the Stream connection", || stream.live(key) == 1).await?;
    stream.ping(key);
    wait_for("the ping answer", || stream.stats(key).pings == 1).await?;
    println!(
        "    Stream connection open (connections/open, then the socket); server ping answered"
    );
    let request = json!({"key": "wf-45/deploy", "title": "Deploy release-45?",
        "initiator": {"id": "alice"},
        "nodes": [{"approvers": [{"id": "bob"}, {"id": "carol"}], "mode": "and"}],
        "cc": [], "fields": [["workflow", "release-45"]]});
    let id = start_approval(&host, &stream_json, request).await?;
    let get = json!({"app": stream_json, "instance_id": id, "refresh": false});
    ding.decide(&id, "bob", true, "ok").await?;
    wait_for("bob's event to be acked", || {
        stream.pending(key) == 0 && !stream.stats(key).acks.is_empty()
    })
    .await?;
    let now = ok(host
        .invoke_json("acme", "get-approval", get.clone())
        .await?)?;
    println!(
        "    bob agrees -> EVENT frame over the WebSocket, applied, acked -> {}",
        now["status"]
    );
    stream.drop_connections(key);
    ding.decide(&id, "carol", true, "ok").await?;
    println!(
        "    the connection drops; carol agrees meanwhile -> {} event(s) waiting for an ack",
        stream.pending(key)
    );
    wait_for("the redelivery", || {
        stream.pending(key) == 0 && stream.live(key) == 1
    })
    .await?;
    let last = ok(host.invoke_json("acme", "get-approval", get).await?)?;
    let stats = stream.stats(key);
    println!(
        "    the host reconnects ({} connections so far, never two at once); what was queued \
         is redelivered and acked -> {}",
        stats.connects, last["status"]
    );
    if last["status"] != "approved" || stats.max_live != 1 {
        bail!("expected the Stream approval to be approved over one connection, got {last}");
    }

    server.shutdown().await;
    println!(
        "\ndone: notifications sent, approvals decided via callbacks on three platforms and over \
         a persistent connection, tenants isolated."
    );
    Ok(())
}
