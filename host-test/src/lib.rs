//! Reference wasmtime host for the imbridge component.
//!
//! [`Host`] loads one plugin per tenant and calls its exports in a fresh, memory-capped,
//! deadline-bound instance per call. The plugin sees only what the `imbridge:plugin/plugin`
//! world imports: outgoing HTTP to allow-listed hosts, a key-value store private to its tenant,
//! the wall and monotonic clocks and randomness.
//!
//! [`server`] puts the same calls behind HTTP (platform callbacks and a JSON API for engines);
//! the `imbridge-host` binary wraps both for the command line.

pub mod bindings;
pub mod call;
pub mod clock;
pub mod config;
pub mod demo;
pub mod engine;
pub mod host;
pub mod json;
pub mod kv;
pub mod log;
pub mod persistent;
pub mod redis_server;
pub mod sandbox;
pub mod server;
pub mod sim;
pub mod store;
pub mod tenants;
pub mod wasi_http;

pub use call::{Call, Export, Reply};

/// A spawned task that is aborted when this is dropped: a task whose owner went away (an
/// ended server, a request that timed out) must not run on without it.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
pub use host::{Host, HostConfig};
pub use tenants::TenantPolicy;
