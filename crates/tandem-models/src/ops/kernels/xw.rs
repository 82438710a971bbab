//! y += scale·x·w with w row-major [k, n] as it lies: the product whose weight is not transposed
//! (a LoRA adapter's up-projection through bᵀ, the head's gradient of its inputs through the head
//! weight). gemm packs both operands for every call, which for the head's [64, 49k] x [49k, hidden]
//! blocks cost more than the arithmetic (113 GFLOP/s on a Xeon); here each weight row is
//! loaded into vector registers straight from where it lies and used for six rows of x.
//!
//! The sum over k goes in blocks of `K_BLOCK`: each block's sum is taken in order p = p0..p1 by
//! fused multiply-adds from zero, then scaled and added to y. The operations for a value do not
//! depend on the vector width, the number of rows beside it or the thread that runs it, so a
//! served token equals a trained one and results never depend on batch size.
#[cfg(target_arch = "x86_64")]
use super::tiles::Lanes;
use super::{team, SharedMut};

/// Columns of a work item: a row's sums for them stay in registers while w's rows stream past.
const COLUMNS: usize = 512;
/// Rows of x per work item: each tile of w is loaded once for this many rows.
const ROWS: usize = 6;
/// Terms of the sum per block: w's block rows stay in L2 for every item of a block.
const K_BLOCK: usize = 512;
/// Rows of w ahead that the vector kernels ask to be fetched.
const AHEAD: usize = 8;

/// An output of `add_xw`: y's rows `stride` apart, the product going to columns first..first+n.
pub(crate) struct Out {
    pub y: SharedMut,
    pub stride: usize,
    pub first: usize,
}

/// y[i, first + j] += scale · Σ_p x[i, p]·w[p, j] for x [m, k] (rows `x.1` apart) and w [k, n]
/// (row-major).
///
/// # Safety
/// `out.y` must hold m rows of `out.stride` values with columns first..first+n in each, written
/// by nothing else during the call.
pub(crate) unsafe fn add_xw(
    (x, x_stride): (&[f32], usize),
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    scale: f32,
    out: Out,
) {
    assert!(m == 0 || x.len() >= (m - 1) * x_stride + k, "add_xw: x is shorter than its rows");
    assert!(w.len() >= k * n && out.first + n <= out.stride, "add_xw: w or the output is too small");
    let (blocks, groups) = (n.div_ceil(COLUMNS), m.div_ceil(ROWS));
    for p0 in (0..k).step_by(K_BLOCK) {
        let p1 = (p0 + K_BLOCK).min(k);
        let y = &out.y;
        team::for_each(groups * blocks, &|item| {
            // The whole SharedMut, not its pointer field (which is not Sync).
            #[allow(clippy::redundant_locals)]
            let y = y;
            let (g, blk) = (item / blocks, item % blocks);
            let (i0, i1) = (g * ROWS, ((g + 1) * ROWS).min(m));
            let tile = Tile {
                x: &x[i0 * x_stride..],
                x_stride,
                rows: i1 - i0,
                p: (p0, p1),
                w,
                n,
                y: SharedMut(y.0.add(i0 * out.stride + out.first)),
                stride: out.stride,
            };
            let (j0, j1) = (blk * COLUMNS, ((blk + 1) * COLUMNS).min(n));
            // SAFETY: each item writes only its rows' columns j0..j1.
            block(&tile, j0, j1, scale);
        });
    }
}

/// A work item's rows of x (`x_stride` apart) over terms p.0..p.1, and its rows of y.
struct Tile<'a> {
    x: &'a [f32],
    x_stride: usize,
    rows: usize,
    p: (usize, usize),
    w: &'a [f32],
    n: usize,
    y: SharedMut,
    stride: usize,
}

impl Tile<'_> {
    /// Where row i's output column j lies (writable only in the item's rows and columns).
    fn at(&self, i: usize, j: usize) -> *mut f32 {
        self.y.0.wrapping_add(i * self.stride + j)
    }

    #[inline(always)]
    unsafe fn x_at(&self, i: usize, p: usize) -> f32 {
        *self.x.get_unchecked(i * self.x_stride + p)
    }
}

/// The tile's columns j0..j1: the vector kernels take as many whole column tiles as fit, the
/// rest go the portable way.
///
/// # Safety
/// The tile's rows' columns j0..j1 must lie within the output and be written by this item only.
unsafe fn block(t: &Tile, j0: usize, j1: usize, scale: f32) {
    let mut done = j0;
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($kernel:ident) => {
                match t.rows {
                    1 => $kernel::<1>(t, j0, j1, scale),
                    2 => $kernel::<2>(t, j0, j1, scale),
                    3 => $kernel::<3>(t, j0, j1, scale),
                    4 => $kernel::<4>(t, j0, j1, scale),
                    5 => $kernel::<5>(t, j0, j1, scale),
                    _ => $kernel::<ROWS>(t, j0, j1, scale),
                }
            };
        }
        if std::is_x86_feature_detected!("avx512f") {
            done = by_rows!(tiles_avx512);
        } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            done = by_rows!(tiles_avx2);
        }
    }
    for i in 0..t.rows {
        portable(t, i, done, j1, scale);
    }
}

/// Row i, columns j0..j1, one value at a time.
unsafe fn portable(t: &Tile, i: usize, j0: usize, j1: usize, scale: f32) {
    let mut sums = [0f32; COLUMNS];
    let sums = &mut sums[..j1 - j0];
    for p in t.p.0..t.p.1 {
        let xp = t.x_at(i, p);
        let row = &t.w[p * t.n + j0..p * t.n + j1];
        for (o, &w) in sums.iter_mut().zip(row) {
            *o = xp.mul_add(w, *o);
        }
    }
    for (o, s) in std::slice::from_raw_parts_mut(t.at(i, j0), j1 - j0).iter_mut().zip(sums.iter()) {
        *o += s * scale;
    }
}

/// Tiles of R rows x V vectors of columns (R·V accumulators in registers; V loads of w per R·V
/// multiply-adds), written once over the vector width; returns the first column not done.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tiles<L: Lanes, const R: usize, const V: usize>(t: &Tile, j0: usize, j1: usize, scale: f32) -> usize {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let width = L::N * V;
    let end = j0 + (j1 - j0) / width * width;
    let sv = L::splat(scale);
    for c0 in (j0..end).step_by(width) {
        let mut acc = [[L::zero(); V]; R];
        for p in t.p.0..t.p.1 {
            let row = t.w.as_ptr().add(p * t.n + c0);
            if p + AHEAD < t.p.1 {
                // w's rows are n apart: too far for the hardware to see a stream.
                let next = row.add(AHEAD * t.n).cast::<i8>();
                for line in 0..width.div_ceil(16) {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(64 * line));
                }
            }
            let mut w = [L::zero(); V];
            for (c, w) in w.iter_mut().enumerate() {
                *w = L::load(row.add(L::N * c));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = L::splat(t.x_at(i, p));
                for (a, &w) in acc.iter_mut().zip(&w) {
                    *a = L::fmadd(xv, w, *a);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let o = t.at(i, c0);
            for (c, a) in acc.iter().enumerate() {
                let o = o.add(L::N * c);
                L::store(o, L::add(L::load(o), L::mul(*a, sv)));
            }
        }
    }
    end
}

/// AVX-512: tiles of R rows x 64 columns (4R of the 32 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tiles_avx512<const R: usize>(t: &Tile, j0: usize, j1: usize, scale: f32) -> usize {
    tiles::<super::avx512::F32x16, R, 4>(t, j0, j1, scale)
}

/// AVX2: tiles of R rows x 16 columns (2R of the 16 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2<const R: usize>(t: &Tile, j0: usize, j1: usize, scale: f32) -> usize {
    tiles::<super::avx2::F32x8, R, 2>(t, j0, j1, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 sums, over shapes with partial row groups, column tails and several k blocks;
    /// and a row alone gets the bits it gets among others.
    #[test]
    fn add_xw_matches_f64_and_any_row_alone() {
        let (m, k, n) = (13, 1100, 150);
        let val =
            |i: usize, s: usize| ((i.wrapping_mul(2_654_435_761).wrapping_add(s) >> 7) % 2001) as f32 * 1e-3 - 1.0;
        let x: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
        let w: Vec<f32> = (0..k * n).map(|i| val(i, 2)).collect();
        let stride = n + 3;
        let mut y: Vec<f32> = (0..m * stride).map(|i| val(i, 3)).collect();
        let y0 = y.clone();
        unsafe { add_xw((&x, k), &w, (m, k, n), 0.5, Out { y: SharedMut(y.as_mut_ptr()), stride, first: 2 }) };
        for i in 0..m {
            for j in 0..stride {
                let want = if (2..2 + n).contains(&j) {
                    let s: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[p * n + j - 2] as f64).sum();
                    y0[i * stride + j] as f64 + 0.5 * s
                } else {
                    y0[i * stride + j] as f64
                };
                assert!((y[i * stride + j] as f64 - want).abs() < 1e-3, "y[{i}, {j}]");
            }
        }
        for i in [0, 7, m - 1] {
            let mut alone = y0[i * stride..(i + 1) * stride].to_vec();
            let out = Out { y: SharedMut(alone.as_mut_ptr()), stride, first: 2 };
            unsafe { add_xw((&x[i * k..(i + 1) * k], k), &w, (1, k, n), 0.5, out) };
            assert_eq!(alone, y[i * stride..(i + 1) * stride], "row {i}");
        }
    }

    /// Every vector form gives the portable form's bits (values do not depend on the machine's
    /// vector width).
    #[test]
    fn vector_tiles_give_the_portable_bits() {
        let (rows, k, n) = (ROWS, 300, 128);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 104_729 % 997) as f32 - 498.0) * 1e-3).collect();
        let run = |form: &dyn Fn(&Tile)| {
            let mut y = vec![0.25f32; rows * n];
            let tile = Tile { x: &x, x_stride: k, rows, p: (0, k), w: &w, n, y: SharedMut(y.as_mut_ptr()), stride: n };
            form(&tile);
            y
        };
        let portable = run(&|t| (0..rows).for_each(|i| unsafe { portable(t, i, 0, n, 0.5) }));
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                assert_eq!(run(&|t| assert_eq!(unsafe { tiles_avx2::<ROWS>(t, 0, n, 0.5) }, n)), portable, "avx2");
            }
            if std::is_x86_feature_detected!("avx512f") {
                assert_eq!(run(&|t| assert_eq!(unsafe { tiles_avx512::<ROWS>(t, 0, n, 0.5) }, n)), portable, "avx512");
            }
        }
    }
}
