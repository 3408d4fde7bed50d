//! Faults from the platforms, per platform, through the built component against the
//! simulators' fault injection: 5xx, 429 and the platforms' rate-limit codes, `Retry-After`,
//! timeouts, and token expiry mid-call.
//!
//! Reads (status polls, token fetches, user lookups) are retried with bounded backoff; creates
//! are never repeated by the plugin (a lost answer may mean the platform acted) and come back as
//! retryable errors instead, except on DingTalk and WeCom when the create may have succeeded:
//! then the start fails for good rather than risk a second approval. Every outcome is a result or a typed error, never a hang: the host's
//! deadline is short here, and a platform that stops answering ends in a `transport` error.

use imbridge_host::sim::dingtalk::{DingtalkApp, DingtalkSim};
use imbridge_host::sim::feishu::{FeishuApp, FeishuConfig, FeishuSim, FeishuUser};
use imbridge_host::sim::http::{Faults, Response};
use imbridge_host::sim::wecom::{WecomApp, WecomConfig, WecomSim, WecomUser};
use imbridge_host::store::{Backend, Commit, Gate, Intercept, MemoryStore, Outcome, Pending};
use imbridge_tests::{Harness, dingtalk_sim, err_kind, err_message, ok};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const TENANT: &str = "t1";

enum Sim {
    Feishu(FeishuSim),
    Dingtalk(DingtalkSim),
    Wecom(WecomSim),
}

/// One platform's fixture: simulator, host, app, and where its calls go.
struct Fx {
    sim: Sim,
    h: Harness,
    app: Value,
    /// The pending approval every test polls.
    instance: String,
    /// Request paths (exact, no query) of the status poll, the create and the token fetch.
    poll: String,
    create: &'static str,
    token: &'static str,
    /// The platform's own rate-limit answer.
    rate_limited: Response,
}

impl Fx {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        match &self.sim {
            Sim::Feishu(s) => s.faults(),
            Sim::Dingtalk(s) => s.faults(),
            Sim::Wecom(s) => s.faults(),
        }
    }

    fn expire_tokens(&self) {
        match &self.sim {
            Sim::Feishu(s) => s.expire_all_tokens(),
            Sim::Dingtalk(s) => s.expire_all_tokens(),
            Sim::Wecom(s) => s.expire_all_tokens(),
        }
    }

    /// Requests to `path` that reached the simulator's handler (injected answers do not);
    /// on Feishu only POSTs, the method the token fetch and the create use.
    fn handled(&self, path: &str) -> usize {
        match &self.sim {
            Sim::Feishu(s) => s.calls(&format!("POST {path}")),
            Sim::Dingtalk(s) => s.calls(path),
            Sim::Wecom(s) => s.calls(path),
        }
    }

    /// Token requests that reached the simulator's handler.
    fn token_fetches(&self) -> usize {
        self.handled(self.token)
    }

    fn inject(&self, path: &str, n: usize, response: Response) {
        self.faults().fail_next(path, n, response);
    }

    /// Injected answers `path` has served and still holds.
    fn served(&self, path: &str) -> (usize, usize) {
        let f = self.faults();
        (f.served(path), f.pending(path))
    }

    async fn poll(&self) -> Value {
        self.h
            .invoke(
                TENANT,
                "get-approval",
                json!({"app": self.app, "instance_id": self.instance, "refresh": true}),
            )
            .await
    }

    async fn start(&self, key: &str, initiator: Value, approver: Value) -> Value {
        self.h
            .invoke(
                TENANT,
                "start-approval",
                json!({"app": self.app, "request": {"key": key, "title": "Deploy?",
                    "initiator": initiator,
                    "nodes": [{"approvers": [approver], "mode": "and"}]}}),
            )
            .await
    }
}

fn unavailable() -> Response {
    Response {
        status: 503,
        headers: vec![("content-type".into(), "text/html".into())],
        body: b"<html>503 Service Temporarily Unavailable</html>".to_vec(),
    }
}

/// A host for tenant `TENANT` that may call the servers at `base_urls`.
async fn harness(base_urls: &[&str]) -> Harness {
    let allow: Vec<String> = base_urls
        .iter()
        .map(|u| u.trim_start_matches("http://").to_string())
        .collect();
    // A short deadline: whatever a platform does, a call must end (typed) well before it.
    Harness::with_config(&[TENANT], &allow, |c| {
        c.call_timeout = Duration::from_secs(5)
    })
    .await
    .expect("harness")
}

async fn feishu() -> Fx {
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![FeishuApp::new("cli_faults", "s3cr3t")],
        users: ["alice", "bob"].into_iter().map(FeishuUser::new).collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let h = harness(&[&sim.base_url()]).await;
    let app = json!({"id": "fs", "platform": "feishu", "app_id": "cli_faults",
                     "app_secret": "s3cr3t", "api_base": sim.base_url()});
    let mut fx = Fx {
        sim: Sim::Feishu(sim),
        h,
        app,
        instance: String::new(),
        poll: String::new(),
        create: "/open-apis/approval/v4/instances",
        token: "/open-apis/auth/v3/tenant_access_token/internal",
        // As Feishu documents it: HTTP 429, code 99991400, the pause in x-ogw-ratelimit-reset.
        rate_limited: Response::json(
            429,
            &json!({"code": 99991400, "msg": "request trigger frequency limit"}),
        )
        .with_header("x-ogw-ratelimit-limit", "100")
        .with_header("x-ogw-ratelimit-reset", "1"),
    };
    let started = fx
        .start("wf-1", json!({"id": "ou_alice"}), json!({"id": "ou_bob"}))
        .await;
    fx.instance = ok(&started)["instance_id"].as_str().unwrap().to_string();
    fx.poll = format!("/open-apis/approval/v4/instances/{}", fx.instance);
    fx
}

/// The im-app `dt` for the simulator's DingTalk `app`, calling `base`.
fn dingtalk_app(app: &DingtalkApp, base: &str) -> Value {
    json!({"id": "dt", "platform": "dingtalk", "app_id": app.app_key,
        "app_secret": app.app_secret, "agent_id": app.agent_id.to_string(), "api_base": base})
}

/// A DingTalk approval-request: one node, approver `a`, started by `orig`.
fn dingtalk_request(key: &str) -> Value {
    json!({"key": key, "title": "Deploy?", "initiator": {"id": "orig"},
        "nodes": [{"approvers": [{"id": "a"}], "mode": "and"}]})
}

async fn dingtalk() -> Fx {
    let app = DingtalkApp::new("dingfaults");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let h = harness(&[&sim.base_url()]).await;
    let app = dingtalk_app(&app, &sim.base_url());
    let mut fx = Fx {
        sim: Sim::Dingtalk(sim),
        h,
        app,
        instance: String::new(),
        poll: "/v1.0/workflow/processInstances".into(),
        create: "/v1.0/workflow/processInstances",
        token: "/v1.0/oauth2/accessToken",
        // The new API's answer over an app's per-second limit (DingTalk's "how to process
        // API throttling" page); a Retry-After is honoured when present.
        rate_limited: Response::json(
            403,
            &json!({"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                    "message": "The request has exceeded the QPS limit"}),
        )
        .with_header("Retry-After", "1"),
    };
    let started = fx
        .start("wf-1", json!({"id": "orig"}), json!({"id": "a"}))
        .await;
    fx.instance = ok(&started)["instance_id"].as_str().unwrap().to_string();
    fx
}

async fn wecom() -> Fx {
    let app = WecomApp::new("wwfaults01", "s3cr3t", 1000002);
    let sim = WecomSim::start(WecomConfig {
        apps: vec![app.clone()],
        users: vec![WecomUser::new("zhangsan"), WecomUser::new("u1")],
        ..Default::default()
    })
    .await
    .expect("sim");
    let h = harness(&[&sim.base_url()]).await;
    let app = json!({"id": "wa", "platform": "wecom", "app_id": app.corp_id,
        "app_secret": app.secret, "agent_id": app.agent_id.to_string(),
        "api_base": sim.base_url()});
    let mut fx = Fx {
        sim: Sim::Wecom(sim),
        h,
        app,
        instance: String::new(),
        poll: "/cgi-bin/oa/getapprovaldetail".into(),
        create: "/cgi-bin/oa/applyevent",
        token: "/cgi-bin/gettoken",
        // WeCom answers rate limits with HTTP 200 and errcode 45009.
        rate_limited: Response::json(
            200,
            &json!({"errcode": 45009, "errmsg": "api freq out of limit"}),
        ),
    };
    let started = fx
        .start("wf-1", json!({"id": "zhangsan"}), json!({"id": "u1"}))
        .await;
    fx.instance = ok(&started)["instance_id"].as_str().unwrap().to_string();
    fx
}

/// The whole list, for one platform.
async fn faults_are_retried_or_typed(fx: Fx) {
    let before = fx.h.kv_dump(TENANT);

    // A 5xx (HTML body) on a poll: retried, then served.
    fx.inject(&fx.poll, 1, unavailable());
    let r = fx.poll().await;
    assert_eq!(ok(&r)["status"], "pending", "{r}");
    assert_eq!(fx.served(&fx.poll), (1, 0));

    // The platform's rate limit with a pause to honour: retried after it, then served.
    fx.inject(&fx.poll, 1, fx.rate_limited.clone());
    let r = fx.poll().await;
    assert_eq!(ok(&r)["status"], "pending", "{r}");
    assert_eq!(fx.served(&fx.poll), (2, 0));

    // Still failing after three attempts: a retryable platform error, the fourth fault unused.
    fx.inject(&fx.poll, 4, unavailable());
    let r = fx.poll().await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    assert_eq!(fx.served(&fx.poll), (5, 1));
    fx.faults().clear();

    // A pause longer than the plugin waits: passed on as retryable at once, one attempt.
    let mut long_pause = fx.rate_limited.clone();
    long_pause.headers.retain(|(k, _)| {
        !k.eq_ignore_ascii_case("retry-after") && !k.eq_ignore_ascii_case("x-ogw-ratelimit-reset")
    });
    fx.inject(&fx.poll, 2, long_pause.with_header("Retry-After", "120"));
    let r = fx.poll().await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    assert_eq!(fx.served(&fx.poll), (1, 1));
    fx.faults().clear();
    assert_eq!(fx.h.kv_dump(TENANT), before, "failed polls stored nothing");

    // A create is never repeated by the plugin: one 5xx is one attempt and a retryable error;
    // the engine's retry with the same key then creates exactly one approval.
    fx.inject(fx.create, 1, unavailable());
    let r = fx.start_second().await;
    assert_eq!(err_kind(&r), "platform", "{r}");
    assert_eq!(r["err"]["retryable"], true, "{r}");
    assert_eq!(fx.served(fx.create), (1, 0));
    let first = ok(&fx.start_second().await)["instance_id"].clone();
    assert_eq!(ok(&fx.start_second().await)["instance_id"], first);

    // The platform creates the approval but its answer is lost. Feishu: the engine's retry
    // sends the key's uuid again and gets that instance back. DingTalk and WeCom cannot tell,
    // so the start fails for good (-3, not retryable) rather than create a second approval.
    let handled = fx.handled(fx.create);
    fx.faults().lose_answers(fx.create, 1);
    let lost = fx.start_key("wf-3").await;
    fx.faults().clear();
    assert_eq!(fx.handled(fx.create), handled + 1);
    if let Sim::Feishu(_) = fx.sim {
        assert_eq!(err_kind(&lost), "transport", "{lost}");
        let id = ok(&fx.start_key("wf-3").await)["instance_id"].clone();
        assert_eq!(ok(&fx.start_key("wf-3").await)["instance_id"], id);
    } else {
        for again in [lost, fx.start_key("wf-3").await, fx.start_key("wf-3").await] {
            assert_eq!(err_kind(&again), "platform", "{again}");
            assert_eq!(again["err"]["code"], -3, "{again}");
            assert_eq!(again["err"]["retryable"], false, "{again}");
        }
        assert_eq!(
            fx.handled(fx.create),
            handled + 1,
            "no second create was sent"
        );
    }

    // Token expiry mid-call: the platform refuses the cached token, the plugin fetches one new
    // token and the poll succeeds.
    let fetched = fx.token_fetches();
    fx.expire_tokens();
    let r = fx.poll().await;
    assert_eq!(ok(&r)["status"], "pending", "{r}");
    assert_eq!(fx.token_fetches(), fetched + 1);
    // The refresh itself hits a 5xx: the token fetch is retried too.
    fx.expire_tokens();
    fx.inject(fx.token, 1, unavailable());
    let r = fx.poll().await;
    assert_eq!(ok(&r)["status"], "pending", "{r}");
    assert_eq!(fx.served(fx.token), (1, 0));
    assert_eq!(fx.token_fetches(), fetched + 2);

    // The platform stops answering: the request is cut off inside the host's deadline and
    // comes back as a retryable transport error (not retried: its time is spent).
    fx.faults()
        .set_delay(&fx.poll, Some(Duration::from_secs(60)));
    let r = fx.poll().await;
    assert_eq!(err_kind(&r), "transport", "{r}");
    assert!(err_message(&r).contains("timed out"), "{r}");
    fx.faults().clear();
    assert_eq!(ok(&fx.poll().await)["status"], "pending");
}

impl Fx {
    /// A second approval, so the create path is exercised after the fixture's.
    async fn start_second(&self) -> Value {
        self.start_key("wf-2").await
    }

    async fn start_key(&self, key: &str) -> Value {
        let (initiator, approver) = match &self.sim {
            Sim::Feishu(_) => (json!({"id": "ou_alice"}), json!({"id": "ou_bob"})),
            Sim::Dingtalk(_) => (json!({"id": "orig"}), json!({"id": "a"})),
            Sim::Wecom(_) => (json!({"id": "zhangsan"}), json!({"id": "u1"})),
        };
        self.start(key, initiator, approver).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn feishu_faults_are_retried_or_typed() {
    faults_are_retried_or_typed(feishu().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dingtalk_faults_are_retried_or_typed() {
    faults_are_retried_or_typed(dingtalk().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wecom_faults_are_retried_or_typed() {
    faults_are_retried_or_typed(wecom().await).await;
}

/// DingTalk's legacy API answers throttling with HTTP 200 and errcode 90018, `/topapi`
/// wrapped in errcode 88 with `sub_code` "90018"; a user lookup (a read) is retried through
/// either. Before, the wrapped form was a permanent error.
#[tokio::test(flavor = "multi_thread")]
async fn dingtalk_legacy_throttling_code_is_retried_on_reads() {
    let fx = dingtalk().await;
    let lookup = "/topapi/v2/user/getbymobile";
    let answers = [
        json!({"errcode": 90018, "errmsg": "调用频率超出限制"}),
        json!({"errcode": 88, "sub_code": "90018", "sub_msg": "调用频率超出限制",
               "errmsg": "ding talk error[subcode=90018,submsg=调用频率超出限制]"}),
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        fx.inject(lookup, 1, Response::json(200, &answer));
        let r = fx
            .start(
                &format!("wf-mobile-{i}"),
                json!({"mobile": "13800000000"}),
                json!({"id": "a"}),
            )
            .await;
        ok(&r);
        assert_eq!(fx.served(lookup).1, 0, "{answer}");
    }
    // A token DingTalk no longer takes is answered the same way (88, sub_code "40014"): the
    // lookup renews it. Before, it failed for good until the cached token expired.
    let token_fetches = || match &fx.sim {
        Sim::Dingtalk(s) => s
            .state()
            .requests
            .iter()
            .filter(|r| r.path == fx.token)
            .count(),
        _ => unreachable!("a DingTalk fixture"),
    };
    fx.expire_tokens();
    let tokens = token_fetches();
    let r = fx
        .start(
            "wf-mobile-expired",
            json!({"mobile": "13800000000"}),
            json!({"id": "a"}),
        )
        .await;
    ok(&r);
    assert_eq!(token_fetches(), tokens + 1, "renewed once");
}

/// Forwards every connection to `to` until aborted; then connections are refused.
async fn tcp_proxy(to: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (format!("http://{addr}"), task)
}

/// A DingTalk create that never connected (connection refused) did not happen, so the
/// engine's retry with the same key creates the approval. Before, every transport error on
/// the create held the key for a person (-3), like an answer lost after the create.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_that_never_connected_may_be_retried() {
    let app = DingtalkApp::new("dingrefused");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let (proxy, forwarding) = tcp_proxy(sim.base_url().trim_start_matches("http://").into()).await;
    let h = harness(&[&sim.base_url(), &proxy]).await;
    let via = |base: &str| dingtalk_app(&app, base);
    let start = |app: Value, key: &'static str| {
        h.invoke(
            TENANT,
            "start-approval",
            json!({"app": app, "request": dingtalk_request(key)}),
        )
    };
    // Token and form are cached for the proxy's address, so the create is the first request.
    ok(&start(via(&proxy), "warm").await);
    let create = "/v1.0/workflow/processInstances";
    let created = sim.calls(create);
    forwarding.abort();
    let _ = forwarding.await;

    let refused = start(via(&proxy), "wf-r").await;
    assert_eq!(err_kind(&refused), "transport", "{refused}");
    assert!(
        err_message(&refused).contains("connection refused"),
        "{refused}"
    );
    assert_eq!(sim.calls(create), created);

    let id = ok(&start(via(&sim.base_url()), "wf-r").await)["instance_id"].clone();
    assert_eq!(
        ok(&start(via(&sim.base_url()), "wf-r").await)["instance_id"],
        id
    );
    // One create, and the start's read-back of the new approval (a GET on the same path).
    assert_eq!(sim.calls(create), created + 2);
}

/// Sends one HTTP/1.1 request to `addr`; the connection, to read the answer from or drop.
async fn send_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s
}

/// One HTTP/1.1 request to `addr`; the answer's body as JSON.
async fn http_json(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> Value {
    use tokio::io::AsyncReadExt as _;
    let mut s = send_http(addr, method, path, body).await;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// An engine whose request times out while `serve` waits for DingTalk's answer to a create
/// does not cut the start off: the start runs to its end, so the approval it created is
/// recorded and the engine's retry gets it. Before, hyper dropped the call with the
/// connection: only the start's claim was kept, the retry answered -2 for an hour and then
/// -3, and callbacks for the approval were dropped as unknown.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_outlives_an_engine_that_hangs_up() {
    let dt = DingtalkApp::new("dinghangup");
    let sim = dingtalk_sim(&dt, &["orig", "a"]).await;
    let h = harness(&[&sim.base_url()]).await;
    let app = dingtalk_app(&dt, &sim.base_url());
    let cfg = json!({"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1",
        "state_dir": h.dir.path().join("serve"), "tenants": [{"id": TENANT, "apps": [app]}]});
    let cfg = imbridge_host::config::ServeConfig::parse(&cfg.to_string(), h.dir.path()).unwrap();
    let server = imbridge_host::server::serve_with(h.host.clone(), cfg)
        .await
        .unwrap();
    let path = format!("/api/{TENANT}/dt/approvals");
    let body = dingtalk_request("wf-h").to_string();

    let create = "/v1.0/workflow/processInstances";
    sim.set_delay(create, Some(Duration::from_secs(1)));
    {
        let _engine = send_http(server.addr(), "POST", &path, &body).await;
        // The engine gives up while the create is at DingTalk, waiting for its answer.
        while sim.faults().delayed(create) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    sim.set_delay(create, None);

    // The engine retries: "in progress" (-2, retryable) while the first start runs, then the
    // approval it created.
    let mut retry = Value::Null;
    for _ in 0..50 {
        retry = http_json(server.addr(), "POST", &path, &body).await;
        if retry["err"]["code"] != -2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = ok(&retry)["instance_id"].clone();
    let again = http_json(server.addr(), "POST", &path, &body).await;
    assert_eq!(ok(&again)["instance_id"], id);
    // One approval at DingTalk, the first start's: no retry created another.
    let creates = sim
        .state()
        .requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == create)
        .count();
    assert_eq!(creates, 1);
    let instances: Vec<String> = sim.state().instances.keys().cloned().collect();
    assert_eq!(instances, [id.as_str().unwrap()]);
    server.shutdown().await;
}

/// A remote store whose next `fail` commits fail: refused, or (`applied`) applied with the
/// answer lost, as when Redis goes away between applying a commit and answering it. With
/// `fill`, a refused commit's keys starting with it are written meanwhile by "another call"
/// (a cache it filled too). While `gets` is held, every read waits, as behind a dead link;
/// with `local`, it reports itself a local store, and while `increments` is held each
/// increment waits, as a disk flush might.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail: AtomicU32,
    applied: AtomicBool,
    fill: Mutex<Option<&'static str>>,
    gets: Gate,
    local: AtomicBool,
    increments: Gate,
}

impl Intercept for FlakyStore {
    fn memory(&self) -> &MemoryStore {
        &self.inner
    }
    fn get(&self, ns: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.gets.pass();
        self.inner.get(ns, key)
    }
    fn commit(&self, ns: &str, commit: Commit) -> anyhow::Result<Outcome> {
        let failing = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !failing {
            return self.inner.commit(ns, commit);
        }
        if self.applied.load(Ordering::SeqCst) {
            self.inner.commit(ns, commit)?;
        } else if let Some(prefix) = *self.fill.lock().unwrap() {
            let others: Vec<_> = commit
                .writes
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| (k.clone(), Some(b"another call's".to_vec())))
                .collect();
            self.inner.put(ns, others)?;
        }
        anyhow::bail!("injected commit failure")
    }
    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> anyhow::Result<u64> {
        self.increments.pass();
        self.inner.increment(ns, key, delta, pending)
    }
    fn remote(&self) -> bool {
        !self.local.load(Ordering::SeqCst)
    }
}

/// An instance id no platform would give (an engine's bug) is the engine's error. Before, its
/// storage key passed the host's 4 KiB key limit and the engine got a retryable `storage`
/// error, which it would retry for ever.
#[tokio::test]
async fn an_overlong_instance_id_is_invalid_input() {
    let h = harness(&[]).await;
    let app = dingtalk_app(&DingtalkApp::new("dinglong"), "http://127.0.0.1:9");
    let id = "x".repeat(5000);
    for (export, input) in [
        (
            "get-approval",
            json!({"app": app, "instance_id": id, "refresh": false}),
        ),
        (
            "cancel-approval",
            json!({"app": app, "instance_id": id, "reason": null}),
        ),
    ] {
        let out = h.invoke(TENANT, export, input).await;
        assert_eq!(err_kind(&out), "invalid-input", "{export}: {out}");
        assert!(!err_message(&out).contains(&id), "{export}: echoes the id");
    }
}

/// Once two calls wait in a store operation `gate` holds, another task still gets a worker;
/// then the gate is released. The test's own thread is not a worker: it blocks while it
/// waits. Where the calls held the workers, the task cannot run before the release, and the
/// generous bounds below are only how long the test waits to say so.
async fn assert_workers_free(gate: &Gate, never: &str) {
    /// Releases the gate however this ends, so that a failed check cannot leave the calls
    /// (and the runtime's shutdown) waiting for ever.
    struct Release<'a>(&'a Gate);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let _release = Release(gate);
    let wait = |done: &dyn Fn() -> bool| {
        let until = Instant::now() + Duration::from_secs(20);
        while !done() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        done()
    };
    assert!(gate.wait_for(2, Duration::from_secs(20)), "{never}");
    let ran = Arc::new(AtomicBool::new(false));
    let task = ran.clone();
    tokio::spawn(async move { task.store(true, Ordering::SeqCst) });
    assert!(
        wait(&|| ran.load(Ordering::SeqCst)),
        "no worker ran another task while two calls waited on the store"
    );
}

/// A remote store behind a dead link holds each read for seconds (Redis: its 5 s timeouts),
/// and the call's deadline cannot cut a host function short. Before, each such call
/// held its async worker meanwhile, so two of them stalled every other task of a 2-worker
/// host (other tenants' calls, the server, persistent connections' pings) until they ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_on_a_remote_store_leave_the_workers_free() {
    let store = Arc::new(FlakyStore::default());
    let h = Harness::with_store(&[TENANT], &[], store.clone())
        .await
        .expect("harness");
    let app = dingtalk_app(&DingtalkApp::new("dingslow"), "http://127.0.0.1:9");
    store.gets.hold();
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let host = h.host.clone();
            let input = json!({"app": app, "instance_id": format!("i{i}"), "refresh": false});
            tokio::spawn(async move { host.invoke_json(TENANT, "get-approval", input).await })
        })
        .collect();
    assert_workers_free(&store.gets, "the two calls never read").await;
    for call in calls {
        let out = call.await.unwrap().expect("the call ends");
        assert_eq!(err_kind(&out), "invalid-input", "{out}");
        assert!(err_message(&out).contains("no approval"), "{out}");
    }
}

/// An increment is durable on its own, so even on the local embedded store it waits for a
/// disk flush. Before, it ran on the call's async worker, and two starts claiming their keys
/// while the disk was slow stalled every other task of a 2-worker host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_on_a_slow_local_disk_leave_the_workers_free() {
    let app = DingtalkApp::new("dingflush");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let store = Arc::new(FlakyStore::default());
    store.local.store(true, Ordering::SeqCst);
    let allow = [sim.base_url().trim_start_matches("http://").to_string()];
    let h = Harness::with_store(&[TENANT], &allow, store.clone())
        .await
        .expect("harness");
    let app = dingtalk_app(&app, &sim.base_url());
    // Token and form cached first, so the starts below reach their claims at once.
    let warm = h
        .host
        .invoke_json(
            TENANT,
            "start-approval",
            json!({"app": app, "request": dingtalk_request("wf-warm")}),
        )
        .await
        .unwrap();
    ok(&warm);
    store.increments.hold();
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let host = h.host.clone();
            let input = json!({"app": app, "request": dingtalk_request(&format!("wf-{i}"))});
            tokio::spawn(async move { host.invoke_json(TENANT, "start-approval", input).await })
        })
        .collect();
    assert_workers_free(&store.increments, "the two starts never claimed").await;
    for call in calls {
        let out = call.await.unwrap().expect("the call ends");
        ok(&out);
    }
}

/// The host's commit of a DingTalk start is all that ties the approval DingTalk now has to
/// its key: the plugin cannot be run again (it would create a second approval), so the host
/// tries the commit again. Before, a store that failed once (Redis restarting) lost the
/// record, and every retry of the start answered -2 for an hour, then -3.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_whose_commit_failed_is_committed_again() {
    let app = DingtalkApp::new("dingcommit");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let store = Arc::new(FlakyStore::default());
    let allow = [sim.base_url().trim_start_matches("http://").to_string()];
    let h = Harness::with_store(&[TENANT], &allow, store.clone())
        .await
        .expect("harness");
    let app = dingtalk_app(&app, &sim.base_url());
    let start = |key: &'static str| {
        h.host.invoke_json(
            TENANT,
            "start-approval",
            json!({"app": app, "request": dingtalk_request(key)}),
        )
    };
    let create = "/v1.0/workflow/processInstances";
    // The first start also fills the access-token cache, as a concurrent call may meanwhile.
    let cases = [
        ("wf-cache-filled", false, Some("tok/")),
        ("wf-refused", false, None),
        ("wf-lost-answer", true, None),
    ];
    for (key, applied, fill) in cases {
        store.applied.store(applied, Ordering::SeqCst);
        *store.fill.lock().unwrap() = fill;
        store.fail.store(1, Ordering::SeqCst);
        let calls = sim.calls(create);
        let first = start(key).await.expect("the host commits again");
        let id = ok(&first)["instance_id"].clone();
        assert_eq!(store.fail.load(Ordering::SeqCst), 0);
        let got = h
            .invoke(
                TENANT,
                "get-approval",
                json!({"app": app, "instance_id": id, "refresh": false}),
            )
            .await;
        assert_eq!(ok(&got)["key"], key, "{got}");
        assert_eq!(ok(&start(key).await.unwrap())["instance_id"], id, "{key}");
        // One create, and the start's read-back (a GET on the same path).
        assert_eq!(sim.calls(create), calls + 2, "{key}");
    }

    // A store that stays down: the call fails after a bounded number of tries.
    store.applied.store(false, Ordering::SeqCst);
    store.fail.store(10, Ordering::SeqCst);
    let down = start("wf-down").await.expect_err("the store is down");
    assert!(format!("{down:#}").contains("committing"), "{down:#}");
    assert_eq!(store.fail.load(Ordering::SeqCst), 6, "four tries");
}

/// The first start of a Feishu app (here: of its node shape) makes and subscribes a
/// definition. Cut off after its create (here its commit fails every try; a crash or the
/// deadline alike), the start leaves only what the plugin made durable at once. The engine's
/// retry makes a new definition, Feishu answers 60012 for the key's uuid, and the instance it
/// holds, on the first definition, must still be taken as this store's. Before, the record of
/// that subscription was a write lost with the call, and every retry answered 60012
/// ("another store").
#[tokio::test(flavor = "multi_thread")]
async fn a_first_feishu_start_cut_off_after_its_create_is_adopted() {
    let sim = FeishuSim::start(FeishuConfig {
        apps: vec![FeishuApp::new("cli_cut", "s3cr3t")],
        users: ["alice", "bob"].into_iter().map(FeishuUser::new).collect(),
        ..FeishuConfig::default()
    })
    .await
    .expect("sim");
    let store = Arc::new(FlakyStore::default());
    let allow = [sim.base_url().trim_start_matches("http://").to_string()];
    let h = Harness::with_store(&[TENANT], &allow, store.clone())
        .await
        .expect("harness");
    let app = json!({"id": "fs", "platform": "feishu", "app_id": "cli_cut",
                     "app_secret": "s3cr3t", "api_base": sim.base_url()});
    let start = || {
        h.host.invoke_json(
            TENANT,
            "start-approval",
            json!({"app": app, "request": {"key": "wf-9/deploy", "title": "Deploy?",
                "initiator": {"id": "ou_alice"},
                "nodes": [{"approvers": [{"id": "ou_bob"}], "mode": "and"}]}}),
        )
    };
    store.fail.store(10, Ordering::SeqCst);
    let cut = start().await.expect_err("the store is down");
    assert!(format!("{cut:#}").contains("committing"), "{cut:#}");
    store.fail.store(0, Ordering::SeqCst);
    let created = {
        let st = sim.state();
        assert_eq!(st.instances.len(), 1);
        st.instances.values().next().unwrap().instance_code.clone()
    };

    let retry = start().await.expect("the call ends");
    assert_eq!(ok(&retry)["instance_id"], created.as_str(), "{retry}");
    assert_eq!(ok(&retry)["status"], "pending", "{retry}");
    assert_eq!(sim.state().instances.len(), 1, "no second approval");
    // The approval is this store's now: decisions on it reach the engine.
    sim.decide(&created, "ou_bob", true, None).await.unwrap();
    let got = h
        .invoke(
            TENANT,
            "get-approval",
            json!({"app": app, "instance_id": created, "refresh": true}),
        )
        .await;
    assert_eq!(ok(&got)["status"], "approved", "{got}");
}

/// A request body over the host's limit is refused by the host before the platform can act
/// on it, so a start whose create was too big may be retried (smaller) with the same key.
/// Before, it counted as a create that may have happened: -3 for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_over_the_hosts_body_limit_may_be_retried() {
    let app = DingtalkApp::new("dingbig");
    let sim = dingtalk_sim(&app, &["orig", "a"]).await;
    let h = harness(&[&sim.base_url()]).await;
    let app = dingtalk_app(&app, &sim.base_url());
    let start = |request: Value| {
        h.invoke(
            TENANT,
            "start-approval",
            json!({"app": app, "request": request}),
        )
    };
    // DingTalk's form value is capped at 65,535 characters (refused before any request), so
    // an approver id carries the bulk here.
    let mut big = dingtalk_request("wf-big");
    big["nodes"][0]["approvers"] = json!([{"id": "a"}, {"id": "x".repeat(3 << 20)}]);
    let refused = start(big).await;
    assert_eq!(err_kind(&refused), "transport", "{refused}");
    assert!(!refused.to_string().contains("-3"), "{refused}");
    let id = ok(&start(dingtalk_request("wf-big")).await)["instance_id"].clone();
    assert_eq!(
        ok(&start(dingtalk_request("wf-big")).await)["instance_id"],
        id
    );
}
