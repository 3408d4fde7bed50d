//! Linear-memory layout of the component (wasm32 only).
//!
//! Rust gives wasm32 a 1 MiB stack below the data, which puts the heap past the first MiB,
//! outside the pages the host keeps resident between calls (host-test/src/engine.rs). The
//! guest's deepest recursion is bounded (serde_json stops at 128 levels, the XML parser
//! earlier), so 512 KiB leaves a wide margin, and stack, data and the allocator's arena
//! (src/alloc.rs) together stay under 1 MiB. An overflow still traps: the stack grows down
//! towards address 0, below which every access is out of bounds.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg-cdylib=-zstack-size=524288");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
