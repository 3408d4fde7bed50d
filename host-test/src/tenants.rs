//! Which plugin, under which policy, serves each tenant.
//!
//! Entries are immutable and shared by `Arc`: loading a new plugin for a tenant swaps the
//! entry, while calls already running keep the `Arc` of the version they started with.

use crate::call::PluginPre;
use crate::wasi_http::AllowList;
use anyhow::{Result, bail};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// What the operator allows one tenant's plugin to do.
#[derive(Clone, Debug, Default)]
pub struct TenantPolicy {
    /// Extra hosts the plugin may call besides the platforms' API hosts and the current app's
    /// `api-base`: `"example.com"` (default port only) or `"127.0.0.1:40123"`.
    pub allow_hosts: Vec<String>,
}

/// One loaded plugin version of one tenant.
pub struct Tenant {
    pub id: Arc<str>,
    pub pre: PluginPre,
    pub policy: TenantPolicy,
    pub allow: AllowList,
    /// The tenant's share of the call slots: the same semaphore for all its versions,
    /// resolved once at load rather than looked up on every call.
    pub share: Arc<tokio::sync::Semaphore>,
    /// sha256 of the component bytes, to tell versions apart in logs.
    pub digest: String,
    /// When its load was asked for, in the host's order of loads: of two loads of one
    /// tenant that overlap, the one asked for last wins, whichever finishes compiling first.
    pub generation: u64,
}

/// What the registry needs to know of an entry (generic so its rules are unit-tested
/// without compiling plugins).
pub trait Versioned {
    fn id(&self) -> &str;
    fn generation(&self) -> u64;
    fn digest(&self) -> &str;
}

impl Versioned for Tenant {
    fn id(&self) -> &str {
        &self.id
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn digest(&self) -> &str {
        &self.digest
    }
}

pub struct Registry<T = Tenant> {
    tenants: RwLock<Tenants<T>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            tenants: RwLock::new(Tenants {
                loaded: HashMap::new(),
                unloaded: HashMap::new(),
            }),
        }
    }
}

struct Tenants<T> {
    loaded: HashMap<String, Arc<T>>,
    /// The generation of each tenant's last unload, so that a load asked for before it and
    /// finishing after it does not bring the plugin back.
    unloaded: HashMap<String, u64>,
}

/// Why a finished load was not installed.
pub enum Superseded<T = Tenant> {
    /// A later load of the tenant finished first; this is what it installed.
    Loaded(Arc<T>),
    /// The tenant was unloaded after the load was asked for.
    Unloaded,
}

impl<T: Versioned> Registry<T> {
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.read().loaded.get(id).cloned()
    }

    /// Installs `tenant`, returning the version it replaced; `Err`, leaving the tenant as it
    /// is, when a load or an unload of it was asked for later.
    pub fn insert(&self, tenant: T) -> Result<Option<Arc<T>>, Superseded<T>> {
        let mut map = self.write();
        if let Some(newer) = map.loaded.get(tenant.id())
            && newer.generation() > tenant.generation()
        {
            return Err(Superseded::Loaded(newer.clone()));
        }
        if map.unloaded.get(tenant.id()) > Some(&tenant.generation()) {
            return Err(Superseded::Unloaded);
        }
        Ok(map.loaded.insert(tenant.id().to_string(), Arc::new(tenant)))
    }

    /// Removes the tenant's plugin unless a load asked for after `generation` installed it;
    /// loads asked for before `generation` no longer install.
    pub fn remove(&self, id: &str, generation: u64) -> Option<Arc<T>> {
        let mut map = self.write();
        let marker = map.unloaded.entry(id.to_string()).or_insert(generation);
        *marker = (*marker).max(generation);
        if map.loaded.get(id)?.generation() > generation {
            return None;
        }
        map.loaded.remove(id)
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read().loaded.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The digests of the plugins installed now.
    pub fn digests(&self) -> HashSet<String> {
        let map = self.read();
        map.loaded
            .values()
            .map(|t| t.digest().to_string())
            .collect()
    }

    // The maps are changed entry by entry, so they are consistent even after a panic.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tenants<T>> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tenants<T>> {
        self.tenants.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tenant and app ids appear in URLs and log lines; keeping them to a plain alphabet avoids
/// escaping questions everywhere.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && id != "."
        && id != "..";
    if !ok {
        bail!("{kind} id must be 1-128 characters of A-Z a-z 0-9 - _ . (got {id:?})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct V(&'static str, u64);

    impl Versioned for V {
        fn id(&self) -> &str {
            "t"
        }
        fn generation(&self) -> u64 {
            self.1
        }
        fn digest(&self) -> &str {
            self.0
        }
    }

    fn installed(r: &Registry<V>) -> Option<u64> {
        r.get("t").map(|v| v.1)
    }

    /// Loads and unloads of one tenant, finishing in any order: the one asked for last wins.
    #[test]
    fn the_operation_asked_for_last_wins() {
        let r = Registry::<V>::default();
        assert!(matches!(r.insert(V("a", 2)), Ok(None)));
        assert!(matches!(r.insert(V("b", 1)), Err(Superseded::Loaded(_))));
        // An unload asked for (5) before a load (6) that finished first leaves that load.
        assert!(matches!(r.insert(V("c", 6)), Ok(Some(_))));
        assert!(r.remove("t", 5).is_none());
        assert_eq!(installed(&r), Some(6));
        // Two unloads finishing out of order keep the later one's mark: a load asked for
        // between them (8) does not install.
        assert_eq!(r.remove("t", 9).map(|v| v.1), Some(6));
        assert!(r.remove("t", 7).is_none());
        assert!(matches!(r.insert(V("d", 8)), Err(Superseded::Unloaded)));
        assert_eq!(installed(&r), None);
        assert!(matches!(r.insert(V("e", 10)), Ok(None)));
        assert_eq!(r.digests(), HashSet::from(["e".to_string()]));
    }

    #[test]
    fn ids() {
        for good in ["default", "acme-prod", "t_1", "a.b"] {
            check_id("tenant", good).unwrap();
        }
        for bad in ["", "a/b", "a b", "..", "é", &"x".repeat(129)] {
            assert!(check_id("tenant", bad).is_err(), "{bad:?}");
        }
    }
}
