//! The trainer's optimizer: AdamW (decoupled weight decay, bias-corrected moments), with the
//! gradient-norm clip folded in. The update itself is tandem's one AdamW rule
//! (`tandem_models::ops::adamw`: in place on the CPU, a test holds it equal to candle's AdamW).
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::ParamsAdamW;
use tandem_models::ops::adamw;
use tandem_models::Result;

pub struct AdamW {
    params: ParamsAdamW,
    vars: Vec<Var>,
    /// First and second moments of each var.
    moments: Vec<(Tensor, Tensor)>,
    step_t: i32,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(AdamW { params, vars, moments, step_t: 0 })
    }

    /// The moments and the step count as named tensors (a checkpoint's part).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("adam.t".to_string(), Tensor::new(&[self.step_t as i64], &candle_core::Device::Cpu)?)];
        for (i, (m, v)) in self.moments.iter().enumerate() {
            out.push((format!("adam.m.{i}"), m.copy()?));
            out.push((format!("adam.v.{i}"), v.copy()?));
        }
        Ok(out)
    }

    /// Takes the moments and step count `state` wrote (same vars, same order).
    pub fn restore(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let get = |name: String| {
            tensors.get(&name).ok_or_else(|| tandem_models::ModelError::Drafter(format!("checkpoint lacks {name}")))
        };
        for (i, (var, moments)) in self.vars.iter().zip(self.moments.iter_mut()).enumerate() {
            let (m, v) = (get(format!("adam.m.{i}"))?, get(format!("adam.v.{i}"))?);
            if m.dims() != var.dims() || v.dims() != var.dims() {
                return Err(tandem_models::ModelError::Drafter(format!("checkpoint moments {i} have another shape")));
            }
            // Copies: the update writes the moments in place.
            *moments = (m.to_dtype(DType::F32)?.copy()?, v.to_dtype(DType::F32)?.copy()?);
        }
        self.step_t = get("adam.t".to_string())?.to_vec1::<i64>()?[0] as i32;
        Ok(())
    }

    /// The global norm of the optimized vars' gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += adamw::sum_of_squares(g)?;
            }
        }
        Ok(sq.sqrt())
    }

    /// Adds `more`'s gradients of the optimized vars into `grads` (one step over several batches).
    pub fn accumulate(&self, grads: &mut GradStore, more: &GradStore) -> Result<()> {
        for v in &self.vars {
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
        self.step_t += 1;
        let p = &self.params;
        let step = adamw::AdamStep {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            t: self.step_t,
            scale,
        };
        for (var, (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                adamw::step(var, g, m, v, &step)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer;

    fn values(var: &Var) -> Result<Vec<f32>> {
        Ok(var.as_tensor().flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn the_in_place_update_matches_candles_adamw() {
        let dev = Device::Cpu;
        let params = ParamsAdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 };
        let init: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let make = || Var::from_tensor(&Tensor::from_vec(init.clone(), (10, 100), &dev).unwrap()).unwrap();
        let (a, b) = (make(), make());
        let mut ours = AdamW::new(vec![a.clone()], params.clone()).unwrap();
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
            let norm = ours.grad_norm(&ga).unwrap();
            ours.step(&mut ga, 0.5).unwrap();
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
