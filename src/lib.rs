//! imbridge: Feishu/Lark, DingTalk and WeCom approvals and notifications for workflow engines,
//! as a WebAssembly component.
//!
//! Everything but `component` and `wasi_env` is plain Rust over the `env::Env` port, so it
//! builds and unit-tests natively; those two modules are the only ones that touch WIT.

pub mod approval;
pub mod callback;
pub mod crypto;
pub mod env;
pub mod error;
pub mod http;
pub mod model;
pub mod notify;
pub mod platform;
pub mod retry;
pub mod token;

#[cfg(test)]
mod storage_faults;

#[cfg(any(target_arch = "wasm32", test))]
mod alloc;
// `imbridge_lint_guest` is set only by `./dev lint`: there is no clippy for the wasm toolchain
// here, and wit-bindgen's output also compiles natively (its imports become stubs), so the
// binding layer is linted as a native build.
#[cfg(all(
    feature = "component",
    any(target_arch = "wasm32", imbridge_lint_guest)
))]
mod component;
#[cfg(all(
    feature = "component",
    any(target_arch = "wasm32", imbridge_lint_guest)
))]
mod wasi_env;
