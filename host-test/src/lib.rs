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
pub use host::{Host, HostConfig};
pub use tenants::TenantPolicy;
