//! The EAGLE drafter's configuration and typed weights: one table names the tensors as published
//! EAGLE-3 checkpoints do, and everything else (shapes, loading, saving, warm starts, the trainer's
//! parameters) goes through the typed fields.
use super::{ServeAs, Served};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tandem_models::{Model, ModelConfig, ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EagleConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The target's vocabulary size.
    pub vocab_size: usize,
    /// Rows of `lm_head`; smaller than `vocab_size` when the draft vocabulary is pruned.
    pub draft_vocab_size: usize,
    /// Target layers (0-based) whose outputs feed `fc`.
    pub target_layers: Vec<usize>,
}

impl EagleConfig {
    /// A drafter shaped like one layer of `target`, reading layers 1, L/2-1 and L-4 (EAGLE-3's
    /// choice: low, middle and high features).
    pub fn for_target(target: &ModelConfig, draft_vocab_size: Option<usize>) -> Self {
        let l = target.num_layers;
        let top = l.saturating_sub(1);
        EagleConfig {
            hidden_size: target.hidden_size,
            num_attention_heads: target.num_heads,
            num_key_value_heads: target.num_kv_heads,
            head_dim: target.head_dim,
            intermediate_size: target.intermediate_size,
            rms_norm_eps: target.rms_norm_eps,
            rope_theta: target.rope_theta,
            vocab_size: target.vocab_size,
            draft_vocab_size: draft_vocab_size.unwrap_or(target.vocab_size).min(target.vocab_size),
            target_layers: vec![1.min(top), (l / 2).saturating_sub(1), l.saturating_sub(4).min(top)],
        }
    }

    pub(super) fn check(&self, target: &ModelConfig) -> Result<()> {
        let bad = |m: String| Err(ModelError::Drafter(format!("the EAGLE drafter does not fit the target: {m}")));
        if self.hidden_size != target.hidden_size {
            return bad(format!("hidden size {} vs {}", self.hidden_size, target.hidden_size));
        }
        if self.vocab_size != target.vocab_size {
            return bad(format!("vocabulary {} vs {}", self.vocab_size, target.vocab_size));
        }
        if let Some(&l) = self.target_layers.iter().find(|&&l| l >= target.num_layers) {
            return bad(format!("layer {l} does not exist ({} layers)", target.num_layers));
        }
        if self.target_layers.is_empty() || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads.max(1)) {
            return bad("target_layers must be non-empty and heads a multiple of kv heads".into());
        }
        Ok(())
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::checkpoint(&path, e))?;
        serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(&path, e))
    }

    /// Floats per position of the concatenated target hidden states `fc` reads.
    pub fn feature_size(&self) -> usize {
        self.target_layers.len() * self.hidden_size
    }
}

/// The drafter's tensors, one field each (any per-tensor type: weights, the trainer's variables,
/// shapes). [`TENSOR_NAMES`] names them, in field order, as EAGLE-3 checkpoints do.
#[derive(Debug, Clone)]
pub struct EagleTensors<T> {
    /// [h, layers × h]: the target's concatenated hidden states down to one.
    pub fc: T,
    /// Norm of the hidden-state half of the layer's input.
    pub hidden_norm: T,
    /// Norm of the embedding half of the layer's input.
    pub input_norm: T,
    /// [heads × d, 2h] (the input is [embedding, hidden]).
    pub q_proj: T,
    pub k_proj: T,
    pub v_proj: T,
    pub o_proj: T,
    pub post_attention_norm: T,
    pub gate_proj: T,
    pub up_proj: T,
    pub down_proj: T,
    /// The final norm before `lm_head`.
    pub norm: T,
    /// [draft vocabulary, h].
    pub lm_head: T,
}

/// The checkpoint name of each field of [`EagleTensors`], in field order.
pub const TENSOR_NAMES: [&str; 13] = [
    "fc.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
];

/// The output head's tensors (what `freeze_head` keeps as initialised).
pub const HEAD_NAMES: [&str; 2] = ["norm.weight", "lm_head.weight"];

impl<T> EagleTensors<T> {
    pub fn from_array(a: [T; 13]) -> Self {
        let [fc, hidden_norm, input_norm, q_proj, k_proj, v_proj, o_proj, post_attention_norm, gate_proj, up_proj, down_proj, norm, lm_head] =
            a;
        EagleTensors {
            fc,
            hidden_norm,
            input_norm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            post_attention_norm,
            gate_proj,
            up_proj,
            down_proj,
            norm,
            lm_head,
        }
    }

    pub fn as_array(&self) -> [&T; 13] {
        [
            &self.fc,
            &self.hidden_norm,
            &self.input_norm,
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.post_attention_norm,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
            &self.norm,
            &self.lm_head,
        ]
    }

    /// Each field with its checkpoint name.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, &T)> {
        TENSOR_NAMES.into_iter().zip(self.as_array())
    }

    /// A new set built field by field from each field's name and value.
    pub fn map<U>(&self, mut f: impl FnMut(&'static str, &T) -> U) -> EagleTensors<U> {
        let values = self.as_array();
        EagleTensors::from_array(std::array::from_fn(|i| f(TENSOR_NAMES[i], values[i])))
    }

    /// As [`Self::map`], stopping at the first error.
    pub fn try_map<U, E>(
        &self,
        mut f: impl FnMut(&'static str, &T) -> std::result::Result<U, E>,
    ) -> std::result::Result<EagleTensors<U>, E> {
        let mut out = Vec::with_capacity(TENSOR_NAMES.len());
        for (name, t) in self.named() {
            out.push(f(name, t)?);
        }
        Ok(EagleTensors::from_array(out.try_into().unwrap_or_else(|_| unreachable!("one value per field"))))
    }
}

impl EagleTensors<Vec<usize>> {
    /// The shape of every tensor of a drafter configured as `c`.
    pub fn shapes(c: &EagleConfig) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        EagleTensors::from_array([
            vec![h, c.feature_size()],
            vec![h],
            vec![h],
            vec![q, 2 * h],
            vec![kv, 2 * h],
            vec![kv, 2 * h],
            vec![h, q],
            vec![h],
            vec![i, h],
            vec![i, h],
            vec![h, i],
            vec![h],
            vec![c.draft_vocab_size, h],
        ])
    }
}

/// The drafter's parameters (f32). `d2t[i]` is the target id of draft id i.
#[derive(Debug, Clone)]
pub struct EagleWeights {
    pub tensors: EagleTensors<Tensor>,
    pub d2t: Vec<u32>,
    /// The form drafting reads, if prepared ahead (`prepare`).
    pub served: OnceLock<Arc<Served>>,
}

impl EagleWeights {
    /// Makes the form a drafter serving `serve_as` reads, so that serving these weights costs
    /// the engine a pointer swap (see [`Served`]); tensors `previous` shares keep its forms.
    pub fn prepare(&self, serve_as: ServeAs, previous: Option<&EagleWeights>) -> Result<()> {
        let previous = previous.and_then(|p| p.served.get()).map(|s| &**s);
        let _ = self.served.set(Arc::new(Served::new(self, serve_as, previous)?));
        Ok(())
    }

    /// Random initialisation: projections N(0, 0.02), norms 1, draft vocabulary = the first
    /// `draft_vocab_size` target ids.
    pub fn random(c: &EagleConfig, seed: u64, device: &Device) -> Result<Self> {
        // candle's CPU generator cannot be seeded: draw from our own so a seed fixes the weights.
        let mut rng = StdRng::seed_from_u64(seed);
        let tensors = EagleTensors::shapes(c).try_map(|_, shape| -> Result<Tensor> {
            if shape.len() == 1 {
                return Ok(Tensor::ones(shape.as_slice(), DType::F32, device)?);
            }
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| 0.02 * normal(&mut rng)).collect();
            Ok(Tensor::from_vec(values, shape.as_slice(), device)?)
        })?;
        Ok(EagleWeights { tensors, d2t: (0..c.draft_vocab_size as u32).collect(), served: Default::default() })
    }

    /// A fresh drafter for `target`, random except for what `warm` copies from the target.
    pub fn init(c: &EagleConfig, target: &Model, warm: WarmStart, seed: u64) -> Result<Self> {
        let mut w = Self::random(c, seed, target.device())?;
        if warm == WarmStart::None {
            return Ok(w);
        }
        // The target's unembedding over the draft vocabulary: the drafter starts out speaking the
        // target's output language and only has to learn which hidden state to produce.
        (w.tensors.lm_head, w.tensors.norm) = target.unembedding_rows(&w.d2t)?;
        if warm == WarmStart::Full {
            w.tensors.fc = pass_top_layer(c, target.device())?;
            if let Some(layer) = target.layer_weights(target.config.num_layers - 1) {
                w.tensors = copy_layer(&w.tensors, &layer, c.hidden_size)?;
            }
        }
        Ok(w)
    }

    /// Every tensor with its expected shape, and `d2t` mapping into the target's vocabulary.
    pub fn check_shapes(&self, config: &EagleConfig) -> Result<()> {
        for ((name, t), (_, shape)) in self.tensors.named().zip(EagleTensors::shapes(config).named()) {
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Drafter(format!(
                    "EAGLE tensor {name} has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
        }
        if self.d2t.len() != config.draft_vocab_size || self.d2t.iter().any(|&t| t as usize >= config.vocab_size) {
            return Err(ModelError::Drafter("EAGLE d2t does not map the draft vocabulary into the target's".into()));
        }
        Ok(())
    }

    /// Reads `dir/model.safetensors` (a drafter configured as `config`) onto `device`.
    pub fn load(dir: &Path, config: &EagleConfig, device: &Device) -> Result<Self> {
        let weights_path = dir.join("model.safetensors");
        let named = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| ModelError::checkpoint(&weights_path, e))?;
        Self::from_named(named, config)
    }

    /// Weights from `to_bytes`'s bytes (a drafter configured as `config`), checked against it.
    pub fn from_bytes(bytes: &[u8], config: &EagleConfig, device: &Device) -> Result<Self> {
        let named = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| ModelError::Drafter(format!("reading drafter weights: {e}")))?;
        Self::from_named(named, config)
    }

    fn from_named(mut named: HashMap<String, Tensor>, config: &EagleConfig) -> Result<Self> {
        let d2t = match named.remove("d2t") {
            // Stored as EAGLE-3 does: offsets, target id = draft id + d2t[draft id].
            Some(t) => t
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .iter()
                .enumerate()
                .map(|(i, &o)| (i as i64 + o).max(0) as u32)
                .collect(),
            None => (0..config.draft_vocab_size as u32).collect(),
        };
        let tensors = EagleTensors::shapes(config).try_map(|name, _| {
            named.remove(name).ok_or_else(|| ModelError::Drafter(format!("missing tensor {name}")))
        })?;
        let weights = EagleWeights { tensors, d2t, served: Default::default() };
        weights.check_shapes(config)?;
        Ok(weights)
    }

    /// The tensors as saved (on the CPU; d2t as EAGLE-3 offsets).
    fn named(&self) -> Result<HashMap<String, Tensor>> {
        let mut named: HashMap<String, Tensor> = self
            .tensors
            .named()
            .map(|(k, v)| Ok((k.to_string(), v.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let offsets: Vec<i64> = self.d2t.iter().enumerate().map(|(i, &t)| t as i64 - i as i64).collect();
        named.insert("d2t".into(), Tensor::new(offsets, &Device::Cpu)?);
        Ok(named)
    }

    /// `model.safetensors`'s bytes, for a weight store.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let named = self.named()?;
        safetensors08::serialize(named.iter().map(|(k, v)| (k.as_str(), v)), None)
            .map_err(|e| ModelError::Drafter(format!("encoding drafter weights: {e}")))
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (d2t stored as EAGLE-3 offsets).
    pub fn save(&self, config: &EagleConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::checkpoint(dir, e))?;
        let cfg_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(config).expect("config serialises");
        std::fs::write(&cfg_path, json).map_err(|e| ModelError::checkpoint(&cfg_path, e))?;
        // Write then rename, so a reader (or a crash) never sees half a checkpoint.
        let tmp = dir.join("model.safetensors.tmp");
        candle_core::safetensors::save(&self.named()?, &tmp)?;
        std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(|e| ModelError::checkpoint(dir, e))?;
        Ok(())
    }
}

/// `fc` passing the highest target layer straight through.
fn pass_top_layer(c: &EagleConfig, device: &Device) -> Result<Tensor> {
    let (h, n) = (c.hidden_size, c.target_layers.len());
    let mut fc = vec![0f32; h * n * h];
    for i in 0..h {
        fc[i * n * h + (n - 1) * h + i] = 1.0;
    }
    Ok(Tensor::from_vec(fc, (h, n * h), device)?)
}

/// `w` with its decoder layer taken from a target layer (`layer`: the target's names without the
/// `midlayer.` prefix). The q/k/v input is [embedding, hidden]: the random embedding half is kept
/// (scaled down) and the hidden half copied; the hidden half's norm starts as the target's.
fn copy_layer(w: &EagleTensors<Tensor>, layer: &HashMap<String, Tensor>, h: usize) -> Result<EagleTensors<Tensor>> {
    let mut out = w.try_map(|name, old| -> Result<Tensor> {
        let Some(t) = name.strip_prefix("midlayer.").and_then(|n| layer.get(n)) else { return Ok(old.clone()) };
        let t = match name.contains("self_attn.") && !name.contains("o_proj") {
            true => Tensor::cat(&[&(old.narrow(1, 0, h)? * 0.1)?, t], 1)?,
            false => t.clone(),
        };
        Ok(if t.dims() == old.dims() { t } else { old.clone() })
    })?;
    out.hidden_norm = out.input_norm.clone();
    Ok(out)
}

/// What a fresh drafter copies from its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WarmStart {
    /// Random weights throughout.
    None,
    /// The target's unembedding rows and final norm for `lm_head` / `norm`.
    Head,
    /// Head, plus the decoder layer from the target's last layer and `fc` passing the top layer through.
    #[default]
    Full,
}

impl std::str::FromStr for WarmStart {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "random" => Ok(WarmStart::None),
            "head" => Ok(WarmStart::Head),
            "full" => Ok(WarmStart::Full),
            _ => Err(format!("unknown warm start {s:?} (none, head, full)")),
        }
    }
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-12);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
