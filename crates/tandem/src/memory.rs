//! How the tandem process takes memory from the system: one place for the allocator's policy.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Training allocates and frees large activations on every pass. glibc returns big blocks to the
/// system and faults fresh zeroed pages in for the next pass (a fifth of forward_backward's time on
/// SmolLM2); keeping freed memory in the heap for reuse made LoRA training ~15% faster here.
/// glibc maps blocks over 32 MiB (its largest threshold) on their own whatever the threshold, so
/// full training of Qwen2.5-Coder-0.5B (gradients of 35-544 MB per pass) still spent a quarter of
/// its time zeroing fresh pages until mapping was turned off (M_MMAP_MAX = 0): 27 -> 32 tok/s
/// (`tandem bench train --model qwen-coder --modes full`, 2026-12-04). Trimming is off entirely
/// (M_TRIM_THRESHOLD = -1): at its largest settable threshold (2 GiB) a pass that freed more than
/// that at the heap's top still gave it back, and the next pass faulted it in again. Full training
/// of Qwen after a LoRA run in the same process (the benchmark's order, a Tinker server's too) did
/// so every pass: 687,000 page faults instead of 94,000, 57 instead of 75 tok/s (2026-12-07). The
/// heap stays at the process's peak, which a server holds anyway.
///
/// One arena: glibc gives threads other than the main one arenas of their own, 64 MiB mappings
/// that the heap's huge page advice (`Allocator`) does not cover. A model loaded or a cache made
/// on another thread (each engine of `bench online --interleave`, the engine's own buffers, the
/// trainer) then streamed from 4 KiB pages, and which of its blocks landed on huge pages was
/// chance: two identical engines side by side ran their prefills 0.6-4% and plain steps 7-8%
/// apart. With every thread in the main heap, 720 of 725 MB were on huge pages and the two
/// engines' tokens/s came within 0.1-0.6% of each other (docs/speculative-decoding.md,
/// 2026-12-07). The shared arena's lock cost nothing measurable: `tandem bench serve` with 16
/// clients and `tandem bench train` ran as fast as with an arena per thread.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called once at start-up before any threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 512 << 20);
    }
}

/// The system allocator with two policies of tandem's: large blocks start on a cache line, and the
/// heap is backed by 2 MiB pages.
///
/// Cache lines: the streaming matmul loads 64 bytes of a weight row and of an input row per
/// step. glibc's blocks start 16 bytes past a line, so every such load straddled two lines and
/// cost two; from a line's start a tile ran 115-127 -> 153-155 GFLOP/s on one core of a Xeon, and
/// a SmolLM2 training forward 2.05 -> 1.77 s (2026-12-04). Every block of at least `LINE_ALIGNED`
/// bytes is placed `CACHE_LINE` bytes into a slightly larger plain block, the plain block's
/// address stored just before it: asking glibc for aligned memory instead (`posix_memalign`)
/// split its heap into fragments that the next pass could not reuse, and fresh zeroed pages ate
/// the gain.
///
/// Huge pages: a decode step streams every weight and the KV cache once; with 4 KiB pages a 90 MB
/// model is 22,000 pages, far more than the TLB holds, so the quantized kernels waited on page
/// walks as much as on memory (their loads were the hot instructions). Linux's default transparent
/// huge page mode is `madvise`: only advised ranges get them. Weights are many blocks of a few
/// hundred KB (one per tensor), too small to hold a huge page each, so the advice covers the main
/// heap as `sbrk` grows it (as glibc's `glibc.malloc.hugetlb=1` tunable does) and every block of
/// at least `LARGE` bytes that glibc maps on its own. It made SmolLM2 Q4_1 decode ~15% faster on
/// the development machine (docs/performance.md).
pub struct Allocator;

/// Blocks this large start on a cache line (smaller ones are not streamed by vector kernels, and
/// the line's worth of padding would be a large share of them).
const LINE_ALIGNED: usize = 4 << 10;
const CACHE_LINE: usize = 64;
/// What glibc guarantees (and the padding's arithmetic assumes) for every block on x86-64.
const SYSTEM_ALIGN: usize = 16;

/// Blocks this large are advised (the part of them that covers whole 2 MiB pages).
const LARGE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// The end of the part of the main heap already advised (0: not started).
static HEAP_ADVISED_TO: AtomicUsize = AtomicUsize::new(0);

/// Starts advising the main heap from its current end: call once at start-up.
pub fn advise_heap_from_here() {
    #[cfg(target_os = "linux")]
    // SAFETY: sbrk(0) only reads the current program break.
    HEAP_ADVISED_TO.store(unsafe { libc::sbrk(0) } as usize, Ordering::Relaxed);
}

/// Advises whatever the heap grew by since the last call.
fn advise_heap_growth() {
    #[cfg(target_os = "linux")]
    {
        let done = HEAP_ADVISED_TO.load(Ordering::Relaxed);
        // SAFETY: sbrk(0) only reads the current program break.
        let top = unsafe { libc::sbrk(0) } as usize;
        // Only whole huge pages are advised: the one the top lies in is left for the next growth.
        let whole = top / HUGE_PAGE * HUGE_PAGE;
        if done != 0
            && whole > done
            && HEAP_ADVISED_TO.compare_exchange(done, whole, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            advise_range(done, whole);
        }
    }
}

/// Advises the whole 2 MiB pages within [start, end).
fn advise_range(start: usize, end: usize) {
    #[cfg(target_os = "linux")]
    {
        let (start, end) = (start.next_multiple_of(HUGE_PAGE), end / HUGE_PAGE * HUGE_PAGE);
        if end > start {
            // SAFETY: the range is memory the allocator owns; the advice changes only how its
            // pages are backed, never their contents. A refusal (a kernel without transparent
            // huge pages) leaves ordinary pages, so its result is ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < 64 << 10 {
        return;
    }
    advise_heap_growth();
    if size >= LARGE {
        advise_range(ptr as usize, ptr as usize + size);
    }
}

/// Whether a block of this layout is placed on a cache line inside a padded plain block.
fn padded(layout: Layout) -> bool {
    layout.size() >= LINE_ALIGNED && layout.align() <= SYSTEM_ALIGN
}

/// The plain block behind a padded block of `size` bytes.
fn plain(size: usize) -> Layout {
    // SAFETY: a size that fit a Layout plus one line still does (isize::MAX is far away for the
    // blocks a process can hold), and SYSTEM_ALIGN is a power of two.
    unsafe { Layout::from_size_align_unchecked(size + CACHE_LINE, SYSTEM_ALIGN) }
}

/// The first cache line past `raw`, a plain block's start (at least 16 bytes on, room for the
/// plain block's address just before it).
fn line_after(raw: *mut u8) -> *mut u8 {
    raw.wrapping_add(CACHE_LINE - raw as usize % CACHE_LINE)
}

/// A padded block in the plain block at `raw`, the plain block's address written before it.
///
/// # Safety
/// `raw` must be a live plain block from `plain`.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    let p = line_after(raw);
    p.cast::<usize>().sub(1).write(raw as usize);
    p
}

/// The plain block a padded block was placed in.
///
/// # Safety
/// `p` must be a live padded block from `place`.
unsafe fn plain_of(p: *mut u8) -> *mut u8 {
    p.cast::<usize>().sub(1).read() as *mut u8
}

/// A new block from the system allocator's `from` (plain or zeroed), padded onto a cache line
/// when it is large.
///
/// # Safety
/// As `GlobalAlloc::alloc`.
unsafe fn take(layout: Layout, from: unsafe fn(&System, Layout) -> *mut u8) -> *mut u8 {
    let padded = padded(layout);
    let p = from(&System, if padded { plain(layout.size()) } else { layout });
    advise(p, layout.size());
    if padded && !p.is_null() {
        place(p)
    } else {
        p
    }
}

// SAFETY: every block comes from the system allocator; a padded block lies inside its plain block
// (place leaves at least its size after it) and is returned as that plain block with its layout.
// `advise` only adds a hint.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        take(layout, <System as GlobalAlloc>::alloc)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        take(layout, <System as GlobalAlloc>::alloc_zeroed)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grown = Layout::from_size_align_unchecked(new_size, layout.align());
        match (padded(layout), padded(grown)) {
            (false, false) => {
                let p = System.realloc(ptr, layout, new_size);
                advise(p, new_size);
                p
            }
            (true, true) => {
                // glibc grows the plain block in place or moves it; the values then sit at the
                // old offset from its start, a cache line only by chance.
                let raw = plain_of(ptr);
                let offset = ptr as usize - raw as usize;
                let moved = System.realloc(raw, plain(layout.size()), new_size + CACHE_LINE);
                if moved.is_null() {
                    return moved;
                }
                advise(moved, new_size);
                let p = line_after(moved);
                if p as usize - moved as usize != offset {
                    // Moved to a block whose first line is elsewhere: the values, then the header
                    // (which may lie inside where they were).
                    std::ptr::copy(moved.add(offset), p, layout.size().min(new_size));
                }
                place(moved)
            }
            _ => {
                // Across the threshold: a new block of the other kind, the values copied over.
                let p = self.alloc(grown);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                p
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if padded(layout) {
            System.dealloc(plain_of(ptr), plain(layout.size()))
        } else {
            System.dealloc(ptr, layout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every kind start where they should, keep their values through growing and
    /// shrinking (across the threshold both ways), and go back whole.
    #[test]
    fn padded_blocks_are_line_aligned_and_keep_their_values() {
        let a = Allocator;
        let fill = |p: *mut u8, n: usize| (0..n).for_each(|i| unsafe { p.add(i).write((i * 7 % 251) as u8) });
        let check = |p: *mut u8, n: usize| (0..n).all(|i| unsafe { p.add(i).read() } == (i * 7 % 251) as u8);
        for size in [8, 100, LINE_ALIGNED - 1, LINE_ALIGNED, 100_000, 5 << 20] {
            let layout = Layout::from_size_align(size, 4).unwrap();
            let p = unsafe { a.alloc(layout) };
            assert!(!p.is_null());
            if padded(layout) {
                assert_eq!(p as usize % CACHE_LINE, 0, "{size} bytes");
            }
            fill(p, size);
            let mut cur = (p, size);
            for new in [size * 2 + 5, size / 3 + 1, LINE_ALIGNED + 17, 64, 3 << 20] {
                let q = unsafe { a.realloc(cur.0, Layout::from_size_align(cur.1, 4).unwrap(), new) };
                assert!(!q.is_null());
                let kept = cur.1.min(new);
                assert!(check(q, kept), "{} -> {new} bytes lost values", cur.1);
                if new >= LINE_ALIGNED {
                    assert_eq!(q as usize % CACHE_LINE, 0, "{} -> {new} bytes", cur.1);
                }
                fill(q, new);
                cur = (q, new);
            }
            unsafe { a.dealloc(cur.0, Layout::from_size_align(cur.1, 4).unwrap()) };
            let z = unsafe { a.alloc_zeroed(layout) };
            assert!((0..size).all(|i| unsafe { z.add(i).read() } == 0));
            unsafe { a.dealloc(z, layout) };
        }
    }
}
