//! Two query rows of one attention item in one AVX-512 register: row a in the low eight lanes,
//! row b in the high eight, each lane running exactly the operations of AVX2's eight-lane form
//! (`avx2::scores`, `avx2::add_values`), so every score and output bit equals AVX2's while the
//! multiply-adds halve. A wider register cannot change a row's summation order (the 16-lane
//! attention of 2026-12-04 did, and moved the quantized target's greedy text, docs/performance.md):
//! here the second half of the register is another row, never more terms of the same sum.
//!
//! Only AVX-512F instructions (64-bit-lane inserts and broadcasts stand in for DQ's 32-bit ones).
#![allow(clippy::needless_range_loop)] // fixed-size register arrays read best indexed
use super::attention::KvElem;
use std::arch::x86_64::*;

/// [lo | hi] from two eight-lane halves.
#[inline(always)]
unsafe fn join(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
}

/// Eight values at p, as f32, in both halves.
#[inline(always)]
unsafe fn both<E: KvElem>(p: *const E) -> __m512 {
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(E::load8(p))))
}

/// The high half.
#[inline(always)]
unsafe fn high(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// AVX2's `_mm256_hadd_ps` on each half: per 128-bit lane [x0 + x1, x2 + x3, y0 + y1, y2 + y3].
#[inline(always)]
unsafe fn hadd(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_ps::<0x88>(x, y), _mm512_shuffle_ps::<0xDD>(x, y))
}

/// `avx2::scores` for two rows over the same keys: sa[p] and sb[p] for the first sa.len() and
/// sb.len() keys (keys holds the longer run; the shorter row's extra lanes are dropped, as AVX2's
/// unused chains are). Per key and row: eight chains over the head dimension in steps of eight,
/// then AVX2's transposing reduction (`avx2::sum8`) and the scale.
///
/// # Safety
/// AVX-512F and FMA; qa, qb of one length d (a multiple of 8); keys holds max(len) rows of d.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn scores<E: KvElem>(qa: &[f32], qb: &[f32], keys: &[E], scale: f32, sa: &mut [f32], sb: &mut [f32]) {
    let d = qa.len();
    let n = sa.len().max(sb.len());
    debug_assert!(qb.len() == d && d.is_multiple_of(8) && (1..=8).contains(&n) && keys.len() >= n * d);
    let kp = keys.as_ptr();
    let rows: [*const E; 8] = std::array::from_fn(|j| kp.add(j.min(n - 1) * d));
    let mut acc = [_mm512_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let qv = join(_mm256_loadu_ps(qa.as_ptr().add(c)), _mm256_loadu_ps(qb.as_ptr().add(c)));
        for j in 0..8 {
            acc[j] = _mm512_fmadd_ps(qv, both(rows[j].add(c)), acc[j]);
        }
    }
    let g0 = hadd(hadd(acc[0], acc[1]), hadd(acc[2], acc[3]));
    let g1 = hadd(hadd(acc[4], acc[5]), hadd(acc[6], acc[7]));
    // AVX2 adds [g0.lo, g1.lo] to [g0.hi, g1.hi] (128-bit lanes); here for both halves at once:
    // [a 0-3, b 0-3, a 4-7, b 4-7], then scaled and put in row order.
    let s = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(g0, g1), _mm512_shuffle_f32x4::<0xDD>(g0, g1));
    let s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
    let s = _mm512_shuffle_f32x4::<0xD8>(s, s);
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), s);
    sa.copy_from_slice(&lanes[..sa.len()]);
    sb.copy_from_slice(&lanes[8..8 + sb.len()]);
}

/// `avx2::add_values` for two rows over the same value rows: o += Σ_p w[p]·inv·values[p] for
/// each (o starting at zero when `first`), every lane adding the rows in order into one
/// accumulator, as AVX2 does.
///
/// # Safety
/// AVX-512F and FMA; oa, ob of one length d (a multiple of 8); values holds wa.len() rows of d.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn add_values<E: KvElem>(
    wa: &[f32],
    inva: f32,
    wb: &[f32],
    invb: f32,
    values: *const E,
    first: bool,
    oa: &mut [f32],
    ob: &mut [f32],
) {
    let d = oa.len();
    debug_assert!(ob.len() == d && wa.len() == wb.len() && d.is_multiple_of(8));
    let mut c0 = 0;
    while c0 + 64 <= d {
        add_lanes::<E, 8>(wa, inva, wb, invb, values, d, c0, first, oa, ob);
        c0 += 64;
    }
    while c0 < d {
        add_lanes::<E, 1>(wa, inva, wb, invb, values, d, c0, first, oa, ob);
        c0 += 8;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn add_lanes<E: KvElem, const N: usize>(
    wa: &[f32],
    inva: f32,
    wb: &[f32],
    invb: f32,
    values: *const E,
    d: usize,
    c0: usize,
    first: bool,
    oa: &mut [f32],
    ob: &mut [f32],
) {
    let (pa, pb) = (oa.as_mut_ptr().add(c0), ob.as_mut_ptr().add(c0));
    // (Filled by a loop: an array built by a closure went through the stack on every call.)
    let mut acc = [_mm512_setzero_ps(); N];
    if !first {
        for n in 0..N {
            acc[n] = join(_mm256_loadu_ps(pa.add(n * 8)), _mm256_loadu_ps(pb.add(n * 8)));
        }
    }
    for p in 0..wa.len() {
        let w = join(_mm256_set1_ps(wa[p] * inva), _mm256_set1_ps(wb[p] * invb));
        let row = values.add(p * d + c0);
        for n in 0..N {
            acc[n] = _mm512_fmadd_ps(w, both(row.add(n * 8)), acc[n]);
        }
    }
    for n in 0..N {
        _mm256_storeu_ps(pa.add(n * 8), _mm512_castps512_ps256(acc[n]));
        _mm256_storeu_ps(pb.add(n * 8), high(acc[n]));
    }
}
