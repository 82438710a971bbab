//! A low-rank adapter's delta, scale·(x·aᵀ)·bᵀ, as one op for serving and training alike.
//!
//! The rank is small (8-64), so the second product has an inner dimension of r: through the
//! streaming kernel every output value paid a horizontal sum for two or four multiply-adds, and
//! adapters on every projection and the head took over a third of a LoRA training step. Here
//! u = x·aᵀ is a row of r dot products per token, and each output value is r multiply-adds in
//! order p = 0..r over bᵀ's rows, vectorised across outputs: the same operations for a value
//! whatever the number of rows, so a served token and a trained one get the same bits.
use super::{f32_slice, gemm, kernels, team, CResult, OpsPath};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Output values per work item (a row's values in blocks of this many stay in L1 while the r
/// rows of bᵀ stream past).
const BLOCK: usize = 512;

/// scale·(x·aᵀ)·bᵀ for x: [m, k], a: [r, k], b: [n, r] -> [m, n] (f32).
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, path: OpsPath) -> CResult<Tensor> {
    let tracked = [x, a, b].iter().any(|t| t.track_op());
    match path {
        OpsPath::CpuKernels if tracked => {
            x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, LoraDelta { scale })
        }
        OpsPath::CpuKernels => {
            x.contiguous()?.apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &LoraDelta { scale })
        }
        OpsPath::Generic => x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale,
    }
}

struct LoraDelta {
    scale: f64,
}

/// u = x·aᵀ: [m, r], one dot product per value (the same for a row in any batch).
fn down(x: &[f32], a: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    const ROWS: usize = 16;
    let mut u = vec![0f32; m * r];
    let out = kernels::SharedMut(u.as_mut_ptr());
    team::for_each(m.div_ceil(ROWS), &|c| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        for i in c * ROWS..((c + 1) * ROWS).min(m) {
            for p in 0..r {
                // SAFETY: each item writes only its own rows of u.
                unsafe { *out.0.add(i * r + p) = kernels::dot(&x[i * k..(i + 1) * k], &a[p * k..(p + 1) * k]) };
            }
        }
    });
    u
}

/// y[i, j0..j1] = scale · Σ_p u[i, p]·bt[p, j], the sum taken in order p = 0..r by fused
/// multiply-adds.
fn up_block(u: &[f32], bt: &[f32], n: usize, j0: usize, j1: usize, scale: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { up_block_fma(u, bt, n, j0, j1, scale, y) };
        }
    }
    up_block_portable(u, bt, n, j0, j1, scale, y)
}

#[inline(always)]
fn up_block_portable(u: &[f32], bt: &[f32], n: usize, j0: usize, j1: usize, scale: f32, y: &mut [f32]) {
    y.fill(0.0);
    for (p, &up) in u.iter().enumerate() {
        let row = &bt[p * n + j0..p * n + j1];
        for (o, &b) in y.iter_mut().zip(row) {
            *o = up.mul_add(b, *o);
        }
    }
    for o in y.iter_mut() {
        *o *= scale;
    }
}

/// The same operations compiled with FMA enabled (`mul_add` is one instruction there).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn up_block_fma(u: &[f32], bt: &[f32], n: usize, j0: usize, j1: usize, scale: f32, y: &mut [f32]) {
    up_block_portable(u, bt, n, j0, j1, scale, y)
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "tandem-lora-delta"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (r, ka) = la.shape().dims2()?;
        let (n, rb) = lb.shape().dims2()?;
        if k != ka || r != rb {
            candle_core::bail!("lora delta: x [{m}, {k}], a [{r}, {ka}], b [{n}, {rb}] do not chain");
        }
        let (x, a, b) = (f32_slice(sx, lx)?, f32_slice(sa, la)?, f32_slice(sb, lb)?);
        let u = down(x, a, m, k, r);
        let mut bt = vec![0f32; r * n];
        for (j, row) in b.chunks_exact(r).enumerate() {
            for (p, &v) in row.iter().enumerate() {
                bt[p * n + j] = v;
            }
        }
        let mut y = vec![0f32; m * n];
        let blocks = n.div_ceil(BLOCK);
        let out = kernels::SharedMut(y.as_mut_ptr());
        let scale = self.scale as f32;
        team::for_each(m * blocks, &|item| {
            #[allow(clippy::redundant_locals)]
            let out = out;
            let (i, blk) = (item / blocks, item % blocks);
            let (j0, j1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(n));
            // SAFETY: each item writes only its own row's columns j0..j1.
            let yr = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * n + j0), j1 - j0) };
            up_block(&u[i * r..(i + 1) * r], &bt, n, j0, j1, scale, yr);
        });
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// With s the scale and g the output's gradient: du = s·g·b, dx = du·a, da = duᵀ·x,
    /// db = s·gᵀ·u (u recomputed: r values per row).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale as f32;
        let [x, a, b, g] = [x, a, b, g].map(|t| t.detach().contiguous());
        let (x, a, b, g) = (x?, a?, b?, g?);
        let guards = [&x, &a, &b, &g].map(|t| t.storage_and_layout());
        let [xs, as_, bs, gs] = [&guards[0], &guards[1], &guards[2], &guards[3]].map(super::host);
        let (xs, as_, bs, gs) = (xs?, as_?, bs?, gs?);
        let mut du = vec![0f32; m * r];
        gemm(m, r, n, &mut du, false, s, (gs, n, 1), (bs, r, 1));
        let mut dx = vec![0f32; m * k];
        gemm(m, k, r, &mut dx, false, 1.0, (&du, r, 1), (as_, k, 1));
        let mut da = vec![0f32; r * k];
        gemm(r, k, m, &mut da, false, 1.0, (&du, 1, r), (xs, k, 1));
        let mut u = vec![0f32; m * r];
        gemm(m, r, k, &mut u, false, 1.0, (xs, k, 1), (as_, 1, k));
        let mut db = vec![0f32; n * r];
        gemm(n, r, m, &mut db, false, s, (gs, 1, n), (&u, r, 1));
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), device)?),
            Some(Tensor::from_vec(da, (r, k), device)?),
            Some(Tensor::from_vec(db, (n, r), device)?),
        ))
    }
}
