//! A transient storage fault at every key-value operation of a callback and of a start, one
//! at a time: the call fails with a typed storage error, and what the platform or the engine
//! does next (redeliver the callback, retry the start) ends where a run without the fault
//! ends. No decision is lost and no second approval is created.
//!
//! Two hosts are modelled. The reference host discards every write of a failed callback (its
//! redelivery then starts from the same state); another host may keep the writes made before
//! the fault. Increments always stay, as in the reference host, which commits them at once.

use crate::approval;
use crate::callback;
use crate::env::fake::FakeEnv;
use crate::env::{Env, Request, Response};
use crate::error::{Error, Result};
use crate::model::{Approval, ApprovalRequest, ApprovalStatus, ImApp};
use crate::platform::dingtalk::tests::{self as dingtalk, app, push};
use crate::platform::wecom::tests as wecom;
use serde_json::json;
use std::cell::Cell;
use std::rc::Rc;

/// A platform that cannot deduplicate creates, scripted: its app, a request, its replies and
/// the path of its create request.
struct Scripted {
    app: fn() -> ImApp,
    request: fn() -> ApprovalRequest,
    reply: fn(&Request) -> Result<Response>,
    create: &'static str,
}

const DINGTALK: Scripted = Scripted {
    app: dingtalk::app,
    request: dingtalk::request,
    reply: dingtalk::scripted_reply,
    create: "/v1.0/workflow/processInstances",
};

const WECOM: Scripted = Scripted {
    app: wecom::app,
    request: wecom::req,
    reply: wecom::scripted_reply,
    create: "/cgi-bin/oa/applyevent",
};

impl Scripted {
    /// Its simulated API, and a count of the create requests sent to it.
    fn env(&self) -> (FakeEnv, Rc<Cell<usize>>) {
        let reply = self.reply;
        FakeEnv::counting(self.create, move |r, _| reply(r))
    }

    /// The same API, except that the first create request gets `first`.
    fn env_answering_first(&self, first: fn() -> Result<Response>) -> (FakeEnv, Rc<Cell<usize>>) {
        let reply = self.reply;
        FakeEnv::counting(self.create, move |r, n| match n {
            Some(1) => first(),
            _ => reply(r),
        })
    }

    fn start(&self, env: &FakeEnv) -> Result<Approval> {
        approval::start(env, &(self.app)(), &(self.request)())
    }
}

fn is_injected(e: &Error) -> bool {
    matches!(e, Error::Storage(m) if m.contains("injected fault"))
}

/// An approver's decision on the started approval, as DingTalk pushes it.
fn decision(env: &FakeEnv) -> crate::model::HttpRequest {
    let ev = json!({"EventType": "bpms_task_change", "processInstanceId": "inst-1",
        "type": "finish", "result": "agree", "staffId": "a", "taskId": 11,
        "finishTime": 1_700_000_000_000u64});
    push(env, &ev, "dingappkey")
}

#[test]
fn a_callback_survives_a_storage_fault_at_every_step() {
    let (env, _) = DINGTALK.env();
    let started = DINGTALK.start(&env).unwrap();
    assert_eq!(started.status, ApprovalStatus::Pending);
    let before = env.snapshot();
    let first_op = env.kv_ops();
    let clean = callback::handle(&env, &app(), &decision(&env)).unwrap();
    assert_eq!(clean.updates.len(), 1);
    assert_eq!(clean.updates[0].decisions.len(), 1);
    let after = env.snapshot();
    let ops = env.kv_ops() - first_op;
    assert_eq!(ops, 2, "load and save");

    for discard in [true, false] {
        for op in 0..ops {
            let env = FakeEnv::with_store(before.clone(), env.now_ms());
            env.set_responder(dingtalk::scripted_reply);
            env.fail_kv_op(Some(op));
            let err = callback::handle(&env, &app(), &decision(&env)).unwrap_err();
            assert!(is_injected(&err), "operation {op}: {err}");
            if discard {
                *env.kv.borrow_mut() = before.clone();
            }
            env.fail_kv_op(None);
            // The platform redelivers the same push.
            let again = callback::handle(&env, &app(), &decision(&env)).unwrap();
            assert_eq!(env.snapshot(), after, "operation {op}, discard {discard}");
            // The reply is encrypted afresh each time (its own nonce), so only its status
            // compares.
            assert_eq!(again.response.status, clean.response.status);
            // Saving the record is the call's only write, so whether the host kept or
            // discarded what the failed call wrote, the redelivery reports the decision.
            assert_eq!(
                again.updates, clean.updates,
                "operation {op}, discard {discard}"
            );
        }
    }
}

/// Starts once with storage operation `op` failing and, if that failed, once more as the
/// engine's retry; returns the approval and how many create requests went out in all.
fn start_with_fault(platform: &Scripted, op: usize) -> (Result<Approval>, usize) {
    let (env, creates) = platform.env();
    env.fail_kv_op(Some(op));
    let first = platform.start(&env);
    env.fail_kv_op(None);
    let retried = first.is_err();
    let result = match first {
        // A cache the start can do without (the access token's) failed: no harm done.
        Ok(a) => Ok(a),
        Err(e) => {
            assert!(is_injected(&e), "operation {op}: {e}");
            platform.start(&env)
        }
    };
    let kept: Vec<String> = env.kv.borrow().keys().cloned().collect();
    assert!(
        !kept.iter().any(|k| k.contains("/unsaved/")),
        "operation {op}: {kept:?}"
    );
    // A retry that saved the record took the mark away with it (a start that succeeded
    // despite the fault may have kept it, beside the record, where callbacks never read it).
    if retried && result.is_ok() {
        assert!(
            !kept.iter().any(|k| k.contains("/starting/")),
            "operation {op}: {kept:?}"
        );
    }
    (result, creates.get())
}

/// Including a fault on taking the key's claim, and one after the create (the approval exists
/// but its record is not saved: the retry saves it rather than leaving the key to a person).
#[test]
fn a_start_survives_a_storage_fault_at_every_step() {
    for platform in [DINGTALK, WECOM] {
        let (env, creates) = platform.env();
        let clean = platform.start(&env).unwrap();
        assert_eq!(creates.get(), 1);
        let ops = env.kv_ops();
        assert!(ops >= 8, "{ops} operations");
        for op in 0..ops {
            let (result, creates) = start_with_fault(&platform, op);
            let app = (platform.app)().id;
            assert_eq!(result, Ok(clean.clone()), "{app}: operation {op}");
            assert_eq!(creates, 1, "{app}: operation {op}");
        }
    }
}

/// Starts with storage operation `op` failing in the first start only, as the engine would:
/// again after each error, at most three times in all. The platform answers its first
/// create request with `first`, later ones as usual. Returns the last answer and how many
/// create requests went out.
fn starts_with_fault(
    platform: &Scripted,
    first: fn() -> Result<Response>,
    op: Option<usize>,
) -> (FakeEnv, Result<Approval>, usize) {
    let (env, creates) = platform.env_answering_first(first);
    env.fail_kv_op(op);
    let mut last = platform.start(&env);
    env.fail_kv_op(None);
    for _ in 0..2 {
        if last.is_ok() {
            break;
        }
        last = platform.start(&env);
    }
    (env, last, creates.get())
}

/// The kv operations of a first start whose create gets `first`.
fn first_start_ops(platform: &Scripted, first: fn() -> Result<Response>) -> usize {
    let (env, _) = platform.env_answering_first(first);
    assert!(platform.start(&env).is_err());
    env.kv_ops()
}

/// A create the platform refused made nothing, so the key must stay free whichever storage
/// operation fails: moving the failure counter on is the only write that frees it, and a
/// fault there used to leave the key answering -2 for an hour, then -3.
#[test]
fn a_refused_start_survives_a_storage_fault_at_every_step() {
    let refused = || crate::env::fake::json_response(503, json!({"code": "Busy"}));
    for platform in [DINGTALK, WECOM] {
        let (_, clean, creates) = starts_with_fault(&platform, refused, None);
        let clean = clean.unwrap();
        assert_eq!(creates, 2);
        for op in 0..first_start_ops(&platform, refused) {
            let (_, result, creates) = starts_with_fault(&platform, refused, Some(op));
            let app = (platform.app)().id;
            assert_eq!(result, Ok(clean.clone()), "{app}: operation {op}");
            assert_eq!(creates, 2, "{app}: operation {op}");
        }
    }
}

/// A store may apply an increment and lose its answer. Freeing the key after a refused create
/// must then still move the failure counter by one generation, not two: every value it
/// passes through is a generation that a concurrent start may claim and create under, so
/// two steps let two such starts each create an approval for the key.
#[test]
fn a_release_whose_answer_was_lost_moves_the_counter_once() {
    let refused = || crate::env::fake::json_response(503, json!({"code": "Busy"}));
    for platform in [DINGTALK, WECOM] {
        let app = (platform.app)().id;
        let mut hit = 0;
        for op in 0..first_start_ops(&platform, refused) {
            let (env, creates) = platform.env_answering_first(refused);
            env.lose_answers(true);
            env.fail_kv_op(Some(op));
            assert!(platform.start(&env).is_err(), "{app}: operation {op}");
            env.fail_kv_op(None);
            let Some(key) = env.lost_answer.take() else {
                continue;
            };
            if !key.contains("/failed/") {
                continue;
            }
            hit += 1;
            assert_eq!(env.kv_increment(&key, 0), Ok(1), "{app}: operation {op}");
            // The key is free: the engine's retry creates the approval.
            assert!(platform.start(&env).is_ok(), "{app}: operation {op}");
            assert_eq!(creates.get(), 2, "{app}: operation {op}");
        }
        assert_eq!(hit, 1, "{app}: one release per refused start");
    }
}

/// A create whose outcome is unknown is never sent again, and every start with the key after
/// it answers -3 whichever storage operation fails: a fault while recording the outcome
/// used to answer `storage`, then -2 ("in progress, retry") for an hour.
#[test]
fn an_unknown_outcome_survives_a_storage_fault_at_every_step() {
    let lost = || Err(Error::transport("request to the platform: timed out"));
    let unknown = |r: &Result<Approval>| {
        matches!(
            r,
            Err(Error::Platform {
                code: -3,
                retryable: false,
                ..
            })
        )
    };
    for platform in [DINGTALK, WECOM] {
        let app = (platform.app)().id;
        for op in 0..first_start_ops(&platform, lost) {
            let (env, result, creates) = starts_with_fault(&platform, lost, Some(op));
            assert!(unknown(&result), "{app}: operation {op}: {result:?}");
            assert_eq!(creates, 1, "{app}: operation {op}");
            let again = platform.start(&env);
            assert!(unknown(&again), "{app}: operation {op}: {again:?}");
        }
    }
}

/// WeCom's detail of the started approval: pending, or approved by "a".
fn wecom_detail(decided: bool) -> impl Fn(&Request) -> Result<Response> {
    move |r: &Request| {
        if !r.url.contains("/cgi-bin/oa/getapprovaldetail") {
            return wecom::scripted_reply(r);
        }
        let (status, details) = match decided {
            false => (1, json!([])),
            true => (
                2,
                json!([{"approver": {"userid": "a"}, "sp_status": 2, "speech": "", "sptime": 10}]),
            ),
        };
        crate::env::fake::json_response(
            200,
            json!({"errcode": 0, "info": {"sp_no": "202401010001", "sp_status": status,
                "sp_record": [{"details": details}]}}),
        )
    }
}

#[test]
fn a_refresh_survives_a_storage_fault_at_every_step() {
    let env = FakeEnv::new(wecom_detail(false));
    let started = WECOM.start(&env).unwrap();
    assert_eq!(started.status, ApprovalStatus::Pending);
    let before = env.snapshot();
    let refresh = |env: &FakeEnv| approval::get(env, &wecom::app(), &started.instance_id, true);
    env.set_responder(wecom_detail(true));
    let first_op = env.kv_ops();
    let clean = refresh(&env).unwrap();
    assert_eq!(clean.status, ApprovalStatus::Approved);
    let after = env.snapshot();
    let ops = env.kv_ops() - first_op;
    assert!(ops >= 2, "load and save: {ops} operations");

    for discard in [true, false] {
        for op in 0..ops {
            let env = FakeEnv::with_store(before.clone(), env.now_ms());
            env.set_responder(wecom_detail(true));
            env.fail_kv_op(Some(op));
            match refresh(&env) {
                // A cache it can do without (the access token's) failed.
                Ok(a) => assert_eq!(a, clean, "operation {op}"),
                Err(e) => {
                    assert!(is_injected(&e), "operation {op}: {e}");
                    if discard {
                        *env.kv.borrow_mut() = before.clone();
                    }
                    env.fail_kv_op(None);
                    assert_eq!(refresh(&env), Ok(clean.clone()), "operation {op}");
                }
            }
            assert_eq!(env.snapshot(), after, "operation {op}, discard {discard}");
        }
    }
}

/// Callbacks for an approval without a record are refused while its start's mark stands (the
/// platform delivers them again), but a platform gives up in the end, and decisions made
/// between a start that could not save its record and the retry that saves it may come before
/// the retry: the retry reads the approval back first, as every start does.
#[test]
fn the_retry_that_saves_a_record_reads_the_approval_back() {
    let mut recovered = 0;
    for op in 0.. {
        let env = FakeEnv::new(wecom_detail(false));
        env.fail_kv_op(Some(op));
        let first = WECOM.start(&env);
        if env.kv_ops() <= op {
            break;
        }
        env.fail_kv_op(None);
        if first.is_ok() {
            continue;
        }
        let created = env
            .sent
            .borrow()
            .iter()
            .any(|r| r.url.contains("/cgi-bin/oa/applyevent"));
        env.set_responder(wecom_detail(true));
        let a = WECOM.start(&env).unwrap();
        assert_eq!(a.status, ApprovalStatus::Approved, "operation {op}");
        assert_eq!(a.decisions.len(), 1, "operation {op}");
        recovered += usize::from(created);
    }
    assert!(recovered >= 2, "{recovered} faults after the create");
}
