//! The AVX-512 form of the streaming matmul: 16-lane tiles in the 32 vector registers.
//!
//! Where a core has two 512-bit multiply-add units (Intel's server cores), 16 lanes double the
//! arithmetic per instruction over the AVX2 form (SmolLM2's f32 forward over 1,024 tokens
//! 570 -> 615-650 tok/s on a Xeon with AVX-512); where 512-bit work is split in two (Zen 4) they
//! halve the instructions for the same work. The sums run in a different order from the 8-lane
//! form, so values differ from an AVX2-only machine's in the last bits; on one machine every value
//! is computed by the same operations whatever the tile, so results never depend on batch size.
use super::tiles::{self, Lanes};
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
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

/// Columns j0..j1 of y: tiles of 4 weight rows x 6 input rows (24 accumulators of the 32
/// registers, 10 loads per 24 multiply-adds).
#[target_feature(enable = "avx512f,fma")]
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
    tiles::block::<W, F32x16, 6>(x, w, m, k, n, j0, j1, y)
}
