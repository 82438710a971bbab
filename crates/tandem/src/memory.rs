//! How the tandem process takes memory from the system: one place for the allocator's policy.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Training allocates and frees large activations on every pass. glibc returns big blocks to the
/// system and faults fresh zeroed pages in for the next pass (a fifth of forward_backward's time on
/// SmolLM2); keeping freed memory in the heap for reuse made LoRA training ~15% faster here.
/// glibc maps blocks over 32 MiB (its largest threshold) on their own whatever the threshold, so
/// full training of Qwen2.5-Coder-0.5B (gradients of 35-544 MB per pass) still spent a quarter of
/// its time zeroing fresh pages until mapping was turned off (M_MMAP_MAX = 0): 27 -> 32 tok/s
/// (`tandem bench train --model qwen-coder --modes full`, 2026-12-04).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called once at start-up before any threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 512 << 20);
    }
}

/// The system allocator, asking the kernel to back the heap and large blocks with 2 MiB pages.
///
/// A decode step streams every weight and the KV cache once; with 4 KiB pages a 90 MB model is
/// 22,000 pages, far more than the TLB holds, so the quantized kernels waited on page walks as
/// much as on memory (their loads were the hot instructions). Linux's default transparent huge
/// page mode is `madvise`: only advised ranges get them. Weights are many blocks of a few hundred
/// KB (one per tensor), too small to hold a huge page each, so the advice covers the main heap as
/// `sbrk` grows it (as glibc's `glibc.malloc.hugetlb=1` tunable does) and every block of at least
/// `LARGE` bytes that glibc maps on its own. It made SmolLM2 Q4_1 decode ~15% faster on the
/// development machine (docs/performance.md).
pub struct HugePages;

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

// SAFETY: every call is forwarded to the system allocator unchanged; `advise` only adds a hint.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        advise(p, layout.size());
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        advise(p, new_size);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
