//! The AVX2 + FMA forms of the CPU kernels (streaming matmul tiles, attention, softmax, SiLU).
#![allow(clippy::needless_range_loop)] // fixed-size register tiles read best indexed
use super::attention::KvElem;
use super::tiles::{self, DotLanes, Lanes};
use super::WeightElem;
use std::arch::x86_64::*;

/// The eight lanes' sum: halves added (lanes e and e + 4), then e and e + 2, then the two left.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// AVX2's eight f32 lanes.
pub struct F32x8;

impl Lanes for F32x8 {
    type V = __m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
}

impl DotLanes for F32x8 {
    #[inline(always)]
    unsafe fn load_weights<W: WeightElem>(p: *const W) -> __m256 {
        W::load8(p)
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        hsum(v)
    }
}

/// Columns j0..j1 of y: AVX2's 16 vector registers hold tiles of 4 weight rows x 2 input rows
/// (8 accumulators).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_block<W: WeightElem>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    tiles::block::<W, F32x8, 2>(x, w, m, k, n, j0, j1, y)
}

/// scores[p] = (q . keys[p]) * scale for every key row, eight keys at a time: eight
/// independent multiply-add chains (one per key), then one transposing reduction gives the
/// eight sums in one vector. Every key's sum is formed by the same operations wherever it
/// lies (a short last group repeats its last key in the unused chains, whose sums are
/// dropped), so a key's score does not depend on how many keys the run has.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores<E: KvElem>(q: &[f32], keys: &[E], scale: f32, scores: &mut [f32]) {
    let d = q.len();
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let sv = _mm256_set1_ps(scale);
    let mut p0 = 0;
    while p0 < scores.len() {
        let n = (scores.len() - p0).min(8);
        let rows: [*const E; 8] = std::array::from_fn(|j| kp.add((p0 + j.min(n - 1)) * d));
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..d).step_by(8) {
            let qv = _mm256_loadu_ps(qp.add(c));
            for j in 0..8 {
                acc[j] = _mm256_fmadd_ps(qv, E::load8(rows[j].add(c)), acc[j]);
            }
        }
        let out = _mm256_mul_ps(sum8(acc), sv);
        if n == 8 {
            _mm256_storeu_ps(scores.as_mut_ptr().add(p0), out);
        } else {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), out);
            scores[p0..p0 + n].copy_from_slice(&lanes[..n]);
        }
        p0 += n;
    }
}

/// The lane sums of eight vectors, as one vector: lane j is
/// ((a_j[0] + a_j[1]) + (a_j[2] + a_j[3])) + ((a_j[4] + a_j[5]) + (a_j[6] + a_j[7])).
#[inline(always)]
unsafe fn sum8(a: [__m256; 8]) -> __m256 {
    let h0 = _mm256_hadd_ps(a[0], a[1]);
    let h1 = _mm256_hadd_ps(a[2], a[3]);
    let h2 = _mm256_hadd_ps(a[4], a[5]);
    let h3 = _mm256_hadd_ps(a[6], a[7]);
    let g0 = _mm256_hadd_ps(h0, h1);
    let g1 = _mm256_hadd_ps(h2, h3);
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(g0, g1), _mm256_permute2f128_ps::<0x31>(g0, g1))
}

/// `attend_rows` for AVX2: key blocks of eight, each used by every row of the item while it
/// is in L1; per row the same operations as `attend_row` (scores in groups of eight from the
/// run's start, softmax, values added in order into the same accumulators). With `pairs` (the CPU
/// has AVX-512F) consecutive rows go two to a register (`attend_pairs`), with the same bits.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_rows<E: KvElem>(
    q: &[f32],
    keys: super::attention::PagedRows<E>,
    values: super::attention::PagedRows<E>,
    rows: &[super::attention::QueryRow],
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    pairs: bool,
) {
    // Per row: its keys' scores, its own key's, and its 1 / Σ (the last slot).
    let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
    let stride = longest + 2;
    // After the scores, room for a block of eight key or value rows converted to f32 once (an
    // f16 cache), which every row of the item then reads.
    let converted = if E::as_f32(&[]).is_some() { 0 } else { 8 * d };
    scores.clear();
    scores.resize(rows.len() * stride + converted, 0.0);
    let (scores, buf) = scores.split_at_mut(rows.len() * stride);
    // Keys and values asked for ahead of use: the first `ahead` positions of both now (the
    // values' then arrive during the scores and softmax), the rest as the loops go.
    let ahead = super::attention::ATTENTION_PREFETCH_AHEAD;
    for p0 in (0..longest.min(ahead)).step_by(8) {
        keys.prefetch(p0, 8);
        values.prefetch(p0, 8);
    }
    // Keys p0.. of row r, or none left (0).
    let left = |r: usize, p0: usize| rows[r].len.saturating_sub(p0).min(8);
    for p0 in (0..longest).step_by(8) {
        if p0 + ahead < longest {
            keys.prefetch(p0 + ahead, 8);
        }
        let block = keys.rows_f32(p0, (longest - p0).min(8), buf);
        let mut r = 0;
        while r < rows.len() {
            let (n, row) = (left(r, p0), &rows[r]);
            let s = scores[r * stride + p0..].as_mut_ptr();
            if pairs && n > 0 && r + 1 < rows.len() && left(r + 1, p0) > 0 {
                let (m, next) = (left(r + 1, p0), &rows[r + 1]);
                let t = scores[(r + 1) * stride + p0..].as_mut_ptr();
                super::attend_pairs::scores(
                    &q[row.at..row.at + d],
                    &q[next.at..next.at + d],
                    &block[..n.max(m) * d],
                    scale,
                    std::slice::from_raw_parts_mut(s, n),
                    std::slice::from_raw_parts_mut(t, m),
                );
                r += 2;
                continue;
            }
            if n > 0 {
                let s = std::slice::from_raw_parts_mut(s, n);
                super::avx2::scores(&q[row.at..row.at + d], &block[..n * d], scale, s);
            }
            r += 1;
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let n = row.len + row.own.is_some() as usize;
        if let Some(p) = row.own {
            let s = &mut scores[r * stride + row.len..r * stride + n];
            super::avx2::scores(&q[row.at..row.at + d], keys.rows(p, 1), scale, s);
        }
        // The row's 1 / Σ goes in its last slot (a slot no key uses).
        scores[r * stride + stride - 1] = softmax_in_place(&mut scores[r * stride..r * stride + n]);
    }
    let weights = |r: usize, p0: usize, n: usize| {
        (&scores[r * stride + p0..r * stride + p0 + n], scores[r * stride + stride - 1])
    };
    for p0 in (0..longest).step_by(8) {
        if p0 + ahead < longest {
            values.prefetch(p0 + ahead, 8);
        }
        let block = values.rows_f32(p0, (longest - p0).min(8), buf);
        let mut r = 0;
        while r < rows.len() {
            let (n, at) = (left(r, p0), rows[r].at);
            let o = out[at..at + d].as_mut_ptr();
            if pairs && n > 0 && r + 1 < rows.len() && left(r + 1, p0) > 0 {
                // Positions both rows see, in one register; then the longer row's rest alone.
                let (m, next) = (left(r + 1, p0), rows[r + 1].at);
                let o2 = out[next..next + d].as_mut_ptr();
                let both = n.min(m);
                let ((wa, ia), (wb, ib)) = (weights(r, p0, both), weights(r + 1, p0, both));
                let (oa, ob) = (std::slice::from_raw_parts_mut(o, d), std::slice::from_raw_parts_mut(o2, d));
                super::attend_pairs::add_values(wa, ia, wb, ib, block.as_ptr(), p0 == 0, oa, ob);
                for (row, k, o) in [(r, n, oa), (r + 1, m, ob)] {
                    if k > both {
                        let (w, inv) = weights(row, p0, k);
                        add_values(&w[both..], inv, block[both * d..].as_ptr(), false, o);
                    }
                }
                r += 2;
                continue;
            }
            if n > 0 {
                let (w, inv) = weights(r, p0, n);
                add_values(w, inv, block.as_ptr(), p0 == 0, std::slice::from_raw_parts_mut(o, d));
            }
            r += 1;
        }
    }
    for (r, row) in rows.iter().enumerate() {
        if let Some(p) = row.own {
            let w = &scores[r * stride + row.len..r * stride + row.len + 1];
            let inv = scores[r * stride + stride - 1];
            add_values(w, inv, values.rows(p, 1).as_ptr(), row.len == 0, &mut out[row.at..row.at + d]);
        }
    }
}

/// o += Σ_p w[p]·inv·values[p] for consecutive value rows (o starts at zero when `first`):
/// each lane adds the rows in order into one accumulator, 64 lanes held in registers.
#[inline(always)]
unsafe fn add_values<E: KvElem>(w: &[f32], inv: f32, values: *const E, first: bool, o: &mut [f32]) {
    let d = o.len();
    let mut c0 = 0;
    while c0 + 64 <= d {
        add_lanes::<E, 8>(w, inv, values, d, c0, first, o);
        c0 += 64;
    }
    while c0 < d {
        add_lanes::<E, 1>(w, inv, values, d, c0, first, o);
        c0 += 8;
    }
}

#[inline(always)]
unsafe fn add_lanes<E: KvElem, const N: usize>(
    w: &[f32],
    inv: f32,
    values: *const E,
    d: usize,
    c0: usize,
    first: bool,
    o: &mut [f32],
) {
    let op = o.as_mut_ptr().add(c0);
    let mut acc = [_mm256_setzero_ps(); N];
    if !first {
        for (n, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(op.add(n * 8));
        }
    }
    for (p, &wp) in w.iter().enumerate() {
        let wv = _mm256_set1_ps(wp * inv);
        let row = values.add(p * d + c0);
        for n in 0..N {
            acc[n] = _mm256_fmadd_ps(wv, E::load8(row.add(n * 8)), acc[n]);
        }
    }
    for n in 0..N {
        _mm256_storeu_ps(op.add(n * 8), acc[n]);
    }
}

/// The largest of x, NaN skipped (exact: max gives the same value in any order).
#[inline(always)]
unsafe fn row_max(x: &[f32]) -> f32 {
    let n8 = x.len() / 8 * 8;
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in (0..n8).step_by(8) {
        // max(v, m) returns m where v is NaN: NaN never enters.
        mv = _mm256_max_ps(_mm256_loadu_ps(x.as_ptr().add(c)), mv);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
    lanes.iter().chain(&x[n8..]).fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m })
}

/// exp(x - max) of the last `x.len() % 8` values through the same polynomial as the rest (so a
/// value's weight does not depend on where the row ends), in lanes 0.., padded lanes zero.
#[inline(always)]
unsafe fn tail_exp(x: &[f32], max: f32) -> __m256 {
    let n8 = x.len() / 8 * 8;
    let mut tail = [max; 8];
    tail[..x.len() - n8].copy_from_slice(&x[n8..]);
    let keep = _mm256_cmp_ps::<_CMP_LT_OQ>(
        _mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.),
        _mm256_set1_ps((x.len() - n8) as f32),
    );
    _mm256_and_ps(exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), _mm256_set1_ps(max))), keep)
}

/// The index of the largest value, the lowest where several are equal; NaN never wins (and a
/// NaN first value stands, as a scalar scan that starts from it would leave it).
#[target_feature(enable = "avx2")]
pub unsafe fn argmax(x: &[f32]) -> u32 {
    if x.is_empty() || x[0].is_nan() {
        return 0;
    }
    let n8 = x.len() / 8 * 8;
    let max = row_max(x);
    let target = _mm256_set1_ps(max);
    for c in (0..n8).step_by(8) {
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(x.as_ptr().add(c)), target));
        if hit != 0 {
            return (c + hit.trailing_zeros() as usize) as u32;
        }
    }
    (n8 + x[n8..].iter().position(|&v| v == max).unwrap_or(0)) as u32
}

/// Replaces scores by exp(score - max) and returns 1 / their sum; eight lanes at a time.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_in_place(scores: &mut [f32]) -> f32 {
    let n = scores.len();
    let n8 = n / 8 * 8;
    let max = row_max(scores);
    let (sp, mv) = (scores.as_mut_ptr(), _mm256_set1_ps(max));
    let mut sum = _mm256_setzero_ps();
    for c in (0..n8).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(sp.add(c)), mv));
        _mm256_storeu_ps(sp.add(c), e);
        sum = _mm256_add_ps(sum, e);
    }
    if n8 < n {
        let e = tail_exp(scores, max);
        let mut tail = [0f32; 8];
        _mm256_storeu_ps(tail.as_mut_ptr(), e);
        scores[n8..].copy_from_slice(&tail[..n - n8]);
        sum = _mm256_add_ps(sum, e);
    }
    1.0 / hsum(sum)
}

/// log Σ exp(x): the maximum, then exp(x - max) through the polynomial below, eight lanes at a
/// time, widened and summed in f64 lanes (a vocabulary of 150k terms in f32 lanes would lose
/// ~1e-4 of the sum).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn log_sum_exp(x: &[f32]) -> f32 {
    let n8 = x.len() / 8 * 8;
    let max = row_max(x);
    if !max.is_finite() {
        return max; // empty, all -inf, or +inf somewhere: no finite normaliser
    }
    let mv = _mm256_set1_ps(max);
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let mut add = |e: __m256| {
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
    };
    for c in (0..n8).step_by(8) {
        add(exp(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(c)), mv)));
    }
    if n8 < x.len() {
        add(tail_exp(x, max));
    }
    let mut sums = [0f64; 4];
    _mm256_storeu_pd(sums.as_mut_ptr(), _mm256_add_pd(lo, hi));
    max + ((sums[0] + sums[1]) + (sums[2] + sums[3])).ln() as f32
}

/// out += scale · exp(z - shift), eight lanes at a time; the tail through the same lanes on a
/// padded copy. z - shift must be at most 0 (the polynomial's range).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_scaled_exp(z: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let n = z.len();
    let n8 = n / 8 * 8;
    let (sv, kv) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    let (zp, op) = (z.as_ptr(), out.as_mut_ptr());
    for c in (0..n8).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(zp.add(c)), sv));
        _mm256_storeu_ps(op.add(c), _mm256_fmadd_ps(kv, e, _mm256_loadu_ps(op.add(c))));
    }
    if n8 < n {
        let mut tail = [shift; 8];
        tail[..n - n8].copy_from_slice(&z[n8..]);
        let mut e = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), sv)));
        for (o, &v) in out[n8..].iter_mut().zip(&e) {
            *o += scale * v;
        }
    }
}

/// `add_scaled_exp` into z itself, from zeros (fma(scale, e, 0) is the one rounding of scale·e).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scale_exp_in_place(z: &mut [f32], shift: f32, scale: f32) {
    let n8 = z.len() / 8 * 8;
    let (sv, kv) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    let zp = z.as_mut_ptr();
    for c in (0..n8).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(zp.add(c)), sv));
        _mm256_storeu_ps(zp.add(c), _mm256_mul_ps(kv, e));
    }
    if n8 < z.len() {
        let mut tail = [shift; 8];
        tail[..z.len() - n8].copy_from_slice(&z[n8..]);
        let mut e = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), _mm256_mul_ps(kv, exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), sv))));
        let len = z.len() - n8;
        z[n8..].copy_from_slice(&e[..len]);
    }
}

/// out = silu(gate) * up, eight values at a time (a libm call per value was 4% of a k = 8
/// verification step): sigmoid from e^-|g|, which the polynomial below covers, so large
/// gates of either sign neither overflow nor lose precision. A row's tail runs the same
/// lanes on a padded copy, so every value is computed alike.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = gu.split_at(inter);
        let mut c = 0;
        while c + 8 <= inter {
            let r = silu_mul8(_mm256_loadu_ps(g.as_ptr().add(c)), _mm256_loadu_ps(u.as_ptr().add(c)));
            _mm256_storeu_ps(o.as_mut_ptr().add(c), r);
            c += 8;
        }
        if c < inter {
            let (mut gt, mut ut) = ([0f32; 8], [0f32; 8]);
            gt[..inter - c].copy_from_slice(&g[c..]);
            ut[..inter - c].copy_from_slice(&u[c..]);
            let mut r = [0f32; 8];
            _mm256_storeu_ps(r.as_mut_ptr(), silu_mul8(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr())));
            o[c..].copy_from_slice(&r[..inter - c]);
        }
    }
}

/// g · sigmoid(g) · u.
#[inline(always)]
unsafe fn silu_mul8(g: __m256, u: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), u)
}

/// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = e^-|g|.
#[inline(always)]
unsafe fn sigmoid8(g: __m256) -> __m256 {
    let neg_abs = _mm256_or_ps(g, _mm256_set1_ps(-0.0));
    let e = exp(neg_abs);
    let inv = _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_set1_ps(1.0), e));
    let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(g, _mm256_setzero_ps());
    _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), negative)
}

/// The gradient of silu(gate) * up, eight values at a time (libm's expf per value was ~2% of a
/// full training pass): rows of out are [d_gate | d_up] for rows of gate_up and of dy (the
/// output's gradient), d_gate = dy · up · s · (1 + gate · (1 − s)), d_up = dy · gate · s with
/// s = sigmoid(gate), the forward's sigmoid. Tails as in `silu_mul`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_mul_bwd(gate_up: &[f32], dy: &[f32], inter: usize, out: &mut [f32]) {
    let rows = gate_up.chunks_exact(2 * inter).zip(dy.chunks_exact(inter)).zip(out.chunks_exact_mut(2 * inter));
    for ((gu, dy), o) in rows {
        let (g, u) = gu.split_at(inter);
        let (d_gate, d_up) = o.split_at_mut(inter);
        let mut c = 0;
        while c + 8 <= inter {
            let at = |v: &[f32]| _mm256_loadu_ps(v.as_ptr().add(c));
            let (dg, du) = silu_mul_bwd8(at(g), at(u), at(dy));
            _mm256_storeu_ps(d_gate.as_mut_ptr().add(c), dg);
            _mm256_storeu_ps(d_up.as_mut_ptr().add(c), du);
            c += 8;
        }
        if c < inter {
            let padded = |v: &[f32]| {
                let mut t = [0f32; 8];
                t[..inter - c].copy_from_slice(&v[c..]);
                t
            };
            let (gt, ut, yt) = (padded(g), padded(u), padded(dy));
            let (dg, du) =
                silu_mul_bwd8(_mm256_loadu_ps(gt.as_ptr()), _mm256_loadu_ps(ut.as_ptr()), _mm256_loadu_ps(yt.as_ptr()));
            let (mut dgt, mut dut) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(dgt.as_mut_ptr(), dg);
            _mm256_storeu_ps(dut.as_mut_ptr(), du);
            d_gate[c..].copy_from_slice(&dgt[..inter - c]);
            d_up[c..].copy_from_slice(&dut[..inter - c]);
        }
    }
}

/// (d_gate, d_up) of eight values.
#[inline(always)]
unsafe fn silu_mul_bwd8(g: __m256, u: __m256, dy: __m256) -> (__m256, __m256) {
    let one = _mm256_set1_ps(1.0);
    let s = sigmoid8(g);
    let dys = _mm256_mul_ps(dy, s);
    let d_gate = _mm256_mul_ps(_mm256_mul_ps(dys, u), _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
    (d_gate, _mm256_mul_ps(dys, g))
}

/// e^x for x <= 0 to within a few ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
/// parts so n ln2 is exact), e^r as 1 + r + r^2 P(r) with Cephes' expf coefficients for P,
/// and 2^n built in the exponent bits. Inputs below -87 give 0.
#[inline(always)]
unsafe fn exp(x: __m256) -> __m256 {
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let scale =
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_andnot_ps(tiny, _mm256_mul_ps(p, scale))
}
