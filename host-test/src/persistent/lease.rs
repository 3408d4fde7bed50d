//! One live connection per app: a named lease held by one owner at a time, in the host's
//! store, with an expiry so a dead holder's lease passes to another host.
//!
//! [`LeaseStore`] is the store's side: take-or-renew, release, read. The embedded store keeps
//! a [`LeaseRecord`] and compares expiries with the wall clock, which is sound because only
//! one process ever opens its file. The Redis store sets the key with a `PX` expiry, so the
//! Redis server's clock alone decides when a lease lapses and the replicas' clocks never
//! meet.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where leases are kept.
pub trait LeaseStore: Send + Sync {
    /// Takes the lease `name` for `owner`, or extends it, for `ttl`: succeeds when it is free,
    /// expired, or already `owner`'s; `false` means another owner holds it.
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool>;
    /// Gives the lease up if `owner` holds it.
    fn release(&self, name: &str, owner: &str) -> Result<()>;
    /// The current holder and its expiry (ms since the epoch, by the store's clock), if the
    /// lease is held.
    fn holder(&self, name: &str) -> Result<Option<(String, u64)>>;
}

/// The embedded store's lease record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub owner: String,
    pub expires_ms: u64,
}

/// The record after `owner` asks for the lease at `now_ms`, or `None` if someone else holds
/// it. An unreadable record (e.g. written by a newer host) is passed as `None` by the caller
/// and so treated as expired rather than blocking the app forever.
pub fn next(
    current: Option<&LeaseRecord>,
    owner: &str,
    ttl: Duration,
    now_ms: u64,
) -> Option<LeaseRecord> {
    if let Some(r) = current
        && r.owner != owner
        && r.expires_ms > now_ms
    {
        return None;
    }
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    Some(LeaseRecord {
        owner: owner.to_string(),
        expires_ms: now_ms.saturating_add(ttl_ms),
    })
}

/// One owner's claim on one named lease.
#[derive(Clone)]
pub struct Lease {
    store: Arc<dyn LeaseStore>,
    name: String,
    owner: String,
    ttl: Duration,
    /// Released for good. A renewal still running when the lease is released (its task was
    /// aborted, but the blocking store call goes on) would otherwise take the lease again
    /// after the release, and no host could connect until it expired.
    released: Arc<AtomicBool>,
}

impl Lease {
    pub fn new(store: Arc<dyn LeaseStore>, name: &str, owner: &str, ttl: Duration) -> Lease {
        Lease {
            store,
            name: name.to_string(),
            owner: owner.to_string(),
            ttl,
            released: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes the lease, or extends it, for `ttl`. `false` means another owner holds it.
    pub fn acquire(&self) -> Result<bool> {
        if self.released.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let granted = self.store.try_acquire(&self.name, &self.owner, self.ttl)?;
        // Released while the store was asked: the release may have come first there, so
        // what this granted is given back.
        if granted && self.released.load(Ordering::SeqCst) {
            self.store.release(&self.name, &self.owner)?;
            return Ok(false);
        }
        Ok(granted)
    }

    /// Gives the lease up if we hold it, so another host need not wait for the expiry, and
    /// for good: this owner never takes it again.
    pub fn release(&self) -> Result<()> {
        self.released.store(true, Ordering::SeqCst);
        self.store.release(&self.name, &self.owner)
    }

    /// The current holder and its expiry (ms, by the store's clock).
    pub fn holder(&self) -> Result<Option<(String, u64)>> {
        self.store.holder(&self.name)
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

    /// A store whose grants wait while `gate` is held, as a store behind a slow link might.
    #[derive(Default)]
    struct GatedStore {
        inner: crate::store::MemoryStore,
        gate: crate::store::Gate,
    }

    impl crate::store::Intercept for GatedStore {
        fn memory(&self) -> &crate::store::MemoryStore {
            &self.inner
        }
        fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
            self.gate.pass();
            self.inner.try_acquire(name, owner, ttl)
        }
    }

    #[test]
    fn a_renewal_in_flight_cannot_undo_the_release() {
        let store = Arc::new(GatedStore::default());
        let lease = Lease::new(store.clone(), "t/a", "me", Duration::from_secs(30));
        assert!(lease.acquire().unwrap());
        store.gate.hold();
        let renewal = {
            let lease = lease.clone();
            std::thread::spawn(move || lease.acquire())
        };
        assert!(
            store.gate.wait_for(1, Duration::from_secs(20)),
            "no renewal"
        );
        lease.release().unwrap();
        assert_eq!(lease.holder().unwrap(), None);
        // The store now grants the renewal (nobody holds the lease): the lease must give it
        // back and report it not taken.
        store.gate.release();
        assert!(!renewal.join().unwrap().unwrap());
        assert_eq!(lease.holder().unwrap(), None);
        assert!(!lease.acquire().unwrap());
        assert_eq!(lease.holder().unwrap(), None);
    }

    #[test]
    fn next_grants_free_expired_or_own_leases_only() {
        let ttl = Duration::from_secs(10);
        let a = next(None, "a", ttl, 1_000).unwrap();
        assert_eq!(a.expires_ms, 11_000);
        assert_eq!(next(Some(&a), "b", ttl, 5_000), None, "held by a");
        assert_eq!(next(Some(&a), "a", ttl, 5_000).unwrap().expires_ms, 15_000);
        assert_eq!(next(Some(&a), "b", ttl, 11_001).unwrap().owner, "b");
    }
}
