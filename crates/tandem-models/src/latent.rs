//! Latent (CARE-converted) key and value projections of a model: the factors a conversion
//! installs, and the dense projections a conversion starts from.
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::model::Model;
use candle_core::Tensor;

/// A latent layer's expansions: cached latents become keys and values through these.
#[derive(Clone)]
pub(crate) struct LatentExpansion {
    /// [kv_size, r_K] and [kv_size, r_V], f32.
    pub(crate) k_up: Tensor,
    pub(crate) k_bias: Option<Tensor>,
    pub(crate) v_up: Tensor,
    pub(crate) v_bias: Option<Tensor>,
}

/// One layer's factored key and value projections, in the math convention x·W with the
/// `tandem convert care` names: latent = x·a (a: [hidden, r]), projection = latent·b + bias
/// (b: [r, kv_size]).
#[derive(Debug, Clone)]
pub struct LatentFactors {
    pub k_a: Tensor,
    pub k_b: Tensor,
    pub v_a: Tensor,
    pub v_b: Tensor,
}

/// One layer's dense key and value projections and biases, f32 [kv_size, hidden] / [kv_size].
pub struct KvProjections {
    pub k: Tensor,
    pub k_bias: Option<Tensor>,
    pub v: Tensor,
    pub v_bias: Option<Tensor>,
}

impl Model {
    /// Layer `layer`'s key and value projections as dense f32 [kv_size, hidden] (a latent layer's
    /// as the product of its factors), with their biases; quantized blocks are dequantized.
    pub fn kv_projections(&self, layer: usize) -> Result<KvProjections> {
        let c = &self.config;
        let b = self.blocks.get(layer).ok_or_else(|| ModelError::InvalidBatch(format!("no layer {layer}")))?;
        let (q, (k_w, v_w)) = (c.q_size(), c.kv_widths(layer));
        let (w, bias) = b.qkv.dense_f32()?;
        let part = |t: &Tensor, at: usize, n: usize| t.narrow(0, at, n).and_then(|t| t.contiguous());
        let bias_part = |at: usize, n: usize| bias.as_ref().map(|b| part(b, at, n)).transpose();
        let (k, v) = (part(&w, q, k_w)?, part(&w, q + k_w, v_w)?);
        Ok(match &b.latent {
            None => KvProjections { k, k_bias: bias_part(q, k_w)?, v, v_bias: bias_part(q + k_w, v_w)? },
            Some(lat) => KvProjections {
                k: lat.k_up.matmul(&k)?,
                k_bias: lat.k_bias.clone(),
                v: lat.v_up.matmul(&v)?,
                v_bias: lat.v_bias.clone(),
            },
        })
    }

    /// This model with every layer's key and value projections replaced by `factors` (one per
    /// layer): the cache then holds each layer's latents. Biases move onto the expansions.
    pub fn with_latent_kv(&self, factors: &[LatentFactors]) -> Result<Model> {
        let c = &self.config;
        if factors.len() != c.num_layers {
            return Err(ModelError::Adapter(format!("{} factor pairs for {} layers", factors.len(), c.num_layers)));
        }
        let mut m = self.clone();
        let f32 = candle_core::DType::F32;
        let (mut k_ranks, mut v_ranks) = (Vec::new(), Vec::new());
        for (l, (b, f)) in m.blocks.iter_mut().zip(factors).enumerate() {
            let kv = self.kv_projections(l)?;
            let (w, bias) = b.qkv.dense_f32()?;
            let q = w.narrow(0, 0, c.q_size())?;
            let qkv = Tensor::cat(&[&q, &f.k_a.t()?.to_dtype(f32)?, &f.v_a.t()?.to_dtype(f32)?], 0)?;
            let (r_k, r_v) = (f.k_a.dim(1)?, f.v_a.dim(1)?);
            let bias = match bias {
                Some(bq) => Some(Tensor::cat(
                    &[&bq.narrow(0, 0, c.q_size())?, &Tensor::zeros(r_k + r_v, f32, &self.device)?],
                    0,
                )?),
                None => None,
            };
            b.qkv = Linear::dense(qkv.contiguous()?, bias);
            b.latent = Some(LatentExpansion {
                k_up: f.k_b.t()?.to_dtype(f32)?.contiguous()?,
                k_bias: kv.k_bias,
                v_up: f.v_b.t()?.to_dtype(f32)?.contiguous()?,
                v_bias: kv.v_bias,
            });
            k_ranks.push(r_k);
            v_ranks.push(r_v);
        }
        m.config.latent_kv = Some(crate::config::LatentKv { k_ranks, v_ranks });
        m.config.check_latent().map_err(ModelError::Adapter)?;
        Ok(m)
    }
}
