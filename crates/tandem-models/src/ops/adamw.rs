//! Gradient accumulation and AdamW's update (decoupled weight decay, bias-corrected moments, the gradient-norm clip folded
//! in as a scale), one rule for every trainer in tandem: the policy's (`tandem-train`) and the
//! drafter's (`tandem-speculator`).
//!
//! On the CPU the parameter and both moments are updated in place, in one pass and no
//! allocation: written as tensor ops the update is ~14 passes over each parameter, each into a
//! fresh tensor (an optimizer step of SmolLM2's full weights took 0.93 s, a fifth of a
//! forward_backward over 1,024 tokens); as three in-place passes (candle lends one mutable
//! operand per in-place op) 10 values moved per weight, now 7. Elsewhere the same formula runs as
//! tensor ops.
use super::CResult;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

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
/// the same shape as `theta`), all in place on the CPU. `theta`, `m` and `v` must not share storage.
pub fn step(theta: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: &AdamStep) -> CResult<()> {
    let g = g.contiguous()?;
    let in_place = [theta.as_tensor(), &g, m, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous());
    if in_place {
        let guard = g.storage_and_layout();
        let g = super::host(&guard)?;
        let rule = Rule::new(s);
        // In-place ops nested: each lends one more mutable operand.
        return lend(theta.as_tensor(), |theta| {
            lend(m, |m| {
                lend(v, |v| {
                    if [m.len(), v.len(), g.len()].iter().any(|&n| n != theta.len()) {
                        candle_core::bail!("AdamW: parameter, gradient and moments differ in size");
                    }
                    update(theta, m, v, g, &rule);
                    Ok(())
                })
            })
        });
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
/// gradients took 0.20 s that way, as long as the update itself then; now ~memory speed).
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

/// One step's constants as the update's loop uses them.
struct Rule {
    scale: f32,
    beta1: f32,
    rest1: f32,
    beta2: f32,
    rest2: f32,
    lr: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl Rule {
    fn new(s: &AdamStep) -> Self {
        Rule {
            scale: s.scale as f32,
            beta1: s.beta1 as f32,
            rest1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            rest2: (1.0 - s.beta2) as f32,
            lr: s.lr as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            bc1: (1.0 - s.beta1.powi(s.t)) as f32,
            bc2: (1.0 - s.beta2.powi(s.t)) as f32,
            eps: s.eps as f32,
        }
    }
}

/// m = β1·m + (1 − β1)·ĝ, v = β2·v + (1 − β2)·ĝ² with ĝ = scale·g, then
/// θ = θ·(1 − lr·decay) − lr·(m / bc1) / (sqrt(v / bc2) + eps): one pass over the four.
fn update(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], r: &Rule) {
    let parts = theta.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK));
    parts.zip(g.par_chunks(CHUNK)).for_each(|(((t, m), v), g)| {
        for (((t, m), v), &g) in t.iter_mut().zip(m).zip(v).zip(g) {
            let g = g * r.scale;
            *m = *m * r.beta1 + g * r.rest1;
            *v = *v * r.beta2 + g * g * r.rest2;
            *t = *t * r.decay - (*m / r.bc1) / ((*v / r.bc2).sqrt() + r.eps) * r.lr;
        }
    });
}

/// Runs `f` on `t`'s values (f32, contiguous, on the CPU), lent mutably by a candle in-place op.
fn lend<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> CResult<R>) -> CResult<R> {
    let op = Lend { f: Mutex::new(Some(f)), out: Mutex::new(None) };
    t.inplace_op1(&op)?;
    Ok(op.out.into_inner().expect("not poisoned").expect("the op ran"))
}

struct Lend<F, R> {
    f: Mutex<Option<F>>,
    out: Mutex<Option<R>>,
}

impl<F: FnOnce(&mut [f32]) -> CResult<R>, R> InplaceOp1 for Lend<F, R> {
    fn name(&self) -> &'static str {
        "tandem-lend-mut"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> CResult<()> {
        let f = self.f.lock().expect("not poisoned").take().expect("lent once");
        let out = f(super::f32_slice_mut(s, l)?)?;
        *self.out.lock().expect("not poisoned") = Some(out);
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
    use candle_core::{Device, Tensor, Var};

    /// Three steps of the one-pass update (clip scale, weight decay, bias corrections, several
    /// work items and a tail) against AdamW written out in f64.
    #[test]
    fn the_fused_update_is_adamw() {
        let n = 2 * super::CHUNK + 37;
        let wave = |i: usize, s: usize| (((i * 7919 + s * 104729) % 2003) as f64 / 1001.5 - 1.0) as f32;
        let theta0: Vec<f32> = (0..n).map(|i| wave(i, 1)).collect();
        let theta = Var::from_vec(theta0.clone(), n, &Device::Cpu).unwrap();
        let (mut m, mut v) = (
            Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let (mut want, mut wm, mut wv) =
            (theta0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| wave(i, t + 1) * 0.3).collect();
            let s = super::AdamStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                t: t as i32,
                scale: 0.7,
            };
            super::step(&theta, &Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap(), &mut m, &mut v, &s).unwrap();
            let (bc1, bc2) = (1.0 - s.beta1.powi(s.t), 1.0 - s.beta2.powi(s.t));
            for i in 0..n {
                let g = g[i] as f64 * s.scale;
                wm[i] = s.beta1 * wm[i] + (1.0 - s.beta1) * g;
                wv[i] = s.beta2 * wv[i] + (1.0 - s.beta2) * g * g;
                want[i] =
                    want[i] * (1.0 - s.lr * s.weight_decay) - s.lr * (wm[i] / bc1) / ((wv[i] / bc2).sqrt() + s.eps);
            }
        }
        let got = theta.as_tensor().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(worst < 1e-6, "largest difference from f64 AdamW: {worst}");
        let moved = got.iter().zip(&theta0).filter(|(a, b)| a != b).count();
        assert_eq!(moved, n, "every weight moves");
    }

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
