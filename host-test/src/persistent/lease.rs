//! One live connection per app: a lease record (owner id + expiry) in the host's store.
//!
//! The logic only needs "read a record" and "replace it if it is still what I read"
//! ([`LeaseStore`]), so any store with compare-and-swap can carry it: the embedded redb store
//! today, Redis (WATCH/MULTI or a small script) when hosts share state over the network.
//! Expiry uses the wall clock because different processes compare it; keep hosts' clocks in
//! sync (NTP) and the TTL well above the expected skew.

use crate::store::Store;
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A key-value store with compare-and-swap, as leases need it.
pub trait LeaseStore: Send + Sync {
    /// The record stored under `name`, if any.
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Writes `new` (or deletes, for `None`) only if the record still equals `expected`
    /// (`None`: absent). Returns whether it did.
    fn compare_and_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool>;
}

/// Leases live in the host's key-value table under a namespace no tenant id can take (tenant
/// ids are `[A-Za-z0-9._-]`), so no plugin can read or forge them.
const NAMESPACE: &str = "#leases";

/// redb takes an exclusive lock on its file, so only one process ever holds a [`Store`]; a
/// process-wide mutex is then enough to make read-compare-write atomic.
static CAS_LOCK: Mutex<()> = Mutex::new(());

impl LeaseStore for Store {
    fn load(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.get(NAMESPACE, name)
    }

    fn compare_and_swap(
        &self,
        name: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        let _guard = CAS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.get(NAMESPACE, name)?;
        if current.as_deref() != expected {
            return Ok(false);
        }
        self.commit(NAMESPACE, [(name.to_string(), new.map(<[u8]>::to_vec))])?;
        Ok(true)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Record {
    owner: String,
    expires_ms: u64,
}

/// One owner's claim on one named lease.
#[derive(Clone)]
pub struct Lease {
    store: Arc<dyn LeaseStore>,
    name: String,
    owner: String,
    ttl: Duration,
}

impl Lease {
    pub fn new(store: Arc<dyn LeaseStore>, name: &str, owner: &str, ttl: Duration) -> Lease {
        Lease {
            store,
            name: name.to_string(),
            owner: owner.to_string(),
            ttl,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the lease, or extends it, for `ttl` from `now_ms`: succeeds when it is free,
    /// expired, or already ours. `false` means another owner holds it.
    pub fn acquire_at(&self, now_ms: u64) -> Result<bool> {
        let current = self.store.load(&self.name)?;
        if let Some(bytes) = &current {
            // An unreadable record (e.g. written by a newer host) is treated as expired rather
            // than blocking the app forever.
            if let Ok(r) = serde_json::from_slice::<Record>(bytes)
                && r.owner != self.owner
                && r.expires_ms > now_ms
            {
                return Ok(false);
            }
        }
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let new = serde_json::to_vec(&Record {
            owner: self.owner.clone(),
            expires_ms: now_ms.saturating_add(ttl_ms),
        })
        .context("encoding lease")?;
        self.store
            .compare_and_swap(&self.name, current.as_deref(), Some(&new))
    }

    /// [`Lease::acquire_at`] with the wall clock.
    pub fn acquire(&self) -> Result<bool> {
        self.acquire_at(now_ms())
    }

    /// Gives the lease up if we hold it, so another host need not wait for the expiry.
    pub fn release(&self) -> Result<()> {
        let Some(current) = self.store.load(&self.name)? else {
            return Ok(());
        };
        match serde_json::from_slice::<Record>(&current) {
            Ok(r) if r.owner == self.owner => {
                self.store
                    .compare_and_swap(&self.name, Some(&current), None)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The current holder and its expiry (ms), expired or not.
    pub fn holder(&self) -> Result<Option<(String, u64)>> {
        Ok(self
            .store
            .load(&self.name)?
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .map(|r| (r.owner, r.expires_ms)))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_at_a_time_until_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LeaseStore> = Arc::new(Store::open(dir.path()).unwrap());
        let ttl = Duration::from_secs(10);
        let a = Lease::new(store.clone(), "t/app", "host-a", ttl);
        let b = Lease::new(store.clone(), "t/app", "host-b", ttl);
        let other = Lease::new(store, "t/other", "host-b", ttl);
        assert!(a.acquire_at(1_000).unwrap());
        assert!(!b.acquire_at(2_000).unwrap(), "held by a");
        assert!(other.acquire_at(2_000).unwrap(), "leases are per name");
        assert!(a.acquire_at(9_000).unwrap(), "renewal by the owner");
        assert!(!b.acquire_at(18_000).unwrap(), "renewed until 19 000");
        assert!(b.acquire_at(19_001).unwrap(), "expired: taken over");
        assert!(!a.acquire_at(19_002).unwrap(), "a lost it");
        a.release().unwrap();
        assert_eq!(
            b.holder().unwrap().unwrap().0,
            "host-b",
            "release by a non-owner is a no-op"
        );
        b.release().unwrap();
        assert!(a.acquire_at(19_003).unwrap(), "released: free at once");
    }
}
