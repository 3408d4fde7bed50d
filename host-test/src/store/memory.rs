//! [`Backend`] in process memory: nothing survives the process.
//!
//! For embedders that keep state elsewhere between calls (or not at all), for tests, and for
//! the benchmarks that separate the sandbox's cost from the disk's: the same commit semantics
//! as the durable backends (reads validated atomically with the writes), minus durability.

use super::{Backend, Commit, Outcome, Pending, Submitted, digest, next_counter};
use crate::persistent::LeaseStore;
use crate::persistent::lease::{self, LeaseRecord};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Keyed by `(namespace, key)`, like the embedded store, so namespaces cannot collide.
    kv: BTreeMap<(String, String), Vec<u8>>,
    outbox: BTreeMap<(String, u64), Vec<u8>>,
    /// Last sequence number per tenant: numbers are never reused after removals.
    outbox_seq: HashMap<String, u64>,
    leases: HashMap<String, LeaseRecord>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below completes or returns before touching the map, so a panic
        // elsewhere cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn kv_key(ns: &str, key: &str) -> (String, String) {
    (ns.to_string(), key.to_string())
}

impl Backend for MemoryStore {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().kv.get(&kv_key(ns, key)).cloned())
    }

    fn keys(&self, ns: &str) -> Result<Vec<String>> {
        let state = self.lock();
        Ok(state
            .kv
            .range(kv_key(ns, "")..)
            .take_while(|((t, _), _)| t == ns)
            .map(|((_, k), _)| k.clone())
            .collect())
    }

    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        let mut state = self.lock();
        for (key, seen) in &commit.reads {
            if digest(state.kv.get(&kv_key(ns, key)).map(Vec::as_slice)) != *seen {
                return Ok(Outcome::Conflict);
            }
        }
        for (key, value) in commit.writes {
            match value {
                Some(v) => state.kv.insert(kv_key(ns, &key), v),
                None => state.kv.remove(&kv_key(ns, &key)),
            };
        }
        let floor = super::seq_floor();
        for record in commit.outbox {
            let seq = state.outbox_seq.entry(ns.to_string()).or_default();
            *seq = super::next_seq(*seq, floor);
            let seq = *seq;
            state.outbox.insert((ns.to_string(), seq), record);
        }
        Ok(Outcome::Applied)
    }

    /// No I/O, so no thread to wait on: the commit is applied on the caller's.
    fn submit(&self, ns: &str, commit: Commit) -> std::result::Result<Submitted, Commit> {
        Ok(Submitted::ready(self.commit(ns, commit)))
    }

    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64> {
        let mut state = self.lock();
        let k = kv_key(ns, key);
        let base = match pending {
            Some(p) => p,
            None => state.kv.get(&k).map(Vec::as_slice),
        };
        let new = next_counter(key, base, delta)?;
        state.kv.insert(k, new.to_string().into_bytes());
        Ok(new)
    }

    fn outbox_page(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let state = self.lock();
        Ok(state
            .outbox
            .range((tenant.to_string(), start)..=(tenant.to_string(), u64::MAX))
            .take(limit)
            .map(|((_, seq), r)| (*seq, r.clone()))
            .collect())
    }

    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()> {
        self.lock()
            .outbox
            .retain(|(t, s), _| t != tenant || *s > seq);
        Ok(())
    }

    fn outbox_last_seq(&self, tenant: &str) -> Result<u64> {
        Ok(self.lock().outbox_seq.get(tenant).copied().unwrap_or(0))
    }

    fn describe(&self) -> String {
        "process memory (not durable)".to_string()
    }
}

impl LeaseStore for MemoryStore {
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let mut state = self.lock();
        match lease::next(state.leases.get(name), owner, ttl, lease::now_ms()) {
            Some(new) => {
                state.leases.insert(name.to_string(), new);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn release(&self, name: &str, owner: &str) -> Result<()> {
        let mut state = self.lock();
        if state.leases.get(name).is_some_and(|r| r.owner == owner) {
            state.leases.remove(name);
        }
        Ok(())
    }

    fn holder(&self, name: &str) -> Result<Option<(String, u64)>> {
        Ok(self
            .lock()
            .leases
            .get(name)
            .map(|r| (r.owner.clone(), r.expires_ms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn conforms() {
        super::super::conformance::all(|| Arc::new(MemoryStore::new()) as Arc<dyn Backend>);
    }
}
