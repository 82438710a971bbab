//! AVX-512's sixteen f32 lanes for the register tiles written over a vector width (`tiles`): the
//! products of an adapter's delta (`xw`) run here; the streaming matmul's own AVX-512 form is
//! `panels` (outer products, no lane sums to reduce).
//!
//! Where a core has two 512-bit multiply-add units (Intel's server cores), 16 lanes double the
//! arithmetic per instruction over the AVX2 form; where 512-bit work is split in two (Zen 4) they
//! halve the instructions for the same work. The sums run in a different order from the 8-lane
//! form, so values differ from an AVX2-only machine's in the last bits; on one machine every value
//! is computed by the same operations whatever the tile, so results never depend on batch size.
use super::tiles::Lanes;
use super::WeightElem;
use std::arch::x86_64::*;

/// AVX-512's sixteen f32 lanes.
pub struct F32x16;

impl Lanes for F32x16 {
    type V = __m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_weights<W: WeightElem>(p: *const W) -> __m512 {
        W::load16(p)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    /// Halves added down to one lane: lanes e and e + 8, then AVX2's sum of the eight left
    /// (e and e + 4, e and e + 2, the two left). `sum4` forms the same sums.
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        super::avx2::hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
    }
    /// The four reductions side by side: each step's shuffles move two or four vectors' halves
    /// at once (lanes of 128 bits are q0..q3).
    #[inline(always)]
    unsafe fn sum4([a, b, c, d]: [__m512; 4]) -> [f32; 4] {
        // [a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3], and for c, d.
        let ab = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
        let cd = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(c, d), _mm512_shuffle_f32x4::<0xEE>(c, d));
        // One 128-bit lane per vector: [a's four partial sums, b's, c's, d's].
        let s = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(ab, cd), _mm512_shuffle_f32x4::<0xDD>(ab, cd));
        // Within each lane: elements e and e + 2, then the two left.
        let s = _mm512_add_ps(s, _mm512_permute_ps::<0x4E>(s));
        let s = _mm512_add_ps(s, _mm512_permute_ps::<0xB1>(s));
        let first = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), s);
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(first));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tile's four-at-once reduction and the single one must agree to the bit, or a value
    /// would depend on which tile computed it.
    #[test]
    fn four_sums_at_once_are_each_sum() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let lanes: Vec<f32> = (0..64).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 10f32.powi(i % 9 - 4)).collect();
        let load = |v: usize| unsafe { _mm512_loadu_ps(lanes[16 * v..].as_ptr()) };
        let four = unsafe { F32x16::sum4([load(0), load(1), load(2), load(3)]) };
        for (v, &s) in four.iter().enumerate() {
            assert_eq!(s.to_bits(), unsafe { F32x16::sum(load(v)) }.to_bits(), "vector {v}");
        }
    }
}
