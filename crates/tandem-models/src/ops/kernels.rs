//! Plain-slice CPU kernels for the decode and verification hot path.
//!
//! Decode and draft verification multiply a handful of rows by every weight, so they are bound by
//! how fast weights stream from memory. The matmul here streams each weight row once and reuses it
//! for every input row, so a forward over k tokens costs little more than one.
use super::team;

/// Raw pointer that may be shared by workers writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// A weight element the streaming matmul can read: f32, or bf16 (half the bytes to stream).
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Eight consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must point to eight readable elements, and the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Elements q..q + 16 of `rows` rows (row stride k; at most 16) as 16 columns: out[c] lane r
    /// holds row r's element q + c, lanes past `rows` zero.
    ///
    /// # Safety
    /// Those elements must be readable, and the CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn columns16(w: *const Self, k: usize, q: usize, rows: usize) -> [std::arch::x86_64::__m512; 16];
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn columns16(w: *const Self, k: usize, q: usize, rows: usize) -> [std::arch::x86_64::__m512; 16] {
        panels::columns_f32(w, k, q, rows)
    }
}

impl WeightElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn columns16(w: *const Self, k: usize, q: usize, rows: usize) -> [std::arch::x86_64::__m512; 16] {
        panels::columns_bf16(w as *const u16, k, q, rows)
    }
}

/// y[i, j] = sum_k x[i, k] * w[j, k] for x: [m, k], w: [n, k] row-major, into a new y: [m, n].
/// Every output is accumulated in the same order whatever m is, so results do not depend on how
/// many rows are batched together. y is written without zeroing it first (in a training pass the
/// zeroing was a share of the memset time, on memory the allocator hands back).
pub fn matmul_xwt<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(m * n);
    // SAFETY: the product writes every element of the spare capacity (each tile its values; the
    // tiles cover every row and column) before the length is set.
    unsafe {
        product(x, w, m, k, n, SharedMut(y.spare_capacity_mut().as_mut_ptr().cast::<f32>()));
        y.set_len(m * n);
    }
    y
}

/// x times w transposed into `out`, which must have room for m × n values; writes them all.
/// With AVX-512 as outer products over packed panels (`panels`: one multiply-add chain per value),
/// else as 8-lane dot products (`tiles`).
unsafe fn product<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize, out: SharedMut) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return panel_product(x, w, m, k, n, out);
    }
    let threads = team::threads();
    // Two blocks per worker: balance enough, and few forks (a decode step runs ~120 of these).
    let block = (n / (threads * 2)).clamp(16, 4096).div_ceil(ROWS) * ROWS;
    let group = input_group(k);
    if n.div_ceil(block) < threads && m > group {
        // Too few weight rows to share out (an adapter's rank): share the input groups instead.
        // A value is computed the same either way.
        return team::for_each(m.div_ceil(group), &|g| {
            #[allow(clippy::redundant_locals)]
            let out = out;
            let (i0, i1) = (g * group, ((g + 1) * group).min(m));
            // SAFETY: every group writes only its own rows of y.
            unsafe { matmul_block(&x[i0 * k..i1 * k], w, i1 - i0, k, n, 0, n, out.0.add(i0 * n)) };
        });
    }
    // (One input group, as in decoding, has nothing to reuse: the whole block streams once.)
    let stretch = if m > group { weight_stretch(k * std::mem::size_of::<W>()) } else { block };
    team::for_each(n.div_ceil(block), &|b| {
        let j0 = b * block;
        let j1 = (j0 + block).min(n);
        // Rebind so the closure captures the Send wrapper, not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let out = out;
        // A stretch of weight rows stays in L2 while every input group passes it (a group in L1).
        for s0 in (j0..j1).step_by(stretch) {
            let s1 = (s0 + stretch).min(j1);
            for i0 in (0..m).step_by(group) {
                let i1 = (i0 + group).min(m);
                // SAFETY: every block writes only columns j0..j1 of y, and blocks do not overlap.
                unsafe { matmul_block(&x[i0 * k..i1 * k], w, i1 - i0, k, n, s0, s1, out.0.add(i0 * n)) };
            }
        }
    });
}

/// The AVX-512 product (`panels`): blocks of whole 16-column vectors shared among the team, each
/// packed a panel at a time and passed by every input row.
#[cfg(target_arch = "x86_64")]
unsafe fn panel_product<W: WeightElem>(x: &[f32], w: &[W], m: usize, k: usize, n: usize, out: SharedMut) {
    let threads = team::threads();
    // Two blocks per worker, as the dot-product form shares them.
    let block = n.div_ceil(threads * 2).clamp(16, 4096).next_multiple_of(16);
    if n.div_ceil(block) < threads && m >= 2 * PANEL_ROWS {
        // Too few columns to share out (an adapter's rank): share the rows instead, each thread
        // packing the same few weight rows. A value is computed the same either way.
        let rows = m.div_ceil(threads).next_multiple_of(PANEL_ROWS);
        return team::for_each(m.div_ceil(rows), &|g| {
            #[allow(clippy::redundant_locals)]
            let out = out;
            let (i0, i1) = (g * rows, ((g + 1) * rows).min(m));
            // SAFETY: every part writes only its own rows of y.
            unsafe { panels::columns(&x[i0 * k..i1 * k], w, i1 - i0, k, n, 0, n, out.0.add(i0 * n)) };
        });
    }
    team::for_each(n.div_ceil(block), &|b| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        let (j0, j1) = (b * block, ((b + 1) * block).min(n));
        // SAFETY: every block writes only its own columns of y.
        unsafe { panels::columns(x, w, m, k, n, j0, j1, out.0) };
    });
}

/// Rows a part gets when the panel product shares rows: a multiple of every tile's height.
#[cfg(target_arch = "x86_64")]
const PANEL_ROWS: usize = 24;

/// Input rows multiplied together: as many as stay in L1 cache beside a tile's weight rows, in
/// whole tiles of 6 rows (AVX2's tile of 2 divides it). Measured on a Xeon when AVX-512 ran these
/// tiles 6 rows wide: 12 rows of 576 (27 KB) against 32 (73 KB) took SmolLM2's products from
/// 220-280 to 250-300 GFLOP/s.
fn input_group(k: usize) -> usize {
    (L1_INPUT_BYTES / (k * 4)).clamp(6, 36) / 6 * 6
}

/// Weight rows streamed once from memory and then reused from L2 cache by every input group: a
/// multiple of the tile's 4 rows (so a column is computed by the same tile whatever m is).
fn weight_stretch(row_bytes: usize) -> usize {
    (L2_WEIGHT_BYTES / row_bytes).max(ROWS) / ROWS * ROWS
}

const L1_INPUT_BYTES: usize = 32 << 10;
const L2_WEIGHT_BYTES: usize = 1 << 20;
const ROWS: usize = 4;
/// Cache lines of the next tile's weights prefetched per step of 8 columns.
const PREFETCH_LINES: usize = 2;

#[allow(clippy::too_many_arguments)]
unsafe fn matmul_block<W: WeightElem>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return avx2::matmul_block(x, w, m, k, n, j0, j1, y);
        }
    }
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            *y.add(i * n + j) = xr.iter().zip(wr).map(|(&a, &b)| a * b.to_f32()).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod attend_pairs;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod panels;
#[cfg(target_arch = "x86_64")]
mod tiles;
mod xw;
pub(crate) use xw::{add_xw, Out};
mod attention;
pub use attention::{attention, cache_write, contiguous_tables, CacheGeometry, KvElem, TokenSlot};

/// Dot product with eight independent partial sums, which the compiler keeps in vector lanes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for q in chunks..a.len() {
        s += a[q] * b[q];
    }
    s
}

/// RMSNorm of each row of x ([rows, dim]) scaled by weight.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = dot(xr, xr) / dim as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * g;
        }
    }
}

/// Rotates each head of x ([tokens, heads, head_dim]) in place by the angle of its token's position.
/// cos/sin tables are [max_pos, head_dim / 2].
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        let c = &cos[pos * half..(pos + 1) * half];
        let s = &sin[pos * half..(pos + 1) * half];
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
            if interleaved {
                for i in 0..half {
                    let (a, b) = (v[2 * i], v[2 * i + 1]);
                    v[2 * i] = a * c[i] - b * s[i];
                    v[2 * i + 1] = a * s[i] + b * c[i];
                }
            } else {
                for i in 0..half {
                    let (a, b) = (v[i], v[i + half]);
                    v[i] = a * c[i] - b * s[i];
                    v[i + half] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

/// out = silu(gate) * up, where gate_up rows are [gate | up].
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::silu_mul(gate_up, inter, out) };
        }
    }
    for (gu, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// The gradient of `silu_mul`: rows of out are [d_gate | d_up] for rows [gate | up] of gate_up
/// and rows of dy, the product's gradient (the forward's sigmoid on AVX2).
pub fn silu_mul_bwd(gate_up: &[f32], dy: &[f32], inter: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::silu_mul_bwd(gate_up, dy, inter, out) };
        }
    }
    let rows = gate_up.chunks_exact(2 * inter).zip(dy.chunks_exact(inter)).zip(out.chunks_exact_mut(2 * inter));
    for ((gu, dy), o) in rows {
        let ((gate, up), (d_gate, d_up)) = (gu.split_at(inter), o.split_at_mut(inter));
        for i in 0..inter {
            let sig = 1.0 / (1.0 + (-gate[i]).exp());
            d_gate[i] = dy[i] * up[i] * sig * (1.0 + gate[i] * (1.0 - sig));
            d_up[i] = dy[i] * gate[i] * sig;
        }
    }
}

/// The index of the largest value, the lowest where several are equal (greedy decoding is
/// then deterministic); NaN never wins. Every greedy token and every verified row takes one
/// over the vocabulary.
pub fn argmax(x: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2::argmax(x) };
        }
    }
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// log Σ exp(x), without writing anything: the normaliser of a vocabulary-sized row of logits,
/// which every emitted token's logprob needs (a libm exp per entry was ~6% of a decode step).
/// exp(x - max) in f32, summed in f64; one fixed order per machine, so every caller (sampling,
/// verification, the training API) gets the same bits for the same row.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::log_sum_exp(x) };
        }
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let sum: f64 = x.iter().map(|&s| (s - max).exp() as f64).sum();
    max + sum.ln() as f32
}

/// out[j] += scale · exp(z[j] - shift), with shift at least max(z) (the row's log-sum-exp: then
/// exp(z - shift) is the row's softmax). The gradient of a loss over vocabulary-sized logits is
/// a multiple of that softmax plus a few sparse terms; this is its one dense pass.
pub fn add_scaled_exp(z: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    assert_eq!(z.len(), out.len(), "add_scaled_exp: rows of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; the lengths are equal.
            return unsafe { avx2::add_scaled_exp(z, shift, scale, out) };
        }
    }
    for (o, &v) in out.iter_mut().zip(z) {
        *o += scale * (v - shift).exp();
    }
}

/// z[j] = scale · exp(z[j] - shift): `add_scaled_exp` into the row itself (its values are then
/// the ones `add_scaled_exp` adds to zeros).
pub fn scale_exp_in_place(z: &mut [f32], shift: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::scale_exp_in_place(z, shift, scale) };
        }
    }
    for v in z.iter_mut() {
        *v = scale * (*v - shift).exp();
    }
}

/// Replaces scores by exp(score - max) and returns 1 / their sum.
pub(crate) fn softmax_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    1.0 / sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        let scan = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best as u32
        };
        for &n in &[1usize, 5, 8, 9, 17, 49_152] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32).collect();
            assert_eq!(argmax(&x), scan(&x), "n={n}");
            if n > 3 {
                x[n - 1] = 5000.0; // the largest in the tail or the last block
                x[1] = f32::NAN;
                assert_eq!(argmax(&x), scan(&x), "n={n}");
                x[2] = 5000.0; // a tie: the first wins
                assert_eq!(argmax(&x), 2);
            }
        }
        assert_eq!(argmax(&[f32::NAN, 3.0, 4.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 9]), 0);
    }

    #[test]
    fn log_sum_exp_matches_f64_libm() {
        // Vocabulary-sized and odd lengths (the padded tail), logits spread like a model's.
        for &n in &[1usize, 7, 8, 13, 4099, 49_152, 151_936] {
            let x: Vec<f32> =
                (0..n).map(|i| ((i.wrapping_mul(2_654_435_761) >> 9) % 3000) as f32 * 0.01 - 12.0).collect();
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let exact = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&x) as f64;
            assert!((got - exact).abs() < 4e-6 * exact.abs().max(1.0), "n={n}: {got} vs {exact}");
        }
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), f32::NEG_INFINITY);
    }

    #[test]
    fn add_scaled_exp_matches_f64_libm() {
        for &n in &[1usize, 7, 8, 13, 8192, 8197] {
            let z: Vec<f32> =
                (0..n).map(|i| ((i.wrapping_mul(2_654_435_761) >> 9) % 3000) as f32 * 0.01 - 12.0).collect();
            let shift = log_sum_exp(&z);
            let start: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
            let mut out = start.clone();
            add_scaled_exp(&z, shift, -0.75, &mut out);
            for j in 0..n {
                let exact = start[j] as f64 - 0.75 * (z[j] as f64 - shift as f64).exp();
                assert!((out[j] as f64 - exact).abs() < 1e-6, "n={n} j={j}: {} vs {exact}", out[j]);
            }
            // In place: the values added to zeros.
            let mut added = vec![0f32; n];
            add_scaled_exp(&z, shift, -0.75, &mut added);
            let mut in_place = z.clone();
            scale_exp_in_place(&mut in_place, shift, -0.75);
            assert_eq!(in_place, added, "n={n}");
        }
    }

    #[test]
    fn matmul_matches_naive_for_odd_shapes() {
        for &(m, k, n) in &[(1, 5, 3), (3, 19, 37), (2, 64, 130), (7, 96, 33), (16, 40, 17)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 17) as f32 / 17.0 - 0.5).collect();
            let y = matmul_xwt(&x, &w, m, k, n);
            let r = naive(&x, &w, m, k, n);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
            // bf16 weights: the same product over the bf16-rounded values.
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let y = matmul_xwt(&x, &wb, m, k, n);
            let r = naive(&x, &wr, m, k, n);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "bf16 {m}x{k}x{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn silu_mul_matches_f64() {
        // Rows of odd width (a padded tail), gates from -100 to 100 and around 0.
        let inter = 37;
        let gates: Vec<f32> = (0..3 * inter).map(|i| ((i as f32 * 0.7311).sin() * 1.3).powi(3) * 40.0).collect();
        let mut gate_up = Vec::new();
        for (r, g) in gates.chunks(inter).enumerate() {
            gate_up.extend_from_slice(g);
            gate_up.extend((0..inter).map(|i| (i + r) as f32 / 7.0 - 2.0));
        }
        gate_up[5] = -100.0;
        gate_up[6] = 100.0;
        gate_up[7] = 1e-7;
        let mut out = vec![0f32; 3 * inter];
        silu_mul(&gate_up, inter, &mut out);
        for (r, (gu, o)) in gate_up.chunks(2 * inter).zip(out.chunks(inter)).enumerate() {
            for i in 0..inter {
                let (g, u) = (gu[i] as f64, gu[inter + i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let tol = 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30;
                assert!((o[i] as f64 - want).abs() <= tol, "row {r} col {i}: {} vs {want}", o[i]);
            }
        }
    }

    #[test]
    fn silu_mul_bwd_matches_f64() {
        // Rows of odd width (a padded tail), gates from -100 to 100 and around 0.
        let inter = 37;
        let mut gate_up = Vec::new();
        for r in 0..3 {
            gate_up.extend((0..inter).map(|i| (((r * inter + i) as f32 * 0.7311).sin() * 1.3).powi(3) * 40.0));
            gate_up.extend((0..inter).map(|i| (i + r) as f32 / 7.0 - 2.0));
        }
        gate_up[5] = -100.0;
        gate_up[6] = 100.0;
        gate_up[7] = 1e-7;
        let dy: Vec<f32> = (0..3 * inter).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
        let mut out = vec![0f32; 6 * inter];
        silu_mul_bwd(&gate_up, &dy, inter, &mut out);
        for r in 0..3 {
            for i in 0..inter {
                let (g, u, y) = (
                    gate_up[r * 2 * inter + i] as f64,
                    gate_up[r * 2 * inter + inter + i] as f64,
                    dy[r * inter + i] as f64,
                );
                let s = 1.0 / (1.0 + (-g).exp());
                let (d_gate, d_up) = (y * u * s * (1.0 + g * (1.0 - s)), y * g * s);
                let scale = (y * u * s).abs() * (1.0 + (g * (1.0 - s)).abs());
                let (got_gate, got_up) = (out[r * 2 * inter + i] as f64, out[r * 2 * inter + inter + i] as f64);
                assert!(
                    (got_gate - d_gate).abs() <= 8.0 * f32::EPSILON as f64 * scale + 1e-30,
                    "row {r} col {i}: d_gate {got_gate} vs {d_gate}"
                );
                assert!(
                    (got_up - d_up).abs() <= 8.0 * f32::EPSILON as f64 * d_up.abs() + 1e-30,
                    "row {r} col {i}: d_up {got_up} vs {d_up}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_batch_size() {
        let (k, n) = (72, 40);
        let x: Vec<f32> = (0..40 * k).map(|i| ((i * 31) % 11) as f32 / 11.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5).collect();
        let all = matmul_xwt(&x, &w, 40, k, n);
        for i in 0..40 {
            let one = matmul_xwt(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(&all[i * n..(i + 1) * n], &one[..], "row {i}");
        }
    }

    #[test]
    fn attention_matches_naive_and_each_row_equals_its_own_pass() {
        let (heads, kv_heads, d, capacity) = (6, 2, 72, 40);
        let g = CacheGeometry { kv_heads, block: capacity, head_dim: d };
        let tables = contiguous_tables(2);
        let cache_len = 2 * kv_heads * capacity * d;
        let kc: Vec<f32> = (0..cache_len).map(|i| ((i * 37) % 23) as f32 / 23.0 - 0.5).collect();
        let vc: Vec<f32> = (0..cache_len).map(|i| ((i * 11) % 19) as f32 / 19.0 - 0.5).collect();
        // A prefill-like run in slot 1 and a verification-like run in slot 0.
        let tokens: Vec<TokenSlot> =
            (0..7).map(|p| TokenSlot::causal(1, p * 5)).chain((30..35).map(|p| TokenSlot::causal(0, p))).collect();
        let t = tokens.len();
        let q: Vec<f32> = (0..t * heads * d).map(|i| ((i * 13) % 29) as f32 / 29.0 - 0.5).collect();
        let mut all = vec![0f32; t * heads * d];
        attention(&q, &kc, &vc, &tokens, &tables, heads, g, &mut all);
        for (ti, ts) in tokens.iter().enumerate() {
            for h in 0..heads {
                let qr = &q[(ti * heads + h) * d..(ti * heads + h + 1) * d];
                let base = g.offset(ts.slot, h / (heads / kv_heads), 0);
                let s: Vec<f64> = (0..=ts.pos)
                    .map(|p| {
                        (0..d).map(|c| qr[c] as f64 * kc[base + p * d + c] as f64).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = (0..=ts.pos).map(|p| e[p] / z * vc[base + p * d + c] as f64).sum();
                    let got = all[(ti * heads + h) * d + c];
                    assert!((got as f64 - want).abs() < 1e-5, "token {ti} head {h} lane {c}: {got} vs {want}");
                }
            }
            let mut one = vec![0f32; heads * d];
            attention(&q[ti * heads * d..(ti + 1) * heads * d], &kc, &vc, &[*ts], &tables, heads, g, &mut one);
            assert_eq!(&all[ti * heads * d..(ti + 1) * heads * d], &one[..], "token {ti}");
        }
    }

    /// Rows two to an AVX-512 register must give AVX2's bits exactly: a summation order that
    /// moved would move the quantized target's greedy text (docs/performance.md, 2026-12-04).
    #[test]
    fn rows_paired_in_avx512_registers_give_the_unpaired_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        for (heads, kv_heads, d) in [(9, 3, 64), (6, 2, 72), (14, 2, 80), (4, 4, 64)] {
            let (block, blocks) = (16, 24);
            let g = CacheGeometry { kv_heads, block, head_dim: d };
            let len = blocks * kv_heads * block * d;
            // Magnitudes over several decades, so that any change of order shows in the bits.
            let val = |i: usize, m: usize| {
                ((i * m) % 97) as f32 / 97.0 - 0.5 + ((i % 13) as f32 - 6.0) * 1e-3 * (i % 7) as f32
            };
            let kc: Vec<f32> = (0..len).map(|i| val(i, 37) * 3.0).collect();
            let vc: Vec<f32> = (0..len).map(|i| val(i, 11) * (1 + i % 5) as f32).collect();
            // Slot 0: a prefill chunk (rows of every length 1..45); slot 1: a verification of
            // four tokens and two tree siblings; slot 2: one decode token at a block's edge.
            let tables: Vec<Vec<u32>> = vec![vec![3, 9, 1], vec![0, 7, 12, 5, 20], vec![2, 4, 6]];
            let tokens: Vec<TokenSlot> = (0..45)
                .map(|p| TokenSlot::causal(0, p))
                .chain((60..64).map(|p| TokenSlot::causal(1, p)))
                .chain([TokenSlot { slot: 1, pos: 64, prefix: 61 }, TokenSlot { slot: 1, pos: 65, prefix: 62 }])
                .chain([TokenSlot::causal(2, 31)])
                .collect();
            let t = tokens.len();
            let q: Vec<f32> = (0..t * heads * d).map(|i| val(i, 13) * 2.0).collect();
            let run = |pairs: bool| {
                let was = attention::set_pairs(pairs);
                let mut out = vec![0f32; t * heads * d];
                attention(&q, &kc, &vc, &tokens, &tables, heads, g, &mut out);
                // Each token alone too (decode-sized items pair differently).
                for (i, ts) in tokens.iter().enumerate() {
                    let mut one = vec![0f32; heads * d];
                    attention(&q[i * heads * d..(i + 1) * heads * d], &kc, &vc, &[*ts], &tables, heads, g, &mut one);
                    out.extend(one);
                }
                attention::set_pairs(was);
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (paired, unpaired) = (run(true), run(false));
            assert_eq!(paired.len(), unpaired.len());
            let differ = paired.iter().zip(&unpaired).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "heads {heads}/{kv_heads}, head dim {d}: {differ} values differ");
        }
    }

    /// An f16 cache converts each key and value to f32 as attention loads it: its outputs must be,
    /// bit for bit, those of an f32 cache holding the same rounded values (what training's forward
    /// computes to match serving), on every kernel path and item shape.
    #[test]
    fn an_f16_cache_attends_as_an_f32_cache_of_its_rounded_values() {
        use half::f16;
        let (heads, kv_heads, d, block) = (9, 3, 64, 16);
        let g = CacheGeometry { kv_heads, block, head_dim: d };
        let len = 24 * kv_heads * block * d;
        let val = |i: usize, m: usize| ((i * m) % 97) as f32 / 97.0 - 0.5 + ((i % 13) as f32 - 6.0) * 1e-3;
        let k16: Vec<f16> = (0..len).map(|i| f16::from_f32(val(i, 37) * 7.0)).collect();
        let v16: Vec<f16> = (0..len).map(|i| f16::from_f32(val(i, 11) * (1 + i % 5) as f32)).collect();
        let (k32, v32): (Vec<f32>, Vec<f32>) =
            (k16.iter().map(|x| x.to_f32()).collect(), v16.iter().map(|x| x.to_f32()).collect());
        let tables: Vec<Vec<u32>> = vec![vec![3, 9, 1], vec![0, 7, 12, 5, 20], vec![2, 4, 6]];
        let tokens: Vec<TokenSlot> = (0..45)
            .map(|p| TokenSlot::causal(0, p))
            .chain((60..64).map(|p| TokenSlot::causal(1, p)))
            .chain([TokenSlot { slot: 1, pos: 64, prefix: 61 }])
            .chain([TokenSlot::causal(2, 31)])
            .collect();
        let t = tokens.len();
        let q: Vec<f32> = (0..t * heads * d).map(|i| val(i, 13) * 2.0).collect();
        for pairs in [true, false] {
            let was = attention::set_pairs(pairs);
            let (mut a, mut b) = (vec![0f32; t * heads * d], vec![0f32; t * heads * d]);
            attention(&q, &k16, &v16, &tokens, &tables, heads, g, &mut a);
            attention(&q, &k32, &v32, &tokens, &tables, heads, g, &mut b);
            let one = |ts: &TokenSlot, i: usize| {
                let mut o = vec![0f32; heads * d];
                attention(&q[i * heads * d..(i + 1) * heads * d], &k16, &v16, &[*ts], &tables, heads, g, &mut o);
                o
            };
            let singles: Vec<f32> = tokens.iter().enumerate().flat_map(|(i, ts)| one(ts, i)).collect();
            attention::set_pairs(was);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "pairs {pairs}: f16 cache against f32 of the same values");
            assert_eq!(bits(&a), bits(&singles), "pairs {pairs}: a token alone against in its batch");
        }
        // Writing rounds to nearest (as the conversion training uses).
        let rows: Vec<f32> = (0..kv_heads * d).map(|i| val(i, 5) * 3.3).collect();
        let mut cache = vec![f16::ZERO; len];
        cache_write(&mut cache, &rows, &[TokenSlot::causal(0, 5)], &tables, g, <f16 as KvElem>::put);
        for h in 0..kv_heads {
            let at = g.at(&tables[0], h, 5);
            for c in 0..d {
                assert_eq!(cache[at + c], f16::from_f32(rows[h * d + c]));
            }
        }
    }

    #[test]
    fn paged_attention_is_bit_for_bit_the_contiguous_one() {
        // Two slots of 40 positions, contiguous, and the same rows in blocks of 8 scattered over
        // a pool in another order: every output bit must agree (sharing blocks between sequences
        // relies on a block's place in the pool never mattering).
        let (heads, kv_heads, d, capacity, block) = (6, 2, 72, 40, 8);
        let whole = CacheGeometry { kv_heads, block: capacity, head_dim: d };
        let cache_len = 2 * kv_heads * capacity * d;
        let kc: Vec<f32> = (0..cache_len).map(|i| ((i * 37) % 23) as f32 / 23.0 - 0.5).collect();
        let vc: Vec<f32> = (0..cache_len).map(|i| ((i * 11) % 19) as f32 / 19.0 - 0.5).collect();
        let paged = CacheGeometry { kv_heads, block, head_dim: d };
        let tables: Vec<Vec<u32>> = vec![vec![7, 2, 9, 0, 4], vec![1, 8, 3, 6, 5]];
        let (mut kp, mut vp) = (vec![0f32; 10 * kv_heads * block * d], vec![0f32; 10 * kv_heads * block * d]);
        for (slot, table) in tables.iter().enumerate() {
            for h in 0..kv_heads {
                for pos in 0..capacity {
                    let (from, to) = (whole.offset(slot, h, pos), paged.at(table, h, pos));
                    kp[to..to + d].copy_from_slice(&kc[from..from + d]);
                    vp[to..to + d].copy_from_slice(&vc[from..from + d]);
                }
            }
        }
        let tokens: Vec<TokenSlot> = (0..12)
            .map(|p| TokenSlot::causal(1, p * 3))
            .chain((30..35).map(|p| TokenSlot::causal(0, p)))
            .chain([TokenSlot { slot: 0, pos: 37, prefix: 31 }])
            .collect();
        let t = tokens.len();
        let q: Vec<f32> = (0..t * heads * d).map(|i| ((i * 13) % 29) as f32 / 29.0 - 0.5).collect();
        let (mut a, mut b) = (vec![0f32; t * heads * d], vec![0f32; t * heads * d]);
        attention(&q, &kc, &vc, &tokens, &contiguous_tables(2), heads, whole, &mut a);
        attention(&q, &kp, &vp, &tokens, &tables, heads, paged, &mut b);
        assert_eq!(a, b);
    }
}
