//! Shared fixtures for the benchmarks and the load test: the three platforms' apps, valid
//! signed + encrypted callbacks with fresh event ids, the stored records those callbacks
//! update, and a small in-memory [`Env`] for running the component's logic natively.
//!
//! Callbacks are built with the simulators' crypto (`imbridge_host::sim`), which is written
//! independently of the guest crate, so every benchmarked input is one the real platforms'
//! wire format would produce, not one the code under test made for itself.

use imbridge::approval::Record;
use imbridge::env::key_segment;
use imbridge::model::{Approval, ApprovalStatus, HttpRequest, ImApp, Platform};
use imbridge_host::json::parse_call;
use imbridge_host::sim::{dingtalk, feishu, wecom};
use imbridge_host::store::Write;
use imbridge_host::{Call, Export};
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// Every bench process allocates as `imbridge-host` does (host-test/src/main.rs), so host costs
/// measured in process are those of the binary. `target/release/ratio` depends on it besides:
/// between batches it generates and drops thousands of events and keeps a growing store, and
/// with glibc's allocator the chunks it freed were consolidated inside the next timed batch
/// (native DingTalk calls read 13–16 µs after 300 rounds against 6–9 µs in isolation, which
/// made their ratios look up to 2× better than they are).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub const PLATFORMS: [Platform; 3] = [Platform::Feishu, Platform::Dingtalk, Platform::Wecom];

const FEISHU_KEY: &str = "bench-encrypt-key";
const FEISHU_TOKEN: &str = "vt-bench";
// Fixed 43-character EncodingAESKeys (base64 of 32 bytes without '='), so the load test's
// config, its pre-generated requests and the benches all agree without passing keys around.
const DINGTALK_AES: &str = "YmVuY2gtZGluZ3RhbGstYWVzLWtleS0zMi1ieXRlcyE";
const WECOM_AES: &str = "YmVuY2gtd2Vjb20tYWVzLWtleS0zMi1ieXRlcy4uLiE";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The app of `platform`, in the host's JSON form (`ImApp` of the WIT contract).
pub fn app_json(platform: Platform) -> Value {
    match platform {
        Platform::Feishu | Platform::Lark => json!({
            "id": "fs", "platform": "feishu", "app_id": "cli_bench", "app_secret": "s",
            "encrypt_key": FEISHU_KEY, "token": FEISHU_TOKEN,
        }),
        Platform::Dingtalk => json!({
            "id": "dt", "platform": "dingtalk", "app_id": "dingbench", "app_secret": "s",
            "agent_id": "1001", "encrypt_key": DINGTALK_AES, "token": "tok-bench",
        }),
        Platform::Wecom => json!({
            "id": "wc", "platform": "wecom", "app_id": "wwbench", "app_secret": "s",
            "agent_id": "1000002", "encrypt_key": WECOM_AES, "token": "tokbench",
        }),
    }
}

/// The same app as the guest crate's native type.
pub fn app_native(platform: Platform) -> ImApp {
    let j = app_json(platform);
    let s = |k: &str| j[k].as_str().map(str::to_string);
    ImApp {
        id: s("id").unwrap_or_default(),
        platform,
        app_id: s("app_id").unwrap_or_default(),
        app_secret: s("app_secret").unwrap_or_default(),
        agent_id: s("agent_id"),
        encrypt_key: s("encrypt_key"),
        token: s("token"),
        api_base: None,
        max_clock_skew_secs: None,
    }
}

/// One platform push as it arrives at `/callback/{tenant}/{app}`.
#[derive(Clone, Debug)]
pub struct Push {
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Push {
    pub fn native(&self) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            path: "/callback".into(),
            query: self.query.clone(),
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }

    /// `handle-callback` input for `Host::invoke_json` / `imbridge_host::json::parse_call`.
    pub fn host_input(&self, platform: Platform) -> Value {
        json!({
            "app": app_json(platform),
            "request": {
                "method": "POST", "path": "/callback", "query": self.query,
                "headers": self.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                "body": String::from_utf8_lossy(&self.body),
            },
        })
    }
}

/// The instance the `n`-th callback of a run is about; every callback gets its own instance
/// (and event id), so each one takes the full path: load, apply, save.
pub fn instance_id(platform: Platform, run: u32, n: u64) -> String {
    match platform {
        // WeCom approval numbers are numeric.
        Platform::Wecom => format!("20{run:06}{n:010}"),
        _ => format!("bench-{run}-{n}"),
    }
}

/// A valid, signed, encrypted decision callback ("approver approved") for `instance`, with
/// an event id unique to `(run, n)`, signed at `now_ms`.
pub fn callback(platform: Platform, run: u32, n: u64, instance: &str, now_ms: u64) -> Push {
    let secs = now_ms / 1000;
    match platform {
        Platform::Feishu | Platform::Lark => {
            // A v1 `approval_task` event, the shape Feishu pushes per approver decision.
            let plain = json!({
                "uuid": format!("{run}-{n}"), "token": FEISHU_TOKEN, "ts": secs.to_string(),
                "type": "event_callback",
                "event": {"app_id": "cli_bench", "tenant_key": "t", "type": "approval_task",
                    "approval_code": "BENCH-CODE", "instance_code": instance,
                    "task_id": format!("task-{n}"), "open_id": "ou_bob", "user_id": "bob",
                    "status": "APPROVED", "operate_time": now_ms.to_string()},
            });
            let body = json!({"encrypt": feishu::crypto::encrypt(FEISHU_KEY, plain.to_string().as_bytes())})
                .to_string()
                .into_bytes();
            let ts = secs.to_string();
            let nonce = format!("n{n}");
            let sig = feishu::crypto::signature(&ts, &nonce, FEISHU_KEY, &body);
            Push {
                query: String::new(),
                headers: vec![
                    (
                        "Content-Type".into(),
                        "application/json; charset=utf-8".into(),
                    ),
                    ("X-Lark-Signature".into(), sig),
                    ("X-Lark-Request-Timestamp".into(), ts),
                    ("X-Lark-Request-Nonce".into(), nonce),
                ],
                body,
            }
        }
        Platform::Dingtalk => {
            let plain = json!({
                "EventType": "bpms_task_change", "processInstanceId": instance,
                "corpId": "dingcorp", "processCode": "PROC-BENCH", "title": "Deploy to prod?",
                "type": "finish", "result": "agree", "staffId": "u_bob", "remark": "lgtm",
                "taskId": format!("{run}{n}"), "createTime": now_ms - 1000, "finishTime": now_ms,
            });
            let enc =
                dingtalk::crypto::encrypt(DINGTALK_AES, plain.to_string().as_bytes(), "dingbench");
            let ts = now_ms.to_string();
            let nonce = format!("n{n}");
            let sig = dingtalk::crypto::signature("tok-bench", &ts, &nonce, &enc);
            Push {
                query: format!("signature={sig}&timestamp={ts}&nonce={nonce}"),
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: json!({ "encrypt": enc }).to_string().into_bytes(),
            }
        }
        Platform::Wecom => {
            // `sys_approval_change` with one approver's decision and the resulting status:
            // two events, as WeCom sends it.
            let xml = format!(
                "<xml><ToUserName><![CDATA[wwbench]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName>\
                 <CreateTime>{secs}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
                 <Event><![CDATA[sys_approval_change]]></Event><AgentID>1000002</AgentID>\
                 <ApprovalInfo><SpNo>{instance}</SpNo><SpName><![CDATA[imbridge]]></SpName>\
                 <SpStatus>2</SpStatus><TemplateId><![CDATA[tpl-bench]]></TemplateId>\
                 <ApplyTime>{secs}</ApplyTime><Applyer><UserId><![CDATA[alice]]></UserId>\
                 <Party><![CDATA[1]]></Party></Applyer><SpRecord><SpStatus>2</SpStatus>\
                 <ApproverAttr>2</ApproverAttr><Details><Approver><UserId><![CDATA[bob]]></UserId>\
                 </Approver><Speech><![CDATA[lgtm]]></Speech><SpStatus>2</SpStatus>\
                 <SpTime>{secs}</SpTime></Details></SpRecord><StatuChangeEvent>2</StatuChangeEvent>\
                 </ApprovalInfo></xml>"
            );
            let mut app = wecom::WecomApp::new("wwbench", "s", 1_000_002);
            app.token = "tokbench".into();
            app.encoding_aes_key = WECOM_AES.into();
            let p = wecom::build_push(&app, &xml, secs);
            Push {
                query: p.query,
                headers: vec![("Content-Type".into(), "text/xml".into())],
                body: p.body,
            }
        }
    }
}

/// `k` fresh events (n+1..=n+k) about new pending instances: for each, the record to seed as
/// `(key, value)` and the signed callback about it.
fn fresh_events(p: Platform, run: u32, n: &mut u64, k: u64) -> Vec<((String, Vec<u8>), Push)> {
    (0..k)
        .map(|_| {
            *n += 1;
            let inst = instance_id(p, run, *n);
            (seed_record(p, &inst), callback(p, run, *n, &inst, now_ms()))
        })
        .collect()
}

/// `k` fresh callbacks (see [`fresh_events`]) as `handle-callback` calls, and the records to
/// seed for them.
pub fn fresh_calls(p: Platform, run: u32, n: &mut u64, k: u64) -> (Vec<Write>, Vec<Call>) {
    fresh_events(p, run, n, k)
        .into_iter()
        .map(|((key, val), push)| ((key, Some(val)), host_call(p, &push)))
        .unzip()
}

/// The native side's [`fresh_calls`]: `k` fresh callbacks as requests for
/// `imbridge::callback::handle`, their records seeded into `env` (whose clock is set to now).
pub fn fresh_native(env: &MemEnv, p: Platform, run: u32, n: &mut u64, k: u64) -> Vec<HttpRequest> {
    env.now.set(now_ms());
    fresh_events(p, run, n, k)
        .into_iter()
        .map(|((key, val), push)| {
            env.kv.borrow_mut().insert(key, val);
            push.native()
        })
        .collect()
}

/// `push` as the host's `handle-callback` call.
pub fn host_call(p: Platform, push: &Push) -> Call {
    parse_call(Export::HandleCallback, &push.host_input(p)).expect("handle-callback input")
}

/// The stored record a pending approval has right after `start-approval`, as `(key, value)`
/// in the plugin's key space. The key layout mirrors `approval::instance_key` (private there).
pub fn seed_record(platform: Platform, instance: &str) -> (String, Vec<u8>) {
    let app = app_native(platform);
    let meta = match platform {
        // DingTalk and WeCom report single decisions; the plugin keeps the node layout.
        Platform::Dingtalk | Platform::Wecom => json!({
            "nodes": [{"mode": "or", "approvers": ["u_bob", "bob", "u_carol"]}],
        }),
        _ => json!({"approval_code": "BENCH-CODE", "initiator": "ou_alice"}),
    };
    let rec = Record {
        approval: Approval {
            instance_id: instance.to_string(),
            key: format!("key-{instance}"),
            status: ApprovalStatus::Pending,
            decisions: Vec::new(),
            updated_at_ms: 0,
        },
        meta,
    };
    let key = format!(
        "a/{}/i/{}",
        key_segment(&app.id),
        key_segment(&rec.approval.instance_id)
    );
    (key, serde_json::to_vec(&rec).unwrap_or_default())
}

/// The guest crate's in-memory [`Env`] (no network, counter-based "randomness").
pub type MemEnv = imbridge::env::fake::FakeEnv;

/// An empty in-memory environment whose clock reads the real time now.
pub fn mem_env() -> MemEnv {
    MemEnv::with_store(Default::default(), now_ms())
}

/// What the host assembles for a tenant, done by hand for benchmarks that instantiate the
/// component without `Host` (to time the parts, or, through its `bindings()`, to keep an
/// instance for many calls).
pub fn plugin_pre(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
) -> anyhow::Result<imbridge_host::call::PluginPre> {
    let linker = imbridge_host::sandbox::linker(engine)?;
    imbridge_host::call::PluginPre::new(linker.instantiate_pre(component)?)
}

/// A store for one instance of tenant `t` with its state in `kv`, no outbound HTTP allowed and
/// no epoch ticker: a deadline far away keeps the guest from being interrupted.
pub fn bench_store(
    engine: &wasmtime::Engine,
    kv: std::sync::Arc<dyn imbridge_host::store::Backend>,
) -> anyhow::Result<wasmtime::Store<imbridge_host::sandbox::CallState>> {
    use std::time::{Duration, Instant};
    let state = imbridge_host::sandbox::CallState::new(
        imbridge_host::kv::KvCtx::new(kv, "t".into()),
        imbridge_host::wasi_http::HttpPolicy::new(
            "t".into(),
            imbridge_host::wasi_http::AllowList::new(&[])?,
            Instant::now() + Duration::from_secs(3600),
            Duration::from_secs(3),
        ),
        None,
        64 << 20,
    );
    let mut store = wasmtime::Store::new(engine, state);
    store.set_epoch_deadline(u64::MAX / 2);
    Ok(store)
}

/// The repository root.
pub fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The component under test: `target/imbridge.wasm`, or `$IMBRIDGE_COMPONENT`.
pub fn component_path() -> std::path::PathBuf {
    std::env::var_os("IMBRIDGE_COMPONENT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/imbridge.wasm"))
}

/// A host with tenant `t` loaded from the built component, and the runtime to drive it.
pub struct InComponent {
    pub rt: tokio::runtime::Runtime,
    pub host: imbridge_host::Host,
    _dir: tempfile::TempDir,
}

impl InComponent {
    /// State in `store`; an embedded database goes under `parent`.
    pub fn new(store: imbridge_host::store::StoreConfig, parent: &std::path::Path) -> InComponent {
        InComponent::load(store, parent, &component_path())
    }

    /// [`InComponent::new`] with the component at `wasm`.
    pub fn load(
        store: imbridge_host::store::StoreConfig,
        parent: &std::path::Path,
        wasm: &std::path::Path,
    ) -> InComponent {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir_in(parent).expect("state dir");
        let mut cfg = imbridge_host::HostConfig::new(dir.path().join("state"));
        cfg.store = store;
        cfg.cache_dir = Some(workspace().join("target/bench-cache"));
        let host = imbridge_host::Host::new(cfg).expect("host");
        let policy = imbridge_host::TenantPolicy::default();
        rt.block_on(host.load_tenant("t", wasm, policy))
            .expect("load the component (run ./dev build first)");
        InComponent {
            rt,
            host,
            _dir: dir,
        }
    }

    pub fn call(&self, call: &Call) -> imbridge_host::Reply {
        self.rt
            .block_on(self.host.call("t", call))
            .expect("host call")
    }
}

/// Instances of the component made by hand, so one can serve many calls (the host never does
/// that: every call gets a fresh instance).
pub struct Warm {
    engine: wasmtime::Engine,
    pre: imbridge_host::bindings::PluginPre<imbridge_host::sandbox::CallState>,
    pub store: std::sync::Arc<dyn imbridge_host::store::Backend>,
}

impl Warm {
    /// Instances of the built component whose state lives in `store`.
    pub fn new(store: std::sync::Arc<dyn imbridge_host::store::Backend>) -> Warm {
        Warm::load(&component_path(), store).expect("target/imbridge.wasm (./dev build)")
    }

    /// Instances of the component at `path` whose state lives in `store`.
    pub fn load(
        path: &std::path::Path,
        store: std::sync::Arc<dyn imbridge_host::store::Backend>,
    ) -> anyhow::Result<Warm> {
        let engine = imbridge_host::engine::new_engine(64 << 20, 32)?;
        let component = wasmtime::component::Component::from_file(&engine, path)?;
        let pre = plugin_pre(&engine, &component)?.bindings()?;
        Ok(Warm { engine, pre, store })
    }

    pub async fn instance(
        &self,
    ) -> (
        wasmtime::Store<imbridge_host::sandbox::CallState>,
        imbridge_host::bindings::Plugin,
    ) {
        let mut store = bench_store(&self.engine, self.store.clone()).expect("store");
        let plugin = self
            .pre
            .instantiate_async(&mut store)
            .await
            .expect("instance");
        (store, plugin)
    }
}

/// `call` (a handle-callback) on an existing instance; the number of approval updates.
pub async fn warm_call(
    store: &mut wasmtime::Store<imbridge_host::sandbox::CallState>,
    plugin: &imbridge_host::bindings::Plugin,
    call: &Call,
) -> usize {
    let Call::HandleCallback { app, request } = call else {
        unreachable!("callbacks only")
    };
    let r = plugin
        .call_handle_callback(&mut *store, app, request)
        .await
        .expect("call");
    updates(&imbridge_host::Reply::Callback(r))
}

/// The number of approval updates a successful callback reply carries.
pub fn updates(reply: &imbridge_host::Reply) -> usize {
    match reply {
        imbridge_host::Reply::Callback(Ok(o)) => o.updates.len(),
        other => panic!("callback failed: {other:?}"),
    }
}

/// A cheap, deterministic shuffle for interleaved measurements (abwarm, ratio): the variant
/// that runs first in a round must not be the same every round.
pub struct Shuffler(u64);

impl Default for Shuffler {
    fn default() -> Shuffler {
        Shuffler(0x9e37_79b9_7f4a_7c15)
    }
}

impl Shuffler {
    /// Reorders `order` in place (Fisher–Yates over xorshift64).
    pub fn shuffle(&mut self, order: &mut [usize]) {
        for i in (1..order.len()).rev() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            order.swap(i, (self.0 % (i as u64 + 1)) as usize);
        }
    }
}

/// The `q`-quantile of `sorted` (nearest rank).
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The median and 10th–90th percentile of per-round figures, as the paired tools record them
/// (`ratio`, `hostcosts`) and the report reads them.
pub fn spread(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"median": quantile(&v, 0.5), "p10": quantile(&v, 0.1), "p90": quantile(&v, 0.9)})
}

/// `--rounds N`, the one argument of the paired tools (`ratio`, `payloads`): at least 10,
/// 100 when not given.
pub fn rounds_arg(tool: &str) -> anyhow::Result<usize> {
    use anyhow::Context as _;
    let mut args = std::env::args().skip(1);
    let mut rounds = 100usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}; usage: {tool} [--rounds N]"),
        }
    }
    anyhow::ensure!(rounds >= 10, "--rounds must be at least 10");
    Ok(rounds)
}

/// Variants measured side by side: every round runs one batch of each (`batch(variant)`, its
/// time per item), in a new order each round, so the VM's drift moves them alike. Per variant,
/// the rounds' times in µs.
pub fn paired_rounds(
    rounds: usize,
    variants: usize,
    shuffler: &mut Shuffler,
    mut batch: impl FnMut(usize) -> anyhow::Result<std::time::Duration>,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut times = vec![Vec::with_capacity(rounds); variants];
    let mut order: Vec<usize> = (0..variants).collect();
    for _ in 0..rounds {
        shuffler.shuffle(&mut order);
        for &v in &order {
            times[v].push(batch(v)?.as_secs_f64() * 1e6);
        }
    }
    Ok(times)
}

/// A paired measurement's record: per variant (named by `names`) the spread of its times, and
/// per `(key, variant)` in `ratios` the spread of that variant's per-round ratio to variant 0.
pub fn paired_entry(names: &[&str], times: &[Vec<f64>], ratios: &[(&str, usize)]) -> Value {
    let mut entry = json!({
        "us": names.iter().zip(times)
            .map(|(name, t)| (name.to_string(), spread(t.clone())))
            .collect::<serde_json::Map<_, _>>(),
    });
    for &(key, v) in ratios {
        let per_round = times[v].iter().zip(&times[0]).map(|(c, n)| c / n).collect();
        entry[key] = spread(per_round);
    }
    entry
}

/// Writes `doc` to `target/bench/{file}`, for the report.
pub fn write_bench_json(file: &str, doc: &Value) -> anyhow::Result<()> {
    let dir = workspace().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(file), serde_json::to_string_pretty(doc)?)?;
    Ok(())
}

/// The cheapest complete call: a Feishu callback that is not a POST is refused before any
/// crypto or state access, so what is measured is the instance and the call machinery.
pub fn empty_call() -> Call {
    let mut input = Push {
        query: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
    }
    .host_input(Platform::Feishu);
    input["request"]["method"] = "GET".into();
    parse_call(Export::HandleCallback, &input).expect("input")
}
