//! Group commit for the embedded store: the commits of concurrent calls share one redb write
//! transaction, so one fsync makes a whole batch durable.
//!
//! redb has a single writer and each durable transaction costs an fsync, so committing one
//! call per transaction caps throughput at 1 / fsync latency however many calls run at once.
//! Here callers queue their commit to one committer thread, which takes whatever is pending
//! (up to [`MAX_BATCH`]), validates and applies each request in arrival order inside one
//! transaction, commits it once, and only then answers every caller. A request whose reads no
//! longer hold (also because an earlier request of the same batch changed them) gets
//! [`Outcome::Conflict`] and none of its writes are applied; a failed transaction fails every
//! request of its batch, with nothing applied.

use super::{Commit, Outcome};
use anyhow::{Result, anyhow};
use redb::{Database, WriteTransaction};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Most requests one transaction carries; bounds the latency a request adds to its batch.
pub const MAX_BATCH: usize = 256;

/// A batch commit slower than this is logged (`store: slow commit`).
pub const SLOW_COMMIT: Duration = Duration::from_millis(20);

/// Validates one request inside the batch's transaction and, if its reads hold, applies it.
/// Must write nothing when it returns `Conflict`.
pub type Apply = fn(&WriteTransaction, &str, &Commit) -> Result<Outcome>;

struct Request {
    ns: String,
    commit: Commit,
    answer: Answer,
}

/// Where a request's outcome goes: a thread blocked in [`Committer::commit`], or a task
/// awaiting [`Committer::submit`] (which then needs no thread of its own to wait on).
enum Answer {
    Blocking(Sender<Result<Outcome>>),
    Async(oneshot::Sender<Result<Outcome>>),
}

impl Answer {
    fn send(self, outcome: Result<Outcome>) {
        // A caller that went away needs no answer.
        let _ = match self {
            Answer::Blocking(tx) => tx.send(outcome).map_err(drop),
            Answer::Async(tx) => tx.send(outcome).map_err(drop),
        };
    }
}

/// The handle callers use; dropping it stops the committer after it has answered everything
/// queued.
pub struct Committer {
    queue: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub fn start(db: Arc<Database>, apply: Apply) -> Result<Committer> {
        let (queue, pending) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("imbridge-commit".into())
            .spawn(move || run(&db, apply, &pending))?;
        Ok(Committer {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `commit` and waits until its batch is durable (or failed).
    pub fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        let (answer, result) = mpsc::channel();
        self.queue(ns, commit, Answer::Blocking(answer))?;
        result.recv().map_err(|_| stopped())?
    }

    /// Queues `commit`; the outcome arrives once its batch is durable (or failed), or at once
    /// as an error when the committer has stopped.
    pub fn submit(&self, ns: &str, commit: Commit) -> Submitted {
        let (answer, result) = oneshot::channel();
        match self.queue(ns, commit, Answer::Async(answer)) {
            Ok(()) => Submitted(result),
            Err(e) => Submitted::ready(Err(e)),
        }
    }

    fn queue(&self, ns: &str, commit: Commit, answer: Answer) -> Result<()> {
        let request = Request {
            ns: ns.to_string(),
            commit,
            answer,
        };
        self.queue
            .as_ref()
            .and_then(|q| q.send(request).ok())
            .ok_or_else(|| anyhow!("the store's committer has stopped"))
    }
}

fn stopped() -> anyhow::Error {
    anyhow!("the store's committer stopped before answering")
}

/// A queued commit's outcome, to be awaited.
pub struct Submitted(oneshot::Receiver<Result<Outcome>>);

impl Submitted {
    /// A commit that is already done (a backend that commits without I/O).
    pub fn ready(outcome: Result<Outcome>) -> Submitted {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(outcome);
        Submitted(rx)
    }

    pub async fn outcome(self) -> Result<Outcome> {
        self.0.await.map_err(|_| stopped())?
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the queue ends the loop; joining releases the thread's hold on the database
        // so the state directory can be opened again at once.
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(db: &Database, apply: Apply, pending: &Receiver<Request>) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = commit_batch(db, apply, &batch);
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            // Every call of the batch waited this long for its answer: the usual cause of a
            // latency tail, and a disk (fsync) problem rather than the plugin's.
            crate::log!(
                "store: slow commit: {} call(s) waited {} ms for one durable transaction",
                batch.len(),
                took.as_millis()
            );
        }
        match result {
            Ok(outcomes) => {
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    request.answer.send(Ok(outcome));
                }
            }
            Err(e) => {
                for request in batch {
                    request.answer.send(Err(anyhow!("{e:#}")));
                }
            }
        }
    }
}

/// One transaction for the whole batch: the outcomes, in order, once it is durable.
fn commit_batch(db: &Database, apply: Apply, batch: &[Request]) -> Result<Vec<Outcome>> {
    let txn = db.begin_write()?;
    let outcomes = batch
        .iter()
        .map(|r| apply(&txn, &r.ns, &r.commit))
        .collect::<Result<Vec<_>>>()?;
    txn.commit()?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Backend, Store, digest};

    fn claim(key: &str, by: &str) -> Commit {
        // Reads `key` as absent and claims it: of several such commits only one can hold.
        Commit {
            reads: vec![(key.to_string(), None)],
            writes: vec![(key.to_string(), Some(by.as_bytes().to_vec()))],
            outbox: vec![format!("claimed by {by}").into_bytes()],
        }
    }

    /// Runs `commits` as one batch, as the committer would, and returns their outcomes.
    fn batch(store: &Store, commits: Vec<(&str, Commit)>) -> Vec<Outcome> {
        let requests: Vec<Request> = commits
            .into_iter()
            .map(|(ns, commit)| Request {
                ns: ns.to_string(),
                commit,
                answer: Answer::Blocking(mpsc::channel().0),
            })
            .collect();
        let db = store.db_for_tests();
        commit_batch(&db, super::super::embedded::apply, &requests).unwrap()
    }

    /// Two requests in one transaction that both read the key absent: the first applies, the
    /// second sees the first's write and conflicts, and none of its effects are written.
    #[test]
    fn a_conflict_within_one_batch_applies_only_the_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let outcomes = batch(
                &store,
                vec![
                    ("t", claim("seen", "a")),
                    ("t", claim("seen", "b")),
                    ("u", claim("seen", "c")),
                ],
            );
            assert_eq!(
                outcomes,
                [Outcome::Applied, Outcome::Conflict, Outcome::Applied]
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("t", "seen").unwrap().as_deref(), Some(&b"a"[..]));
        let records = store.outbox_list("t", 0).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1, b"claimed by a");
        assert_eq!(store.get("u", "seen").unwrap().as_deref(), Some(&b"c"[..]));
    }

    /// A request that read what an earlier request of its batch wrote holds.
    #[test]
    fn a_request_may_rest_on_an_earlier_one_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let then = Commit {
            reads: vec![("k".into(), digest(Some(b"a")))],
            writes: vec![("k".into(), Some(b"a2".to_vec()))],
            outbox: vec![],
        };
        let outcomes = batch(&store, vec![("t", claim("k", "a")), ("t", then)]);
        assert_eq!(outcomes, [Outcome::Applied, Outcome::Applied]);
        assert_eq!(store.get("t", "k").unwrap().as_deref(), Some(&b"a2"[..]));
    }

    /// Many threads commit at once: every acknowledged commit is there after reopening, with
    /// its outbox record, and of the commits racing for one key exactly one won.
    #[test]
    fn concurrent_commits_are_all_durable_and_one_claim_wins() {
        const THREADS: usize = 16;
        const EACH: usize = 20;
        let dir = tempfile::tempdir().unwrap();
        let wins = {
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        let mut won = 0;
                        for i in 0..EACH {
                            let own = Commit {
                                writes: vec![(format!("k{t}-{i}"), Some(vec![t as u8]))],
                                ..Commit::default()
                            };
                            assert_eq!(store.commit("t", own).unwrap(), Outcome::Applied);
                            let race = claim(&format!("race{i}"), &t.to_string());
                            if store.commit("r", race).unwrap() == Outcome::Applied {
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum::<usize>()
        };
        assert_eq!(wins, EACH, "one winner per raced key");
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.keys("t").unwrap().len(), THREADS * EACH);
        for t in 0..THREADS {
            for i in 0..EACH {
                assert_eq!(
                    store.get("t", &format!("k{t}-{i}")).unwrap(),
                    Some(vec![t as u8])
                );
            }
        }
        assert_eq!(store.keys("r").unwrap().len(), EACH);
        assert_eq!(store.outbox_list("r", 0).unwrap().len(), EACH);
    }
}
