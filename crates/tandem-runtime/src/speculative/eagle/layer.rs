//! The drafter's decoder layer: one forward used by drafting (over its KV cache, no gradients)
//! and by its trainer (over packed windows, with autograd). Only attention differs between the two,
//! so the caller supplies it as a closure, as the target model's forward does; everything else
//! (norms, projections, rope, the MLP, the head) runs on tandem's kernels, which are differentiable
//! on the CPU and fall back to candle primitives elsewhere.
use super::weights::{EagleConfig, EagleTensors};
use candle_core::Tensor;
use tandem_models::linear::Linear;
use tandem_models::ops::{self, RopeTables};
use tandem_models::{ModelError, OpsPath, Result};

/// A weight as the layer reads it: a matrix multiplies its input, a norm's vector scales it.
/// Training reads plain tensors (differentiable); serving reads projections, which may be
/// block-quantized.
pub trait LayerWeight {
    /// x [m, in] times the matrix transposed -> [m, out].
    fn project(&self, x: &Tensor, path: OpsPath) -> Result<Tensor>;
    /// The vector of a norm.
    fn vector(&self) -> Result<&Tensor>;
}

impl LayerWeight for Tensor {
    fn project(&self, x: &Tensor, path: OpsPath) -> Result<Tensor> {
        Ok(ops::matmul_xwt(x, self, path)?)
    }
    fn vector(&self) -> Result<&Tensor> {
        Ok(self)
    }
}

impl LayerWeight for Linear {
    fn project(&self, x: &Tensor, path: OpsPath) -> Result<Tensor> {
        Ok(self.forward(x, path)?)
    }
    fn vector(&self) -> Result<&Tensor> {
        self.dense_weight().ok_or_else(|| ModelError::Drafter("a norm of the drafter is not a dense vector".into()))
    }
}

/// Projections that read the same input, stacked into one matrix each while serving: one pass
/// of the kernels (one input quantization, one hand-out to the threads) instead of three and two.
/// Each output column is computed as the separate matrix computes it. The trainer keeps them apart.
pub struct Stacked<'a, W> {
    /// q_proj, k_proj, v_proj.
    pub qkv: &'a W,
    /// gate_proj, up_proj.
    pub gate_up: &'a W,
}

/// The layer's weights with what its forward needs beside them.
pub struct EagleLayer<'a, W: LayerWeight> {
    pub w: &'a EagleTensors<W>,
    pub stacked: Option<Stacked<'a, W>>,
    pub config: &'a EagleConfig,
    pub rope: &'a RopeTables,
    pub path: OpsPath,
}

/// Rope tables of a drafter (rotate-half layout, as the checkpoints' HF convention).
pub fn rope_tables(c: &EagleConfig, positions: usize, device: &candle_core::Device) -> Result<RopeTables> {
    Ok(RopeTables::new(c.head_dim, c.rope_theta, positions, false, device)?)
}

impl<W: LayerWeight> EagleLayer<'_, W> {
    fn linear(&self, x: &Tensor, w: &W) -> Result<Tensor> {
        w.project(x, self.path)
    }

    fn rms_norm(&self, x: &Tensor, w: &W) -> Result<Tensor> {
        Ok(ops::rms_norm(x, w.vector()?, self.config.rms_norm_eps, self.path)?)
    }

    /// `fc` over the target's concatenated hidden states: [t, layers × h] -> [t, h].
    pub fn features(&self, target_hidden: &Tensor) -> Result<Tensor> {
        self.linear(target_hidden, &self.w.fc)
    }

    /// The embedding half of the layer's input, [t, h] -> [t, h].
    pub fn normed_embeds(&self, embeds: &Tensor) -> Result<Tensor> {
        self.rms_norm(embeds, &self.w.input_norm)
    }

    /// The layer over `t` rows: `x` [t, h] (fc's output or the drafter's own previous output),
    /// `normed_embeds` [t, h] (of the token after each row's position), rope at `positions`.
    /// `attend(q [t, heads, d], k [t, kv_heads, d], v [t, kv_heads, d])` (q and k roped) returns
    /// [t, heads × d]. Returns the layer's output [t, h].
    pub fn forward(
        &self,
        x: &Tensor,
        normed_embeds: &Tensor,
        positions: &[usize],
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = self.config;
        let t = x.dim(0)?;
        let (heads, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let input = Tensor::cat(&[normed_embeds, &self.rms_norm(x, &self.w.hidden_norm)?], 1)?;
        let (q, k, v) = match &self.stacked {
            Some(st) => {
                let qkv = self.linear(&input, st.qkv)?;
                (
                    qkv.narrow(1, 0, heads * d)?,
                    qkv.narrow(1, heads * d, kvh * d)?,
                    qkv.narrow(1, (heads + kvh) * d, kvh * d)?,
                )
            }
            None => (
                self.linear(&input, &self.w.q_proj)?,
                self.linear(&input, &self.w.k_proj)?,
                self.linear(&input, &self.w.v_proj)?,
            ),
        };
        let (q, k, v) = (q.reshape((t, heads, d))?, k.reshape((t, kvh, d))?, v.reshape((t, kvh, d))?);
        let q = ops::rope(&q, positions, self.rope, self.path)?;
        let k = ops::rope(&k, positions, self.rope, self.path)?;
        let attn = attend(q, k, v)?;
        let h = (x + self.linear(&attn, &self.w.o_proj)?)?;
        let m = self.rms_norm(&h, &self.w.post_attention_norm)?;
        let gate_up = match &self.stacked {
            Some(st) => self.linear(&m, st.gate_up)?,
            None => Tensor::cat(&[self.linear(&m, &self.w.gate_proj)?, self.linear(&m, &self.w.up_proj)?], 1)?,
        };
        let mlp = self.linear(&ops::silu_mul(&gate_up, self.path)?, &self.w.down_proj)?;
        Ok((h + mlp)?)
    }

    /// Draft-vocabulary logits of the layer's output rows: [t, h] -> [t, draft vocabulary].
    pub fn logits(&self, out: &Tensor) -> Result<Tensor> {
        self.logits_with(out, &self.w.lm_head)
    }

    /// Logits over some rows of the head only (`head`: those rows, [s, h]; the trainer's sampled
    /// vocabulary): [t, h] -> [t, s].
    pub fn logits_with(&self, out: &Tensor, head: &W) -> Result<Tensor> {
        self.linear(&self.rms_norm(out, &self.w.norm)?, head)
    }
}
