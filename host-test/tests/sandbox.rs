//! The host against a synthetic plugin whose exports misbehave on purpose: loop forever, trap,
//! eat memory. Independent of the real component, so it pins down the host's own guarantees.

mod common;

use common::{
    Behaviour, component_of_modules, plugin, plugin_of_world, plugin_trapping_when_instantiated,
    poll_once, standard, wit_dir,
};
use imbridge_host::{Host, HostConfig, TenantPolicy};
use serde_json::{Value, json};
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

fn app() -> Value {
    json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t"})
}

fn notify_input() -> Value {
    json!({"app": null, "notification": {"target": {"chat": "oc_1"}, "title": "t"}})
}

async fn host(dir: &Path, timeout: Duration) -> Host {
    let mut cfg = HostConfig::new(dir);
    cfg.call_timeout = timeout;
    Host::new(cfg).unwrap()
}

/// A host in `dir` whose tenant `t` runs the [`standard`] plugin.
async fn standard_host(dir: &Path) -> Host {
    let host = host(dir, Duration::from_secs(5)).await;
    host.load_tenant_bytes("t", plugin(standard, "1"), TenantPolicy::default())
        .await
        .unwrap();
    host
}

#[tokio::test]
async fn plugin_errors_are_json_results() {
    let dir = tempfile::tempdir().unwrap();
    let host = standard_host(dir.path()).await;
    assert_callback_gives_the_plugins_error(&host).await;
    assert!(
        std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "cwasm")),
        "compiled component is cached on disk"
    );
}

#[tokio::test]
async fn runaway_plugin_hits_the_deadline_and_the_host_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_millis(500)).await;
    host.load_tenant_bytes("t", plugin(standard, "1"), TenantPolicy::default())
        .await
        .unwrap();
    let started = Instant::now();
    let err = host
        .invoke_json("t", "notify", notify_input())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(format!("{err:#}").contains("deadline exceeded"), "{err:#}");
    // Stopped at its deadline, not left running: the bound is loose for a loaded machine.
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");

    let err = host
        .invoke_json(
            "t",
            "get-approval",
            json!({"app": app(), "instance_id": "i"}),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("trap"), "{err:#}");
    assert!(!format!("{err:#}").contains("s3cr3t"));

    let err = host
        .invoke_json(
            "t",
            "cancel-approval",
            json!({"app": app(), "instance_id": "i"}),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("trap"), "{err:#}");

    // Still serving.
    let out = host
        .invoke_json(
            "t",
            "start-approval",
            json!({"app": app(), "request": {"key": "k", "title": "t", "initiator": {"id": "u"}}}),
        )
        .await
        .unwrap();
    assert_eq!(out["err"]["kind"], "invalid-input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_atomically_and_in_flight_calls_keep_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_millis(800)).await;
    let counted = |name: &str| match name {
        "notify" => Behaviour::Counted(&Behaviour::Loop),
        other => standard(other),
    };
    host.load_tenant_bytes("t", plugin(counted, "1"), TenantPolicy::default())
        .await
        .unwrap();

    let in_flight = {
        let host = host.clone();
        tokio::spawn(async move { host.invoke_json("t", "notify", notify_input()).await })
    };
    // Counted, so it runs version 1 by now.
    while host.kv_get("t", "notify").unwrap().is_none() {
        assert!(
            !in_flight.is_finished(),
            "the first call ended without running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.load_tenant_bytes(
        "t",
        plugin(|_| Behaviour::Err, "2"),
        TenantPolicy::default(),
    )
    .await
    .unwrap();
    let out = host
        .invoke_json("t", "notify", notify_input())
        .await
        .unwrap();
    assert_eq!(
        out["err"]["kind"], "invalid-input",
        "new version serves new calls"
    );
    let old = in_flight.await.unwrap().unwrap_err();
    assert!(format!("{old:#}").contains("deadline"), "{old:#}");
}

/// Polls a load once: that takes its place in the order of loads and starts compiling, and
/// it cannot finish before the compiler has.
async fn begin<F: Future<Output = anyhow::Result<()>>>(load: &mut Pin<Box<F>>) {
    poll_once(load, "loaded without waiting for the compiler").await;
}

/// Two loads of one tenant that overlap: the one asked for last stays installed, even when
/// the earlier one finishes compiling after it. Before, whichever finished last won, and both
/// callers were told their version was loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_overlapping_loads_the_later_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_secs(5)).await;
    let older = plugin(|_| Behaviour::Trap, "older");
    let mut older = Box::pin(host.load_tenant_bytes("t", older, TenantPolicy::default()));
    begin(&mut older).await;
    host.load_tenant_bytes(
        "t",
        plugin(|_| Behaviour::Err, "newer"),
        TenantPolicy::default(),
    )
    .await
    .unwrap();
    let err = older.await.unwrap_err();
    assert!(format!("{err:#}").contains("was not installed"), "{err:#}");
    let out = host
        .invoke_json("t", "notify", notify_input())
        .await
        .unwrap();
    assert_eq!(
        out["err"]["kind"], "invalid-input",
        "the newer version serves"
    );
}

/// An unload between a load's start and its end wins too: before, the load installed the
/// plugin again once it finished compiling, and its caller was told it was loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_asked_for_before_an_unload_does_not_undo_it() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_secs(5)).await;
    host.load_tenant_bytes("t", plugin(standard, "kept"), TenantPolicy::default())
        .await
        .unwrap();
    let mut load = Box::pin(host.load_tenant_bytes(
        "t",
        plugin(|_| Behaviour::Err, "late"),
        TenantPolicy::default(),
    ));
    begin(&mut load).await;
    assert!(host.unload_tenant("t"));
    let err = load.await.unwrap_err();
    assert!(format!("{err:#}").contains("unloaded"), "{err:#}");
    assert!(host.tenants().is_empty(), "{:?}", host.tenants());
    let err = host
        .invoke_json("t", "notify", notify_input())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("unknown tenant"), "{err:#}");

    // A load asked for after the unload installs as usual.
    host.load_tenant_bytes(
        "t",
        plugin(|_| Behaviour::Err, "late"),
        TenantPolicy::default(),
    )
    .await
    .unwrap();
    assert_eq!(host.tenants(), ["t"]);
}

/// Swapping versions for months must not keep every compiled version in memory: only the
/// versions some tenant runs stay, however many there were.
#[tokio::test]
async fn versions_no_tenant_runs_are_dropped_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_secs(5)).await;
    for version in ["1", "2", "3"] {
        host.load_tenant_bytes("t", plugin(standard, version), TenantPolicy::default())
            .await
            .unwrap();
        assert_eq!(host.compiled_components(), 1, "after version {version}");
    }
    // Another tenant on the same version shares it; on its own version it adds one.
    host.load_tenant_bytes("u", plugin(standard, "3"), TenantPolicy::default())
        .await
        .unwrap();
    assert_eq!(host.compiled_components(), 1);
    host.load_tenant_bytes("u", plugin(standard, "4"), TenantPolicy::default())
        .await
        .unwrap();
    assert_eq!(host.compiled_components(), 2);
    assert!(host.unload_tenant("u"));
    assert_eq!(host.compiled_components(), 1);
    assert!(host.unload_tenant("t"));
    assert_eq!(host.compiled_components(), 0);
    // Dropped from memory, not from disk: loading a recent version again needs no compile.
    let artifacts = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
    assert_eq!(artifacts, 4, "one artifact per version");
}

/// Artifacts on disk that no tenant runs go once they are a week old, but a restart, which
/// loads tenant after tenant, must not take the versions of tenants not loaded yet for
/// unused: before, the first load after a long uptime deleted them all.
#[tokio::test]
async fn a_restart_keeps_the_artifacts_of_tenants_loaded_later() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let artifacts = || std::fs::read_dir(&cache).unwrap().count();
    let age_all = || {
        let old = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        for e in std::fs::read_dir(&cache).unwrap() {
            let f = std::fs::File::options()
                .write(true)
                .open(e.unwrap().path())
                .unwrap();
            f.set_modified(old).unwrap();
        }
    };
    {
        let first = host(dir.path(), Duration::from_secs(5)).await;
        for (t, v) in [("t", "1"), ("u", "2")] {
            first
                .load_tenant_bytes(t, plugin(standard, v), TenantPolicy::default())
                .await
                .unwrap();
        }
    }
    assert_eq!(artifacts(), 2);
    age_all();
    let restarted = host(dir.path(), Duration::from_secs(5)).await;
    for (t, v) in [("t", "1"), ("u", "2")] {
        restarted
            .load_tenant_bytes(t, plugin(standard, v), TenantPolicy::default())
            .await
            .unwrap();
        assert_eq!(artifacts(), 2, "after loading {t}");
    }
    // Replacing t's version deletes its old one once that is a week old; u's stays (in use).
    age_all();
    restarted
        .load_tenant_bytes("t", plugin(standard, "3"), TenantPolicy::default())
        .await
        .unwrap();
    assert_eq!(artifacts(), 2, "version 1 deleted, 2 and 3 kept");
    restarted
        .load_tenant_bytes("t", plugin(standard, "1"), TenantPolicy::default())
        .await
        .unwrap();
    assert_eq!(artifacts(), 3, "version 1 compiled again");
}

#[tokio::test]
async fn host_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let host = standard_host(dir.path()).await;
    let cases = [
        ("nobody", "notify", notify_input(), "unknown tenant"),
        ("t", "frobnicate", json!({}), "unknown export"),
        (
            "t",
            "get-approval",
            json!({"app": app()}),
            "missing `instance_id`",
        ),
        (
            "t",
            "start-approval",
            json!({"app": {"id": "a", "platform": "s3cr3t"}, "request": {}}),
            "`app.platform`",
        ),
        (
            "t",
            "start-approval",
            json!({"app": {"id": "a", "platform": "feishu", "app_id": "x", "app_secret": "s",
                           "api_base": "not a url"}, "request": {"key": "k", "title": "t",
                           "initiator": {"id": "u"}}}),
            "api_base",
        ),
    ];
    for (tenant, export, input, want) in cases {
        let err = host.invoke_json(tenant, export, input).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains("s3cr3t"), "{msg}");
    }

    // A bad load is refused with its reason, and the tenant keeps what it runs.
    // Version 1 traps in `get-approval`; the refused replacement would answer.
    let get = json!({"app": app(), "instance_id": "i1", "refresh": false});
    let trapped = host
        .invoke_json("t", "get-approval", get.clone())
        .await
        .unwrap_err();
    assert!(format!("{trapped:#}").contains("trap"), "{trapped:#}");
    let bad = host
        .load_tenant_bytes("t", b"not wasm".to_vec(), TenantPolicy::default())
        .await
        .unwrap_err();
    assert!(
        format!("{bad:#}").contains("failed to parse WebAssembly module"),
        "{bad:#}"
    );
    let policy = TenantPolicy {
        allow_hosts: vec!["bad host:x".into()],
    };
    let bad = host
        .load_tenant_bytes("t", plugin(|_| Behaviour::Err, "2"), policy)
        .await
        .unwrap_err();
    assert!(
        format!("{bad:#}").contains("invalid allow_hosts"),
        "{bad:#}"
    );
    assert_eq!(
        host.tenant_policy("t").unwrap().allow_hosts,
        Vec::<String>::new()
    );
    let still = host
        .invoke_json("t", "get-approval", get)
        .await
        .unwrap_err();
    assert_eq!(format!("{still:#}"), format!("{trapped:#}"));
}

/// A plugin of more memories than one call's share of the pool is refused at load: a few of
/// its calls at once would otherwise take every pool slot, and every other tenant's calls
/// fail to instantiate. The tenant keeps the version it runs.
#[tokio::test]
async fn a_plugin_over_the_per_call_pool_share_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path(), Duration::from_secs(5)).await;
    host.load_tenant_bytes(
        "t",
        plugin(|_| Behaviour::Err, "1"),
        TenantPolicy::default(),
    )
    .await
    .unwrap();
    let err = host
        .load_tenant_bytes("t", component_of_modules(3), TenantPolicy::default())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("memories"), "{msg}");
    assert_callback_gives_the_plugins_error(&host).await;
}

/// An export whose name fits the world but whose type does not: the plugin is refused when it
/// is loaded, with an error that names the export, rather than failing (or misreading its
/// arguments) on every call; the tenant's loaded version stays in place.
#[tokio::test]
async fn an_export_of_the_wrong_type_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let wit = dir.path().join("wit");
    copy_dir(&wit_dir(), &wit);
    let world = wit.join("world.wit");
    let text = std::fs::read_to_string(&world).unwrap();
    let right = "export handle-callback: func(app: im-app, request: http-request) \
                 -> result<callback-outcome, error>;";
    let wrong = "export handle-callback: func(app: im-app, request: string) \
                 -> result<callback-outcome, error>;";
    assert!(
        text.contains(right),
        "wit/world.wit changed: update this test"
    );
    std::fs::write(&world, text.replace(right, wrong)).unwrap();

    let host = host(&dir.path().join("host"), Duration::from_secs(5)).await;
    host.load_tenant_bytes("t", plugin(standard, "1"), TenantPolicy::default())
        .await
        .unwrap();
    let err = host
        .load_tenant_bytes(
            "t",
            plugin_of_world(&wit, |_| Behaviour::Err, "2"),
            TenantPolicy::default(),
        )
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("does not fit the imbridge:plugin world"),
        "{msg}"
    );
    assert!(msg.contains("`handle-callback`"), "{msg}");
    // Compiled, refused, and not kept in memory.
    assert_eq!(host.compiled_components(), 1);

    assert_callback_gives_the_plugins_error(&host).await;
}

/// A plugin that fits the world but traps when instantiated is refused at load, naming the
/// trap; before, it replaced the working version and every call of the tenant failed.
#[tokio::test]
async fn a_plugin_that_traps_when_instantiated_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let host = standard_host(dir.path()).await;
    let err = host
        .load_tenant_bytes(
            "t",
            plugin_trapping_when_instantiated(),
            TenantPolicy::default(),
        )
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("fails when instantiated"), "{msg}");
    assert!(msg.contains("out of bounds"), "{msg}");
    assert_eq!(host.compiled_components(), 1);
    assert_callback_gives_the_plugins_error(&host).await;
    // A first load is refused the same way: no tenant is left without a working plugin.
    let err = host
        .load_tenant_bytes(
            "u",
            plugin_trapping_when_instantiated(),
            TenantPolicy::default(),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("fails when instantiated"));
    assert!(
        host.invoke_json("u", "get-approval", json!({}))
            .await
            .is_err()
    );
}

/// A tenant whose calls all wait (here at a gate; for real, on a platform that stopped
/// answering) takes at most its share of the call slots: another tenant's call runs at once.
/// Before, the first tenant's calls took every slot and the other's waited behind them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_calls_hang_leaves_slots_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HostConfig::new(dir.path());
    cfg.call_timeout = Duration::from_secs(60);
    cfg.max_concurrent_calls = 4;
    let host = Host::new(cfg).unwrap();
    let held = |_: &str| Behaviour::Counted(&Behaviour::Gated(&Behaviour::Err));
    host.load_tenant_bytes("slow", plugin(held, "1"), TenantPolicy::default())
        .await
        .unwrap();
    host.load_tenant_bytes("fine", plugin(standard, "1"), TenantPolicy::default())
        .await
        .unwrap();
    let ran = || {
        host.kv_get("slow", "handle-callback")
            .unwrap()
            .map_or(0, |v| String::from_utf8(v).unwrap().parse::<u32>().unwrap())
    };
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let host = host.clone();
            tokio::spawn(async move {
                host.invoke_json(
                    "slow",
                    "handle-callback",
                    json!({"app": app(), "request": {"body": "{}"}}),
                )
                .await
            })
        })
        .collect();
    // Three quarters of the four slots: three run, the fourth waits for one of them.
    common::until("three calls running", Duration::from_secs(20), || {
        ran() >= 3
    })
    .await;
    let other = tokio::time::timeout(
        Duration::from_secs(20),
        host.invoke_json(
            "fine",
            "handle-callback",
            json!({"app": app(), "request": {"body": "{}"}}),
        ),
    )
    .await
    .expect("the other tenant's call waited behind the hung ones")
    .unwrap();
    assert_eq!(other["err"]["kind"], "invalid-input");
    assert_eq!(
        ran(),
        3,
        "the fourth call still waits for its tenant's share"
    );
    host.kv_set("slow", common::GATE, b"open").unwrap();
    for call in calls {
        let out = call.await.unwrap().unwrap();
        assert_eq!(out["err"]["kind"], "invalid-input");
    }
    assert_eq!(ran(), 4);
}

/// `handle-callback` on tenant `t`, whose plugin answers it with `err(invalid-input("x"))`.
async fn assert_callback_gives_the_plugins_error(host: &Host) {
    let out = host
        .invoke_json(
            "t",
            "handle-callback",
            json!({"app": app(), "request": {"body": "{}"}}),
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"err": {"kind": "invalid-input", "message": "x"}})
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A second host loads the artifact the first one wrote instead of compiling again: the one
/// `.cwasm` file is the same file (a compile writes a new one and renames it into place).
#[tokio::test]
async fn precompiled_cache_is_reused_across_hosts() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugin(standard, "1");
    let artifacts = || -> Vec<(std::path::PathBuf, u64)> {
        std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .map(|e| (e.path(), e.metadata().unwrap().ino()))
            .collect()
    };
    {
        let host = host(dir.path(), Duration::from_secs(5)).await;
        host.load_tenant_bytes("t", wasm.clone(), TenantPolicy::default())
            .await
            .unwrap();
    }
    let written = artifacts();
    assert_eq!(written.len(), 1, "{written:?}");
    let host = host(dir.path(), Duration::from_secs(5)).await;
    host.load_tenant_bytes("t", wasm, TenantPolicy::default())
        .await
        .unwrap();
    assert_eq!(artifacts(), written, "the artifact was written again");
    assert_callback_gives_the_plugins_error(&host).await;
}
