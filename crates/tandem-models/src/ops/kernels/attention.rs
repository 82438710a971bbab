//! Causal attention over a paged KV cache (blocks of positions through per-slot tables), and the
//! cache writes that fill it: the decode and verification form, one item per group of query rows
//! that read the same keys and values.
use super::{dot, softmax_in_place, team, SharedMut};

/// Where one token of a batch lives in the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSlot {
    pub slot: usize,
    /// Where the token's key and value are in the cache.
    pub pos: usize,
    /// The token attends to cache positions 0..prefix and to itself: prefix == pos is plain causal
    /// attention; prefix < pos is a draft-tree sibling whose cache row sits after the rows of
    /// branches it must not see.
    pub prefix: usize,
}

impl TokenSlot {
    /// A token at `pos` that sees every position before it.
    pub fn causal(slot: usize, pos: usize) -> Self {
        TokenSlot { slot, pos, prefix: pos }
    }
}

/// Geometry of one layer's cache tensor, a pool of blocks: [blocks, kv_heads, block, head_dim].
/// A slot's positions live in the blocks its table names, `block` rows each (position p in
/// row p % block of block table[p / block]). A cache with one block per slot, of the whole
/// capacity, is the contiguous layout [slots, kv_heads, capacity, head_dim] (the drafter's).
#[derive(Debug, Clone, Copy)]
pub struct CacheGeometry {
    pub kv_heads: usize,
    /// Rows per block: a multiple of eight (attention reads keys in groups of eight that must not
    /// straddle two blocks), unless every slot has a single block.
    pub block: usize,
    pub head_dim: usize,
}

impl CacheGeometry {
    /// Where row `row` of `head` in pool block `block` starts.
    #[inline]
    pub fn offset(&self, block: usize, head: usize, row: usize) -> usize {
        ((block * self.kv_heads + head) * self.block + row) * self.head_dim
    }

    /// Where position `pos` of `head` starts for a slot with block table `table`.
    #[inline]
    pub fn at(&self, table: &[u32], head: usize, pos: usize) -> usize {
        self.offset(table[pos / self.block] as usize, head, pos % self.block)
    }
}

/// The block tables of a contiguous cache of `slots` slots: slot s is block s.
pub fn contiguous_tables(slots: usize) -> Vec<Vec<u32>> {
    (0..slots as u32).map(|s| vec![s]).collect()
}

/// What a KV cache holds per value: f32, or f16 (half the bytes each decode step reads from
/// memory, where attention over a long context is bound; llama.cpp's default). Every value is
/// converted to f32 exactly as it is loaded, so attention's arithmetic is f32's either way and an
/// f16 cache gives the bits an f32 cache holding the same (rounded) values gives.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// dst = src, each value rounded to this type (to nearest, ties to even).
    fn put(dst: &mut [Self], src: &[f32]);
    /// dst = src as f32 (exact).
    fn get(dst: &mut [f32], src: &[Self]);
    /// The values as f32 without a conversion, where they are f32.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// Eight values at p as f32.
    ///
    /// # Safety
    /// AVX (and F16C for f16); eight values readable at p.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn put(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src)
    }
    fn get(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    fn put(dst: &mut [half::f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
    fn get(dst: &mut [f32], src: &[half::f16]) {
        // Eight at a time with F16C: the `half` crate's slice conversion (its own dispatch and
        // loop per call) made an f16 latent cache's step, which converts one short row at a
        // time, 15-20% slower than the f32 one's.
        #[cfg(target_arch = "x86_64")]
        if src.len().is_multiple_of(8) && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and so AVX).
            return unsafe { f16c_to_f32(dst, src) };
        }
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    fn as_f32(_: &[half::f16]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// dst = src as f32, eight values at a time (src.len() a multiple of eight, dst as long).
///
/// # Safety
/// The CPU has AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16c_to_f32(dst: &mut [f32], src: &[half::f16]) {
    assert_eq!(dst.len(), src.len());
    for c in (0..src.len()).step_by(8) {
        std::arch::x86_64::_mm256_storeu_ps(dst.as_mut_ptr().add(c), half::f16::load8(src.as_ptr().add(c)));
    }
}

/// One KV head's keys (or values) of one slot, read through the slot's block table.
pub(crate) struct PagedRows<'a, E> {
    cache: &'a [E],
    table: &'a [u32],
    head: usize,
    g: CacheGeometry,
}

impl<E> Clone for PagedRows<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for PagedRows<'_, E> {}

impl<'a, E: KvElem> PagedRows<'a, E> {
    /// Rows pos..pos + n, which lie in one block (n <= 8 from a multiple of eight, or one row).
    #[inline]
    pub(crate) fn rows(&self, pos: usize, n: usize) -> &'a [E] {
        debug_assert!(pos % self.g.block + n <= self.g.block, "rows {pos}..+{n} straddle a block");
        let at = self.g.at(self.table, self.head, pos);
        &self.cache[at..at + n * self.g.head_dim]
    }

    /// Rows pos..pos + n (within one block) as f32: the cache's own values, or (f16) converted
    /// into `buf` once, so that every row of an item reads the block without converting it again.
    #[inline]
    pub(crate) fn rows_f32<'b>(&self, pos: usize, n: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        let src = self.rows(pos, n);
        match E::as_f32(src) {
            Some(f) => f,
            None => {
                let out = &mut buf[..src.len()];
                E::get(out, src);
                out
            }
        }
    }

    /// Asks for rows pos..pos + n (within one block) ahead of their use; nothing past the table.
    #[inline]
    pub(crate) fn prefetch(&self, pos: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if pos / self.g.block < self.table.len() {
            let p = self.cache.as_ptr().wrapping_add(self.g.at(self.table, self.head, pos)) as *const i8;
            for line in (0..n * self.g.head_dim * std::mem::size_of::<E>()).step_by(64) {
                // SAFETY: a prefetch never faults.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line)) }
            }
        }
    }
}

/// How many positions ahead of the block of eight being used attention asks for keys and values
/// (8 KB at head dimension 64). A paged cache's blocks of 16 positions are 4 KB apart at best, and
/// the hardware prefetcher starts over on each: SmolLM2 Q4_1 decode from depth 16 to 316 ran 6%
/// faster with this, a 2-row verification at depth 256 7% (the Xeon of docs/performance.md,
/// 2026-12-05).
pub(crate) const ATTENTION_PREFETCH_AHEAD: usize = 32;

/// Largest keys and values of one KV head (bytes) that a one-token step still splits between two
/// items (see `attention`).
const SPLIT_HEAD_BYTES: usize = 256 << 10;

/// Writes new rows ([tokens, kv_heads, head_dim]) into the cache at each token's slot and
/// position, by `put` (a copy, or a conversion to the cache's element type).
pub fn cache_write<E, R>(
    cache: &mut [E],
    rows: &[R],
    tokens: &[TokenSlot],
    tables: &[Vec<u32>],
    g: CacheGeometry,
    put: impl Fn(&mut [E], &[R]),
) {
    let d = g.head_dim;
    for (t, ts) in tokens.iter().enumerate() {
        for h in 0..g.kv_heads {
            let dst = g.at(&tables[ts.slot], h, ts.pos);
            let src = (t * g.kv_heads + h) * d;
            put(&mut cache[dst..dst + d], &rows[src..src + d]);
        }
    }
}

/// Causal attention of each token over its own slot's cache: positions 0..prefix, then itself.
/// q: [tokens, heads, head_dim] -> out: [tokens, heads * head_dim].
///
/// A work item is a few query rows that read the same keys and values: consecutive tokens of one
/// slot, the query heads of one KV head. They go over the keys in blocks of eight, each block
/// staying in L1 while every row of the item uses it (a verification's k rows would otherwise
/// each stream the whole cache from L2). A row's result is computed by the same instructions
/// whatever else is in its item or the batch, so verifying k drafted tokens gives each of them
/// bit for bit what decoding it alone would.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    tokens: &[TokenSlot],
    tables: &[Vec<u32>],
    heads: usize,
    g: CacheGeometry,
    out: &mut [f32],
) {
    assert!(
        g.block.is_multiple_of(8) || tokens.iter().all(|ts| tables[ts.slot].len() == 1),
        "attention: blocks of {} rows straddle the groups of eight keys are read in",
        g.block
    );
    let d = g.head_dim;
    let t = tokens.len();
    assert_eq!(q.len(), t * heads * d);
    assert_eq!(out.len(), t * heads * d);
    let group = heads / g.kv_heads;
    // Rows per item: at least the query heads of one KV head (they then read its keys and values
    // once, not once each: a SmolLM2 Q4_1 decode step 5-8% faster at depth 150-400, though three
    // items share two threads unevenly), more where there are enough rows to balance the threads,
    // at most a few tokens' worth.
    let threads = team::threads();
    // Decided once per call (an atomic and a feature test), not per item.
    let pairs = pairs();
    let mut per_item = (t * heads / (threads * 4)).clamp(group, 3 * group);
    // A one-token step has one item per KV head; fewer of them than twice the threads, not a
    // multiple of them (SmolLM2: three on two threads), leave a thread idle a third of the
    // attention: each head's rows then go in two items, reading its keys twice but from L2 (a
    // row's operations are the same in any item). SmolLM2 Q4_1 decode at depth 256-512 4-8%
    // faster on the Xeon of docs/performance.md (2026-12-05).
    // Only while a head's keys and values stay in L2 for the second read: past that, each item
    // reads them from memory again, and one item per head, unevenly shared, is the faster
    // (SmolLM2 Q4_1, f32 cache at depth 4,096: 18.5 against 20.0 ms a step, docs/performance.md).
    let head_bytes = 2 * tokens.first().map_or(0, |ts| ts.pos + 1) * d * std::mem::size_of::<E>();
    if t == 1 && g.kv_heads < 2 * threads && !g.kv_heads.is_multiple_of(threads) && head_bytes <= SPLIT_HEAD_BYTES {
        per_item = group.div_ceil(2);
    } else if pairs {
        // Rows go two to a register: an even count leaves no row alone (SmolLM2's groups of 3).
        per_item = per_item.next_multiple_of(2);
    }
    let mut items = Vec::new();
    let mut start = 0;
    while start < t {
        let end = start + tokens[start..].iter().take_while(|ts| ts.slot == tokens[start].slot).count();
        for kv in 0..g.kv_heads {
            let rows = (end - start) * group;
            items.extend((0..rows).step_by(per_item).map(|r| (start, kv, r, (r + per_item).min(rows))));
        }
        start = end;
    }
    let dst = SharedMut(out.as_mut_ptr());
    let item = |i: usize| {
        let (first, kv, r0, r1) = items[i];
        let table = &tables[tokens[first].slot];
        let row = |r: usize| {
            let (ti, h) = (first + r / group, kv * group + r % group);
            let ts = tokens[ti];
            // Keys 0..len of the run, then the token's own when it is not the next one.
            let (len, own) = if ts.prefix >= ts.pos { (ts.pos + 1, None) } else { (ts.prefix, Some(ts.pos)) };
            QueryRow { at: (ti * heads + h) * d, len, own }
        };
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: every row belongs to exactly one item, and an item writes only its rows of out.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.0, t * heads * d) };
        let keys = PagedRows { cache: k_cache, table, head: kv, g };
        let values = PagedRows { cache: v_cache, table, head: kv, g };
        SCRATCH.with_borrow_mut(|(scores, rows)| {
            rows.clear();
            rows.extend((r0..r1).map(row));
            attend_rows(q, keys, values, rows, d, scores, out, pairs)
        });
    };
    // Forking workers costs more than a decode step's few heads over a short cache.
    let work: usize = tokens.iter().map(|ts| ts.prefix.min(ts.pos) + 1).sum::<usize>() * heads * d;
    if work < 1 << 16 {
        (0..items.len()).for_each(item);
    } else {
        team::for_each(items.len(), &item);
    }
}

/// One query row of an attention item: where its query and output are, how many of the run's
/// keys it sees, and the position of its own key when that is not the next one (a sibling).
pub(crate) struct QueryRow {
    pub(crate) at: usize,
    pub(crate) len: usize,
    pub(crate) own: Option<usize>,
}

thread_local! {
    /// Each thread's attention scores and query rows (one item's at a time): no allocation per item.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<QueryRow>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether AVX-512 machines put two rows in a register (a test turns it off to compare).
static PAIRS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether `attend_rows` pairs rows here.
fn pairs() -> bool {
    #[cfg(target_arch = "x86_64")]
    return PAIRS.load(std::sync::atomic::Ordering::Relaxed) && std::is_x86_feature_detected!("avx512f");
    #[allow(unreachable_code)]
    false
}

/// Turns pairing on or off for the whole process (results are the same bits either way, so
/// other tests running meanwhile are unaffected); returns what it was.
#[cfg(test)]
pub(crate) fn set_pairs(on: bool) -> bool {
    PAIRS.swap(on, std::sync::atomic::Ordering::Relaxed)
}

/// The rows of one item against one KV head's keys and values; `pairs`: two rows to an AVX-512
/// register (`pairs()`), where the AVX2 kernel runs.
#[allow(clippy::too_many_arguments)]
fn attend_rows<E: KvElem>(
    q: &[f32],
    keys: PagedRows<E>,
    values: PagedRows<E>,
    rows: &[QueryRow],
    d: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    pairs: bool,
) {
    let scale = 1.0 / (d as f32).sqrt();
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(8)
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has AVX2, FMA and F16C (and AVX-512F for pairs); rows lie within
            // q, out and the slot's blocks.
            return unsafe { super::avx2::attend_rows(q, keys, values, rows, d, scale, scores, out, pairs) };
        }
    }
    for r in rows {
        attend_row(&q[r.at..r.at + d], keys, values, r, scale, scores, &mut out[r.at..r.at + d]);
    }
}

/// The portable form of `avx2::attend_rows`, one row at a time: softmax(q.K * scale).V over
/// positions 0..len and then the row's own (a tree sibling's), in that order. Each key's score
/// and each value's term are computed alike wherever the row lies, so a tree sibling attending
/// to [prefix, itself] gets bit for bit what the same keys in one contiguous run give.
fn attend_row<E: KvElem>(
    q: &[f32],
    keys: PagedRows<E>,
    values: PagedRows<E>,
    r: &QueryRow,
    scale: f32,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let positions = (0..r.len).chain(r.own);
    let mut buf = vec![0f32; q.len()];
    scores.clear();
    for p in positions.clone() {
        scores.push(dot(q, keys.rows_f32(p, 1, &mut buf)) * scale);
    }
    let inv = softmax_in_place(scores);
    o.fill(0.0);
    for (&s, p) in scores.iter().zip(positions) {
        let w = s * inv;
        for (o, &v) in o.iter_mut().zip(values.rows_f32(p, 1, &mut buf)) {
            *o += w * v;
        }
    }
}
