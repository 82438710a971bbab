//! AVX-512's sixteen f32 lanes for the register code written over a vector width: the products of
//! an adapter's delta (`xw`) run in them. (The streaming matmul's AVX-512 form is `panels`.)
//!
//! Where a core has two 512-bit multiply-add units (Intel's server cores), 16 lanes double the
//! arithmetic per instruction over the AVX2 form; where 512-bit work is split in two (Zen 4) they
//! halve the instructions for the same work.
use super::tiles::Lanes;
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
}
