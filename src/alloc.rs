//! The guest's global allocator: a static arena first, `memory.grow` only beyond it.
//!
//! Every call runs in a fresh instance. With Rust's default allocator (dlmalloc) the very
//! first allocation of each call grows linear memory, and the host must then take the grown
//! pages away again before the slot's next instance: an `mprotect` that makes the kernel
//! flush the TLB of every core running the host, on every call (BENCHMARKS.md). An arena in
//! `.bss` is part of the memory the module starts with, so a call that fits in it never grows
//! memory at all; a larger one still grows, as before.
//!
//! talc rather than a hand-written arena: it is a maintained general-purpose allocator (free,
//! realloc in place, coalescing) whose memory source is pluggable, which is all this needs.

use core::alloc::Layout;
use core::mem::MaybeUninit;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::cell::TalcSyncCell;
use talc::source::Source;
use talc::wasm::WasmBinning;

/// A callback's allocations peak well below this (see BENCHMARKS.md, memory per instance);
/// together with the stack (build.rs) and the data it stays inside the pages the host keeps
/// resident between calls.
const ARENA_BYTES: usize = 384 << 10;
const PAGE: usize = 64 << 10;

static mut ARENA: [MaybeUninit<u8>; ARENA_BYTES] = [MaybeUninit::uninit(); ARENA_BYTES];

#[global_allocator]
static ALLOCATOR: TalcSyncCell<ArenaThenGrow, WasmBinning> =
    TalcSyncCell::new_wasm(ArenaThenGrow {
        arena_claimed: false,
    });

#[derive(Debug)]
struct ArenaThenGrow {
    arena_claimed: bool,
}

// SAFETY: `acquire` allocates nothing; it hands talc the arena once, then fresh pages that
// `memory.grow` has just added and nothing else refers to.
unsafe impl Source for ArenaThenGrow {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        if !talc.source.arena_claimed {
            talc.source.arena_claimed = true;
            // SAFETY: the arena is reachable only through this one claim.
            let arena = (&raw mut ARENA).cast::<u8>();
            if unsafe { talc.claim(arena, ARENA_BYTES) }.is_some() {
                return Ok(());
            }
        }
        // Room for the allocation plus talc's bookkeeping and alignment; whole pages, and
        // at least 1 MiB at a time so a growing heap does not grow page by page.
        let needed = layout.size() + layout.align() + 4 * talc::base::CHUNK_UNIT;
        let pages = needed.div_ceil(PAGE).max(16);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return Err(());
        }
        // SAFETY: the pages were just added to linear memory and belong to no one else.
        match unsafe { talc.claim((previous * PAGE) as *mut u8, pages * PAGE) } {
            Some(_) => Ok(()),
            None => Err(()),
        }
    }
}
