//! The backward's products, c = [c +] alpha·a·b over plain f32 slices, on the `gemm` crate's
//! single-threaded kernels, one part of c per thread.
use super::{kernels, team};

/// c[m, n] = [c +] alpha·a·b with a: [m, k] and b: [k, n] given as (values, row stride, column
/// stride): transposes are strides, never copies. The products of the backward are plain
/// matrices; the `gemm` crate's blocked kernels run them near the machine's peak.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    gemm_on(worth_threads(m, n, k), (m, n, k), c, accumulate, alpha, a, b)
}

/// Small products are not worth waking threads for.
fn worth_threads(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= 1 << 18
}

/// `gemm`, shared among the compute threads (the team when this thread leads it, else the rayon
/// pool) or (`parallel` false: inside work items that already are parallel) on the calling thread.
pub(crate) fn gemm_on(
    parallel: bool,
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    assert!(c.len() >= m * n, "gemm: output too small");
    // SAFETY: c holds m × n values.
    unsafe { gemm_into(parallel, (m, n, k), c.as_mut_ptr(), accumulate, alpha, a, b) }
}

/// A new [m, n] product alpha·a·b (as `gemm`), written without zeroing it first: a training
/// pass's gradients are products the allocator hands back recycled memory for, which zeroing
/// would write once more for nothing.
pub(crate) fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) -> Vec<f32> {
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: with k > 0 and accumulate false, gemm writes every one of the m × n outputs (it
    // never reads them) before the length is set.
    unsafe {
        gemm_into(worth_threads(m, n, k), (m, n, k), c.spare_capacity_mut().as_mut_ptr().cast(), false, alpha, a, b);
        c.set_len(m * n);
    }
    c
}

/// `gemm_on` into raw memory with room for m × n values (read only when accumulating).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    parallel: bool,
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    accumulate: bool,
    alpha: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    let end = |(v, rs, cs): (&[f32], usize, usize), rows: usize, cols: usize| {
        assert!(rows == 0 || cols == 0 || v.len() > (rows - 1) * rs + (cols - 1) * cs, "gemm: input too small");
    };
    end(a, m, k);
    end(b, k, n);
    if m == 0 || n == 0 {
        return;
    }
    let parts = if parallel { team::threads() } else { 1 };
    if parts > 1 {
        // One single-threaded product per thread, over its own rows of c (its columns when c is
        // wider than tall), on the team when this thread leads it. The gemm crate's own threading
        // splits inner loops with a barrier each on rayon's threads: on a 2-core Xeon it ran the
        // backward's shapes 2-30% slower, and a SmolLM2 full-training pass ~1.5x slower
        // (docs/performance.md, 2026-12-06).
        let c = kernels::SharedMut(c);
        let by_rows = m >= n;
        let len = if by_rows { m } else { n };
        let step = if by_rows { m.div_ceil(parts) } else { n.div_ceil(parts).next_multiple_of(16) };
        let part = |i: usize| {
            let (start, end) = ((i * step).min(len), ((i + 1) * step).min(len));
            if start == end {
                return;
            }
            // SAFETY: parts write disjoint rows (or columns) of c; each piece's operands are the
            // whole operand's rows or columns from `start`, inside the slices checked above.
            unsafe {
                if by_rows {
                    gemm_one(
                        (end - start, n, k),
                        { c }.0.add(start * n),
                        n,
                        accumulate,
                        alpha,
                        (&a.0[start * a.1..], a.1, a.2),
                        b,
                    );
                } else {
                    gemm_one(
                        (m, end - start, k),
                        { c }.0.add(start),
                        n,
                        accumulate,
                        alpha,
                        a,
                        (&b.0[start * b.2..], b.1, b.2),
                    );
                }
            }
        };
        return team::for_each(parts, &part);
    }
    // SAFETY: the asserts above keep every index the strides reach inside the slices; the
    // caller gives room for the m × n outputs.
    unsafe { gemm_one((m, n, k), c, n, accumulate, alpha, a, b) }
}

/// The gemm crate's product on the calling thread: c (row stride ldc) = [c +] alpha·a·b.
unsafe fn gemm_one(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    alpha: f32,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    /// The backward's products as the pool splits them (by rows, by columns when c is wider
    /// than tall, uneven last parts), deep (k = 1,100: several of the gemm crate's k blocks) and
    /// wide, plain and transposed operands, overwriting and accumulating: within f32 rounding of
    /// an f64 reference (k·ε times the sum of the terms' sizes, the standard bound for a sum of k).
    #[test]
    fn split_products_match_an_f64_reference() {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.5).collect()
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(m, n, k) in &[(301, 65, 40), (37, 530, 29), (64, 64, 64), (29, 70, 1100), (40, 600, 70)] {
            for transposed in 0..4 {
                for (accumulate, alpha) in [(false, 1.0f32), (true, -0.5)] {
                    let (av, bv) = (values(m * k, 1), values(k * n, 2));
                    let a = if transposed & 1 == 1 { (&av[..], 1, m) } else { (&av[..], k, 1) };
                    let b = if transposed & 2 == 2 { (&bv[..], 1, k) } else { (&bv[..], n, 1) };
                    let mut c = values(m * n, 3);
                    let start = c.clone();
                    pool.install(|| super::gemm(m, n, k, &mut c, accumulate, alpha, a, b));
                    for i in 0..m {
                        for j in 0..n {
                            let term = |p: usize| a.0[i * a.1 + p * a.2] as f64 * b.0[p * b.1 + j * b.2] as f64;
                            let dot: f64 = (0..k).map(term).sum();
                            let size: f64 = (0..k).map(|p| term(p).abs()).sum();
                            let want = if accumulate { start[i * n + j] as f64 } else { 0.0 } + alpha as f64 * dot;
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < k as f64 * f64::from(f32::EPSILON) * (1.0 + size),
                                "{m}x{n}x{k} transposed {transposed}: c[{i},{j}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
