//! The one approval state machine. Starts are idempotent per (app, key); callbacks and polling
//! both feed `apply`; terminal states never change; duplicate events are no-ops, by content
//! (see `apply_inbound`).

use crate::env::{Env, EnvExt, app_key};
use crate::error::{Error, Result};
use crate::http;
use crate::model::{Approval, ApprovalRequest, ApprovalStatus, Decision, ImApp, SignMode};
use crate::platform::{self, CreateError, Created};
use serde::{Deserialize, Serialize};

const MAX_KEY_LEN: usize = 256;
/// The platforms' instance ids are 18–64 characters. A longer one was never started, and as
/// part of a storage key it could pass a host's key limit, which would read as a retryable
/// storage error rather than the engine's mistake.
const MAX_INSTANCE_ID_LEN: usize = 256;
const MAX_TITLE_LEN: usize = 200;
pub(crate) const MAX_NODES: usize = 20;
pub(crate) const MAX_APPROVERS_PER_NODE: usize = 100;
pub(crate) const MAX_CC: usize = 100;

/// What the plugin keeps per instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub approval: Approval,
    /// Platform data needed for later calls (e.g. Feishu's approval code, the initiator).
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// Something the platform said about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Decision(Decision),
    Status(ApprovalStatus),
}

/// An event from a callback, about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub instance_id: String,
    pub event: Event,
}

impl Record {
    /// Applies every event in order; returns whether any changed the record.
    pub fn apply_all(&mut self, events: &[Event]) -> bool {
        events
            .iter()
            .fold(false, |changed, e| self.apply(e) | changed)
    }

    /// Returns whether anything changed. Decisions arriving after a terminal status are still
    /// recorded (platforms do not order task and instance events), but the status never moves
    /// again once terminal.
    pub fn apply(&mut self, event: &Event) -> bool {
        let a = &mut self.approval;
        match event {
            Event::Status(s) => {
                if a.status.is_terminal() || *s == ApprovalStatus::Pending {
                    return false;
                }
                a.status = *s;
                true
            }
            Event::Decision(d) => {
                // Callbacks and polling report the same decision with slightly different
                // timestamps, so a decision is identified by who and which way.
                if let Some(x) = a
                    .decisions
                    .iter_mut()
                    .find(|x| x.user == d.user && x.approved == d.approved)
                {
                    if x.comment.is_none() && d.comment.is_some() {
                        x.comment = d.comment.clone();
                        return true;
                    }
                    return false;
                }
                // Only ever inserted here, so the list stays in time order (ties by arrival)
                // without a sort, which would cost the component ~5 KB of sorting code.
                let at = a.decisions.partition_point(|x| x.at_ms <= d.at_ms);
                a.decisions.insert(at, d.clone());
                // The layout is read only here: most events are duplicates or statuses. It may
                // reject, never approve: an approver can add approvers (加签), which the layout
                // does not show, so only the platform's own status (its instance event or a
                // poll) says approved. Declaring approved early would let a deployment through
                // that the added approver may still refuse.
                if !self.approval.status.is_terminal()
                    && let Some(s @ ApprovalStatus::Rejected) = self
                        .local_nodes()
                        .and_then(|n| evaluate_nodes(&n, &self.approval.decisions))
                {
                    self.approval.status = s;
                }
                true
            }
        }
    }

    /// Node layout for platforms whose callbacks report only individual decisions; they store
    /// it at start as `meta.nodes = [{"mode": "and"|"or", "approvers": [ids]}]`.
    fn local_nodes(&self) -> Option<Vec<(SignMode, Vec<String>)>> {
        #[derive(Deserialize)]
        struct Node {
            mode: SignMode,
            approvers: Vec<String>,
        }
        let nodes = Vec::<Node>::deserialize(self.meta.get("nodes")?).ok()?;
        Some(nodes.into_iter().map(|n| (n.mode, n.approvers)).collect())
    }
}

fn instance_key(app: &ImApp, instance_id: &str) -> String {
    app_key(app, "i", instance_id)
}
/// An increment a start makes once its create has answered: unlike the record, it is visible
/// to other calls before the start commits.
fn starting_key(app: &ImApp, instance_id: &str) -> String {
    app_key(app, "starting", instance_id)
}
fn index_key(app: &ImApp, key: &str) -> String {
    app_key(app, "k", key)
}
fn claim_key(app: &ImApp, key: &str, generation: u64) -> String {
    // Generation 0 keeps the key of versions before generations, so an attempt such a
    // version still has in flight keeps its claim.
    match generation {
        0 => app_key(app, "claim", key),
        g => format!("{}/{g}", app_key(app, "claim", key)),
    }
}
/// Versions before generations wrote `{"attempt": n}` here when generation 0 failed.
fn legacy_attempt_key(app: &ImApp, key: &str) -> String {
    app_key(app, "attempt", key)
}
/// A counter: attempts that ended before anything was created (on DingTalk and WeCom, which
/// cannot deduplicate creates), i.e. the generation the next attempt claims.
fn failed_key(app: &ImApp, key: &str) -> String {
    app_key(app, "failed", key)
}
/// Versions before timed claims counted claims and kept the owner's time (ms since the
/// epoch) here; it is still written, for a rollback to one of them.
fn claimed_at_key(app: &ImApp, key: &str, generation: u64) -> String {
    format!("{}/{generation}", app_key(app, "claimed-at", key))
}
/// A claim counter at least this large holds its owner's time (ms since the epoch) rather
/// than a count of attempts, as claims of versions before timed claims did.
const TIMED_CLAIMS_FROM: u64 = 1 << 40;
/// When the timed claim `held` was taken, as seen at `now`. Starts that found the claim free
/// at the same moment each added their time, so `held` is the sum of k close times, and k
/// is the multiple of `now` nearest to it (exact while they lie within years of `now`).
fn claim_time(held: u64, now: u64) -> u64 {
    let now = now.max(TIMED_CLAIMS_FROM);
    held / ((held + now / 2) / now).max(1)
}
/// A start claimed longer ago than this is taken as interrupted: no host lets a call run
/// longer (the reference host's longest `call_timeout_secs` is 3600).
const INTERRUPTED_AFTER_MS: u64 = 3_600_000;
/// start-approval reads its new approval back only when the start has been this quick, and
/// gives that read this long, tried once: the read is optional, and a slow platform must not
/// push a start whose create succeeded towards the host's deadline, where a host that does
/// not cut requests short of it would cut the start off and its record would be lost.
const READ_BACK_IF_STARTED_WITHIN_MS: u64 = 5_000;
pub(crate) const READ_BACK_LIMIT_MS: u64 = 2_000;
/// Why a create request that went out may have created an approval without the plugin
/// learning its id.
fn unknown_key(app: &ImApp, key: &str) -> String {
    app_key(app, "unknown", key)
}
/// A created approval whose record a storage fault kept from being saved: the next start
/// with its key saves it, instead of leaving the key to a person.
fn unsaved_key(app: &ImApp, key: &str) -> String {
    app_key(app, "unsaved", key)
}

pub fn load(env: &(impl Env + ?Sized), app: &ImApp, instance_id: &str) -> Result<Option<Record>> {
    env.kv_get_json(&instance_key(app, instance_id))
}

fn save(env: &(impl Env + ?Sized), app: &ImApp, rec: &mut Record) -> Result<()> {
    rec.approval.updated_at_ms = env.now_ms();
    env.kv_set_json(&instance_key(app, &rec.approval.instance_id), rec)
}

pub fn validate(req: &ApprovalRequest) -> Result<()> {
    let key = req.key.trim();
    if key.is_empty() || req.key.len() > MAX_KEY_LEN {
        return Err(Error::input(format!(
            "key must be 1..={MAX_KEY_LEN} bytes (UTF-8)"
        )));
    }
    if req.title.trim().is_empty() || req.title.chars().count() > MAX_TITLE_LEN {
        return Err(Error::input(format!(
            "title must be 1..={MAX_TITLE_LEN} characters"
        )));
    }
    if req.nodes.is_empty() || req.nodes.len() > MAX_NODES {
        return Err(Error::input(format!(
            "between 1 and {MAX_NODES} approval nodes are required"
        )));
    }
    for (i, n) in req.nodes.iter().enumerate() {
        if n.approvers.is_empty() || n.approvers.len() > MAX_APPROVERS_PER_NODE {
            return Err(Error::input(format!(
                "node {} needs 1..={MAX_APPROVERS_PER_NODE} approvers",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Limits newer than some stored approvals: checked only before a create, so a start with
/// the key of one made earlier still returns it.
fn validate_new(req: &ApprovalRequest) -> Result<()> {
    if req.cc.len() > MAX_CC {
        return Err(Error::input(format!("at most {MAX_CC} cc recipients")));
    }
    Ok(())
}

/// A stable per-(app, key) token for platforms that deduplicate creates themselves.
pub fn idempotency_token(app: &ImApp, key: &str) -> String {
    let h = crate::env::hex(&crate::crypto::sha256(&[
        app.id.as_bytes(),
        b"\0",
        key.as_bytes(),
    ]));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn start(env: &(impl Env + ?Sized), app: &ImApp, req: &ApprovalRequest) -> Result<Approval> {
    let began_ms = env.now_ms();
    validate(req)?;
    if let Some(existing) = find_by_key(env, app, &req.key)? {
        return Ok(existing.approval);
    }
    let unsaved = unsaved_key(app, &req.key);
    if let Some(rec) = env.kv_get_json(&unsaved)? {
        let approval = save_started(env, app, &req.key, rec, began_ms)?;
        // Indexed now, so never read again; should the delete fail, a stale copy costs
        // only its space.
        let _ = env.kv_delete(&unsaved);
        return Ok(approval);
    }
    validate_new(req)?;
    if platform::dedups_creates(app.platform) {
        // A repeated create with the same token returns the first instance.
        let token = idempotency_token(app, &req.key);
        let created = platform::create(env, app, req, &token).map_err(|e| match e {
            // A repeat with the token is handed the first instance: a create that may have
            // happened (an unreadable 2xx) is for the engine's retry to settle, never final.
            CreateError {
                error: Error::Platform { code, message, .. },
                maybe_created: true,
            } => Error::platform(code, message, true),
            e => e.error,
        })?;
        return record_created(env, app, req, created, began_ms);
    }
    if let Some(why) = env.kv_get(&unknown_key(app, &req.key))? {
        return Err(outcome_unknown(&String::from_utf8_lossy(&why)));
    }
    // Lookups and the form or template before the claim: a start cut off while they run (a
    // long list of mobiles against a slow platform) then holds nothing, where under the claim
    // it held the key for an hour and then answered -3 although nothing was sent.
    let prepared = platform::prepare(env, app, req)?;
    // Incrementing by 0 reads the counter atomically.
    let failed = env.kv_increment(&failed_key(app, &req.key), 0)?;
    let legacy = env.kv_get(&legacy_attempt_key(app, &req.key))?.is_some();
    let generation = failed.max(u64::from(legacy));
    // The counter is the only cross-call primitive: whoever moves it first owns this
    // generation. Each generation has its own counter, so attempts refused while another
    // was in flight cannot block the ones after its failure. Counters are also all that
    // commit when a call is cut off (trap, deadline, host crash), so the owner takes the
    // claim by adding its time: no cut-off can leave a claim whose age later starts cannot
    // tell. Refused starts only read it.
    let claim = claim_key(app, &req.key, generation);
    let stamp = claimed_at_key(app, &req.key, generation);
    let now = env.now_ms().max(1);
    // What other starts added: nothing if this one took the claim.
    let held = match env.kv_increment(&claim, 0)? {
        0 => env
            .kv_increment(&claim, now)?
            .checked_sub(now)
            .ok_or_else(|| Error::storage("a claim counter went backwards"))?,
        other => other,
    };
    if held != 0 {
        let at = match held {
            TIMED_CLAIMS_FROM.. => claim_time(held, now),
            _ => env.kv_increment(&stamp, 0)?,
        };
        if at != 0 && now.saturating_sub(at) > INTERRUPTED_AFTER_MS {
            return Err(outcome_unknown(
                "the start that claimed the key over an hour ago never finished",
            ));
        }
        return Err(Error::platform(
            -2,
            "another start for this key is in progress; retry later",
            true,
        ));
    }
    // Only for a rollback to a version before timed claims, which reads the time here.
    let _ = env.kv_increment(&stamp, now);
    // Nothing has gone out yet: moving the failure counter on hands the next start a new
    // generation, as after a refused create. It is the only write that frees the key, so a
    // transient storage fault gets a second try rather than holding the key for an hour. The
    // first try may have applied with its answer lost: only this start moves the counter
    // past `generation`, so a counter already past it is not moved again, since every value
    // it passes through is a generation another start may claim and create under.
    let release = |error: Error| {
        let failed_key = failed_key(app, &req.key);
        let step = generation + 1 - failed;
        env.kv_increment(&failed_key, step).or_else(|_| {
            match env.kv_increment(&failed_key, 0)? {
                moved if moved > generation => Ok(moved),
                _ => env.kv_increment(&failed_key, step),
            }
        })?;
        Err(error)
    };
    let meta = prepared.meta().clone();
    match platform::send(env, app, prepared) {
        Ok(created) => record_created(env, app, req, created, began_ms),
        // Released first: the check may take a while, and a start cut off during it must not
        // hold the key.
        Err(CreateError {
            error,
            maybe_created: false,
        }) => release(error).map_err(|e| platform::forget_gone(env, app, &meta, e)),
        Err(CreateError {
            error,
            maybe_created: true,
        }) => {
            let why = error.to_string();
            // Whether or not this is recorded, the answer is the same: should both tries fail,
            // the claim holds the key as for a start cut off here, and after an hour later
            // starts answer -3 too.
            let unknown = unknown_key(app, &req.key);
            let _ = env
                .kv_set(&unknown, why.as_bytes())
                .or_else(|_| env.kv_set(&unknown, why.as_bytes()));
            Err(outcome_unknown(&why))
        }
    }
}

/// Retrying cannot help: only a person can see whether the IM app has the approval.
fn outcome_unknown(why: &str) -> Error {
    Error::platform(
        -3,
        format!(
            "a start for this key may have created an approval the plugin has no id for: its \
             create request's outcome is unknown ({why}); check the IM app, cancel the \
             approval there if it exists, and start again with a new key"
        ),
        false,
    )
}

fn record_created(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    req: &ApprovalRequest,
    created: Created,
    began_ms: u64,
) -> Result<Approval> {
    let Created { instance_id, meta } = created;
    let rec = Record {
        approval: Approval {
            instance_id,
            key: req.key.clone(),
            status: ApprovalStatus::Pending,
            decisions: Vec::new(),
            updated_at_ms: 0,
        },
        meta,
    };
    save_started(env, app, &req.key, rec, began_ms)
}

/// Saves a started approval's record and indexes it under its key. On a storage fault the
/// record is kept for the next start with the key to save: the approval exists, and a second
/// create would split its approvers' decisions.
fn save_started(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    key: &str,
    mut rec: Record,
    began_ms: u64,
) -> Result<Approval> {
    // The record commits only when this call returns. Callbacks for the instance from the
    // increment on are refused (see `apply_inbound`), so the platform delivers them again,
    // after the commit, which deletes the mark. One made before (a decision the platform
    // made at once: an initiator who is also an approver is approved automatically) would
    // be dropped: the read catches it. Both are best effort: the approval exists, so their
    // failure fails nothing.
    let starting = starting_key(app, &rec.approval.instance_id);
    let _ = env.kv_increment(&starting, env.now_ms());
    let mut events = Vec::new();
    if env.now_ms().saturating_sub(began_ms) <= READ_BACK_IF_STARTED_WITHIN_MS
        && let Some(read) = read_once(env, app, &rec)
    {
        events = read;
    }
    let saved = (|| {
        // Feishu hands a concurrent start with the same key the same instance; if that start
        // has recorded it meanwhile (and callbacks may have moved it on), its record stands,
        // as does one an earlier attempt saved before failing to index it.
        let mut changed = match load(env, app, &rec.approval.instance_id)? {
            Some(existing) => {
                rec = existing;
                false
            }
            None => true,
        };
        changed |= rec.apply_all(&events);
        if changed {
            save(env, app, &mut rec)?;
        }
        // A mark left beside the record is harmless: callbacks find the record first.
        let _ = env.kv_delete(&starting);
        env.kv_set(&index_key(app, key), rec.approval.instance_id.as_bytes())
    })();
    match saved {
        Ok(()) => Ok(rec.approval),
        Err(e) => {
            // Should this fail too, the claim holds the key as for a start cut off mid-way.
            let _ = env.kv_set_json(&unsaved_key(app, key), &rec);
            Err(e)
        }
    }
}

fn find_by_key(env: &(impl Env + ?Sized), app: &ImApp, key: &str) -> Result<Option<Record>> {
    match env.kv_get(&index_key(app, key))? {
        None => Ok(None),
        Some(id) => {
            let id = String::from_utf8(id).map_err(|_| Error::storage("corrupt key index"))?;
            load(env, app, &id)
        }
    }
}

fn must_load(env: &(impl Env + ?Sized), app: &ImApp, instance_id: &str) -> Result<Record> {
    if instance_id.len() > MAX_INSTANCE_ID_LEN {
        return Err(Error::input(format!(
            "no approval has an id longer than {MAX_INSTANCE_ID_LEN} bytes"
        )));
    }
    load(env, app, instance_id)?.ok_or_else(|| {
        Error::input(format!(
            "no approval {instance_id:?} was started through app {:?}",
            app.id
        ))
    })
}

/// One best-effort read of the approval from the platform, given [`READ_BACK_LIMIT_MS`] and
/// tried once: `None` when it failed.
fn read_once(env: &(impl Env + ?Sized), app: &ImApp, rec: &Record) -> Option<Vec<Event>> {
    http::bounded(env, READ_BACK_LIMIT_MS, || platform::poll(env, app, rec)).ok()
}

pub fn get(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    instance_id: &str,
    refresh: bool,
) -> Result<Approval> {
    let mut rec = must_load(env, app, instance_id)?;
    if refresh {
        let events = platform::poll(env, app, &rec)?;
        if rec.apply_all(&events) {
            save(env, app, &mut rec)?;
        }
    }
    Ok(rec.approval)
}

pub fn cancel(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    instance_id: &str,
    reason: Option<&str>,
) -> Result<Approval> {
    let rec = must_load(env, app, instance_id)?;
    if rec.approval.status.is_terminal() {
        return Ok(rec.approval);
    }
    if let Err(refused) = platform::cancel(env, app, &rec, reason) {
        // When a platform refuses, the approval may have ended there (decided before its
        // callback arrived here): one read tells, and then how it ended is the answer.
        if matches!(refused, Error::Platform { .. })
            && let Some(read) = read_once(env, app, &rec)
        {
            let mut rec = must_load(env, app, instance_id)?;
            let changed = rec.apply_all(&read);
            if rec.approval.status.is_terminal() {
                if changed {
                    save(env, app, &mut rec)?;
                }
                return Ok(rec.approval);
            }
        }
        return Err(refused);
    }
    // Cancel's commit is not validated (the platform has already acted), so it must not write
    // back the copy read before the round trip: a callback that landed meanwhile would lose
    // its decision.
    let mut rec = must_load(env, app, instance_id)?;
    // The platform's own "canceled" callback may have landed meanwhile: rewriting the same
    // record would reach the engine's outbox a second time.
    if rec.apply(&Event::Status(ApprovalStatus::Canceled)) {
        save(env, app, &mut rec)?;
    }
    Ok(rec.approval)
}

/// Applies authenticated callback events; returns the approvals that changed. Events for
/// instances this plugin has not stored are acknowledged and dropped, except those of an
/// instance a start has marked and not yet recorded: they fail with a retryable error, so
/// the platform delivers them again, after the start's commit.
///
/// Deduplication is by content, not by the platforms' event ids: [`Record::apply`] counts a
/// decision once per approver and direction and never moves a terminal status, so a
/// redelivery, a replay inside the timestamp window, or the same decision from a callback and
/// a poll changes nothing and is not reported again. Nothing is stored per delivery, so a
/// callback that changes nothing writes nothing, and state grows with approvals, not with
/// callbacks. (Earlier versions also wrote a `seen` mark per event id; nothing reads those
/// keys any more, and a rollback to such a version re-applies an event it finds unmarked,
/// which changes nothing either.)
pub fn apply_inbound(
    env: &(impl Env + ?Sized),
    app: &ImApp,
    events: &[Inbound],
) -> Result<Vec<Approval>> {
    // Each record read once per call, with whether an event changed it.
    let mut loaded: Vec<(Record, bool)> = Vec::new();
    for ev in events {
        let i = match loaded
            .iter()
            .position(|(r, _)| r.approval.instance_id == ev.instance_id)
        {
            Some(i) => i,
            None => {
                let id = &ev.instance_id;
                // "Still pending" changes no record: the event Feishu and WeCom send right
                // after every create is not worth a redelivery.
                let news = ev.event != Event::Status(ApprovalStatus::Pending);
                let rec = match load(env, app, id)? {
                    Some(r) => r,
                    None if !news => continue,
                    None if starting(env, app, id)? => {
                        return Err(Error::storage(format!(
                            "approval {id:?} is still being started: deliver again"
                        )));
                    }
                    // Its start may have committed between the two reads. Without this
                    // read the event would be dropped: a call that writes nothing commits
                    // unchecked.
                    None => match load(env, app, id)? {
                        Some(r) => r,
                        None => continue,
                    },
                };
                loaded.push((rec, false));
                loaded.len() - 1
            }
        };
        let (rec, changed) = &mut loaded[i];
        *changed |= rec.apply(&ev.event);
    }
    let mut out = Vec::new();
    for (mut rec, changed) in loaded {
        if changed {
            save(env, app, &mut rec)?;
            out.push(rec.approval);
        }
    }
    Ok(out)
}

/// Whether a start created `instance_id` and has not committed its record, within the hour
/// a call may run: a mark older than that was left by a start cut off, whose approval has no
/// record (on DingTalk and WeCom for good), and its callbacks are dropped as before rather
/// than refused for as long as the platform retries.
fn starting(env: &(impl Env + ?Sized), app: &ImApp, instance_id: &str) -> Result<bool> {
    let key = starting_key(app, instance_id);
    // A read first: an increment would create the key for every unknown instance (DingTalk
    // and WeCom send the whole organisation's). Incrementing by 0 then reads the counter as
    // every store keeps it.
    if env.kv_get(&key)?.is_none() {
        return Ok(false);
    }
    let now = env.now_ms();
    let began = claim_time(env.kv_increment(&key, 0)?, now);
    Ok(now.saturating_sub(began) < INTERRUPTED_AFTER_MS)
}

/// Per-node evaluation for platforms that report only individual decisions: AND needs every
/// approver, OR the first; any rejection rejects. Returns `None` while undecided.
/// `Record::apply` takes only its rejections (see there).
pub fn evaluate_nodes(
    nodes: &[(SignMode, Vec<String>)],
    decisions: &[Decision],
) -> Option<ApprovalStatus> {
    // A person listed in several nodes decides in each separately, so a decision counts for
    // the first node that lists its author and is not decided yet: one approval never
    // completes two nodes. `decisions` is in time order.
    let mut used = vec![false; decisions.len()];
    // Counts the earliest decision not counted yet by someone `listed` accepts.
    let mut next = |listed: &dyn Fn(&str) -> bool| {
        let i = (0..decisions.len()).find(|&i| !used[i] && listed(&decisions[i].user))?;
        used[i] = true;
        Some(decisions[i].approved)
    };
    for (mode, approvers) in nodes {
        match mode {
            // Each approver's own decision; a rejection by any of them rejects at once.
            SignMode::And => {
                let mut approved = 0;
                for u in approvers {
                    match next(&|author| author == u) {
                        Some(false) => return Some(ApprovalStatus::Rejected),
                        Some(true) => approved += 1,
                        None => {}
                    }
                }
                if approved < approvers.len() {
                    return None;
                }
            }
            // The first decision by any of them settles the node; the others' decisions
            // belong to later nodes that list them.
            SignMode::Or => match next(&|author| approvers.iter().any(|u| u == author)) {
                Some(false) => return Some(ApprovalStatus::Rejected),
                Some(true) => {}
                None => return None,
            },
        }
    }
    Some(ApprovalStatus::Approved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            approval: Approval {
                instance_id: "i1".into(),
                key: "k".into(),
                status: ApprovalStatus::Pending,
                decisions: vec![],
                updated_at_ms: 0,
            },
            meta: serde_json::Value::Null,
        }
    }

    fn dec(user: &str, approved: bool, at: u64) -> Event {
        Event::Decision(Decision {
            user: user.into(),
            approved,
            comment: None,
            at_ms: at,
        })
    }

    #[test]
    fn request_limits() {
        use crate::model::UserRef;
        let mut req = crate::platform::dingtalk::tests::request();
        let node = req.nodes[0].clone();
        let ids = |n: usize| {
            (0..n)
                .map(|i| UserRef::Id(format!("u{i}")))
                .collect::<Vec<_>>()
        };
        req.nodes = vec![node; MAX_NODES];
        req.nodes[0].approvers = ids(MAX_APPROVERS_PER_NODE);
        req.cc = ids(MAX_CC);
        assert_eq!(validate(&req).and(validate_new(&req)), Ok(()));
        let too_many: [&dyn Fn(&mut ApprovalRequest); 4] = [
            &|r| r.nodes.clear(),
            &|r| r.nodes.push(r.nodes[0].clone()),
            &|r| r.nodes[1].approvers = ids(MAX_APPROVERS_PER_NODE + 1),
            &|r| r.cc.push(UserRef::Id("one more".into())),
        ];
        for (case, change) in too_many.iter().enumerate() {
            let mut r = req.clone();
            change(&mut r);
            let e = validate(&r).and(validate_new(&r));
            assert!(matches!(e, Err(Error::InvalidInput(_))), "case {case}");
        }
        // The cc limit is newer than approvals made before it: their key still finds them.
        // (Started with few: DingTalk's own cap is lower.)
        let (env, sent) = dingtalk_env(|_| created());
        let app = crate::platform::dingtalk::tests::app();
        req.cc = ids(10);
        let started = start(&env, &app, &req).unwrap();
        let mut old = req.clone();
        old.cc = ids(MAX_CC + 1);
        assert_eq!(start(&env, &app, &old), Ok(started));
        assert_eq!(sent.get(), 1);
    }

    #[test]
    fn terminal_states_stick() {
        let mut r = rec();
        assert!(r.apply(&Event::Status(ApprovalStatus::Approved)));
        assert!(!r.apply(&Event::Status(ApprovalStatus::Rejected)));
        assert!(!r.apply(&Event::Status(ApprovalStatus::Pending)));
        assert_eq!(r.approval.status, ApprovalStatus::Approved);
    }

    #[test]
    fn duplicate_decisions_are_noops_and_late_ones_recorded() {
        let mut r = rec();
        assert!(r.apply(&dec("u1", true, 5)));
        assert!(!r.apply(&dec("u1", true, 5)));
        assert!(!r.apply(&dec("u1", true, 6)));
        let with_comment = Event::Decision(Decision {
            user: "u1".into(),
            approved: true,
            comment: Some("lgtm".into()),
            at_ms: 7,
        });
        assert!(r.apply(&with_comment));
        assert!(!r.apply(&with_comment));
        assert!(r.apply(&Event::Status(ApprovalStatus::Approved)));
        assert!(r.apply(&dec("u2", true, 3)));
        // Same time as u1's: after it, in arrival order.
        assert!(r.apply(&dec("u3", false, 5)));
        let users: Vec<_> = r
            .approval
            .decisions
            .iter()
            .map(|d| d.user.as_str())
            .collect();
        assert_eq!(users, ["u2", "u1", "u3"]);
    }

    #[test]
    fn stored_node_layout_drives_status() {
        // [AND a, b], then [OR c, d], as DingTalk starts store it.
        let and_then_or = || {
            let mut r = rec();
            r.meta = serde_json::json!({"nodes": [
                {"mode": "and", "approvers": ["a", "b"]},
                {"mode": "or", "approvers": ["c", "d"]},
            ]});
            r
        };
        let mut r = and_then_or();
        r.apply(&dec("a", true, 1));
        r.apply(&dec("b", true, 2));
        assert_eq!(r.approval.status, ApprovalStatus::Pending);
        // Every node is complete, but an approver may have added signers the layout does not
        // show: only the platform's status approves.
        assert!(r.apply(&dec("d", true, 3)));
        assert_eq!(r.approval.status, ApprovalStatus::Pending);
        assert!(r.apply(&Event::Status(ApprovalStatus::Approved)));
        assert_eq!(r.approval.status, ApprovalStatus::Approved);
        // A rejection on an undecided node rejects at once.
        let mut r = and_then_or();
        r.apply(&dec("a", true, 1));
        r.apply(&dec("b", false, 2));
        assert_eq!(r.approval.status, ApprovalStatus::Rejected);
        // Someone in two nodes: their one recorded approval completes only the first; the
        // platform's status decides the rest (their second approval is the same decision).
        let mut r = rec();
        r.meta = serde_json::json!({"nodes": [
            {"mode": "or", "approvers": ["a"]},
            {"mode": "or", "approvers": ["b"]},
            {"mode": "or", "approvers": ["a"]},
        ]});
        r.apply(&dec("a", true, 1));
        r.apply(&dec("b", true, 2));
        assert!(!r.apply(&dec("a", true, 3)));
        assert_eq!(r.approval.status, ApprovalStatus::Pending);
        r.apply(&dec("a", false, 4));
        assert_eq!(r.approval.status, ApprovalStatus::Rejected);
        // Without a layout (Feishu), decisions never decide; the platform's status does.
        let mut r = rec();
        r.apply(&dec("a", false, 1));
        assert_eq!(r.approval.status, ApprovalStatus::Pending);
    }

    fn inbound(instance: &str, event: Event) -> Inbound {
        Inbound {
            instance_id: instance.into(),
            event,
        }
    }

    /// A scripted DingTalk (which cannot deduplicate creates) whose create endpoint answers
    /// with `create`'s next reply; counts the create requests sent.
    fn dingtalk_env(
        create: impl Fn(usize) -> Result<crate::env::Response> + 'static,
    ) -> (
        crate::env::fake::FakeEnv,
        std::rc::Rc<std::cell::Cell<usize>>,
    ) {
        use crate::platform::dingtalk::tests::scripted_reply;
        crate::env::fake::FakeEnv::counting("/v1.0/workflow/processInstances", move |r, n| {
            n.map_or_else(|| scripted_reply(r), &create)
        })
    }

    fn created() -> Result<crate::env::Response> {
        crate::env::fake::json_response(200, serde_json::json!({"instanceId": "inst-1"}))
    }

    fn code(e: &Error) -> (i64, bool) {
        match e {
            Error::Platform {
                code, retryable, ..
            } => (*code, *retryable),
            other => panic!("not a platform error: {other:?}"),
        }
    }

    #[test]
    fn a_create_that_may_have_succeeded_is_never_sent_again() {
        use crate::env::fake::json_response;
        use crate::platform::dingtalk::tests::{app, request};
        let lost: [fn() -> Result<crate::env::Response>; 4] = [
            || Err(Error::transport("request to api.dingtalk.com: timed out")),
            || json_response(500, serde_json::json!({"code": "InternalError"})),
            || json_response(504, serde_json::json!({"code": "GatewayTimeout"})),
            || json_response(200, serde_json::json!({"result": {}})),
        ];
        for (case, reply) in lost.into_iter().enumerate() {
            let (env, sent) = dingtalk_env(move |n| if n == 1 { reply() } else { created() });
            let e = start(&env, &app(), &request()).unwrap_err();
            assert_eq!(code(&e), (-3, false), "case {case}: {e}");
            // The engine retries anyway (or a person does): still no second create, the same
            // answer, and it names the first failure.
            let again = start(&env, &app(), &request()).unwrap_err();
            assert_eq!(again, e, "case {case}");
            assert_eq!(sent.get(), 1, "case {case}");
            assert!(find_by_key(&env, &app(), &request().key).unwrap().is_none());
        }
    }

    #[test]
    fn a_refused_create_may_be_retried_once_per_failure() {
        use crate::env::fake::json_response;
        use crate::platform::dingtalk::tests::{app, request};
        let refused: [fn() -> Result<crate::env::Response>; 4] = [
            || json_response(503, serde_json::json!({"code": "ServiceUnavailable"})),
            || json_response(429, serde_json::json!({"code": "Throttling.Api"})),
            || json_response(400, serde_json::json!({"code": "InvalidParameter"})),
            || {
                Err(Error::unsent(
                    "request to api.dingtalk.com: connection refused",
                ))
            },
        ];
        for (case, reply) in refused.into_iter().enumerate() {
            let (env, sent) = dingtalk_env(move |n| if n == 1 { reply() } else { created() });
            let e = start(&env, &app(), &request()).unwrap_err();
            assert!(
                !matches!(e, Error::Platform { code: -3, .. }),
                "case {case}: {e}"
            );
            let a = start(&env, &app(), &request()).unwrap();
            assert_eq!(a.instance_id, "inst-1", "case {case}");
            assert_eq!(start(&env, &app(), &request()).unwrap(), a, "case {case}");
            assert_eq!(sent.get(), 2, "case {case}");
        }
    }

    /// After a refused create the start asks whether its form is gone. It has released the
    /// key by then, and a platform that stalls on the question costs the start the check's
    /// bound, not the request timeout or the retry budget.
    #[test]
    fn the_check_after_a_refused_create_is_bounded_and_holds_no_key() {
        use crate::env::fake::json_response;
        use crate::platform::dingtalk::tests::{app, request};
        let refused = || json_response(400, serde_json::json!({"code": "InvalidParameter"}));
        let (env, sent) = dingtalk_env(move |n| if n == 1 { refused() } else { created() });
        let is_check = |r: &crate::env::Request| r.url.contains("/forms/schemas/processCodes");
        env.set_latency(move |r| if is_check(r) { 60_000 } else { 0 });
        let t0 = env.now_ms();
        let e = start(&env, &app(), &request()).unwrap_err();
        assert_eq!(code(&e), (-400, false), "{e}");
        assert_eq!(env.now_ms() - t0, crate::platform::GONE_CHECK_LIMIT_MS);
        assert_eq!(env.sent.borrow().iter().filter(|r| is_check(r)).count(), 1);
        assert_eq!(
            start(&env, &app(), &request()).unwrap().instance_id,
            "inst-1"
        );
        assert_eq!(sent.get(), 2);
    }

    /// The create was refused for its token, and fetching a new one failed: nothing was
    /// created, so the key is free (before, the token's timeout counted as the create's).
    #[test]
    fn a_create_whose_token_could_not_be_renewed_may_be_retried() {
        use crate::env::fake::{FakeEnv, json_response};
        use crate::platform::{dingtalk, wecom};
        use std::cell::Cell;
        use std::rc::Rc;
        let cases = [
            (
                dingtalk::tests::app(),
                "/v1.0/oauth2/accessToken",
                "/v1.0/workflow/processInstances",
                serde_json::json!({"code": "InvalidAuthentication", "message": "expired"}),
                dingtalk::tests::scripted_reply as fn(&_) -> _,
            ),
            (
                wecom::tests::app(),
                "/cgi-bin/gettoken",
                "/cgi-bin/oa/applyevent",
                serde_json::json!({"errcode": 42001, "errmsg": "access_token expired"}),
                wecom::tests::scripted_reply as fn(&_) -> _,
            ),
        ];
        for (app, token_path, create_path, expired, scripted) in cases {
            let (tokens, creates) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
            let (t, c) = (tokens.clone(), creates.clone());
            let env = FakeEnv::new(move |r| {
                let path = r.url.split('?').next().unwrap_or_default();
                if path.ends_with(token_path) {
                    t.set(t.get() + 1);
                    if t.get() == 2 {
                        return Err(Error::transport("token request: timed out"));
                    }
                } else if r.method == "POST" && path.ends_with(create_path) {
                    c.set(c.get() + 1);
                    if c.get() == 1 {
                        return json_response(401, expired.clone());
                    }
                }
                scripted(r)
            });
            let e = start(&env, &app, &dingtalk::tests::request()).unwrap_err();
            assert!(matches!(e, Error::Transport(_)), "{app:?}: {e}");
            assert_eq!(creates.get(), 1, "{app:?}");
            let a = start(&env, &app, &dingtalk::tests::request()).unwrap();
            assert_eq!(creates.get(), 2, "{app:?}");
            assert_eq!(start(&env, &app, &dingtalk::tests::request()).unwrap(), a);
        }
    }

    /// The platform approved the initiator's own task while the create was answered: the
    /// start's record has it, although no callback could have applied it.
    #[test]
    fn a_decision_made_during_the_create_is_in_the_started_record() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = crate::env::fake::FakeEnv::new(|r| {
            if r.url
                .contains("/v1.0/workflow/processInstances?processInstanceId=inst-1")
            {
                crate::env::fake::json_response(
                    200,
                    serde_json::json!({"result": {"status": "RUNNING", "tasks": [
                        {"userId": "a", "status": "COMPLETED", "result": "AGREE"},
                        {"userId": "b", "status": "RUNNING", "result": "NONE"}]}}),
                )
            } else {
                scripted_reply(r)
            }
        });
        let a = start(&env, &app(), &request()).unwrap();
        let users: Vec<_> = a.decisions.iter().map(|d| d.user.as_str()).collect();
        assert_eq!((users, a.status), (vec!["a"], ApprovalStatus::Pending));
        assert_eq!(get(&env, &app(), &a.instance_id, false).unwrap(), a);
        // A poll that fails takes nothing from the start.
        let env = crate::env::fake::FakeEnv::new(scripted_reply);
        assert!(
            start(&env, &app(), &request())
                .unwrap()
                .decisions
                .is_empty()
        );
    }

    fn is_read_back(r: &crate::env::Request) -> bool {
        r.method == "GET" && r.url.contains("/v1.0/workflow/processInstances?")
    }

    /// A platform that stalls on the read-back costs the start the read's bound, not the
    /// request timeout (10 s) or the retry budget; the start succeeds with its record.
    #[test]
    fn a_stalled_read_back_is_given_up_within_its_bound() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = crate::env::fake::FakeEnv::new(scripted_reply);
        env.set_latency(|r| if is_read_back(r) { 60_000 } else { 0 });
        let t0 = env.now_ms();
        let a = start(&env, &app(), &request()).unwrap();
        assert_eq!(env.now_ms() - t0, READ_BACK_LIMIT_MS);
        assert_eq!(
            env.sent.borrow().iter().filter(|r| is_read_back(r)).count(),
            1
        );
        assert_eq!(get(&env, &app(), &a.instance_id, false).unwrap(), a);
    }

    /// A start that was slow already (here a create that took 6 s) skips the read-back.
    #[test]
    fn a_slow_start_skips_the_read_back() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = crate::env::fake::FakeEnv::new(scripted_reply);
        env.set_latency(|r| {
            if r.method == "POST" && r.url.ends_with("/v1.0/workflow/processInstances") {
                6_000
            } else {
                0
            }
        });
        let a = start(&env, &app(), &request()).unwrap();
        assert!(!env.sent.borrow().iter().any(is_read_back));
        assert_eq!(get(&env, &app(), &a.instance_id, false).unwrap(), a);
    }

    /// A decision pushed after the create answered but before the start saved the record is
    /// refused, so the platform delivers it again, rather than dropped.
    #[test]
    fn a_callback_during_its_start_is_refused_until_the_record_is_saved() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = std::rc::Rc::new(crate::env::fake::FakeEnv::new(scripted_reply));
        let refused = std::rc::Rc::new(std::cell::Cell::new(0));
        let (during, seen) = (std::rc::Rc::downgrade(&env), refused.clone());
        env.set_responder(move |r| {
            if is_read_back(r) {
                let id = r.url.split("processInstanceId=").nth(1).unwrap();
                let env = during.upgrade().unwrap();
                let e = apply_inbound(&*env, &app(), &[inbound(id, dec("a", false, 9))]);
                assert!(
                    matches!(e, Err(Error::Storage(ref m)) if m.contains("still being started"))
                );
                // "Still pending" is no news: not refused.
                let pending = inbound(id, Event::Status(ApprovalStatus::Pending));
                assert_eq!(apply_inbound(&*env, &app(), &[pending]), Ok(vec![]));
                seen.set(seen.get() + 1);
            }
            scripted_reply(r)
        });
        let a = start(&*env, &app(), &request()).unwrap();
        assert_eq!((refused.get(), a.status), (1, ApprovalStatus::Pending));
        assert!(!env.kv.borrow().keys().any(|k| k.contains("/starting/")));
        let again = apply_inbound(
            &*env,
            &app(),
            &[inbound(&a.instance_id, dec("a", false, 9))],
        );
        assert_eq!(again.unwrap()[0].status, ApprovalStatus::Rejected);

        // Another instance of the organisation: dropped, and nothing is written for it.
        let before = env.snapshot();
        let other = [inbound("other", dec("a", true, 9))];
        assert_eq!(apply_inbound(&*env, &app(), &other), Ok(vec![]));
        assert_eq!(env.snapshot(), before);

        // A mark left by a start cut off holds callbacks back for the hour a call may run.
        let cut = [inbound("cut", dec("a", true, 9))];
        env.kv_increment(&starting_key(&app(), "cut"), env.now_ms())
            .unwrap();
        env.now.set(env.now.get() + INTERRUPTED_AFTER_MS - 1);
        assert!(apply_inbound(&*env, &app(), &cut).is_err());
        env.now.set(env.now.get() + 1);
        assert_eq!(apply_inbound(&*env, &app(), &cut), Ok(vec![]));
    }

    /// The start commits its record (and deletes its mark) between a callback's read of the
    /// record and its read of the mark: the callback reads the record again and applies.
    #[test]
    fn a_start_that_commits_between_a_callbacks_reads_is_seen() {
        use crate::env::fake::FakeEnv;
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        struct CommitsOnMarkRead(FakeEnv, String, Vec<u8>);
        impl Env for CommitsOnMarkRead {
            fn send(&self, r: &crate::env::Request) -> Result<crate::env::Response> {
                self.0.send(r)
            }
            fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
                if key.contains("/starting/") {
                    self.0.kv_set(&self.1, &self.2)?;
                }
                self.0.kv_get(key)
            }
            fn kv_set(&self, key: &str, value: &[u8]) -> Result<()> {
                self.0.kv_set(key, value)
            }
            fn kv_delete(&self, key: &str) -> Result<()> {
                self.0.kv_delete(key)
            }
            fn kv_increment(&self, key: &str, delta: u64) -> Result<u64> {
                self.0.kv_increment(key, delta)
            }
            fn now_ms(&self) -> u64 {
                self.0.now_ms()
            }
            fn sleep_ms(&self, ms: u64) {
                self.0.sleep_ms(ms)
            }
            fn random_bytes(&self, len: usize) -> Vec<u8> {
                self.0.random_bytes(len)
            }
        }
        let env = FakeEnv::new(scripted_reply);
        let a = start(&env, &app(), &request()).unwrap();
        let key = instance_key(&app(), &a.instance_id);
        let record = env.kv.borrow_mut().remove(&key).unwrap();
        let env = CommitsOnMarkRead(env, key, record);
        let got = apply_inbound(&env, &app(), &[inbound(&a.instance_id, dec("a", false, 9))]);
        assert_eq!(got.unwrap()[0].status, ApprovalStatus::Rejected);
    }

    /// The platform's "canceled" callback lands while the terminate request is out: the
    /// cancel writes nothing more (a write would reach the engine's outbox twice).
    #[test]
    fn a_cancel_its_own_callback_recorded_first_writes_nothing() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = std::rc::Rc::new(crate::env::fake::FakeEnv::new(scripted_reply));
        let a = start(&*env, &app(), &request()).unwrap();
        let during = std::rc::Rc::downgrade(&env);
        let after_callback = std::rc::Rc::new(std::cell::RefCell::new(None));
        let (id, seen) = (a.instance_id.clone(), after_callback.clone());
        env.set_responder(move |r| {
            if r.url.ends_with("/v1.0/workflow/processInstances/terminate") {
                let env = during.upgrade().unwrap();
                let ev = inbound(&id, Event::Status(ApprovalStatus::Canceled));
                env.now.set(env.now.get() + 1_000);
                assert_eq!(apply_inbound(&*env, &app(), &[ev]).unwrap().len(), 1);
                env.now.set(env.now.get() + 1_000);
                *seen.borrow_mut() = Some(env.snapshot());
                crate::env::fake::json_response(200, serde_json::json!({"result": true}))
            } else {
                scripted_reply(r)
            }
        });
        let c = cancel(&*env, &app(), &a.instance_id, None).unwrap();
        assert_eq!(c.status, ApprovalStatus::Canceled);
        assert_eq!(Some(env.snapshot()), after_callback.borrow_mut().take());
    }

    #[test]
    fn a_decision_during_a_cancel_stays_recorded() {
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        let env = std::rc::Rc::new(crate::env::fake::FakeEnv::new(scripted_reply));
        let a = start(&*env, &app(), &request()).unwrap();
        // While the terminate request is out, a callback records `a`'s approval.
        let during = std::rc::Rc::downgrade(&env);
        let id = a.instance_id.clone();
        env.set_responder(move |r| {
            if r.url.ends_with("/v1.0/workflow/processInstances/terminate") {
                let env = during.upgrade().unwrap();
                let ev = inbound(&id, dec("a", true, 9));
                assert_eq!(apply_inbound(&*env, &app(), &[ev]).unwrap().len(), 1);
                crate::env::fake::json_response(200, serde_json::json!({"result": true}))
            } else {
                scripted_reply(r)
            }
        });
        let c = cancel(&*env, &app(), &a.instance_id, None).unwrap();
        assert_eq!(c.status, ApprovalStatus::Canceled);
        assert_eq!(c.decisions.len(), 1);
        assert_eq!(get(&*env, &app(), &a.instance_id, false).unwrap(), c);
    }

    #[test]
    fn a_start_cut_off_mid_call_is_reported_unknown_once_no_call_can_still_run() {
        use crate::platform::dingtalk::tests::{app, request};
        // The create request goes out and the call never returns (the host killed it): only
        // the counters it moved remain, as in the reference host.
        let (env, sent) = dingtalk_env(|n| if n == 1 { panic!("cut off") } else { created() });
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            start(&env, &app(), &request())
        }));
        assert!(cut.is_err());
        let e = start(&env, &app(), &request()).unwrap_err();
        assert_eq!(code(&e), (-2, true), "{e}");
        env.now.set(env.now.get() + INTERRUPTED_AFTER_MS);
        assert_eq!(
            code(&start(&env, &app(), &request()).unwrap_err()),
            (-2, true)
        );
        env.now.set(env.now.get() + 1);
        let e = start(&env, &app(), &request()).unwrap_err();
        assert_eq!(code(&e), (-3, false), "{e}");
        assert_eq!(sent.get(), 1);
    }

    /// Cut off while it looks users up (a long list against a slow platform), a start has
    /// claimed nothing: the retry creates. Each person is looked up once per start, however
    /// often the request names them.
    #[test]
    fn a_start_cut_off_before_its_create_holds_nothing() {
        use crate::model::UserRef;
        use crate::platform::dingtalk::tests::{app, request, scripted_reply};
        use std::cell::Cell;
        use std::rc::Rc;
        let lookups = Rc::new(Cell::new(0));
        let seen = lookups.clone();
        let (env, sent) =
            crate::env::fake::FakeEnv::counting("/v1.0/workflow/processInstances", move |r, n| {
                if r.url.contains("/topapi/v2/user/getbymobile") {
                    seen.set(seen.get() + 1);
                    if seen.get() == 1 {
                        panic!("cut off");
                    }
                }
                n.map_or_else(|| scripted_reply(r), |_| created())
            });
        let mut req = request();
        let mobile = UserRef::Mobile("13800000000".into());
        req.nodes[0].approvers.push(mobile.clone());
        req.nodes[1].approvers.push(mobile.clone());
        req.cc.push(mobile);
        let cut =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(&env, &app(), &req)));
        assert!(cut.is_err());
        let a = start(&env, &app(), &req).unwrap();
        assert_eq!((a.instance_id.as_str(), sent.get()), ("inst-1", 1));
        // One lookup for the four mentions of one mobile (plus the one cut off).
        assert_eq!(lookups.get(), 2);
    }

    /// What a start answers while generation 0's claim counter holds `claim` (and its
    /// legacy time stamp `stamp`), now and just over an hour later.
    fn refusals(claim: u64, stamp: u64) -> [(i64, bool); 2] {
        use crate::platform::dingtalk::tests::{app, request};
        let (env, sent) = dingtalk_env(|_| created());
        let (app, req) = (app(), request());
        env.kv_increment(&claim_key(&app, &req.key, 0), claim)
            .unwrap();
        env.kv_increment(&claimed_at_key(&app, &req.key, 0), stamp)
            .unwrap();
        let first = code(&start(&env, &app, &req).unwrap_err());
        env.now.set(env.now.get() + INTERRUPTED_AFTER_MS + 1);
        let later = code(&start(&env, &app, &req).unwrap_err());
        assert_eq!(sent.get(), 0);
        // Refused starts leave the claim as they found it.
        let held = env.kv_increment(&claim_key(&app, &req.key, 0), 0).unwrap();
        assert_eq!(held, claim);
        [first, later]
    }

    /// A start cut off after taking its claim, however early: the claim carries its time.
    #[test]
    fn every_claim_tells_its_age() {
        let t = crate::env::fake::FakeEnv::offline().now_ms();
        let (busy, unknown) = ((-2, true), (-3, false));
        // Taken by this version, with no time stamp (cut off in between).
        assert_eq!(refusals(t, 0), [busy, unknown]);
        // Taken by two starts that found it free at once (each added its time).
        assert_eq!(refusals(t + t - 3, 0), [busy, unknown]);
        assert_eq!(refusals(3 * t, 0), [busy, unknown]);
        // Counted by an earlier version: its time is in the stamp, if it got that far.
        assert_eq!(refusals(2, t), [busy, unknown]);
        assert_eq!(refusals(1, 0), [busy, busy]);
    }

    #[test]
    fn the_owner_stamps_its_claim_for_earlier_versions() {
        use crate::platform::dingtalk::tests::{app, request};
        let (env, _) = dingtalk_env(|n| if n == 1 { panic!("cut off") } else { created() });
        let (app, req) = (app(), request());
        let cut =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start(&env, &app, &req)));
        assert!(cut.is_err());
        let t = env
            .kv_increment(&claimed_at_key(&app, &req.key, 0), 0)
            .unwrap();
        assert_eq!(env.kv_increment(&claim_key(&app, &req.key, 0), 0), Ok(t));
        // What an earlier version does on a retry: counts itself in, reads the stamp.
        assert!(env.kv_increment(&claim_key(&app, &req.key, 0), 1).unwrap() > 1);
        assert!(t >= TIMED_CLAIMS_FROM);
    }

    #[test]
    fn starts_refused_during_an_attempt_do_not_block_the_key() {
        use crate::platform::dingtalk::tests::{app, request};
        let (env, sent) = dingtalk_env(|_| created());
        let (app, req) = (app(), request());
        // Attempt A owns generation 0 and is still creating when two retries arrive.
        assert_eq!(
            env.kv_increment(&claim_key(&app, &req.key, 0), 1).unwrap(),
            1
        );
        for _ in 0..2 {
            let e = start(&env, &app, &req).unwrap_err();
            assert_eq!(code(&e), (-2, true), "{e}");
        }
        assert_eq!(sent.get(), 0);
        // A then fails before its create went out; the next retry owns generation 1.
        env.kv_increment(&failed_key(&app, &req.key), 1).unwrap();
        assert_eq!(start(&env, &app, &req).unwrap().instance_id, "inst-1");
        assert_eq!(sent.get(), 1);
    }

    /// Feishu hands a repeated create with the key's uuid the first instance, so a create
    /// whose answer does not say what happened (a 2xx that is not JSON: a proxy's page, a
    /// body cut short) is retryable; it was final, and the approval Feishu may have made was
    /// left to its approvers with the engine given up.
    #[test]
    fn a_feishu_create_with_an_unreadable_answer_may_be_retried() {
        use crate::env::fake::{FakeEnv, json_response};
        let env = FakeEnv::new(|r| {
            let path = r.url.split('?').next().unwrap_or_default();
            match path.trim_start_matches("http://127.0.0.1:1/open-apis") {
                "/auth/v3/tenant_access_token/internal" => json_response(
                    200,
                    serde_json::json!({"code": 0, "tenant_access_token": "t", "expire": 7200}),
                ),
                "/approval/v4/instances" => Ok(crate::env::Response {
                    status: 200,
                    headers: vec![("content-type".into(), "text/html".into())],
                    body: b"<html>ok</html>".to_vec(),
                }),
                "/approval/v4/approvals" => json_response(
                    200,
                    serde_json::json!({"code": 0, "data": {"approval_code": "DEF1"}}),
                ),
                _ => json_response(200, serde_json::json!({"code": 0, "data": {}})),
            }
        });
        let app = crate::platform::feishu::tests::app();
        let mut req = crate::platform::dingtalk::tests::request();
        req.initiator = crate::model::UserRef::Id("ou_a".into());
        let e = start(&env, &app, &req).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Platform {
                    code: -200,
                    retryable: true,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_concurrent_start_does_not_reset_a_recorded_instance() {
        use crate::env::fake::FakeEnv;
        let env = FakeEnv::offline();
        let app = crate::platform::feishu::tests::app();
        let req = crate::platform::dingtalk::tests::request();
        // The other start recorded "i1" and a callback approved it after this one looked
        // for the key; Feishu now hands this one the same instance.
        let mut r = rec();
        r.apply(&Event::Status(ApprovalStatus::Approved));
        save(&env, &app, &mut r).unwrap();
        let before = env.snapshot();
        let created = Created {
            instance_id: "i1".into(),
            meta: serde_json::Value::Null,
        };
        let a = record_created(&env, &app, &req, created, env.now_ms()).unwrap();
        assert_eq!(a.status, ApprovalStatus::Approved);
        // Its record stands; the key's index (which that start writes too) names it.
        let mut after = env.snapshot();
        assert_eq!(
            after.remove(&index_key(&app, &req.key)),
            Some(b"i1".to_vec())
        );
        assert_eq!(after, before);
    }

    /// Stored state is found by these keys: a change would orphan every record kept so far.
    #[test]
    fn keys_keep_their_layout() {
        let app = ImApp {
            id: "t/1".into(),
            ..crate::platform::feishu::tests::app()
        };
        let k = "wf%/7";
        assert_eq!(instance_key(&app, "i/1"), "a/t%2F1/i/i%2F1");
        assert_eq!(index_key(&app, k), "a/t%2F1/k/wf%25%2F7");
        assert_eq!(claim_key(&app, k, 0), "a/t%2F1/claim/wf%25%2F7");
        assert_eq!(claim_key(&app, k, 2), "a/t%2F1/claim/wf%25%2F7/2");
        assert_eq!(claimed_at_key(&app, k, 0), "a/t%2F1/claimed-at/wf%25%2F7/0");
        assert_eq!(legacy_attempt_key(&app, k), "a/t%2F1/attempt/wf%25%2F7");
        assert_eq!(failed_key(&app, k), "a/t%2F1/failed/wf%25%2F7");
        assert_eq!(unknown_key(&app, k), "a/t%2F1/unknown/wf%25%2F7");
        assert_eq!(unsaved_key(&app, k), "a/t%2F1/unsaved/wf%25%2F7");
        assert_eq!(starting_key(&app, "i/1"), "a/t%2F1/starting/i%2F1");
    }

    #[test]
    fn a_failure_recorded_by_an_earlier_version_allows_one_retry() {
        use crate::platform::dingtalk::tests::{app, request};
        let (env, sent) = dingtalk_env(|_| created());
        let (app, req) = (app(), request());
        // Before generations: attempt 1 failed, attempt 2 was refused while it ran.
        env.kv_set(&claim_key(&app, &req.key, 0), b"2").unwrap();
        env.kv_set(&legacy_attempt_key(&app, &req.key), br#"{"attempt":1}"#)
            .unwrap();
        assert_eq!(start(&env, &app, &req).unwrap().instance_id, "inst-1");
        assert_eq!(sent.get(), 1);
    }

    #[test]
    fn redeliveries_change_and_store_nothing() {
        use crate::env::fake::FakeEnv;
        let env = FakeEnv::offline();
        let app = crate::platform::feishu::tests::app();
        // An event for an instance not stored yet is dropped without a trace, so the
        // platform's redelivery after the start is recorded still applies.
        let status = inbound("i1", Event::Status(ApprovalStatus::Approved));
        let decision = inbound("i1", dec("u", true, 5));
        assert!(
            apply_inbound(&env, &app, std::slice::from_ref(&status))
                .unwrap()
                .is_empty()
        );
        assert!(env.snapshot().is_empty());
        let mut r = rec();
        save(&env, &app, &mut r).unwrap();
        let got = apply_inbound(&env, &app, &[decision.clone(), status.clone()]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].status, ApprovalStatus::Approved);
        assert_eq!(got[0].decisions.len(), 1);
        let applied = env.snapshot();
        // The record is the only key: nothing is kept per delivery.
        assert_eq!(applied.len(), 1);
        // Redeliveries (also twice within one call), and the same decision as a poll reports
        // it (another time), change nothing, report nothing and write nothing.
        let ops = env.kv_ops();
        let again = [
            decision.clone(),
            status.clone(),
            status,
            inbound("i1", dec("u", true, 8)),
        ];
        assert!(apply_inbound(&env, &app, &again).unwrap().is_empty());
        assert_eq!(env.snapshot(), applied);
        assert_eq!(env.kv_ops() - ops, 1, "one read of the record, no write");
    }

    #[test]
    fn a_failed_load_changes_nothing() {
        use crate::env::fake::FakeEnv;
        let env = FakeEnv::offline();
        let app = crate::platform::feishu::tests::app();
        // A corrupt record makes loading fail: the call errs and writes nothing.
        env.kv_set(&instance_key(&app, "i1"), b"{not json").unwrap();
        let before = env.snapshot();
        let ev = inbound("i1", Event::Status(ApprovalStatus::Approved));
        assert!(matches!(
            apply_inbound(&env, &app, &[ev]),
            Err(Error::Storage(_))
        ));
        assert_eq!(env.snapshot(), before);
    }

    #[test]
    fn node_evaluation() {
        let nodes = vec![
            (SignMode::And, vec!["a".to_string(), "b".to_string()]),
            (SignMode::Or, vec!["c".to_string(), "d".to_string()]),
        ];
        let d = |u: &str, ok: bool| Decision {
            user: u.into(),
            approved: ok,
            comment: None,
            at_ms: 1,
        };
        assert_eq!(evaluate_nodes(&nodes, &[d("a", true)]), None);
        assert_eq!(evaluate_nodes(&nodes, &[d("a", true), d("b", true)]), None);
        assert_eq!(
            evaluate_nodes(&nodes, &[d("a", true), d("b", true), d("d", true)]),
            Some(ApprovalStatus::Approved)
        );
        assert_eq!(
            evaluate_nodes(&nodes, &[d("a", true), d("b", false)]),
            Some(ApprovalStatus::Rejected)
        );
        // Someone in two nodes: their approval at the first does not complete the third,
        // and their rejection there still rejects.
        let nodes = vec![
            (SignMode::Or, vec!["a".to_string()]),
            (SignMode::Or, vec!["b".to_string()]),
            (SignMode::Or, vec!["a".to_string()]),
        ];
        assert_eq!(evaluate_nodes(&nodes, &[d("a", true), d("b", true)]), None);
        assert_eq!(
            evaluate_nodes(&nodes, &[d("a", true), d("b", true), d("a", false)]),
            Some(ApprovalStatus::Rejected)
        );
        assert_eq!(
            evaluate_nodes(&nodes, &[d("a", true), d("b", true), d("a", true)]),
            Some(ApprovalStatus::Approved)
        );
        // An OR node is settled by its first decision; the other approvers' decisions count
        // for the later nodes that list them (it used to take them all).
        let or_then = |second: SignMode, approvers: &[&str]| {
            vec![
                (SignMode::Or, vec!["a".to_string(), "b".to_string()]),
                (second, approvers.iter().map(|u| u.to_string()).collect()),
            ]
        };
        let nodes = or_then(SignMode::And, &["b", "c"]);
        let all = [d("a", true), d("b", true), d("c", true)];
        assert_eq!(evaluate_nodes(&nodes, &all), Some(ApprovalStatus::Approved));
        assert_eq!(evaluate_nodes(&nodes, &all[..2]), None);
        let nodes = or_then(SignMode::Or, &["a"]);
        assert_eq!(
            evaluate_nodes(&nodes, &[d("b", true), d("a", true)]),
            Some(ApprovalStatus::Approved)
        );
        assert_eq!(
            evaluate_nodes(&nodes, &[d("b", false), d("a", true)]),
            Some(ApprovalStatus::Rejected)
        );
        // An AND node rejects on any member's rejection, whoever has not decided yet.
        let nodes = vec![(SignMode::And, vec!["a".to_string(), "b".to_string()])];
        assert_eq!(
            evaluate_nodes(&nodes, &[d("b", false)]),
            Some(ApprovalStatus::Rejected)
        );
    }

    #[test]
    fn idempotency_token_is_stable_and_uuid_shaped() {
        let app = crate::platform::feishu::tests::app();
        let t = idempotency_token(&app, "k1");
        assert_eq!(t, idempotency_token(&app, "k1"));
        assert_ne!(t, idempotency_token(&app, "k2"));
        assert_eq!(t.len(), 36);
        assert_eq!(t.matches('-').count(), 4);
    }
}
