//! The host's durable state behind one small trait, [`Backend`]: plugin key-value data,
//! the outbox of approval updates, and the leases of persistent connections.
//!
//! Three implementations: [`Store`] (an embedded redb database, the default; one process per
//! state directory), [`RedisStore`] (one Redis shared by several host replicas) and
//! [`MemoryStore`] (process memory, not durable: tests, benchmarks, ephemeral embedders).
//! Tests inject store faults through [`Intercept`].
//!
//! Plugin calls are not serialized. Each call records what every key it read held
//! ([`Commit::reads`]), and its writes commit only if those reads still hold, atomically with
//! the writes and the outbox records ([`Backend::commit`]): optimistic concurrency. Two
//! deliveries of one callback, on one host or on two, therefore cannot both read the record
//! without the decision and both save it; the loser learns of the conflict and is re-run (see
//! `host.rs`), and then finds the decision recorded.

mod embedded;
mod group_commit;
mod intercept;
mod memory;
mod redis;

pub use self::embedded::{DB_FILE, Store};
pub use self::group_commit::{SLOW_COMMIT, Submitted};
pub use self::intercept::{Gate, Intercept};
pub use self::memory::MemoryStore;
pub use self::redis::{NotReplicated, RedisStore};

use crate::persistent::LeaseStore;
use anyhow::{Context as _, Result, bail};
use sha1::{Digest as _, Sha1};
use std::sync::Arc;

/// Runs a blocking store operation (a disk commit, a Redis round trip) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("store task failed")?
}

/// Where the outbox sequence numbers of one commit start at the least: the wall clock in
/// microseconds since the Unix epoch. Each record is numbered [`next_seq`] of the one before,
/// so the numbers of one commit are consecutive, and numbers keep increasing across a new or
/// restored store (a move to Redis, a fresh `state_dir`, a Redis failover that lost
/// increments) as long as the clock does: an engine that dedupes by `seq` or keeps a cursor
/// never takes a new update for one it already had. They stay below 2^53 (exact as a JSON
/// number and a Redis score) until the year 2255.
pub fn seq_floor() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The sequence number after `last` in a commit whose floor is `floor`.
pub fn next_seq(last: u64, floor: u64) -> u64 {
    last.saturating_add(1).max(floor)
}

/// A pending change to one key: `Some` writes the value, `None` deletes the key.
pub type Write = (String, Option<Vec<u8>>);

/// A call's own uncommitted write to a key it increments, if it has one: the value, or `None`
/// for a deletion.
pub type Pending<'a> = Option<Option<&'a [u8]>>;

/// What a read saw: the SHA-1 of the value, or `None` for an absent key. A digest keeps the
/// read set small; SHA-1 because Redis scripts can compute it (`redis.sha1hex`), and a
/// plugin that forged a collision could only confuse its own tenant's data.
pub type Seen = Option<[u8; 20]>;

pub fn digest(value: Option<&[u8]>) -> Seen {
    value.map(|v| Sha1::digest(v).into())
}

/// One plugin call's effect, applied all or nothing.
#[derive(Default, Debug, Clone)]
pub struct Commit {
    /// Keys the call read from the store, with what they held then.
    pub reads: Vec<(String, Seen)>,
    pub writes: Vec<Write>,
    /// Records appended to the tenant's outbox (approval updates for the engine).
    pub outbox: Vec<Vec<u8>>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.outbox.is_empty()
    }
}

/// Whether a [`Commit`] was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// A key in the read set changed since it was read; nothing was written.
    Conflict,
}

/// Durable state shared by the plugin KV, the outbox and the leases. `ns` is a tenant id
/// (`[A-Za-z0-9._-]`, checked when tenants load) or a host-internal namespace starting with
/// `#`, which no tenant id can.
pub trait Backend: LeaseStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// All keys of one namespace, sorted.
    fn keys(&self, ns: &str) -> Result<Vec<String>>;
    /// Applies `commit` atomically if every read in it still holds.
    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome>;
    /// The same as [`Backend::commit`] for a backend that commits on a thread of its own (the
    /// embedded group committer): the commit is queued and its outcome awaited, so an async
    /// caller needs no blocking thread to wait on it. `Err(commit)` hands the commit back to a
    /// caller of a backend that commits only synchronously.
    fn submit(&self, ns: &str, commit: Commit) -> std::result::Result<Submitted, Commit> {
        let _ = ns;
        Err(commit)
    }
    /// Adds `delta` to the decimal counter at `key` and makes it durable at once; returns the
    /// new value. `pending` is the calling plugin's own uncommitted write to the key, if any:
    /// the plugin must see its own writes, so that value (or its deletion) is the base. A
    /// missing key counts as 0.
    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64>;
    /// At most `limit` outbox records of a tenant with sequence number above `after`, oldest
    /// first.
    fn outbox_page(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;
    /// All of them.
    fn outbox_list(&self, tenant: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.outbox_page(tenant, after, usize::MAX)
    }
    /// Removes the records up to and including `seq` (delivered or acknowledged), in one
    /// step: acknowledging a long backlog must not cost one durable transaction per record.
    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()>;
    /// The last sequence number given out for the tenant's outbox (0 before the first).
    fn outbox_last_seq(&self, tenant: &str) -> Result<u64>;
    /// Where the state lives, for the log (no credentials).
    fn describe(&self) -> String;
    /// Whether an operation may wait on the network: a store behind a dead link holds it for
    /// seconds, so the host does not let it hold an async worker meanwhile.
    fn remote(&self) -> bool {
        false
    }

    /// Writes without conditions (tests, tooling, seeding).
    fn put(&self, ns: &str, writes: Vec<Write>) -> Result<()> {
        let commit = Commit {
            writes,
            ..Commit::default()
        };
        match self.commit(ns, commit)? {
            Outcome::Applied => Ok(()),
            Outcome::Conflict => bail!("unconditional write reported a conflict"),
        }
    }
}

/// Where the host keeps its state (serve config key `store`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// redb in the state directory.
    #[default]
    Embedded,
    /// A Redis server, e.g. `redis://127.0.0.1:6379/0`, shared by several hosts; with
    /// `wait_replicas`, a commit counts only once that many replicas have it (Redis `WAIT`).
    Redis { url: String, wait_replicas: u32 },
    /// Process memory: lost when the host stops, so only for embedders, tests and benchmarks.
    /// Deliberately not offered by the `serve` configuration: a server acknowledges callbacks
    /// the platform will not send again, and those must survive a crash.
    Memory,
}

impl StoreConfig {
    pub fn open(&self, state_dir: &std::path::Path) -> Result<Arc<dyn Backend>> {
        let store: Arc<dyn Backend> = match self {
            StoreConfig::Embedded => Arc::new(Store::open(state_dir)?),
            StoreConfig::Redis { url, wait_replicas } => {
                Arc::new(RedisStore::open(url)?.wait_replicas(*wait_replicas))
            }
            StoreConfig::Memory => Arc::new(MemoryStore::new()),
        };
        Ok(store)
    }
}

/// The counter arithmetic both backends share: `base` is what the key holds (or the caller's
/// pending write), `None` when absent.
pub fn next_counter(key: &str, base: Option<&[u8]>, delta: u64) -> Result<u64> {
    let current = match base {
        None => 0,
        Some(bytes) => {
            parse_counter(bytes).with_context(|| format!("key `{key}` does not hold a counter"))?
        }
    };
    match current.checked_add(delta) {
        Some(new) => Ok(new),
        None => bail!("counter `{key}` would overflow"),
    }
}

fn parse_counter(bytes: &[u8]) -> Result<u64> {
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    text.trim()
        .parse::<u64>()
        .context("not a decimal unsigned integer")
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every backend must have, run against each of them.
    use super::*;

    fn w(k: &str, v: Option<&[u8]>) -> Write {
        (k.to_string(), v.map(<[u8]>::to_vec))
    }

    pub fn kv_is_per_namespace(s: Arc<dyn Backend>) {
        s.put("a", vec![w("k1", Some(b"v1")), w("k2", Some(b"v2"))])
            .unwrap();
        s.put("ab", vec![w("k1", Some(b"other"))]).unwrap();
        assert_eq!(s.get("a", "k1").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(s.get("b", "k1").unwrap(), None);
        assert_eq!(s.keys("a").unwrap(), ["k1", "k2"]);
        assert_eq!(s.keys("ab").unwrap(), ["k1"]);
        // Keys may contain anything, including what looks like another namespace's prefix.
        s.put(
            "a",
            vec![w("x:{ab}:kv:k1", Some(b"odd")), w("*", Some(b"star"))],
        )
        .unwrap();
        assert_eq!(s.get("ab", "k1").unwrap().as_deref(), Some(&b"other"[..]));
        assert_eq!(s.keys("ab").unwrap(), ["k1"]);
        assert_eq!(s.keys("a").unwrap(), ["*", "k1", "k2", "x:{ab}:kv:k1"]);
        s.put("a", vec![w("k1", None)]).unwrap();
        assert_eq!(s.get("a", "k1").unwrap(), None);
        assert!(s.keys("nobody").unwrap().is_empty());
    }

    pub fn commit_validates_reads(s: Arc<dyn Backend>) {
        s.put("t", vec![w("seen", Some(b"1"))]).unwrap();
        let stale = Commit {
            reads: vec![("seen".into(), None)],
            writes: vec![w("rec", Some(b"applied"))],
            outbox: vec![b"update".to_vec()],
        };
        assert_eq!(s.commit("t", stale.clone()).unwrap(), Outcome::Conflict);
        assert_eq!(s.get("t", "rec").unwrap(), None, "nothing written");
        assert!(
            s.outbox_list("t", 0).unwrap().is_empty(),
            "no outbox record"
        );
        let fresh = Commit {
            reads: vec![("seen".into(), digest(Some(b"1"))), ("absent".into(), None)],
            ..stale
        };
        assert_eq!(s.commit("t", fresh).unwrap(), Outcome::Applied);
        assert_eq!(s.get("t", "rec").unwrap().as_deref(), Some(&b"applied"[..]));
        let records = s.outbox_list("t", 0).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1, b"update");
        let changed = Commit {
            reads: vec![("seen".into(), digest(Some(b"2")))],
            writes: vec![w("rec", None)],
            outbox: vec![],
        };
        assert_eq!(s.commit("t", changed).unwrap(), Outcome::Conflict);
        assert!(s.get("t", "rec").unwrap().is_some());
    }

    pub fn increment_counts_and_sees_pending_writes(s: Arc<dyn Backend>) {
        assert_eq!(s.increment("t", "c", 1, None).unwrap(), 1);
        assert_eq!(s.increment("t", "c", 2, None).unwrap(), 3);
        assert_eq!(s.get("t", "c").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(s.increment("t", "c", 1, Some(Some(b"10"))).unwrap(), 11);
        assert_eq!(s.increment("t", "c", 1, Some(None)).unwrap(), 1);
        assert_eq!(s.increment("u", "c", 5, None).unwrap(), 5);
        s.put("t", vec![w("s", Some(b"text"))]).unwrap();
        assert!(s.increment("t", "s", 1, None).is_err());
        s.put("t", vec![w("m", Some(u64::MAX.to_string().as_bytes()))])
            .unwrap();
        assert!(s.increment("t", "m", 1, None).is_err());
        assert_eq!(
            s.get("t", "m").unwrap(),
            Some(u64::MAX.to_string().into_bytes()),
            "a failed increment changes nothing"
        );
    }

    pub fn outbox_is_ordered_per_tenant(s: Arc<dyn Backend>) {
        let push = |t: &str, records: &[&[u8]]| {
            let c = Commit {
                outbox: records.iter().map(|r| r.to_vec()).collect(),
                ..Commit::default()
            };
            assert_eq!(s.commit(t, c).unwrap(), Outcome::Applied);
        };
        let before = seq_floor();
        push("t", &[b"one", b"two"]);
        push("u", &[b"x"]);
        let t = s.outbox_list("t", 0).unwrap();
        let one = t[0].0;
        // Numbered from the clock on, consecutively within a commit.
        assert!(one >= before, "{one} < {before}");
        assert_eq!(t, [(one, b"one".to_vec()), (one + 1, b"two".to_vec())]);
        let two = one + 1;
        assert_eq!(s.outbox_list("t", one).unwrap(), [(two, b"two".to_vec())]);
        let u = s.outbox_list("u", 0).unwrap();
        assert_eq!((u.len(), u[0].1.as_slice()), (1, &b"x"[..]));
        assert_eq!(s.outbox_last_seq("t").unwrap(), two);
        assert_eq!(s.outbox_page("t", 0, 1).unwrap(), [(one, b"one".to_vec())]);
        assert!(s.outbox_page("t", 0, 0).unwrap().is_empty());
        s.outbox_remove_through("t", one).unwrap();
        assert_eq!(s.outbox_list("t", 0).unwrap(), [(two, b"two".to_vec())]);
        s.outbox_remove_through("t", two).unwrap();
        // Removing records does not take their numbers back.
        assert_eq!(s.outbox_last_seq("t").unwrap(), two);
        push("t", &[b"three"]);
        let three = s.outbox_last_seq("t").unwrap();
        assert!(three > two);
        assert_eq!(
            s.outbox_list("t", two).unwrap(),
            [(three, b"three".to_vec())]
        );
        assert!(s.outbox_list("t", u64::MAX).unwrap().is_empty());
        assert_eq!(s.outbox_last_seq("u").unwrap(), u[0].0);
        assert_eq!(s.outbox_last_seq("nobody").unwrap(), 0);
        // Through a number past the records, and only the tenant's own.
        push("t", &[b"four"]);
        s.outbox_remove_through("t", u64::MAX - 1).unwrap();
        assert!(s.outbox_list("t", 0).unwrap().is_empty());
        assert_eq!(s.outbox_list("u", 0).unwrap(), u);
    }

    /// A new store (a move to Redis, a fresh state directory, a failover that lost counter
    /// increments) numbers its updates above every number an earlier one gave out, so an
    /// engine deduping by `seq` or holding a cursor does not drop them. Before, each store
    /// counted from 1.
    pub fn a_new_store_numbers_above_the_old_ones(make: &impl Fn() -> Arc<dyn Backend>) {
        let push = |s: &Arc<dyn Backend>, n: usize| {
            let c = Commit {
                outbox: vec![b"r".to_vec(); n],
                ..Commit::default()
            };
            assert_eq!(s.commit("t", c).unwrap(), Outcome::Applied);
            s.outbox_last_seq("t").unwrap()
        };
        let old = make();
        // Fifty numbers in one commit run ahead of the clock; the next commit passes them.
        let seen = push(&old, 50);
        let last = push(&old, 1);
        assert!(last > seen, "{last} <= {seen}");
        drop(old);
        // A move takes longer than the microseconds those numbers ran ahead.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let new = make();
        assert_eq!(new.outbox_last_seq("t").unwrap(), 0, "a new store");
        let first = push(&new, 1);
        assert!(first > last, "{first} <= {last}");
    }

    /// Leases: one owner at a time, renewals, release, expiry by the store's own clock.
    pub fn leases(s: Arc<dyn Backend>) {
        use std::time::Duration;
        let ttl = Duration::from_millis(400);
        assert!(s.try_acquire("t/app", "a", ttl).unwrap());
        assert!(!s.try_acquire("t/app", "b", ttl).unwrap(), "held by a");
        assert!(s.try_acquire("t/other", "b", ttl).unwrap(), "per name");
        assert!(s.try_acquire("t/app", "a", ttl).unwrap(), "renewed by a");
        assert_eq!(s.holder("t/app").unwrap().unwrap().0, "a");
        s.release("t/app", "b").unwrap();
        assert_eq!(
            s.holder("t/app").unwrap().unwrap().0,
            "a",
            "not b's to release"
        );
        s.release("t/app", "a").unwrap();
        assert!(s.holder("t/app").unwrap().is_none());
        assert!(s.try_acquire("t/app", "b", ttl).unwrap(), "free at once");
        // Expiry is a property of the store, not of a caller's clock: wait it out.
        std::thread::sleep(ttl + Duration::from_millis(200));
        assert!(s.try_acquire("t/app", "a", ttl).unwrap(), "expired: taken");
        // Leases are invisible to tenants' key-value data.
        assert!(s.keys("t").unwrap().is_empty());
    }

    /// Calls on several threads (or replicas) at once, as the host runs them: each updates a
    /// value it read, committing only if the value still holds what it read, and retries on a
    /// conflict. No update is lost, every increment counts, and the outbox numbers every
    /// applied commit once.
    pub fn concurrent_updates_are_never_lost(s: Arc<dyn Backend>) {
        const THREADS: usize = 4;
        const EACH: usize = 12;
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        s.increment("t", "hits", 1, None).unwrap();
                        loop {
                            let seen = s.get("t", "n").unwrap();
                            let n: u64 = seen
                                .as_deref()
                                .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                            // Widens the window in which another thread commits meanwhile.
                            std::thread::yield_now();
                            let update = Commit {
                                reads: vec![("n".into(), digest(seen.as_deref()))],
                                writes: vec![w("n", Some((n + 1).to_string().as_bytes()))],
                                outbox: vec![format!("{t}-{i}").into_bytes()],
                            };
                            if s.commit("t", update).unwrap() == Outcome::Applied {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for h in threads {
            h.join().unwrap();
        }
        let total = (THREADS * EACH).to_string();
        assert_eq!(s.get("t", "n").unwrap(), Some(total.clone().into_bytes()));
        assert_eq!(s.get("t", "hits").unwrap(), Some(total.into_bytes()));
        let outbox = s.outbox_list("t", 0).unwrap();
        let seqs: Vec<u64> = outbox.iter().map(|(seq, _)| *seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let mut records: Vec<Vec<u8>> = outbox.into_iter().map(|(_, r)| r).collect();
        records.sort();
        records.dedup();
        assert_eq!(records.len(), THREADS * EACH, "each applied commit once");
    }

    pub fn all(make: impl Fn() -> Arc<dyn Backend>) {
        kv_is_per_namespace(make());
        commit_validates_reads(make());
        increment_counts_and_sees_pending_writes(make());
        outbox_is_ordered_per_tenant(make());
        a_new_store_numbers_above_the_old_ones(&make);
        leases(make());
        concurrent_updates_are_never_lost(make());
    }
}
