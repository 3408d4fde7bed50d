//! The guest's global allocator: a bump arena in `.bss` that rewinds whenever nothing in it is
//! live, and talc on grown memory beyond it.
//!
//! Every call runs in a fresh instance. With Rust's default allocator (dlmalloc) the very
//! first allocation of each call grows linear memory, and the host must then take the grown
//! pages away again before the slot's next instance: an `mprotect` that makes the kernel
//! flush the TLB of every core running the host, on every call (BENCHMARKS.md). An arena in
//! `.bss` is part of the memory the module starts with, so a call that fits in it never grows
//! memory at all; a larger one still grows, as before.
//!
//! Bump rather than a general-purpose allocator over the arena: a call's allocations are many
//! small buffers that are all freed by the time the export returns, so the arena rewinds to
//! its start then, and in between whenever the newest block is freed or resized. talc over the
//! same arena spent about a tenth of a warm callback's guest time in its bins (perf, issue 7);
//! with the bump arena callbacks are 2–6% faster through `Host::call` and 5–9% on a warm
//! instance (`target/release/abwarm`). Freed room below a live block waits for the next
//! rewind, so a call that allocates more than the arena, or keeps a block alive throughout,
//! costs memory and no correctness: what does not fit goes to talc on pages `memory.grow`
//! adds. The test suite's callbacks, start-approvals and notifications all fit; only its
//! deliberately oversized (≥ 1 MiB) bodies go beyond.

use core::alloc::Layout;

/// Bookkeeping of a bump arena of `N` bytes, in offsets from its start, so that it is plain
/// arithmetic (unit-tested natively) and the arena's address is only known where it is used.
#[derive(Debug)]
pub(crate) struct Bump<const N: usize> {
    /// The first byte past the newest block.
    top: usize,
    /// Blocks handed out and not yet freed; none means the whole arena is free.
    live: usize,
}

impl<const N: usize> Bump<N> {
    pub(crate) const fn new() -> Self {
        Self { top: 0, live: 0 }
    }

    /// Offset of a new block for `layout` in the arena starting at address `base`, or `None`
    /// when it does not fit. Every offset handed out is below `N`, also for a zero-size block,
    /// so `owns` tells the arena's blocks from any other.
    pub(crate) fn alloc(&mut self, base: usize, layout: Layout) -> Option<usize> {
        let start = base
            .checked_add(self.top)?
            .checked_next_multiple_of(layout.align())?
            - base;
        let end = start.checked_add(layout.size())?;
        if start >= N || end > N {
            return None;
        }
        self.top = end;
        self.live += 1;
        Some(start)
    }

    pub(crate) fn owns(offset: usize) -> bool {
        offset < N
    }

    /// Frees the block at `offset` of `size` bytes, which `alloc` handed out.
    pub(crate) fn free(&mut self, offset: usize, size: usize) {
        self.live -= 1;
        if self.live == 0 {
            self.top = 0;
        } else if offset + size == self.top {
            self.top = offset;
        }
    }

    /// Resizes the block at `offset` from `old` to `new` bytes where it lies: the newest block
    /// grows or shrinks while the arena has room, any other block only shrinks. `false`: it
    /// must move.
    pub(crate) fn resize(&mut self, offset: usize, old: usize, new: usize) -> bool {
        if offset + old == self.top {
            if new > N - offset {
                return false;
            }
            self.top = offset + new;
            return true;
        }
        new <= old
    }
}

#[cfg(target_arch = "wasm32")]
mod global {
    use super::Bump;
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;
    use core::mem::MaybeUninit;
    use talc::base::Talc;
    use talc::base::binning::Binning;
    use talc::cell::TalcSyncCell;
    use talc::source::Source;
    use talc::wasm::WasmBinning;

    #[cfg(target_feature = "atomics")]
    compile_error!("the allocator assumes single-threaded wasm (no shared memory)");

    /// A callback's allocations peak well below this (see BENCHMARKS.md, memory per instance);
    /// together with the stack (build.rs) and the data it stays inside the pages the host
    /// keeps resident between calls.
    const ARENA_BYTES: usize = 384 << 10;
    const PAGE: usize = 64 << 10;

    static mut ARENA: [MaybeUninit<u8>; ARENA_BYTES] = [MaybeUninit::uninit(); ARENA_BYTES];

    #[global_allocator]
    static ALLOCATOR: CallArena = CallArena {
        bump: UnsafeCell::new(Bump::new()),
        beyond: TalcSyncCell::new_wasm(Grow),
    };

    struct CallArena {
        bump: UnsafeCell<Bump<ARENA_BYTES>>,
        beyond: TalcSyncCell<Grow, WasmBinning>,
    }

    // SAFETY: without the atomics feature (checked above) wasm32 has one thread, so nothing
    // can reach the cell concurrently.
    unsafe impl Sync for CallArena {}

    fn base() -> usize {
        (&raw const ARENA) as usize
    }

    // The three entry points are kept out of line: inlined into every allocation site they
    // made the component 75 KB larger.
    unsafe impl GlobalAlloc for CallArena {
        #[inline(never)]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: single-threaded (see `Sync`), and no allocator call is re-entered.
            let bump = unsafe { &mut *self.bump.get() };
            match bump.alloc(base(), layout) {
                Some(offset) => (base() + offset) as *mut u8,
                // SAFETY: forwarded with the caller's guarantees.
                None => unsafe { self.beyond.alloc(layout) },
            }
        }

        #[inline(never)]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let offset = (ptr as usize).wrapping_sub(base());
            if Bump::<ARENA_BYTES>::owns(offset) {
                // SAFETY: as in `alloc`.
                unsafe { &mut *self.bump.get() }.free(offset, layout.size());
            } else {
                // SAFETY: not the arena's, so talc handed it out.
                unsafe { self.beyond.dealloc(ptr, layout) }
            }
        }

        #[inline(never)]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let offset = (ptr as usize).wrapping_sub(base());
            if !Bump::<ARENA_BYTES>::owns(offset) {
                // SAFETY: talc handed it out.
                return unsafe { self.beyond.realloc(ptr, layout, new_size) };
            }
            // SAFETY: as in `alloc`.
            if unsafe { &mut *self.bump.get() }.resize(offset, layout.size(), new_size) {
                return ptr;
            }
            // SAFETY: `new_size` with the old alignment is a valid layout (the caller's
            // guarantee); the old block stays valid until it has been copied.
            unsafe {
                let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }

    #[derive(Debug)]
    struct Grow;

    // SAFETY: `acquire` allocates nothing; it hands talc fresh pages that `memory.grow` has
    // just added and nothing else refers to.
    unsafe impl Source for Grow {
        fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
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
}

#[cfg(test)]
mod tests {
    use super::Bump;
    use core::alloc::Layout;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn rewinds_to_the_start_once_nothing_is_live() {
        let mut b = Bump::<1024>::new();
        let x = b.alloc(0x1000, layout(100, 8)).unwrap();
        let y = b.alloc(0x1000, layout(100, 8)).unwrap();
        assert_eq!((x, y), (0, 104));
        b.free(x, 100);
        // y is still live: x's room is not reused yet.
        assert_eq!(b.alloc(0x1000, layout(8, 8)), Some(208));
        b.free(208, 8);
        b.free(y, 100);
        assert_eq!(b.alloc(0x1000, layout(16, 16)), Some(0));
    }

    #[test]
    fn freeing_the_newest_block_gives_its_room_back() {
        let mut b = Bump::<1024>::new();
        let x = b.alloc(0, layout(10, 1)).unwrap();
        let y = b.alloc(0, layout(20, 1)).unwrap();
        b.free(y, 20);
        assert_eq!(b.alloc(0, layout(5, 1)), Some(y));
        assert_eq!(x, 0);
    }

    #[test]
    fn aligns_by_absolute_address() {
        let mut b = Bump::<1024>::new();
        // The arena starts at an odd address: offsets are chosen so addresses are aligned.
        let base = 0x1003;
        b.alloc(base, layout(1, 1)).unwrap();
        let o = b.alloc(base, layout(8, 8)).unwrap();
        assert_eq!((base + o) % 8, 0);
        assert!(o >= 1);
    }

    #[test]
    fn refuses_what_does_not_fit_and_keeps_its_state() {
        let mut b = Bump::<64>::new();
        assert_eq!(b.alloc(0, layout(64, 1)), Some(0));
        assert_eq!(b.alloc(0, layout(1, 1)), None);
        // Even a zero-size block needs an offset inside the arena, or `owns` would be wrong.
        assert_eq!(b.alloc(0, layout(0, 1)), None);
        b.free(0, 64);
        assert_eq!(b.alloc(0, layout(65, 1)), None);
        assert_eq!(
            b.alloc(usize::MAX - 3, layout(1, 16)),
            None,
            "address overflow"
        );
        assert_eq!(b.alloc(0, layout(isize::MAX as usize, 1)), None);
        assert_eq!(b.alloc(0, layout(64, 1)), Some(0));
    }

    #[test]
    fn owns_exactly_the_arena() {
        assert!(Bump::<64>::owns(0));
        assert!(Bump::<64>::owns(63));
        assert!(!Bump::<64>::owns(64));
        // An address below the arena wraps to a huge offset.
        assert!(!Bump::<64>::owns(0usize.wrapping_sub(1)));
    }

    #[test]
    fn resizes_the_newest_block_in_place_and_shrinks_any() {
        let mut b = Bump::<100>::new();
        let x = b.alloc(0, layout(10, 1)).unwrap();
        assert!(b.resize(x, 10, 40), "newest block grows");
        let y = b.alloc(0, layout(10, 1)).unwrap();
        assert_eq!(y, 40);
        assert!(!b.resize(x, 40, 50), "an older block cannot grow");
        assert!(b.resize(x, 40, 20), "but can shrink where it is");
        assert!(b.resize(y, 10, 60), "up to the end of the arena");
        assert!(!b.resize(y, 60, 61), "not beyond it");
        assert!(
            b.resize(y, 60, 1),
            "the newest block shrinks and gives room back"
        );
        assert_eq!(b.alloc(0, layout(1, 1)), Some(41));
    }

    /// Random sequences of alloc, free and resize against a model of the live blocks: no two
    /// live blocks overlap, every block is aligned and inside the arena, and the arena is
    /// whole again once everything is freed.
    #[test]
    fn live_blocks_never_overlap() {
        const N: usize = 4096;
        let base = 0x10_0005;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        let (mut allocated, mut resized) = (0, 0);
        for _ in 0..200 {
            let mut b = Bump::<N>::new();
            let mut live: Vec<(usize, usize)> = Vec::new();
            for _ in 0..200 {
                match next(3) {
                    0 => {
                        let l = layout(1 + next(300), 1 << next(5));
                        if let Some(o) = b.alloc(base, l) {
                            assert_eq!((base + o) % l.align(), 0);
                            assert!(o + l.size() <= N);
                            live.push((o, l.size()));
                            allocated += 1;
                        }
                    }
                    1 if !live.is_empty() => {
                        let (o, s) = live.swap_remove(next(live.len()));
                        b.free(o, s);
                    }
                    _ if !live.is_empty() => {
                        let i = next(live.len());
                        let new = 1 + next(300);
                        if b.resize(live[i].0, live[i].1, new) {
                            live[i].1 = new;
                            assert!(live[i].0 + new <= N);
                            resized += 1;
                        }
                    }
                    _ => {}
                }
                let mut sorted = live.clone();
                sorted.sort();
                for w in sorted.windows(2) {
                    assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {w:?}");
                }
            }
            for (o, s) in live.drain(..) {
                b.free(o, s);
            }
            assert_eq!(
                b.alloc(base, layout(N - 3, 1)),
                Some(0),
                "arena whole again"
            );
        }
        // The checks above run only on what succeeded: an allocator that refused nearly
        // everything would pass them.
        assert!(
            allocated > 10_000 && resized > 5_000,
            "{allocated} {resized}"
        );
    }
}
