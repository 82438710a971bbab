//! Gradient accumulation and AdamW's update (decoupled weight decay, bias-corrected moments, the gradient-norm clip folded
//! in as a scale), one rule for every trainer in tandem: the policy's (`tandem-train`) and the
//! drafter's (`tandem-speculator`).
//!
//! On the CPU the parameter and both moments are updated in place, in three passes and no
//! allocation: written as tensor ops the update is ~14 passes over each parameter, each into a
//! fresh tensor (an optimizer step of SmolLM2's full weights took 0.93 s, a fifth of a
//! forward_backward over 1,024 tokens). Elsewhere the same formula runs as tensor ops.
use super::CResult;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

/// One step's constants.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The optimizer's step count, this step included (from 1): the bias corrections use it.
    pub t: i32,
    /// Every gradient is multiplied by this first (the global-norm clip; 1.0: none).
    pub scale: f64,
}

/// Elements per parallel work item (memory-bound passes: large items, few forks).
const CHUNK: usize = 1 << 16;

/// Updates `theta` from its gradient `g` and its moments `m`, `v` (zeros before the first step;
/// the same shape as `theta`), all in place on the CPU.
pub fn step(theta: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: &AdamStep) -> CResult<()> {
    let g = g.contiguous()?;
    let in_place = [theta.as_tensor(), &g, m, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous());
    if in_place {
        m.inplace_op2(&g, &Moment::new(s.beta1, s.scale, false))?;
        v.inplace_op2(&g, &Moment::new(s.beta2, s.scale, true))?;
        return theta.as_tensor().inplace_op3(m, v, &Param::new(s));
    }
    let g = (g * s.scale)?;
    *m = ((&*m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let (bc1, bc2) = (1.0 - s.beta1.powi(s.t), 1.0 - s.beta2.powi(s.t));
    let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + s.eps)?)?;
    let decayed = (theta.as_tensor() * (1.0 - s.lr * s.weight_decay))?;
    theta.set(&(decayed - (update * s.lr)?)?)
}

/// Σ g² of a gradient (for the global norm), read where it lies on the CPU.
pub fn sum_of_squares(g: &Tensor) -> CResult<f64> {
    let g = g.contiguous()?;
    if !g.device().is_cpu() || g.dtype() != candle_core::DType::F32 {
        return g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    let guard = g.storage_and_layout();
    let values = super::host(&guard)?;
    Ok(values.par_chunks(CHUNK).map(squares).sum())
}

/// Σ x² of a chunk in f64, in 16 independent sums: one running sum waits on each add (SmolLM2's
/// gradients took 0.20 s, as long as the update's three passes; now ~memory speed).
fn squares(chunk: &[f32]) -> f64 {
    let mut lanes = [0f64; 16];
    let mut blocks = chunk.chunks_exact(16);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane += (x as f64) * (x as f64);
        }
    }
    let rest: f64 = blocks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
    lanes.iter().sum::<f64>() + rest
}

/// m = β·m + (1 − β)·(scale·g), or of (scale·g)² for the second moment.
struct Moment {
    beta: f32,
    rest: f32,
    scale: f32,
    square: bool,
}

impl Moment {
    fn new(beta: f64, scale: f64, square: bool) -> Self {
        Moment { beta: beta as f32, rest: (1.0 - beta) as f32, scale: scale as f32, square }
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "tandem-adamw-moment"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout) -> CResult<()> {
        let (m, g) = (super::f32_slice_mut(dst, dl)?, super::f32_slice(gs, gl)?);
        if m.len() != g.len() {
            candle_core::bail!("AdamW: moment and gradient differ in size");
        }
        let (beta, rest) = (self.beta, self.rest);
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                let g = g * self.scale;
                *m = *m * beta + if self.square { g * g * rest } else { g * rest };
            }
        });
        Ok(())
    }
}

/// θ = θ·(1 − lr·decay) − lr·(m / bc1) / (sqrt(v / bc2) + eps).
struct Param {
    lr: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl Param {
    fn new(s: &AdamStep) -> Self {
        Param {
            lr: s.lr as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            bc1: (1.0 - s.beta1.powi(s.t)) as f32,
            bc2: (1.0 - s.beta2.powi(s.t)) as f32,
            eps: s.eps as f32,
        }
    }
}

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "tandem-adamw-param"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<()> {
        let (theta, m, v) = (super::f32_slice_mut(dst, dl)?, super::f32_slice(ms, ml)?, super::f32_slice(vs, vl)?);
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("AdamW: parameter and moments differ in size");
        }
        theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(t, (m, v))| {
            for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                *t = *t * self.decay - (m / self.bc1) / ((v / self.bc2).sqrt() + self.eps) * self.lr;
            }
        });
        Ok(())
    }
}

/// sum += g, in place on the CPU (one pass, no allocation): gradients accumulated over several
/// forward_backward calls before a step. The caller must hold `sum`'s storage alone (no clone of
/// it may be in use), since every tensor sharing it sees the change.
pub fn accumulate(sum: &mut Tensor, g: &Tensor) -> CResult<()> {
    let g = g.contiguous()?;
    let in_place =
        [&*sum, &g].iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
            && sum.shape() == g.shape();
    if in_place {
        sum.inplace_op2(&g, &Add)
    } else {
        *sum = (&*sum + &g)?;
        Ok(())
    }
}

struct Add;

impl InplaceOp2 for Add {
    fn name(&self) -> &'static str {
        "tandem-accumulate"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout) -> CResult<()> {
        let (sum, g) = (super::f32_slice_mut(dst, dl)?, super::f32_slice(gs, gl)?);
        sum.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(s, g)| {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += g);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Σ g² over several work items and a tail under 16 lanes: the f64 sum of the squares.
    #[test]
    fn sum_of_squares_is_the_f64_sum() {
        let n = 3 * super::CHUNK + 21;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 / 101.3 - 5.0).collect();
        let g = candle_core::Tensor::from_vec(values.clone(), n, &candle_core::Device::Cpu).unwrap();
        let want: f64 = values.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let got = super::sum_of_squares(&g).unwrap();
        assert!((got - want).abs() <= want * 1e-12, "{got} vs {want}");
    }
}
