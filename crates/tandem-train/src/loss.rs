//! The policy losses of the training API, as sums over tokens (not means), each with arbitrary
//! per-token weights where the loss takes them.
//!
//! Notation: lp = the learner's logprob of each target token (differentiated), q = the sampler's
//! logprob of it (input `logprobs`), A = input `advantages`, r = exp(lp − q).
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub enum LossFn {
    /// −Σ w·lp
    CrossEntropy,
    /// −Σ r·A
    ImportanceSampling,
    /// −Σ min(r·A, clip(r, lo, hi)·A)
    Ppo { low: f64, high: f64 },
    /// −Σ sg(clip(r, lo, hi))·lp·A
    Cispo { low: f64, high: f64 },
    /// −Σ [lp·A − ½β(lp − q)²]
    Dro { beta: f64 },
}

/// A loss configuration value (numbers, or text for future options).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    Number(f64),
    Text(String),
}

impl LossFn {
    pub const NAMES: [&'static str; 5] = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"];

    /// The loss called `name` with its configuration; unknown names and keys are errors, so a typo
    /// never trains with a default silently.
    pub fn parse(name: &str, config: &BTreeMap<String, ConfigValue>) -> Result<LossFn, String> {
        let allowed: &[&str] = match name {
            "cross_entropy" | "importance_sampling" => &[],
            "ppo" | "cispo" => &["clip_low_threshold", "clip_high_threshold"],
            "dro" => &["beta"],
            other => return Err(format!("unknown loss_fn `{other}` (known: {})", Self::NAMES.join(", "))),
        };
        for k in config.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(format!("loss_fn `{name}` takes no option `{k}` (it takes: {})", allowed.join(", ")));
            }
        }
        let num = |k: &str, default: f64| -> Result<f64, String> {
            match config.get(k) {
                None => Ok(default),
                Some(ConfigValue::Number(x)) if x.is_finite() => Ok(*x),
                Some(v) => Err(format!("loss_fn_config `{k}` must be a finite number, got {v:?}")),
            }
        };
        Ok(match name {
            "cross_entropy" => LossFn::CrossEntropy,
            "importance_sampling" => LossFn::ImportanceSampling,
            "ppo" | "cispo" => {
                let (low, high) = (num("clip_low_threshold", 0.8)?, num("clip_high_threshold", 1.2)?);
                if !(low > 0.0 && low <= high) {
                    return Err(format!("clip thresholds must satisfy 0 < low <= high, got {low} and {high}"));
                }
                if name == "ppo" {
                    LossFn::Ppo { low, high }
                } else {
                    LossFn::Cispo { low, high }
                }
            }
            _ => LossFn::Dro { beta: num("beta", 0.1)? },
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            LossFn::CrossEntropy => "cross_entropy",
            LossFn::ImportanceSampling => "importance_sampling",
            LossFn::Ppo { .. } => "ppo",
            LossFn::Cispo { .. } => "cispo",
            LossFn::Dro { .. } => "dro",
        }
    }

    /// The inputs (besides `target_tokens`) each datum must carry, all as long as its tokens.
    pub fn inputs(&self) -> &'static [&'static str] {
        match self {
            LossFn::CrossEntropy => &["weights"],
            _ => &["logprobs", "advantages"],
        }
    }

    /// The loss of one datum: lp [n] (differentiated); `inputs` by name, each [n], same dtype.
    pub fn loss(&self, lp: &Tensor, inputs: &BTreeMap<&str, Tensor>) -> candle_core::Result<Tensor> {
        let get = |k: &str| inputs.get(k).ok_or_else(|| candle_core::Error::Msg(format!("missing input {k}")));
        let ratio = || -> candle_core::Result<Tensor> { (lp - get("logprobs")?)?.exp() };
        let total = match self {
            LossFn::CrossEntropy => (lp * get("weights")?)?.sum_all()?.neg()?,
            LossFn::ImportanceSampling => (ratio()? * get("advantages")?)?.sum_all()?.neg()?,
            LossFn::Ppo { low, high } => {
                let (r, a) = (ratio()?, get("advantages")?);
                let unclipped = (&r * a)?;
                let clipped = (r.clamp(*low, *high)? * a)?;
                unclipped.minimum(&clipped)?.sum_all()?.neg()?
            }
            LossFn::Cispo { low, high } => {
                let w = ratio()?.clamp(*low, *high)?.detach();
                ((w * lp)? * get("advantages")?)?.sum_all()?.neg()?
            }
            LossFn::Dro { beta } => {
                let pg = (lp * get("advantages")?)?;
                let d = (lp - get("logprobs")?)?;
                (pg - (d.sqr()? * (0.5 * beta))?)?.sum_all()?.neg()?
            }
        };
        Ok(total)
    }

    /// d loss / d lp for each of these tokens (lp and every input given over the same tokens):
    /// candle's autograd through `loss` itself, on the CPU. Each loss is a sum of per-token terms,
    /// so a token's gradient is the same over any span holding it, and the same ops give it the
    /// bits a whole pass's backward gives it.
    pub fn token_gradients(&self, lp: &[f32], inputs: &BTreeMap<&str, &[f32]>) -> candle_core::Result<Vec<f32>> {
        let lp = Var::from_slice(lp, lp.len(), &Device::Cpu)?;
        let tensors = inputs
            .iter()
            .map(|(k, v)| Ok((*k, Tensor::from_slice(v, v.len(), &Device::Cpu)?)))
            .collect::<candle_core::Result<BTreeMap<_, _>>>()?;
        let grads = self.loss(lp.as_tensor(), &tensors)?.backward()?;
        match grads.get(lp.as_tensor()) {
            Some(g) => g.to_vec1(),
            None => Ok(vec![0.0; lp.elem_count()]),
        }
    }
}
