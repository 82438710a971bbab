//! A low-rank adapter's delta, scale·(x·aᵀ)·bᵀ, as one op for serving and training alike.
//!
//! The rank is small (8-64), so the second product has an inner dimension of r: through the
//! streaming kernel every output value paid a horizontal sum for two or four multiply-adds, and
//! adapters on every projection and the head took over a third of a LoRA training step. Here
//! u = x·aᵀ goes through the streaming kernel's tiles (r weight rows), and each output value is r
//! multiply-adds in order p = 0..r over bᵀ's rows, vectorised across outputs: the same operations
//! for a value whatever the number of rows, so a served token and a trained one get the same bits.
use super::{f32_slice, gemm, kernels, CResult, OpsPath};
use crate::linear::{Linear, LoraPart};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

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

/// u = x·aᵀ: [m, r], by the streaming kernel's tiles (each value the same for a row in any batch).
fn down(x: &[f32], a: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    kernels::matmul_xwt(x, a, m, k, r)
}

/// scale·(x·aᵀ)·bᵀ on host values: x [m, k], a [r, k], b [n, r] -> [m, n].
#[allow(clippy::too_many_arguments)]
fn delta(x: &[f32], a: &[f32], b: &[f32], m: usize, k: usize, r: usize, n: usize, scale: f32) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    add_delta(x, (a, b), (m, k, r), scale, Columns { y: &mut y, stride: n, first: 0, width: n });
    y
}

/// The columns of a row-major output an adapter adds to: columns first..first+width of rows
/// `stride` wide.
struct Columns<'a> {
    y: &'a mut [f32],
    stride: usize,
    first: usize,
    width: usize,
}

/// Adds scale·(x·aᵀ)·bᵀ to the columns of y, in place (x [m, k], a [r, k], b [width, r]): no
/// [m, width] delta is allocated, zeroed and summed in a second pass. Each value is y + scale·Σ,
/// the same two roundings as adding a separately computed delta.
fn add_delta(x: &[f32], (a, b): (&[f32], &[f32]), (m, k, r): (usize, usize, usize), scale: f32, out: Columns) {
    let n = out.width;
    assert!(out.y.len() >= m * out.stride && out.first + n <= out.stride, "adapter columns outside the output");
    let u = down(x, a, m, k, r);
    let mut bt = vec![0f32; r * n];
    super::transpose_into(b, (n, r), &mut bt);
    let out = kernels::Out { y: kernels::SharedMut(out.y.as_mut_ptr()), stride: out.stride, first: out.first };
    // SAFETY: y holds m rows of `stride` values with the adapter's columns in each (asserted above).
    unsafe { kernels::add_xw((&u, r), &bt, (m, r, n), scale, out) };
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
        let y = delta(x, a, b, m, k, r, n, self.scale as f32);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// The adapter's gradients (`adapter_grads`) from the output's gradient g.
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
        let want_dx = x.track_op();
        let [x, a, b, g] = [x, a, b, g].map(|t| t.detach().contiguous());
        let (x, a, b, g) = (x?, a?, b?, g?);
        let guards = [&x, &a, &b, &g].map(|t| t.storage_and_layout());
        let [xs, as_, bs, gs] = [&guards[0], &guards[1], &guards[2], &guards[3]].map(super::host);
        let (xs, as_, bs, gs) = (xs?, as_?, bs?, gs?);
        let mut dx = vec![0f32; if want_dx { m * k } else { 0 }];
        let dx_wanted = want_dx.then_some(&mut dx[..]);
        let (da, db) = adapter_grads(xs, gs, (as_, bs), (m, k, r), &[n], self.scale as f32, dx_wanted);
        let device = x.device();
        Ok((
            want_dx.then(|| Tensor::from_vec(dx, (m, k), device)).transpose()?,
            Some(Tensor::from_vec(da, (r, k), device)?),
            Some(Tensor::from_vec(db, (n, r), device)?),
        ))
    }
}

/// A projection with a frozen base and adapters on its parts (q, k and v share one product) as
/// one op: y = base(x) + [deltaᵢ(x)]ᵢ, each delta added into the base's output in place. Autograd
/// over the base product, each delta, their concatenation and the sum kept and summed a [tokens,
/// width] gradient per node; here one node holds x alone, and serving makes no [tokens, width]
/// copies. Each value is base + delta with the same roundings however many rows run together.
pub fn adapted(x: &Tensor, base: &Linear, parts: &[LoraPart], scale: f64) -> CResult<Tensor> {
    let rank = parts[0].a.dim(0)?;
    let tracked = x.track_op() || parts.iter().any(|p| p.a.track_op() || p.b.track_op());
    if !tracked {
        return served(x, base, parts, scale);
    }
    let a = Tensor::cat(&parts.iter().map(|p| &p.a).collect::<Vec<_>>(), 0)?.contiguous()?;
    let b = Tensor::cat(&parts.iter().map(|p| &p.b).collect::<Vec<_>>(), 0)?.contiguous()?;
    let outs = parts.iter().map(|p| p.b.dim(0)).collect::<CResult<Vec<_>>>()?;
    x.contiguous()?.apply_op3(&a, &b, Adapted { base: base.detached(), scale, rank, outs })
}

/// `adapted` where nothing is differentiated (serving): each adapter's tensors read where they
/// lie, no stacked copies of a and b (a decode step would copy every adapter's weights).
fn served(x: &Tensor, base: &Linear, parts: &[LoraPart], scale: f64) -> CResult<Tensor> {
    let (m, k) = x.dims2()?;
    let x = x.contiguous()?;
    let xg = x.storage_and_layout();
    let y = served_rows(super::host(&xg)?, (m, k), base, parts, scale)?;
    Tensor::from_vec(y, (m, base.out_features()), x.device())
}

/// `served` on host rows x [m, k], into a new [m, n] vector (the fused head's logits, which it
/// then turns into their gradients in place).
pub(crate) fn served_rows(
    x: &[f32],
    (m, k): (usize, usize),
    base: &Linear,
    parts: &[LoraPart],
    scale: f64,
) -> CResult<Vec<f32>> {
    let rank = parts[0].a.dim(0)?;
    let tensors = parts.iter().flat_map(|p| [&p.a, &p.b]).map(|t| t.contiguous()).collect::<CResult<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards.iter().map(super::host).collect::<CResult<Vec<_>>>()?;
    let adapters: Vec<(&[f32], &[f32])> = values.chunks_exact(2).map(|ab| (ab[0], ab[1])).collect();
    adapted_rows(base, x, (m, k, rank), &adapters, scale as f32)
}

struct Adapted {
    base: Linear,
    scale: f64,
    rank: usize,
    /// Each part's output width, in order.
    outs: Vec<usize>,
}

/// Adapters' gradients from g [m, n], each adapter's columns in turn (widths `outs`), with every
/// adapter's rank-r product stacked into one: u = x·aᵀ and du = [s·g_i·b_i]ᵢ are [m, parts·r],
/// so dx += du·a (when x's gradient is wanted) and da = duᵀ·x are one product each with an inner
/// or outer size of parts·r (products r wide run at a third of gemm's rate); db_i = s·g_iᵀ·u_i
/// per adapter (computed transposed). a is the adapters' [parts·r, k] stacked, b their [n, r]. Returns (da, db).
fn adapter_grads(
    x: &[f32],
    g: &[f32],
    (a, b): (&[f32], &[f32]),
    (m, k, r): (usize, usize, usize),
    outs: &[usize],
    s: f32,
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (n, pr) = (outs.iter().sum::<usize>(), outs.len() * r);
    let u = super::gemm_new(m, pr, k, 1.0, (x, k, 1), (a, 1, k));
    let (mut du, mut part) = (vec![0f32; m * pr], vec![0f32; m * r]);
    let mut db = vec![0f32; n * r];
    let mut first = 0;
    for (i, &width) in outs.iter().enumerate() {
        let (b_i, db_i) = (&b[first * r..(first + width) * r], &mut db[first * r..(first + width) * r]);
        gemm(m, r, width, &mut part, false, s, (&g[first..], n, 1), (b_i, r, 1));
        du.chunks_exact_mut(pr).zip(part.chunks_exact(r)).for_each(|(d, p)| d[i * r..(i + 1) * r].copy_from_slice(p));
        // db_iᵀ = s·u_iᵀ·g_i, [r, width], then transposed: gemm packs g_i's rows as they lie
        // (as g_iᵀ's columns it packed them element by element on the calling thread) and runs
        // its tiles along the width. 0.13 -> 0.09-0.10 s of a SmolLM2 LoRA pass.
        let db_t = super::gemm_new(r, width, m, s, (&u[i * r..], 1, pr), (&g[first..], n, 1));
        super::transpose_into(&db_t, (r, width), db_i);
        first += width;
    }
    if let Some(dx) = dx {
        gemm(m, k, pr, dx, true, 1.0, (&du, pr, 1), (a, k, 1));
    }
    let da = super::gemm_new(pr, k, m, 1.0, (&du, 1, pr), (x, k, 1));
    (da, db)
}

/// base(x) + [deltaᵢ(x)]ᵢ on host values: the base kernel's output, each adapter's (a [r, k],
/// b [width, r]) delta added into its columns in place.
fn adapted_rows(
    base: &Linear,
    x: &[f32],
    (m, k, r): (usize, usize, usize),
    adapters: &[(&[f32], &[f32])],
    scale: f32,
) -> CResult<Vec<f32>> {
    let mut y = super::linear_rows(base, x, m, k)?;
    let n = adapters.iter().map(|(_, b)| b.len() / r).sum::<usize>();
    let mut first = 0;
    for &(a, b) in adapters {
        let width = b.len() / r;
        add_delta(x, (a, b), (m, k, r), scale, Columns { y: &mut y, stride: n, first, width });
        first += width;
    }
    Ok(y)
}

impl CustomOp3 for Adapted {
    fn name(&self) -> &'static str {
        "tandem-adapted-linear"
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
        let (x, a, b) = (f32_slice(sx, lx)?, f32_slice(sa, la)?, f32_slice(sb, lb)?);
        let (r, n) = (self.rank, self.outs.iter().sum::<usize>());
        let mut adapters = Vec::with_capacity(self.outs.len());
        let mut first = 0;
        for (i, &width) in self.outs.iter().enumerate() {
            adapters.push((&a[i * r * k..(i + 1) * r * k], &b[first * r..(first + width) * r]));
            first += width;
        }
        let y = adapted_rows(&self.base, x, (m, k, r), &adapters, self.scale as f32)?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// dx = g·W plus the adapters' gradients (`adapter_grads`).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The first layer's input is the frozen embedding's: no gradient to compute there.
        let (dx, da, db) = self.grads(x, a, b, g, x.track_op())?;
        Ok((dx, Some(da), Some(db)))
    }
}

impl Adapted {
    /// The gradients of x (when wanted), of the stacked a [parts·r, k] and of b [n, r].
    fn grads(&self, x: &Tensor, a: &Tensor, b: &Tensor, g: &Tensor, want_dx: bool) -> CResult<Grads> {
        let ((m, k), r, n) = (x.dims2()?, self.rank, self.outs.iter().sum::<usize>());
        let (x, g) = (x.detach().contiguous()?, g.detach().contiguous()?);
        let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
        let guards = [&x, &g, &a, &b].map(|t| t.storage_and_layout());
        let [xs, gs, as_, bs] = [&guards[0], &guards[1], &guards[2], &guards[3]].map(super::host);
        let (xs, gs, as_, bs) = (xs?, gs?, as_?, bs?);
        let mut dx = Vec::new();
        if want_dx {
            let w = self.base.dense_f32()?.0.contiguous()?;
            let guard = w.storage_and_layout();
            dx = super::gemm_new(m, k, n, 1.0, (gs, n, 1), (super::host(&guard)?, k, 1));
        }
        let dx_wanted = want_dx.then_some(&mut dx[..]);
        let (da, db) = adapter_grads(xs, gs, (as_, bs), (m, k, r), &self.outs, self.scale as f32, dx_wanted);
        let device = x.device();
        Ok((
            want_dx.then(|| Tensor::from_vec(dx, (m, k), device)).transpose()?,
            Tensor::from_vec(da, (self.outs.len() * r, k), device)?,
            Tensor::from_vec(db, (n, r), device)?,
        ))
    }
}

/// An adapted projection's gradients: x's (when wanted), the stacked a's and b's.
type Grads = (Option<Tensor>, Tensor, Tensor);

/// One adapter's (da, db).
type PartGrads = (Tensor, Tensor);

/// The gradients of `adapted(x, base, parts, scale)` for its output's gradient g: x's when
/// `want_dx`, and each part's (da, db) in order. The same values as the op's backward.
pub(crate) fn adapted_grads(
    x: &Tensor,
    base: &Linear,
    parts: &[LoraPart],
    scale: f64,
    g: &Tensor,
    want_dx: bool,
) -> CResult<(Option<Tensor>, Vec<PartGrads>)> {
    let rank = parts[0].a.dim(0)?;
    let a = Tensor::cat(&parts.iter().map(|p| p.a.detach()).collect::<Vec<_>>(), 0)?;
    let b = Tensor::cat(&parts.iter().map(|p| p.b.detach()).collect::<Vec<_>>(), 0)?;
    let outs = parts.iter().map(|p| p.b.dim(0)).collect::<CResult<Vec<_>>>()?;
    let op = Adapted { base: base.detached(), scale, rank, outs };
    let (dx, da, db) = op.grads(x, &a, &b, g, want_dx)?;
    let mut first = 0;
    let mut each = Vec::with_capacity(parts.len());
    for (i, &width) in op.outs.iter().enumerate() {
        each.push((da.narrow(0, i * rank, rank)?, db.narrow(0, first, width)?));
        first += width;
    }
    Ok((dx, each))
}
