//! `wasi:keyvalue/store` and `wasi:keyvalue/atomics` (0.2.0-draft) over the host's
//! [`Backend`].
//!
//! Each plugin call gets its own [`KvCtx`]: writes are buffered in an overlay the call reads
//! back, and the host commits the overlay in one transaction only when the export returns
//! normally. A trap or a missed deadline therefore leaves no half-applied state behind.
//! `increment` is the exception: it is how concurrent calls coordinate, so it is committed at
//! once.
//!
//! Every value the call read from the store is remembered (as a digest), and the commit
//! applies only if those keys still hold what was read: a concurrent call that changed one of
//! them in between makes this commit a [`Outcome::Conflict`](crate::store::Outcome) instead
//! of a lost update. (`list-keys` is not validated: key listings are for tooling, and the
//! plugin's decisions never rest on one.)

use crate::bindings::wasi::keyvalue::{atomics, store};
use crate::store::{Backend, Commit, Seen, Write, digest};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable, ResourceTableError};

/// The only bucket identifier a plugin may open; tenants are separated by the host, not by
/// bucket names the plugin could choose.
pub const BUCKET: &str = "";

/// Number of keys returned per `list-keys` page.
const LIST_PAGE: usize = 1000;

/// Most bytes (keys plus values written, keys read) one call may buffer. The overlay and the
/// read set live in host memory, outside the guest's linear-memory cap, so a runaway plugin
/// must not be able to grow them unbounded.
const MAX_BUFFERED: usize = 16 << 20;

/// Longest key a plugin may use: keys are names (the plugin's own are a few hundred bytes at
/// most), and each one read is kept for the commit's check and sent with it.
pub const MAX_KEY: usize = 4096;

/// Keys the host writes into a tenant's namespace for its own bookkeeping (the commit marks
/// of [`crate::host`]): hidden from the plugin's `list-keys` and refused to its reads and
/// writes, so that a plugin can neither see nor forge them.
pub(crate) const HOST_KEY_PREFIX: &str = "\0imbridge-host/";

fn check_key(key: &str) -> anyhow::Result<()> {
    anyhow::ensure!(key.len() <= MAX_KEY, "key longer than {MAX_KEY} bytes");
    anyhow::ensure!(
        !key.starts_with(HOST_KEY_PREFIX),
        "keys starting with {HOST_KEY_PREFIX:?} are the host's"
    );
    Ok(())
}

/// The host side of a `bucket` resource. It carries no state: the tenant is fixed per call.
pub struct Bucket;

/// Host-side error, converted to `wasi:keyvalue/store.error` for the guest.
#[derive(Debug)]
pub enum KvError {
    NoSuchStore,
    AccessDenied,
    Other(String),
}

impl From<ResourceTableError> for KvError {
    fn from(err: ResourceTableError) -> Self {
        KvError::Other(err.to_string())
    }
}

impl From<anyhow::Error> for KvError {
    fn from(err: anyhow::Error) -> Self {
        KvError::Other(format!("{err:#}"))
    }
}

/// Per-call key-value state of one tenant.
pub struct KvCtx {
    store: Arc<dyn Backend>,
    tenant: Arc<str>,
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    /// What each key read from the store held at its first read.
    reads: BTreeMap<String, Seen>,
    buffered: usize,
}

impl KvCtx {
    pub fn new(store: Arc<dyn Backend>, tenant: Arc<str>) -> KvCtx {
        KvCtx {
            store,
            tenant,
            overlay: BTreeMap::new(),
            reads: BTreeMap::new(),
            buffered: 0,
        }
    }

    fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        check_key(key)?;
        if let Some(pending) = self.overlay.get(key) {
            return Ok(pending.clone());
        }
        if !self.reads.contains_key(key) {
            self.count(key.len() + std::mem::size_of::<Seen>())?;
        }
        let value = self.wait(false, |store, tenant| store.get(tenant, key))?;
        // The first read is what the call's decisions rest on; a later read of a key that
        // changed meanwhile will fail validation all the same.
        self.reads
            .entry(key.to_string())
            .or_insert_with(|| digest(value.as_deref()));
        Ok(value)
    }

    /// Runs a store operation that the plugin's call waits for. The call runs on an async
    /// worker and the operation cannot be cut short by the call's deadline, so on a remote
    /// store behind a dead link (Redis: up to its 5 s timeouts, then a retry) it would hold
    /// the worker, and two such calls would stall every other task of the host: the server's
    /// requests, persistent connections' pings. `block_in_place` hands the worker's other
    /// tasks to another thread meanwhile. Local reads of one key answer in microseconds, where
    /// that hand-off would cost more than it saves; `slow` operations take long on a local
    /// store too: an increment is durable on its own, so it waits for a disk flush, and a
    /// listing reads every key of the tenant. On a current-thread runtime nothing can take the
    /// tasks over, so the operation runs in place.
    fn wait<R>(&self, slow: bool, op: impl FnOnce(&dyn Backend, &str) -> R) -> R {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi_thread = || {
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
        };
        if (slow || self.store.remote()) && multi_thread() {
            tokio::task::block_in_place(|| op(&*self.store, &self.tenant))
        } else {
            op(&*self.store, &self.tenant)
        }
    }

    fn count(&mut self, size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.buffered.saturating_add(size) <= MAX_BUFFERED,
            "more than {MAX_BUFFERED} bytes of keys and values in one call"
        );
        self.buffered += size;
        Ok(())
    }

    fn set(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), KvError> {
        check_key(&key)?;
        // Overwrites are counted again: simpler, and only makes the cap stricter.
        self.count(key.len() + value.as_ref().map_or(0, Vec::len))?;
        self.overlay.insert(key, value);
        Ok(())
    }

    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .wait(true, |store, tenant| store.keys(tenant))?
            .into_iter()
            .filter(|k| !self.overlay.contains_key(k) && !k.starts_with(HOST_KEY_PREFIX))
            .collect();
        keys.extend(
            self.overlay
                .iter()
                .filter(|(_, v)| v.is_some())
                .map(|(k, _)| k.clone()),
        );
        keys.sort();
        Ok(keys)
    }

    fn increment(&mut self, key: &str, delta: u64) -> anyhow::Result<u64> {
        check_key(key)?;
        // Durable at once, so counted as a write of the key and the longest counter: else
        // a call could create any number of keys beyond the cap, one increment at a time.
        self.count(key.len() + u64::MAX.ilog10() as usize + 1)?;
        let pending = self.overlay.get(key).map(Option::as_deref);
        let new = self.wait(true, |store, tenant| {
            store.increment(tenant, key, delta, pending)
        })?;
        // The counter is now durable; a buffered write must not overwrite it at commit, and
        // the call's own increment must not count as a concurrent change to what it read
        // (the increment is itself the atomic read-modify-write).
        self.overlay.remove(key);
        self.reads.remove(key);
        Ok(new)
    }

    /// The call's effect, with its read set: committed as is, it applies only if the reads
    /// still hold; a caller that clears `reads` applies the writes whatever happened meanwhile.
    pub fn into_commit(self) -> (Arc<dyn Backend>, Arc<str>, Commit) {
        let commit = Commit {
            reads: self.reads.into_iter().collect(),
            writes: self.overlay.into_iter().collect::<Vec<Write>>(),
            outbox: Vec::new(),
        };
        (self.store, self.tenant, commit)
    }
}

/// What the generated `Host` traits are implemented for.
pub struct KvView<'a> {
    pub ctx: &'a mut KvCtx,
    pub table: &'a mut ResourceTable,
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKv>(linker, get)?;
    atomics::add_to_linker::<T, HasKv>(linker, get)?;
    Ok(())
}

impl store::Host for KvView<'_> {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        if identifier != BUCKET {
            return Err(KvError::NoSuchStore);
        }
        Ok(self.table.push(Bucket)?)
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<store::Error> {
        Ok(match err {
            KvError::NoSuchStore => store::Error::NoSuchStore,
            KvError::AccessDenied => store::Error::AccessDenied,
            KvError::Other(msg) => store::Error::Other(msg),
        })
    }
}

impl store::HostBucket for KvView<'_> {
    fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, KvError> {
        self.table.get(&bucket)?;
        Ok(self.ctx.get(&key)?)
    }

    fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        self.table.get(&bucket)?;
        self.ctx.set(key, Some(value))
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        self.table.get(&bucket)?;
        self.ctx.set(key, None)
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        self.table.get(&bucket)?;
        Ok(self.ctx.get(&key)?.is_some())
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        self.table.get(&bucket)?;
        let keys = self.ctx.keys()?;
        let start = usize::try_from(cursor.unwrap_or(0))
            .unwrap_or(usize::MAX)
            .min(keys.len());
        let end = start.saturating_add(LIST_PAGE).min(keys.len());
        Ok(store::KeyResponse {
            keys: keys[start..end].to_vec(),
            cursor: (end < keys.len()).then_some(end as u64),
        })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        self.table.get(&bucket)?;
        Ok(self.ctx.increment(&key, delta)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atomics::Host as _;
    use store::{Host as _, HostBucket as _};

    use crate::store::{Outcome, Store};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Backend>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        Fixture { _dir: dir, store }
    }

    fn commit(ctx: KvCtx) -> Outcome {
        let (store, tenant, commit) = ctx.into_commit();
        store.commit(&tenant, commit).unwrap()
    }

    fn put(store: &Arc<dyn Backend>, tenant: &str, key: &str, value: &[u8]) {
        store
            .put(tenant, vec![(key.to_string(), Some(value.to_vec()))])
            .unwrap();
    }

    fn open(view: &mut KvView<'_>) -> Resource<Bucket> {
        view.open(String::new()).unwrap()
    }

    fn borrow(b: &Resource<Bucket>) -> Resource<Bucket> {
        Resource::new_borrow(b.rep())
    }

    #[test]
    fn only_the_empty_bucket_opens() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        assert!(matches!(
            view.open("other".into()),
            Err(KvError::NoSuchStore)
        ));
        assert!(view.open(String::new()).is_ok());
    }

    #[test]
    fn writes_are_visible_in_the_call_and_durable_only_after_commit() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let b = open(&mut view);
        view.set(borrow(&b), "k".into(), b"v".to_vec()).unwrap();
        assert_eq!(
            view.get(borrow(&b), "k".into()).unwrap(),
            Some(b"v".to_vec())
        );
        assert!(view.exists(borrow(&b), "k".into()).unwrap());
        let keys = view.list_keys(borrow(&b), None).unwrap();
        assert_eq!(keys.keys, ["k"]);
        assert_eq!(f.store.get("t", "k").unwrap(), None, "not yet committed");

        assert_eq!(commit(ctx), Outcome::Applied);
        assert_eq!(f.store.get("t", "k").unwrap(), Some(b"v".to_vec()));
    }

    /// The host's own keys in a tenant's namespace (commit marks) are neither listed to the
    /// plugin nor readable or writable by it.
    #[test]
    fn the_hosts_keys_are_out_of_the_plugins_reach() {
        let f = fixture();
        let mark = format!("{HOST_KEY_PREFIX}commit/1");
        put(&f.store, "t", "mine", b"1");
        put(&f.store, "t", &mark, b"1");
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let b = open(&mut view);
        assert_eq!(view.list_keys(borrow(&b), None).unwrap().keys, ["mine"]);
        assert!(view.get(borrow(&b), mark.clone()).is_err());
        assert!(view.set(borrow(&b), mark.clone(), b"x".to_vec()).is_err());
        assert!(view.delete(borrow(&b), mark.clone()).is_err());
        assert_eq!(commit(ctx), Outcome::Applied);
        assert_eq!(f.store.get("t", &mark).unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn a_dropped_call_leaves_no_writes() {
        let f = fixture();
        put(&f.store, "t", "keep", b"1");
        {
            // A trap or deadline drops the store, and with it the context, uncommitted.
            let mut ctx = KvCtx::new(f.store.clone(), "t".into());
            let mut table = ResourceTable::new();
            let mut view = KvView {
                ctx: &mut ctx,
                table: &mut table,
            };
            let b = open(&mut view);
            view.set(borrow(&b), "new".into(), b"x".to_vec()).unwrap();
            view.delete(borrow(&b), "keep".into()).unwrap();
            assert_eq!(view.get(borrow(&b), "keep".into()).unwrap(), None);
            assert!(view.list_keys(borrow(&b), None).unwrap().keys == ["new"]);
        }
        assert_eq!(f.store.keys("t").unwrap(), ["keep"]);
    }

    #[test]
    fn increment_is_committed_immediately() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let b = open(&mut view);
        assert_eq!(view.increment(borrow(&b), "n".into(), 1).unwrap(), 1);
        assert_eq!(view.increment(borrow(&b), "n".into(), 1).unwrap(), 2);
        assert_eq!(
            view.get(borrow(&b), "n".into()).unwrap(),
            Some(b"2".to_vec())
        );
        view.set(borrow(&b), "m".into(), b"41".to_vec()).unwrap();
        assert_eq!(view.increment(borrow(&b), "m".into(), 1).unwrap(), 42);
        drop(ctx);
        assert_eq!(f.store.get("t", "n").unwrap(), Some(b"2".to_vec()));
        assert_eq!(f.store.get("t", "m").unwrap(), Some(b"42".to_vec()));
    }

    #[test]
    fn tenants_do_not_see_each_other() {
        let f = fixture();
        let mut a = KvCtx::new(f.store.clone(), "a".into());
        a.set("secret".into(), Some(b"a-only".to_vec())).unwrap();
        assert_eq!(commit(a), Outcome::Applied);

        let mut ctx = KvCtx::new(f.store.clone(), "b".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let b = open(&mut view);
        assert_eq!(view.get(borrow(&b), "secret".into()).unwrap(), None);
        assert!(view.list_keys(borrow(&b), None).unwrap().keys.is_empty());
        assert_eq!(view.increment(borrow(&b), "secret".into(), 1).unwrap(), 1);
        assert_eq!(
            f.store.get("a", "secret").unwrap(),
            Some(b"a-only".to_vec())
        );
    }

    #[test]
    fn buffered_writes_are_capped() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let big = vec![0u8; MAX_BUFFERED / 2];
        ctx.set("a".into(), Some(big.clone())).unwrap();
        assert!(ctx.set("b".into(), Some(big)).is_err());
    }

    #[test]
    fn increments_count_towards_the_cap() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let key = "k".repeat(4000);
        ctx.set("a".into(), Some(vec![0u8; MAX_BUFFERED - 5000]))
            .unwrap();
        assert_eq!(ctx.increment(&key, 1).unwrap(), 1);
        assert!(ctx.increment(&key, 1).is_err());
        assert_eq!(f.store.get("t", &key).unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn list_keys_pages() {
        let f = fixture();
        let writes: Vec<Write> = (0..LIST_PAGE + 5)
            .map(|i| (format!("k{i:05}"), Some(vec![1])))
            .collect();
        f.store.put("t", writes).unwrap();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let mut table = ResourceTable::new();
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let b = open(&mut view);
        let first = view.list_keys(borrow(&b), None).unwrap();
        assert_eq!(first.keys.len(), LIST_PAGE);
        let second = view.list_keys(borrow(&b), first.cursor).unwrap();
        assert_eq!(second.keys.len(), 5);
        assert_eq!(second.cursor, None);
        let past = view.list_keys(borrow(&b), Some(u64::MAX)).unwrap();
        assert!(past.keys.is_empty());
    }

    /// Two deliveries of one callback, interleaved: both read the record before the decision,
    /// both save it. The second commit must not apply.
    #[test]
    fn a_commit_whose_reads_changed_conflicts() {
        let f = fixture();
        let mut first = KvCtx::new(f.store.clone(), "t".into());
        let mut second = KvCtx::new(f.store.clone(), "t".into());
        for ctx in [&mut first, &mut second] {
            assert_eq!(ctx.get("rec").unwrap(), None);
            ctx.set("rec".into(), Some(b"decided".to_vec())).unwrap();
        }
        assert_eq!(commit(first), Outcome::Applied);
        assert_eq!(commit(second), Outcome::Conflict);

        // Unvalidated commits (exports whose effect cannot be redone) apply regardless.
        let mut blind = KvCtx::new(f.store.clone(), "t".into());
        assert_eq!(blind.get("rec").unwrap(), Some(b"decided".to_vec()));
        put(&f.store, "t", "rec", b"changed");
        blind.set("other".into(), Some(b"x".to_vec())).unwrap();
        let (store, tenant, mut c) = blind.into_commit();
        c.reads.clear();
        assert_eq!(store.commit(&tenant, c).unwrap(), Outcome::Applied);
        assert_eq!(f.store.get("t", "other").unwrap(), Some(b"x".to_vec()));
    }

    /// Every key a call reads is kept in host memory for the commit, outside the guest's
    /// memory cap: a plugin reading ever new (or huge) keys used to grow it without bound.
    #[test]
    fn keys_and_the_read_set_are_bounded() {
        let f = fixture();
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        let long = "k".repeat(MAX_KEY + 1);
        assert!(ctx.get(&long).is_err());
        assert!(ctx.set(long.clone(), Some(b"v".to_vec())).is_err());
        assert!(ctx.increment(&long, 1).is_err());
        assert!(ctx.reads.is_empty() && ctx.overlay.is_empty());
        let key = |i: usize| format!("{i:0>4000}");
        let mut reads = 0;
        while ctx.get(&key(reads)).is_ok() {
            reads += 1;
            assert!(reads < 10_000, "reads are never refused");
        }
        assert!(reads > 1_000, "{reads}");
        let err = format!("{:#}", ctx.get(&key(reads)).unwrap_err());
        assert!(err.contains("bytes of keys and values"), "{err}");
        // A key already read is read again for free.
        assert!(ctx.get(&key(0)).is_ok());
    }

    #[test]
    fn reads_of_unchanged_keys_and_own_increments_do_not_conflict() {
        let f = fixture();
        put(&f.store, "t", "a", b"1");
        let mut ctx = KvCtx::new(f.store.clone(), "t".into());
        assert_eq!(ctx.get("a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(ctx.get("claim").unwrap(), None);
        assert_eq!(ctx.increment("claim", 1).unwrap(), 1);
        // Rewritten with the same value by someone else: what was read still holds.
        put(&f.store, "t", "a", b"1");
        ctx.set("b".into(), Some(b"2".to_vec())).unwrap();
        assert_eq!(commit(ctx), Outcome::Applied);
    }
}
