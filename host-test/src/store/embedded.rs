//! [`Backend`] over an embedded redb database: one file in the state directory, one process.
//!
//! Plugin key-value data lives in one table keyed by `(namespace, key)`. Keying by tuple
//! rather than by a prefixed string means no tenant id or key can ever collide with another
//! tenant's namespace, whatever characters it contains.
//!
//! Plugin commits go through the group committer (`group_commit.rs`), which shares one
//! durable transaction among concurrent commits; increments, leases and outbox removals are
//! rare and keep their own transactions.

use super::group_commit::Committer;
use super::{Backend, Commit, Outcome, Pending, Submitted, digest, next_counter};
use crate::persistent::LeaseStore;
use crate::persistent::lease::{self, LeaseRecord};
use anyhow::{Context as _, Result};
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
/// Last outbox sequence number per tenant, kept apart so numbers are never reused after the
/// newest records have been removed.
const OUTBOX_SEQ: TableDefinition<&str, u64> = TableDefinition::new("outbox_seq");
/// Lease records (JSON [`LeaseRecord`]) by lease name.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "imbridge.redb";

pub struct Store {
    // Declared first so it is dropped (and its thread joined) before `db`.
    committer: Committer,
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let db = Database::create(&path).with_context(|| {
            format!(
                "opening {} (is another imbridge-host using this state directory?)",
                path.display()
            )
        })?;
        // Create the tables up front so read transactions never meet a missing table.
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(OUTBOX_SEQ)?;
        txn.open_table(LEASES)?;
        txn.commit()?;
        let db = Arc::new(db);
        let committer = Committer::start(db.clone(), apply).context("starting the committer")?;
        Ok(Store {
            committer,
            db,
            path,
        })
    }

    #[cfg(test)]
    pub(super) fn db_for_tests(&self) -> Arc<Database> {
        self.db.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes or renews a lease as of `now_ms` (the wall clock: one process holds the file,
    /// so there is only one clock).
    pub fn acquire_at(&self, name: &str, owner: &str, ttl: Duration, now_ms: u64) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let taken = {
            let mut table = txn.open_table(LEASES)?;
            let current = table
                .get(name)?
                .and_then(|v| serde_json::from_slice::<LeaseRecord>(v.value()).ok());
            match lease::next(current.as_ref(), owner, ttl, now_ms) {
                Some(new) => {
                    table.insert(name, serde_json::to_vec(&new)?.as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(taken)
    }
}

/// Appends `record` to the tenant's outbox inside `txn`.
fn outbox_append(txn: &WriteTransaction, tenant: &str, record: &[u8], floor: u64) -> Result<u64> {
    let mut seqs = txn.open_table(OUTBOX_SEQ)?;
    let seq = super::next_seq(seqs.get(tenant)?.map_or(0, |v| v.value()), floor);
    seqs.insert(tenant, seq)?;
    txn.open_table(OUTBOX)?.insert((tenant, seq), record)?;
    Ok(seq)
}

/// Validates `commit` inside `txn` and applies it if its reads hold. Run by the group
/// committer for each request of a batch: the transaction already holds the writes of the
/// requests before this one, so a read they changed is a conflict here too. redb has one
/// writer at a time, so checking the reads inside the write transaction makes check and
/// write one atomic step.
pub(super) fn apply(txn: &WriteTransaction, ns: &str, commit: &Commit) -> Result<Outcome> {
    let mut table = txn.open_table(KV)?;
    for (key, seen) in &commit.reads {
        let now = table
            .get((ns, key.as_str()))?
            .map(|v| digest(Some(v.value())));
        if now.flatten() != *seen {
            // Checked before any write: a conflicting request leaves the batch untouched.
            return Ok(Outcome::Conflict);
        }
    }
    for (key, value) in &commit.writes {
        match value {
            Some(v) => {
                table.insert((ns, key.as_str()), v.as_slice())?;
            }
            None => {
                table.remove((ns, key.as_str()))?;
            }
        }
    }
    drop(table);
    let floor = super::seq_floor();
    for record in &commit.outbox {
        outbox_append(txn, ns, record, floor)?;
    }
    Ok(Outcome::Applied)
}

impl Backend for Store {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        Ok(table.get((ns, key))?.map(|v| v.value().to_vec()))
    }

    fn keys(&self, ns: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        let mut keys = Vec::new();
        for entry in table.range((ns, "")..)? {
            let (k, _) = entry?;
            let (t, key) = k.value();
            if t != ns {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        if commit.is_empty() {
            return Ok(Outcome::Applied);
        }
        self.committer.commit(ns, commit)
    }

    fn submit(&self, ns: &str, commit: Commit) -> std::result::Result<Submitted, Commit> {
        Ok(self.committer.submit(ns, commit))
    }

    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let new = {
            let mut table = txn.open_table(KV)?;
            let stored = table.get((ns, key))?.map(|v| v.value().to_vec());
            let base = match pending {
                Some(p) => p,
                None => stored.as_deref(),
            };
            let new = next_counter(key, base, delta)?;
            table.insert((ns, key), new.to_string().as_bytes())?;
            new
        };
        txn.commit()?;
        Ok(new)
    }

    fn outbox_page(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in table
            .range((tenant, start)..=(tenant, u64::MAX))?
            .take(limit)
        {
            let (k, v) = entry?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?
            .retain_in((tenant, 0)..=(tenant, seq), |_, _| false)?;
        txn.commit()?;
        Ok(())
    }

    fn outbox_last_seq(&self, tenant: &str) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn
            .open_table(OUTBOX_SEQ)?
            .get(tenant)?
            .map_or(0, |v| v.value()))
    }

    fn describe(&self) -> String {
        format!("embedded database {}", self.path.display())
    }
}

impl LeaseStore for Store {
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.acquire_at(name, owner, ttl, lease::now_ms())
    }

    fn release(&self, name: &str, owner: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(LEASES)?;
            let ours = table
                .get(name)?
                .and_then(|v| serde_json::from_slice::<LeaseRecord>(v.value()).ok())
                .is_some_and(|r| r.owner == owner);
            if ours {
                table.remove(name)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn holder(&self, name: &str) -> Result<Option<(String, u64)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LEASES)?;
        Ok(table
            .get(name)?
            .and_then(|v| serde_json::from_slice::<LeaseRecord>(v.value()).ok())
            .map(|r| (r.owner, r.expires_ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn conforms() {
        let dirs = std::cell::RefCell::new(Vec::new());
        super::super::conformance::all(|| {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Backend> = Arc::new(Store::open(dir.path()).unwrap());
            dirs.borrow_mut().push(dir);
            store
        });
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let c = Commit {
                writes: vec![("k".to_string(), Some(b"v".to_vec()))],
                outbox: vec![b"r".to_vec()],
                ..Commit::default()
            };
            assert_eq!(store.commit("t", c).unwrap(), Outcome::Applied);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("t", "k").unwrap().as_deref(), Some(&b"v"[..]));
        let records: Vec<_> = store.outbox_list("t", 0).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].1, b"r");
    }

    #[test]
    fn lease_expiry_follows_the_given_clock() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ttl = Duration::from_secs(10);
        assert!(s.acquire_at("t/app", "a", ttl, 1_000).unwrap());
        assert!(!s.acquire_at("t/app", "b", ttl, 2_000).unwrap());
        assert!(s.acquire_at("t/app", "a", ttl, 9_000).unwrap(), "renewal");
        assert!(
            !s.acquire_at("t/app", "b", ttl, 18_000).unwrap(),
            "until 19 000"
        );
        assert!(s.acquire_at("t/app", "b", ttl, 19_001).unwrap(), "expired");
        assert!(
            !s.acquire_at("t/app", "a", ttl, 19_002).unwrap(),
            "a lost it"
        );
    }
}
