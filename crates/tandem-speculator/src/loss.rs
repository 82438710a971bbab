//! The drafter's loss over one unrolled step's logits, fused.
//!
//! Both terms read the logits' softmax q = softmax(z) row by row:
//! - soft cross-entropy: ce = -Σ_r w_r Σ_j p_rj log q_rj, with p the target's distribution (a
//!   label row; rows without a label have w_r = 0) and w_r the row's weight;
//! - discard: the mean over rejected proposals (r, c) of -log(1 + ε - q_rc).
//!
//! Through candle's element-wise ops this was ~25 passes over a [rows, draft vocabulary] matrix
//! per unrolled step, each allocating it anew (a quarter of a trainer step). On the CPU it is one
//! pass forward (each row's log-sum-exp and p·z) and one backward (the gradient is a multiple of
//! q plus the label row plus a few sparse terms: -w_r p_rj + (w_r P_r - Σ_c u_c) q_rj + u_c at c,
//! where P_r = Σ_j p_rj and u_c = q_c / (1 + ε - q_c) / rejected). Other devices run the same
//! formula through candle's ops (`generic`, also the tests' reference).
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use tandem_models::ops::kernels;
use tandem_models::Result;

/// Keeps log(1 + ε - q) finite when the drafter is certain of a rejected token.
const EPS: f64 = 1e-6;

/// What one step's loss needs besides the logits and the labels.
#[derive(Debug, Clone, Default)]
pub struct LossTerms {
    /// The weight of each row's cross-entropy (0: not counted), already divided by their total.
    pub row_weights: Vec<f32>,
    /// (row, draft id) of proposals the target rejected at this step.
    pub rejected: Vec<(usize, usize)>,
}

/// [ce, discard] of `logits` [rows, vocabulary] against `labels` of the same shape; differentiable
/// in the logits.
pub fn step_loss(logits: &Tensor, labels: &Tensor, terms: LossTerms) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && labels.dtype() == DType::F32 {
        return Ok(logits.contiguous()?.apply_op2(&labels.contiguous()?, FusedLoss(terms))?);
    }
    generic(logits, labels, &terms)
}

/// The same two terms through candle's ops (any device).
pub fn generic(logits: &Tensor, labels: &Tensor, terms: &LossTerms) -> Result<Tensor> {
    let dev = logits.device();
    let (n, vd) = logits.dims2()?;
    let logq = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let w = Tensor::from_slice(&terms.row_weights, (n, 1), dev)?;
    let ce = (labels.broadcast_mul(&w)? * &logq)?.sum_all()?.neg()?;
    let discard = if terms.rejected.is_empty() {
        Tensor::zeros((), DType::F32, dev)?
    } else {
        let idx: Vec<u32> = terms.rejected.iter().map(|&(r, c)| (r * vd + c) as u32).collect();
        let count = idx.len();
        let lq = logq.flatten_all()?.index_select(&Tensor::from_vec(idx, count, dev)?, 0)?;
        let one_minus = lq.exp()?.affine(-1.0, 1.0 + EPS)?;
        (one_minus.log()?.neg()?.sum_all()? / count as f64)?
    };
    Ok(Tensor::stack(&[ce, discard], 0)?)
}

struct FusedLoss(LossTerms);

impl FusedLoss {
    /// The rejected proposals of each row.
    fn rejected_by_row(&self, rows: usize) -> Vec<Vec<usize>> {
        let mut by_row = vec![Vec::new(); rows];
        for &(r, c) in &self.0.rejected {
            by_row[r].push(c);
        }
        by_row
    }
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.shape().dims2()
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("the drafter's loss needs contiguous f32 tensors"),
    }
}

impl CustomOp2 for FusedLoss {
    fn name(&self) -> &'static str {
        "tandem-drafter-loss"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vd) = dims(zl)?;
        if dims(pl)? != (n, vd) || self.0.row_weights.len() != n {
            candle_core::bail!("the drafter's loss: logits, labels and row weights disagree");
        }
        let (z, p) = (slice(zs, zl)?, slice(ps, pl)?);
        let rejected = self.rejected_by_row(n);
        let (ce, discard) = (0..n)
            .into_par_iter()
            .map(|r| {
                let zr = &z[r * vd..(r + 1) * vd];
                let lse = kernels::log_sum_exp(zr);
                let w = self.0.row_weights[r];
                let mut ce = 0f64;
                if w != 0.0 {
                    let pr = &p[r * vd..(r + 1) * vd];
                    let mass: f64 = pr.iter().map(|&x| x as f64).sum();
                    ce = -(w as f64) * (kernels::dot(pr, zr) as f64 - mass * lse as f64);
                }
                let discard: f64 = rejected[r].iter().map(|&c| -(1.0 + EPS - ((zr[c] - lse) as f64).exp()).ln()).sum();
                (ce, discard)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let discard = discard / self.0.rejected.len().max(1) as f64;
        Ok((CpuStorage::F32(vec![ce as f32, discard as f32]), Shape::from(2)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, vd) = z.dims2()?;
        let device = z.device().clone();
        let g = g.to_vec1::<f32>()?;
        let (g_ce, g_discard) = (g[0], g[1] / self.0.rejected.len().max(1) as f32);
        let (z, p) = (z.flatten_all()?.to_vec1::<f32>()?, p.flatten_all()?.to_vec1::<f32>()?);
        let rejected = self.rejected_by_row(n);
        let mut grad = vec![0f32; n * vd];
        grad.par_chunks_mut(vd).enumerate().for_each(|(r, out)| {
            let (zr, pr) = (&z[r * vd..(r + 1) * vd], &p[r * vd..(r + 1) * vd]);
            let w = g_ce * self.0.row_weights[r];
            if w == 0.0 && rejected[r].is_empty() {
                return;
            }
            let lse = kernels::log_sum_exp(zr);
            let mut q_scale = 0f32;
            if w != 0.0 {
                let mut mass = 0f64;
                for (o, &x) in out.iter_mut().zip(pr) {
                    *o = -w * x;
                    mass += x as f64;
                }
                q_scale = w * mass as f32;
            }
            let sparse: Vec<(usize, f32)> = rejected[r]
                .iter()
                .map(|&c| {
                    let q = ((zr[c] - lse) as f64).exp();
                    (c, (g_discard as f64 * q / (1.0 + EPS - q)) as f32)
                })
                .collect();
            q_scale -= sparse.iter().map(|s| s.1).sum::<f32>();
            kernels::add_scaled_exp(zr, lse, q_scale, out);
            for (c, u) in sparse {
                out[c] += u;
            }
        });
        Ok((Some(Tensor::from_vec(grad, (n, vd), &device)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A batch's worth of logits, labels (some rows unlabelled, some truncated to a top-n) and
    /// rejected proposals.
    fn case(n: usize, vd: usize) -> (Tensor, Tensor, LossTerms) {
        let dev = Device::Cpu;
        let z: Vec<f32> =
            (0..n * vd).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2000) as f32 * 0.005 - 5.0).collect();
        let mut p = vec![0f32; n * vd];
        for r in 0..n {
            if r % 4 == 3 {
                continue; // no label
            }
            let top = if r % 2 == 0 { vd } else { 5 }; // a full distribution or a truncated top-5
            let raw: Vec<f32> = (0..top).map(|j| 1.0 / (1.0 + ((j * 7 + r * 3) % 11) as f32)).collect();
            let sum: f32 = raw.iter().sum();
            for (j, x) in raw.iter().enumerate() {
                p[r * vd + (j * 13 + r) % vd] += 0.9 * x / sum;
            }
        }
        let labelled = (0..n).filter(|r| r % 4 != 3).count() as f32;
        let row_weights = (0..n).map(|r| if r % 4 == 3 { 0.0 } else { (1.0 + (r % 3) as f32) / labelled }).collect();
        let rejected = vec![(0, 3), (1, vd - 1), (1, 2), (5, 0)];
        let zt = Tensor::from_vec(z, (n, vd), &dev).unwrap();
        let pt = Tensor::from_vec(p, (n, vd), &dev).unwrap();
        (zt, pt, LossTerms { row_weights, rejected })
    }

    #[test]
    fn fused_loss_and_gradient_match_candle_ops() {
        for &(n, vd) in &[(6usize, 13usize), (9, 1003), (8, 8192)] {
            let (z, p, terms) = case(n, vd);
            let weights = Tensor::new(&[0.8f32, 0.3], &Device::Cpu).unwrap();
            let run = |fused: bool| {
                let v = Var::from_tensor(&z).unwrap();
                let loss = if fused {
                    step_loss(v.as_tensor(), &p, terms.clone())
                } else {
                    generic(v.as_tensor(), &p, &terms)
                }
                .unwrap();
                let total = (&loss * &weights).unwrap().sum_all().unwrap();
                let grads = total.backward().unwrap();
                let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (loss.to_vec1::<f32>().unwrap(), g)
            };
            let (fused, reference) = (run(true), run(false));
            for (a, b) in fused.0.iter().zip(&reference.0) {
                assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{n}x{vd} loss: {:?} vs {:?}", fused.0, reference.0);
            }
            let scale = reference.1.iter().fold(0f32, |m, &x| m.max(x.abs()));
            for (j, (a, b)) in fused.1.iter().zip(&reference.1).enumerate() {
                assert!((a - b).abs() < 1e-5 * scale.max(1e-3), "{n}x{vd} gradient {j}: {a} vs {b}");
            }
        }
    }
}
