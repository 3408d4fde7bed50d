//! The per-call store state and the linker that exposes exactly the plugin world's imports.

use crate::engine::{CORE_INSTANCES_PER_CALL, MEMORIES_PER_CALL, TABLES_PER_CALL};
use crate::kv::{self, KvCtx, KvView};
use crate::wasi_http::{self, HttpPolicy};
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksCtxView};
use wasmtime_wasi::p2::bindings::{clocks, io, random};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{HostWallClock, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Most resources (buckets, HTTP handles, streams) one call may hold at once. Resources live
/// in host memory, outside the guest's linear-memory cap.
const MAX_RESOURCES: usize = 10_000;

/// The `T` of every `Store<T>`: created fresh for each call and dropped with it.
pub struct CallState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_policy: HttpPolicy,
    pub(crate) kv: KvCtx,
    pub(crate) limits: StoreLimits,
}

impl CallState {
    pub fn new(
        kv: KvCtx,
        http_policy: HttpPolicy,
        wall_clock: Option<Box<dyn HostWallClock + Send>>,
        memory_limit: usize,
    ) -> CallState {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        // Nothing but clocks and randomness is taken from `WasiCtx`: no environment, args,
        // stdio, filesystem or sockets are linked, whatever the builder would default to.
        let mut builder = WasiCtx::builder();
        if let Some(clock) = wall_clock {
            builder.wall_clock(BoxedClock(clock));
        }
        CallState {
            table,
            wasi: builder.build(),
            http: WasiHttpCtx::new(),
            http_policy,
            kv,
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .instances(CORE_INSTANCES_PER_CALL as usize)
                .memories(MEMORIES_PER_CALL as usize)
                .tables(TABLES_PER_CALL as usize)
                .build(),
        }
    }
}

struct BoxedClock(Box<dyn HostWallClock + Send>);

impl HostWallClock for BoxedClock {
    fn resolution(&self) -> std::time::Duration {
        self.0.resolution()
    }
    fn now(&self) -> std::time::Duration {
        self.0.now()
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// A linker with the interfaces of the `imbridge:plugin/plugin` world and nothing else, so a
/// plugin that imports more (filesystem, sockets, environment) fails to load.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<CallState>> {
    let mut l = Linker::new(engine);
    io::error::add_to_linker::<CallState, HasTable>(&mut l, |s| &mut s.table)?;
    io::poll::add_to_linker::<CallState, HasTable>(&mut l, |s| &mut s.table)?;
    io::streams::add_to_linker::<CallState, HasTable>(&mut l, |s| &mut s.table)?;
    clocks::wall_clock::add_to_linker::<CallState, WasiClocks>(&mut l, |s| WasiClocksCtxView {
        ctx: s.wasi.clocks(),
        table: &mut s.table,
    })?;
    clocks::monotonic_clock::add_to_linker::<CallState, WasiClocks>(&mut l, |s| {
        WasiClocksCtxView {
            ctx: s.wasi.clocks(),
            table: &mut s.table,
        }
    })?;
    random::random::add_to_linker::<CallState, WasiRandom>(&mut l, |s| s.wasi.random())?;
    wasi_http::add_to_linker(&mut l, |s| &s.http_policy)?;
    kv::add_to_linker(&mut l, |s| KvView {
        ctx: &mut s.kv,
        table: &mut s.table,
    })?;
    Ok(l)
}
