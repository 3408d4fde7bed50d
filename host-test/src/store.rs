//! The host's durable state: one embedded redb database per state directory.
//!
//! Plugin key-value data lives in one table keyed by `(tenant, key)`. Keying by tuple rather
//! than by a prefixed string means no tenant id or key can ever collide with another tenant's
//! namespace, whatever characters it contains.

use anyhow::{Context as _, Result, bail};
use redb::{Database, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
/// Last outbox sequence number per tenant, kept apart so numbers are never reused after the
/// newest records have been removed.
const OUTBOX_SEQ: TableDefinition<&str, u64> = TableDefinition::new("outbox_seq");

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "imbridge.redb";

/// A pending change to one key: `Some` writes the value, `None` deletes the key.
pub type Write = (String, Option<Vec<u8>>);

pub struct Store {
    db: Database,
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
        txn.commit()?;
        Ok(Store { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        Ok(table.get((tenant, key))?.map(|v| v.value().to_vec()))
    }

    /// All keys of one tenant, sorted.
    pub fn keys(&self, tenant: &str) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        let mut keys = Vec::new();
        for entry in table.range((tenant, "")..)? {
            let (k, _) = entry?;
            let (t, key) = k.value();
            if t != tenant {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    /// Applies all writes of one plugin call in a single durable transaction.
    pub fn commit(&self, tenant: &str, writes: impl IntoIterator<Item = Write>) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(KV)?;
            for (key, value) in writes {
                match value {
                    Some(v) => {
                        table.insert((tenant, key.as_str()), v.as_slice())?;
                    }
                    None => {
                        table.remove((tenant, key.as_str()))?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Adds `delta` to the decimal counter at `key` and commits at once; returns the new value.
    ///
    /// `pending` is the calling plugin's own uncommitted write to the same key, if any: the
    /// plugin must see its own writes, so that value (or its deletion) is the base instead of
    /// the stored one. A missing key counts as 0.
    pub fn increment(
        &self,
        tenant: &str,
        key: &str,
        delta: u64,
        pending: Option<Option<&[u8]>>,
    ) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let new = {
            let mut table = txn.open_table(KV)?;
            let stored = table.get((tenant, key))?.map(|v| v.value().to_vec());
            let base = match pending {
                Some(p) => p.map(<[u8]>::to_vec),
                None => stored,
            };
            let current = match base {
                None => 0,
                Some(bytes) => parse_counter(&bytes)
                    .with_context(|| format!("key `{key}` does not hold a counter"))?,
            };
            let Some(new) = current.checked_add(delta) else {
                bail!("counter `{key}` would overflow");
            };
            table.insert((tenant, key), new.to_string().as_bytes())?;
            new
        };
        txn.commit()?;
        Ok(new)
    }

    /// Appends one record to a tenant's outbox and returns its sequence number.
    pub fn outbox_push(&self, tenant: &str, record: &[u8]) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let seq = {
            let mut seqs = txn.open_table(OUTBOX_SEQ)?;
            let seq = seqs.get(tenant)?.map_or(0, |v| v.value()) + 1;
            seqs.insert(tenant, seq)?;
            txn.open_table(OUTBOX)?.insert((tenant, seq), record)?;
            seq
        };
        txn.commit()?;
        Ok(seq)
    }

    /// The outbox records of a tenant with sequence number above `after`, oldest first.
    pub fn outbox_list(&self, tenant: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in table.range((tenant, start)..=(tenant, u64::MAX))? {
            let (k, v) = entry?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Removes a delivered outbox record.
    pub fn outbox_remove(&self, tenant: &str, seq: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(OUTBOX)?.remove((tenant, seq))?;
        txn.commit()?;
        Ok(())
    }
}

fn parse_counter(bytes: &[u8]) -> Result<u64> {
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    text.trim()
        .parse::<u64>()
        .context("not a decimal unsigned integer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_get_keys_are_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(
                "a",
                [
                    ("k1".to_string(), Some(b"v1".to_vec())),
                    ("k2".to_string(), Some(b"v2".to_vec())),
                ],
            )
            .unwrap();
        store
            .commit("ab", [("k1".to_string(), Some(b"other".to_vec()))])
            .unwrap();
        assert_eq!(store.get("a", "k1").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(store.get("b", "k1").unwrap(), None);
        assert_eq!(store.keys("a").unwrap(), ["k1", "k2"]);
        assert_eq!(store.keys("ab").unwrap(), ["k1"]);
        assert!(store.keys("").unwrap().is_empty());

        store.commit("a", [("k1".to_string(), None)]).unwrap();
        assert_eq!(store.keys("a").unwrap(), ["k2"]);
    }

    #[test]
    fn increment_counts_from_zero_and_sees_pending_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.increment("t", "c", 1, None).unwrap(), 1);
        assert_eq!(store.increment("t", "c", 2, None).unwrap(), 3);
        assert_eq!(store.get("t", "c").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(store.increment("t", "c", 1, Some(Some(b"10"))).unwrap(), 11);
        assert_eq!(store.increment("t", "c", 1, Some(None)).unwrap(), 1);
        assert_eq!(store.increment("u", "c", 5, None).unwrap(), 5);

        store
            .commit("t", [("s".to_string(), Some(b"text".to_vec()))])
            .unwrap();
        assert!(store.increment("t", "s", 1, None).is_err());
        store
            .commit(
                "t",
                [("m".to_string(), Some(u64::MAX.to_string().into_bytes()))],
            )
            .unwrap();
        assert!(store.increment("t", "m", 1, None).is_err());
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .commit("t", [("k".to_string(), Some(b"v".to_vec()))])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("t", "k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn outbox_is_ordered_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.outbox_push("t", b"one").unwrap(), 1);
        assert_eq!(store.outbox_push("t", b"two").unwrap(), 2);
        assert_eq!(store.outbox_push("u", b"x").unwrap(), 1);
        let all = store.outbox_list("t", 0).unwrap();
        assert_eq!(all, vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
        store.outbox_remove("t", 1).unwrap();
        assert_eq!(
            store.outbox_list("t", 0).unwrap(),
            vec![(2, b"two".to_vec())]
        );
        assert_eq!(store.outbox_push("t", b"three").unwrap(), 3);
    }
}
