//! The streaming matmul's dot-product register tiles, written once over a vector width (`Lanes`,
//! which the adapter's products in `xw` share with AVX-512's 16 lanes): AVX2's form, as AVX-512
//! runs outer products instead (`panels`).
#![allow(clippy::needless_range_loop)] // fixed-size register tiles read best indexed
use super::{WeightElem, PREFETCH_LINES};

/// One vector of f32 lanes and the few operations a tile needs.
pub trait Lanes {
    type V: Copy;
    /// Lanes per vector.
    const N: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// a·b + c, rounded once.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Every lane x.
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
}

/// What the dot-product tiles need beyond `Lanes`: weights widened as they load, and the sum of a
/// vector's lanes.
pub trait DotLanes: Lanes {
    unsafe fn load_weights<W: WeightElem>(p: *const W) -> Self::V;
    /// The lanes' sum (always reduced in the same order).
    unsafe fn sum(v: Self::V) -> f32;
}

/// R weight rows against C input rows: R*C accumulators stay in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: WeightElem, L: DotLanes, const R: usize, const C: usize>(
    x: &[f32],
    w: &[W],
    k: usize,
    n: usize,
    j: usize,
    i: usize,
    y: *mut f32,
) {
    let mut acc = [[L::zero(); C]; R];
    let kv = k / L::N * L::N;
    let wp = w.as_ptr().add(j * k);
    let xp = x.as_ptr().add(i * k);
    let mut p = 0;
    while p < kv {
        let mut wv = [L::zero(); R];
        for r in 0..R {
            wv[r] = L::load_weights(wp.add(r * k + p));
        }
        if R == 4 {
            // The next tile's weight rows, a slice per step, so their loads from memory overlap
            // this tile's arithmetic: with several input rows the hardware prefetcher alone
            // falls behind. (wrapping_add: past the last row this only names an address.)
            let ahead = wp.wrapping_add(R * k + p * R) as *const i8;
            for line in 0..PREFETCH_LINES * L::N / 8 {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.wrapping_add(64 * line));
            }
        }
        for c in 0..C {
            let xv = L::load(xp.add(c * k + p));
            for r in 0..R {
                acc[r][c] = L::fmadd(wv[r], xv, acc[r][c]);
            }
        }
        p += L::N;
    }
    for c in 0..C {
        for r in 0..R {
            let mut s = L::sum(acc[r][c]);
            for q in kv..k {
                s += (*wp.add(r * k + q)).to_f32() * *xp.add(c * k + q);
            }
            *y.add((i + c) * n + j + r) = s;
        }
    }
}

/// Columns j0..j1 of y for every input row: tiles of 4 weight rows against C input rows, then
/// narrower tiles for the rest. Every tile computes a value by the same operations, so a value
/// does not depend on how many rows run together.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block<W: WeightElem, L: DotLanes, const C: usize>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    let mut j = j0;
    while j + 4 <= j1 {
        let mut i = 0;
        while C > 2 && i + C <= m {
            tile::<W, L, 4, C>(x, w, k, n, j, i, y);
            i += C;
        }
        while i + 2 <= m {
            tile::<W, L, 4, 2>(x, w, k, n, j, i, y);
            i += 2;
        }
        if i < m {
            tile::<W, L, 4, 1>(x, w, k, n, j, i, y);
        }
        j += 4;
    }
    while j < j1 {
        for i in 0..m {
            tile::<W, L, 1, 1>(x, w, k, n, j, i, y);
        }
        j += 1;
    }
}
