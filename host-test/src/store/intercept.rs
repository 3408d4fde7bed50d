//! A [`MemoryStore`] with some of its operations replaced: the one way this crate's tests, and
//! the end-to-end tests, inject store faults (a lost commit answer, a disk that refuses
//! writes, a slow link) without writing out every [`Backend`] and [`LeaseStore`] method.
//!
//! Implement [`Intercept::memory`] and override only what the fault changes; every other
//! operation is the memory store's own; a [`Gate`] holds an operation until the test lets it
//! go. `Backend::submit` keeps its default (the commit is
//! handed back and goes through `commit`), so an overridden `commit` sees every commit.

use super::{Backend, Commit, MemoryStore, Outcome, Pending};
use crate::persistent::LeaseStore;
use anyhow::Result;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Store operations held, while the test holds the gate, until it releases it: a store behind
/// a dead link or a slow disk, with the test knowing when the operations have reached it.
#[derive(Default)]
pub struct Gate {
    held: Mutex<bool>,
    open: Condvar,
    waiting: AtomicU32,
}

impl Gate {
    pub fn hold(&self) {
        *self.lock() = true;
    }

    pub fn release(&self) {
        *self.lock() = false;
        self.open.notify_all();
    }

    /// What an intercepted operation calls first: waits while the gate is held.
    pub fn pass(&self) {
        let mut held = self.lock();
        if *held {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while *held {
                held = self.open.wait(held).unwrap_or_else(|e| e.into_inner());
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether `n` operations are waiting at the gate within `within`; blocks the thread
    /// meanwhile (tests call it from a thread that is not an async worker).
    pub fn wait_for(&self, n: u32, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self.waiting.load(Ordering::SeqCst) < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.waiting.load(Ordering::SeqCst) >= n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub trait Intercept: Send + Sync {
    /// The store every operation not overridden goes to.
    fn memory(&self) -> &MemoryStore;

    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.memory().get(ns, key)
    }
    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        self.memory().commit(ns, commit)
    }
    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64> {
        self.memory().increment(ns, key, delta, pending)
    }
    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()> {
        self.memory().outbox_remove_through(tenant, seq)
    }
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.memory().try_acquire(name, owner, ttl)
    }
    /// What [`Backend::remote`] answers: whether the host runs this store's operations off
    /// its async workers whatever they are.
    fn remote(&self) -> bool {
        false
    }
}

impl<T: Intercept> LeaseStore for T {
    fn try_acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool> {
        Intercept::try_acquire(self, name, owner, ttl)
    }
    fn release(&self, name: &str, owner: &str) -> Result<()> {
        self.memory().release(name, owner)
    }
    fn holder(&self, name: &str) -> Result<Option<(String, u64)>> {
        self.memory().holder(name)
    }
}

impl<T: Intercept> Backend for T {
    fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Intercept::get(self, ns, key)
    }
    fn keys(&self, ns: &str) -> Result<Vec<String>> {
        self.memory().keys(ns)
    }
    fn commit(&self, ns: &str, commit: Commit) -> Result<Outcome> {
        Intercept::commit(self, ns, commit)
    }
    fn increment(&self, ns: &str, key: &str, delta: u64, pending: Pending) -> Result<u64> {
        Intercept::increment(self, ns, key, delta, pending)
    }
    fn outbox_page(&self, tenant: &str, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.memory().outbox_page(tenant, after, limit)
    }
    fn outbox_remove_through(&self, tenant: &str, seq: u64) -> Result<()> {
        Intercept::outbox_remove_through(self, tenant, seq)
    }
    fn outbox_last_seq(&self, tenant: &str) -> Result<u64> {
        self.memory().outbox_last_seq(tenant)
    }
    fn describe(&self) -> String {
        "memory (faults injected)".into()
    }
    fn remote(&self) -> bool {
        Intercept::remote(self)
    }
}
