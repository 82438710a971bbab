//! The trainer's optimizer: AdamW (decoupled weight decay, bias-corrected moments), with the
//! gradient-norm clip folded in.
//!
//! On the CPU each parameter is updated in place in one pass (moments, decay and step together):
//! candle's AdamW spends ~14 tensor ops per parameter, each a pass over it and a fresh allocation,
//! which with the clip and the norm was ~12% of a drafter step. On other devices candle's AdamW
//! runs (the same update; a test holds the two equal).
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use std::cell::RefCell;
use tandem_models::Result;

pub enum AdamW {
    Fused(Fused),
    Candle { opt: candle_nn::AdamW, vars: Vec<Var> },
}

pub struct Fused {
    params: ParamsAdamW,
    vars: Vec<Var>,
    /// First and second moments of each var.
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    step_t: i32,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        if vars.iter().all(|v| v.device().is_cpu() && v.dtype() == candle_core::DType::F32) {
            let moments = vars.iter().map(|v| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()])).collect();
            return Ok(AdamW::Fused(Fused { params, vars, moments, step_t: 0 }));
        }
        Ok(AdamW::Candle { opt: candle_nn::AdamW::new(vars.clone(), params)?, vars })
    }

    fn vars(&self) -> &[Var] {
        match self {
            AdamW::Fused(f) => &f.vars,
            AdamW::Candle { vars, .. } => vars,
        }
    }

    /// The global norm of the optimized vars' gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for v in self.vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += match self {
                    AdamW::Fused(_) => sum_of_squares(g)?,
                    AdamW::Candle { .. } => g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64,
                };
            }
        }
        Ok(sq.sqrt())
    }

    /// Adds `more`'s gradients of the optimized vars into `grads` (one step over several batches).
    pub fn accumulate(&self, grads: &mut GradStore, more: &GradStore) -> Result<()> {
        for v in self.vars() {
            if let Some(g) = more.get(v.as_tensor()) {
                let sum = match grads.remove(v.as_tensor()) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                grads.insert(v.as_tensor(), sum);
            }
        }
        Ok(())
    }

    /// One step with every gradient multiplied by `scale` (the clip; 1.0: none).
    pub fn step(&mut self, grads: &mut GradStore, scale: f64) -> Result<()> {
        match self {
            AdamW::Fused(f) => f.step(grads, scale as f32),
            AdamW::Candle { opt, vars } => {
                if scale != 1.0 {
                    for v in vars.iter() {
                        if let Some(g) = grads.remove(v.as_tensor()) {
                            grads.insert(v.as_tensor(), (g * scale)?);
                        }
                    }
                }
                Ok(opt.step(grads)?)
            }
        }
    }
}

impl Fused {
    fn step(&mut self, grads: &GradStore, scale: f32) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let update = Update {
            moments: RefCell::new(None),
            scale,
            lr: p.lr as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            correct1: (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32,
            correct2: (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32,
            eps: p.eps as f32,
        };
        for (var, (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            *update.moments.borrow_mut() = Some((std::mem::take(m), std::mem::take(v)));
            let r = var.as_tensor().inplace_op2(&g.contiguous()?, &update);
            (*m, *v) = update.moments.borrow_mut().take().expect("the moments come back");
            r?;
        }
        Ok(())
    }
}

/// One parameter's update in place; the moments travel in and out through the cell.
struct Update {
    moments: RefCell<Option<(Vec<f32>, Vec<f32>)>>,
    scale: f32,
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    correct1: f32,
    correct2: f32,
    eps: f32,
}

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "tandem-adamw"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let (Some((a, b)), Some((ga, gb))) = (dst_l.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("AdamW needs contiguous parameters and gradients");
        };
        let CpuStorage::F32(theta) = dst else { candle_core::bail!("AdamW needs f32 parameters") };
        let theta = &mut theta[a..b];
        let g = &gs.as_slice::<f32>()?[ga..gb];
        let mut cell = self.moments.borrow_mut();
        let Some((m, v)) = cell.as_mut() else { candle_core::bail!("AdamW: no moments") };
        if theta.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!("AdamW: parameter, gradient and moments differ in size");
        }
        for (((t, &g), m), v) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * self.scale;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            let step = (*m * self.correct1) / ((*v * self.correct2).sqrt() + self.eps);
            *t = *t * self.decay - self.lr * step;
        }
        Ok(())
    }
}

/// Σ g² of a CPU f32 tensor, read where it lies.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(tandem_models::ModelError::Drafter("a CPU gradient was expected".into()));
    };
    Ok(cpu.as_slice::<f32>()?[a..b].iter().map(|&x| (x as f64) * (x as f64)).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(var: &Var) -> Result<Vec<f32>> {
        Ok(var.as_tensor().flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn the_fused_update_matches_candles_adamw() {
        let dev = Device::Cpu;
        let params = ParamsAdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 };
        let init: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let make = || Var::from_tensor(&Tensor::from_vec(init.clone(), (10, 100), &dev).unwrap()).unwrap();
        let (a, b) = (make(), make());
        let mut fused = AdamW::new(vec![a.clone()], params.clone()).unwrap();
        let mut reference = candle_nn::AdamW::new(vec![b.clone()], params).unwrap();
        for step in 0..5 {
            // A loss whose gradient changes with the parameters: Σ (x - c)² · k.
            let loss = |x: &Var| {
                (x.as_tensor().affine(1.0, -0.1 * step as f64).unwrap().sqr().unwrap() * 3.0)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let mut ga = loss(&a).backward().unwrap();
            let norm = fused.grad_norm(&ga).unwrap();
            fused.step(&mut ga, 0.5).unwrap();
            let mut gb = loss(&b).backward().unwrap();
            let g = gb.remove(b.as_tensor()).unwrap();
            let exact: f64 = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((norm - exact.sqrt()).abs() < 1e-4 * norm, "norm {norm} vs {}", exact.sqrt());
            gb.insert(b.as_tensor(), (g * 0.5).unwrap());
            reference.step(&gb).unwrap();
        }
        for (x, y) in values(&a).unwrap().iter().zip(values(&b).unwrap()) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}
