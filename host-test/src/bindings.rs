//! Generated bindings for the `imbridge:plugin/plugin` world.
//!
//! WASI interfaces the guest imports are mapped onto wasmtime-wasi's and wasmtime-wasi-http's
//! own bindings so their host implementations can be linked as they are; only
//! `wasi:keyvalue` is generated here, because the host implements it over its own store.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "imbridge:plugin/plugin",
    imports: { default: trappable },
    exports: { default: async },
    require_store_data_send: true,
    with: {
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        "wasi:random": wasmtime_wasi::p2::bindings::random,
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi:keyvalue/store.bucket": crate::kv::Bucket,
    },
    trappable_error_type: {
        "wasi:keyvalue/store.error" => crate::kv::KvError,
    },
});

pub use self::imbridge::plugin::types;
