//! The AVX-512 streaming matmul as outer products: sixteen lanes across output columns, each value
//! one multiply-add chain over k in order.
//!
//! The 16-lane dot product (`tiles`, still AVX2's form) sums each value in lanes across k and
//! reduces them at the end: ten vector loads per 24 multiply-adds and a shuffle tree per value.
//! Here a value's chain runs in one lane of an accumulator and an input element is broadcast to
//! four vectors of 16 weight columns, so a tile of 6 rows x 64 columns does 24 multiply-adds per 4
//! weight loads and 6 broadcasts, with no reduction: on a 2-core Xeon SmolLM2's training-forward
//! products went from 203-238 to 266-293 GFLOP/s, its forward 26-29% faster (docs/performance.md,
//! 2026-12-06).
//!
//! The lanes need 16 columns of one k side by side, so with more than `DIRECT_ROWS` input rows
//! each panel of up to 64 weight rows is first transposed into a scratch block (`pack`, 16 x 16 at
//! a time in registers), a read of the weights that every row shares; with fewer (decoding) each
//! 16 x 16 block is transposed and used at once (bf16 in pairs of elements before widening,
//! `columns_bf16`: half the shuffles). Decoding a dense model pays for the transposes: f32 ~3%
//! slower than the dot products were; bf16 as fast. Every tile, packed or direct, whatever its
//! rows and columns, computes a value by the same chain (`acc = x[k] * w[k] + acc`, k = 0, 1, ...,
//! rounded once per step), so a value never depends on how many rows run together: what lets a
//! training pass's logprobs equal the sampler's to the bit.
//!
//! Register arrays here are filled by loops, never by `std::array::from_fn`: its closure is not
//! compiled with AVX-512, so every shuffle in it became a function call (dense decode fell from 37
//! to 7 tok/s on a Xeon, docs/performance.md, 2026-12-06 18:00 UTC).
#![allow(clippy::needless_range_loop)] // fixed-size register tiles read best indexed
use super::WeightElem;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows (output columns) per packed panel: four vectors of 16.
const PANEL: usize = 64;
/// Accumulators of a tile (of the 32 vector registers; the rest hold a step's weight vectors).
const ACCUMULATORS: usize = 24;

thread_local! {
    /// Each thread's packed panel, reused from product to product.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Columns j0..j1 of y ([m, n], row-major) for every row of x ([m, k]) against w ([n, k]).
///
/// # Safety
/// The CPU must support AVX-512F; y must have room for m rows of n; j1 <= n.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn columns<W: WeightElem>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    if m == 0 {
        return;
    }
    if m <= DIRECT_ROWS {
        return direct(x, w, m, k, n, j0, j1, y);
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        // One panel, starting on a cache line (the tile's weight loads are whole lines).
        if s.len() < k * PANEL + 16 {
            s.resize(k * PANEL + 16, 0.0);
        }
        let skip = s.as_ptr().align_offset(64);
        let panel = &mut s[skip..skip + k * PANEL];
        let mut j = j0;
        while j < j1 {
            let cols = (j1 - j).min(PANEL);
            let vectors = cols.div_ceil(16);
            pack(w, k, j, cols, vectors, panel);
            let yj = y.add(j);
            match vectors {
                4 => rows::<4>(x, m, k, panel, cols, yj, n),
                3 => rows::<3>(x, m, k, panel, cols, yj, n),
                2 => rows::<2>(x, m, k, panel, cols, yj, n),
                _ => rows::<1>(x, m, k, panel, cols, yj, n),
            }
            j += cols;
        }
    })
}

/// At most this many rows (decoding, short verifications) skip the packed panel: each block of
/// weights is transposed in registers and used at once, as often as there are rows.
const DIRECT_ROWS: usize = 8;

/// Columns j0..j1 for a few rows, 16 columns at a time: the same chains as the packed tiles.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn direct<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize, j0: usize, j1: usize, y: *mut f32) {
    let mut j = j0;
    while j < j1 {
        let cols = (j1 - j).min(16);
        let (xp, wp, yj) = (x.as_ptr(), w.as_ptr().add(j * k), y.add(j));
        match m {
            1 => direct_rows::<W, 1>(xp, wp, k, cols, yj, n),
            2 => direct_rows::<W, 2>(xp, wp, k, cols, yj, n),
            3 => direct_rows::<W, 3>(xp, wp, k, cols, yj, n),
            4 => direct_rows::<W, 4>(xp, wp, k, cols, yj, n),
            5 => direct_rows::<W, 5>(xp, wp, k, cols, yj, n),
            6 => direct_rows::<W, 6>(xp, wp, k, cols, yj, n),
            7 => direct_rows::<W, 7>(xp, wp, k, cols, yj, n),
            _ => direct_rows::<W, 8>(xp, wp, k, cols, yj, n),
        }
        j += cols;
    }
}

/// R rows of x against weight rows w..w + cols (at most 16).
#[inline(always)]
unsafe fn direct_rows<W: WeightElem, const R: usize>(
    x: *const f32,
    w: *const W,
    k: usize,
    cols: usize,
    y: *mut f32,
    n: usize,
) {
    let mut acc = [_mm512_setzero_ps(); R];
    let mut step = |q: usize, t: &[__m512; 16]| {
        for (c, tc) in t.iter().enumerate() {
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * k + q + c)), *tc, *a);
            }
        }
    };
    let q = blocks(w, k, cols, &mut step);
    for q in q..k {
        let mut column = [0f32; 16];
        for (r, v) in column.iter_mut().enumerate().take(cols) {
            *v = (*w.add(r * k + q)).to_f32();
        }
        let wv = _mm512_loadu_ps(column.as_ptr());
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * k + q)), wv, *a);
        }
    }
    let mask = if cols >= 16 { 0xFFFF } else { ((1u32 << cols) - 1) as __mmask16 };
    for (r, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(y.add(r * n), mask, *a);
    }
}

/// Every row of x against one packed panel of `V` vectors: tiles of as many rows as fill the
/// accumulators, then smaller ones.
#[inline(always)]
unsafe fn rows<const V: usize>(x: &[f32], m: usize, k: usize, panel: &[f32], cols: usize, y: *mut f32, n: usize) {
    let xp = x.as_ptr();
    let mut i = 0;
    macro_rules! tiles_of {
        ($r:literal) => {
            while i + $r <= m {
                tile::<V, $r>(xp.add(i * k), k, panel.as_ptr(), cols, y.add(i * n), n);
                i += $r;
            }
        };
    }
    match ACCUMULATORS / V {
        24 => tiles_of!(24),
        12 => tiles_of!(12),
        8 => tiles_of!(8),
        _ => tiles_of!(6),
    }
    // The rest (under a full tile) in tiles of 4 rows, then 3, 2 or 1.
    tiles_of!(4);
    let (xi, yi, p) = (xp.add(i * k), y.add(i * n), panel.as_ptr());
    match m - i {
        3 => tile::<V, 3>(xi, k, p, cols, yi, n),
        2 => tile::<V, 2>(xi, k, p, cols, yi, n),
        1 => tile::<V, 1>(xi, k, p, cols, yi, n),
        _ => {}
    }
}

/// R rows x V vectors of columns: R*V accumulators, one chain over k each.
#[inline(always)]
unsafe fn tile<const V: usize, const R: usize>(
    x: *const f32,
    k: usize,
    panel: *const f32,
    cols: usize,
    y: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let stride = 16 * V;
    for q in 0..k {
        let wp = panel.add(q * stride);
        let mut wv = [_mm512_setzero_ps(); V];
        for v in 0..V {
            wv[v] = _mm512_load_ps(wp.add(16 * v));
        }
        for r in 0..R {
            let b = _mm512_set1_ps(*x.add(r * k + q));
            for v in 0..V {
                acc[r][v] = _mm512_fmadd_ps(b, wv[v], acc[r][v]);
            }
        }
    }
    for r in 0..R {
        for v in 0..V {
            let left = cols - 16 * v;
            let out = y.add(r * n + 16 * v);
            if left >= 16 {
                _mm512_storeu_ps(out, acc[r][v]);
            } else {
                _mm512_mask_storeu_ps(out, ((1u32 << left) - 1) as __mmask16, acc[r][v]);
            }
        }
    }
}

/// Rows j..j + cols of w, transposed into `panel` as k steps of 16 * vectors columns (the columns
/// past `cols` zero).
#[inline(always)]
unsafe fn pack<W: WeightElem>(w: &[W], k: usize, j: usize, cols: usize, vectors: usize, panel: &mut [f32]) {
    let stride = 16 * vectors;
    let wp = w.as_ptr().add(j * k);
    let pp = panel.as_mut_ptr();
    for v in 0..vectors {
        let rows = (cols - 16 * v).min(16);
        let base = wp.add(16 * v * k);
        let done = blocks(base, k, rows, &mut |q, t| {
            for (c, tc) in t.iter().enumerate() {
                _mm512_store_ps(pp.add((q + c) * stride + 16 * v), *tc);
            }
        });
        for q in done..k {
            for r in 0..16 {
                let value = if r < rows { (*base.add(r * k + q)).to_f32() } else { 0.0 };
                *pp.add(q * stride + 16 * v + r) = value;
            }
        }
    }
}

/// Hands `f(q, t)` the columns of 16 weight rows (rows past `rows` zero) 16 at a time, t[c]
/// holding element q + c of every row; returns where the blocks end (the rest, under 16 columns,
/// is the caller's).
#[inline(always)]
unsafe fn blocks<W: WeightElem>(w: *const W, k: usize, rows: usize, f: &mut impl FnMut(usize, &[__m512; 16])) -> usize {
    let mut q = 0;
    while q + 16 <= k {
        let columns = W::columns16(w, k, q, rows);
        ahead(w, k, q);
        f(q, &columns);
        q += 16;
    }
    q
}

/// Asks for the next 16 weight rows' elements at q while these are transposed: 16 rows read side
/// by side are more streams than the hardware prefetcher follows. Into L2 only: asking for them
/// in L1 took the fill buffers the loads of this block wait on (bf16 SmolLM2 decoded 52 -> 61
/// tok/s on a Xeon with the L2 hint; none at all: 41). (wrapping_add: past the last row this only
/// names an address.)
#[inline(always)]
unsafe fn ahead<W>(w: *const W, k: usize, q: usize) {
    for r in 16..32 {
        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(r * k + q) as *const i8);
    }
}

/// `columns16` for f32 weights: the 16 x 16 block loaded and transposed.
#[inline(always)]
pub(super) unsafe fn columns_f32(w: *const f32, k: usize, q: usize, rows: usize) -> [__m512; 16] {
    let mut block = [_mm512_setzero_ps(); 16];
    for (r, row) in block.iter_mut().enumerate().take(rows) {
        *row = _mm512_loadu_ps(w.add(r * k + q));
    }
    transpose(block)
}

/// A transpose's first two steps over groups of four rows (of 32-bit elements): pairs of rows
/// interleaved by 32 bits, then by 64 bits, so that in each 128-bit lane q of out[4g + s] lie
/// rows 4g..4g + 4 of element 4q + s.
#[inline(always)]
unsafe fn interleave<const N: usize>(r: [__m512; N]) -> [__m512; N] {
    let mut t = [_mm512_setzero_ps(); N];
    for i in 0..N {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        t[i] = if i % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) };
    }
    let mut u = [_mm512_setzero_ps(); N];
    for i in 0..N {
        let (g, s) = (i / 4, i % 4);
        let (a, b) = (_mm512_castps_pd(t[4 * g + s / 2]), _mm512_castps_pd(t[4 * g + s / 2 + 2]));
        u[i] = _mm512_castpd_ps(if s % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) });
    }
    u
}

/// A 16 x 16 block transposed: out[c] lane r = rows[r] lane c.
#[inline(always)]
unsafe fn transpose(r: [__m512; 16]) -> [__m512; 16] {
    let u = interleave(r);
    // Then the 4 x 4 grid of 128-bit lanes: column 4q + s gathers lane q of u[s], u[4 + s],
    // u[8 + s], u[12 + s].
    let mut out = [_mm512_setzero_ps(); 16];
    for s in 0..4 {
        let a01 = _mm512_shuffle_f32x4::<0x44>(u[s], u[4 + s]);
        let a23 = _mm512_shuffle_f32x4::<0xEE>(u[s], u[4 + s]);
        let b01 = _mm512_shuffle_f32x4::<0x44>(u[8 + s], u[12 + s]);
        let b23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + s], u[12 + s]);
        out[s] = _mm512_shuffle_f32x4::<0x88>(a01, b01);
        out[4 + s] = _mm512_shuffle_f32x4::<0xDD>(a01, b01);
        out[8 + s] = _mm512_shuffle_f32x4::<0x88>(a23, b23);
        out[12 + s] = _mm512_shuffle_f32x4::<0xDD>(a23, b23);
    }
    out
}

/// `columns16` for bf16 weights: the block transposed in pairs of elements (32-bit lanes) and
/// then widened, half the shuffles of widening first and transposing 32-bit values (bf16 decode
/// ran ~12% slower with those than with the dot products before them). Lane r of pair p holds
/// row r's elements q + 2p (low 16 bits) and q + 2p + 1 (high): shifted left by 16 and masked to
/// the high half they are those elements' f32 values.
#[inline(always)]
pub(super) unsafe fn columns_bf16(w: *const u16, k: usize, q: usize, rows: usize) -> [__m512; 16] {
    // z[i]: row i's 8 pairs in the low 256 bits, row i + 8's in the high (as f32 bits: the
    // interleaving only moves 32-bit lanes).
    let mut z = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        for (half, r) in [(0, i), (1, i + 8)] {
            if r < rows {
                let row = _mm256_loadu_si256(w.add(r * k + q) as *const __m256i);
                let wide = _mm512_castps_si512(z[i]);
                let wide = if half == 0 { _mm512_zextsi256_si512(row) } else { _mm512_inserti64x4::<1>(wide, row) };
                z[i] = _mm512_castsi512_ps(wide);
            }
        }
    }
    // An 8 x 8 transpose of 32-bit pairs in each 256-bit half at once.
    let zu = interleave(z);
    let mut u = [_mm512_setzero_si512(); 8];
    for i in 0..8 {
        u[i] = _mm512_castps_si512(zu[i]);
    }
    // Pair p gathers 128-bit lane p / 4 of each half of u[p % 4] (rows 0..4 of the half) and of
    // u[4 + p % 4] (rows 4..8).
    let low = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let high = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    let high_half = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut out = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        let (a, b) = (u[p % 4], u[4 + p % 4]);
        let pair = if p < 4 { _mm512_permutex2var_epi64(a, low, b) } else { _mm512_permutex2var_epi64(a, high, b) };
        out[2 * p] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
        out[2 * p + 1] = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let rows: [__m512; 16] = std::array::from_fn(|r| unsafe { _mm512_loadu_ps(m[16 * r..].as_ptr()) });
        let t = unsafe { transpose(rows) };
        for (c, v) in t.iter().enumerate() {
            let mut lanes = [0f32; 16];
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
            for (r, &x) in lanes.iter().enumerate() {
                assert_eq!(x, m[16 * r + c], "column {c} row {r}");
            }
        }
    }

    /// Every value is the one chain `acc = x[q] * w[q] + acc` over q in order, whatever the tile
    /// (packed or direct, every width of panel and of row tile, k in blocks of 16 and single
    /// columns), for f32 and bf16 weights.
    #[test]
    fn each_value_is_one_ordered_chain() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let shapes = [
            (0, 16, 16),
            (1, 16, 16),
            (30, 35, 70),
            (7, 48, 64),
            (25, 17, 130),
            (13, 64, 33),
            (3, 35, 70),
            (8, 50, 33),
            (37, 83, 200),
            (20, 40, 96),
        ];
        for &(m, k, n) in &shapes {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1013) as f32 / 101.3 - 5.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 997) as f32 / 99.7 - 5.0).collect();
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let mut y = vec![f32::NAN; m * n];
            let mut yb = vec![f32::NAN; m * n];
            unsafe {
                columns(&x, &w, m, k, n, 0, n, y.as_mut_ptr());
                columns(&x, &wb, m, k, n, 0, n, yb.as_mut_ptr());
            }
            for i in 0..m {
                for j in 0..n {
                    let chain = |w: &dyn Fn(usize) -> f32| (0..k).fold(0f32, |acc, q| x[i * k + q].mul_add(w(q), acc));
                    let (f, b) = (chain(&|q| w[j * k + q]), chain(&|q| wb[j * k + q].to_f32()));
                    assert_eq!(y[i * n + j].to_bits(), f.to_bits(), "f32 {m}x{k}x{n} at ({i}, {j})");
                    assert_eq!(yb[i * n + j].to_bits(), b.to_bits(), "bf16 {m}x{k}x{n} at ({i}, {j})");
                }
            }
        }
    }
}
