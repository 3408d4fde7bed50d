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
    /// sha256 of the component bytes, to tell versions apart in logs.
    pub digest: String,
    /// When its load was asked for, in the host's order of loads: of two loads of one
    /// tenant that overlap, the one asked for last wins, whichever finishes compiling first.
    pub generation: u64,
}

#[derive(Default)]
pub struct Registry {
    tenants: RwLock<Tenants>,
}

#[derive(Default)]
struct Tenants {
    loaded: HashMap<String, Arc<Tenant>>,
    /// The generation of each tenant's last unload, so that a load asked for before it and
    /// finishing after it does not bring the plugin back.
    unloaded: HashMap<String, u64>,
}

/// Why a finished load was not installed.
pub enum Superseded {
    /// A later load of the tenant finished first; this is what it installed.
    Loaded(Arc<Tenant>),
    /// The tenant was unloaded after the load was asked for.
    Unloaded,
}

impl Registry {
    pub fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.read().loaded.get(id).cloned()
    }

    /// Installs `tenant`, returning the version it replaced; `Err`, leaving the tenant as it
    /// is, when a load or an unload of it was asked for later.
    pub fn insert(&self, tenant: Tenant) -> Result<Option<Arc<Tenant>>, Superseded> {
        let mut map = self.write();
        if let Some(newer) = map.loaded.get(&*tenant.id)
            && newer.generation > tenant.generation
        {
            return Err(Superseded::Loaded(newer.clone()));
        }
        if map.unloaded.get(&*tenant.id) > Some(&tenant.generation) {
            return Err(Superseded::Unloaded);
        }
        map.unloaded.remove(&*tenant.id);
        Ok(map.loaded.insert(tenant.id.to_string(), Arc::new(tenant)))
    }

    /// Removes the tenant's plugin; loads asked for before `generation` no longer install.
    pub fn remove(&self, id: &str, generation: u64) -> Option<Arc<Tenant>> {
        let mut map = self.write();
        map.unloaded.insert(id.to_string(), generation);
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
        map.loaded.values().map(|t| t.digest.clone()).collect()
    }

    // The maps are changed entry by entry, so they are consistent even after a panic.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tenants> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tenants> {
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
