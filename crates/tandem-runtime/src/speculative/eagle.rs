//! An EAGLE-3-style drafter: a single decoder layer that reads the target's own hidden states.
//!
//! Position t of the drafter takes the target's hidden states at t from three layers (concatenated,
//! then `fc`: 3h -> h) and the RMS-normed embedding of token t+1 (the target's table, frozen); the
//! two are concatenated (2h) into one decoder layer whose attention runs over the drafter's own KV
//! cache; a final norm and `lm_head` (over the target vocabulary or a pruned draft vocabulary,
//! with `d2t` mapping draft ids to target ids) predict token t+2. Drafting k tokens feeds the
//! layer's output hidden state back in place of the target's for steps 2..k.
//!
//! Checkpoint: a folder with `config.json` ([`EagleConfig`]) and `model.safetensors` using the
//! tensor names of published EAGLE-3 drafters (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`).
//!
//! Over 600 lines because the drafter's config, weights (load, save, warm starts) and its
//! batched drafting forward live together; the training forward is in tandem-speculator (one
//! shared layer for both is an open item of the engine-shape issue).
use super::{draft_token, drafter_sampler, Draft, DraftRequest, Drafter, NgramDrafter, TrainableDrafter};
use crate::sampling::Sampler;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
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

    fn check(&self, target: &ModelConfig) -> Result<()> {
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
}

/// The drafter's parameters (f32). `d2t[i]` is the target id of draft id i.
#[derive(Debug, Clone)]
pub struct EagleWeights {
    pub tensors: HashMap<String, Tensor>,
    pub d2t: Vec<u32>,
}

/// The drafter's tensors (all trained; `d2t` is stored beside them).
pub const NAMES: &[&str] = &[
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

impl EagleWeights {
    fn shapes(c: &EagleConfig) -> Vec<Vec<usize>> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let f = c.target_layers.len() * h;
        vec![
            vec![h, f],
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
        ]
    }

    /// Random initialisation: projections N(0, 0.02), norms 1, draft vocabulary = the first
    /// `draft_vocab_size` target ids.
    pub fn random(c: &EagleConfig, seed: u64, device: &Device) -> Result<Self> {
        // candle's CPU generator cannot be seeded: draw from our own so a seed fixes the weights.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in NAMES.iter().zip(Self::shapes(c)) {
            let t = if shape.len() == 1 {
                Tensor::ones(shape, DType::F32, device)?
            } else {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| 0.02 * normal(&mut rng)).collect();
                Tensor::from_vec(values, shape, device)?
            };
            tensors.insert(name.to_string(), t);
        }
        Ok(EagleWeights { tensors, d2t: (0..c.draft_vocab_size as u32).collect() })
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    /// A fresh drafter for `target`, random except for what `warm` copies from the target.
    pub fn init(c: &EagleConfig, target: &Model, warm: WarmStart, seed: u64) -> Result<Self> {
        let mut w = Self::random(c, seed, target.device())?;
        if warm == WarmStart::None {
            return Ok(w);
        }
        // The target's unembedding over the draft vocabulary: the drafter starts out speaking the
        // target's output language and only has to learn which hidden state to produce.
        let (rows, norm) = target.unembedding_rows(&w.d2t)?;
        w.tensors.insert("lm_head.weight".into(), rows);
        w.tensors.insert("norm.weight".into(), norm);
        if warm == WarmStart::Full {
            // fc passes the highest target layer straight through, and the decoder layer starts as
            // the target's last layer reading that hidden state (the embedding half starts small).
            let h = c.hidden_size;
            let n = c.target_layers.len();
            let mut fc = vec![0f32; h * n * h];
            for i in 0..h {
                fc[i * n * h + (n - 1) * h + i] = 1.0;
            }
            w.tensors.insert("fc.weight".into(), Tensor::from_vec(fc, (h, n * h), target.device())?);
            if let Some(layer) = target.layer_weights(target.config.num_layers - 1) {
                for (name, t) in layer {
                    let key = format!("midlayer.{name}");
                    let Some(old) = w.tensors.get(&key) else { continue };
                    let t = if matches!(
                        name.as_str(),
                        "self_attn.q_proj.weight" | "self_attn.k_proj.weight" | "self_attn.v_proj.weight"
                    ) {
                        // Input is [embedding, hidden]: keep the random embedding half, copy the rest.
                        Tensor::cat(&[&(old.narrow(1, 0, h)? * 0.1)?, &t], 1)?
                    } else {
                        t
                    };
                    if t.dims() == old.dims() {
                        let t = if name == "input_layernorm.weight" { t.clone() } else { t };
                        w.tensors.insert(key, t);
                    }
                }
                // The hidden half is normed by hidden_norm in the drafter: start it as the target's.
                if let Some(n) = w.tensors.get("midlayer.input_layernorm.weight").cloned() {
                    w.tensors.insert("midlayer.hidden_norm.weight".into(), n);
                }
            }
        }
        Ok(w)
    }
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

/// Positions of its own past the drafter attends to. Its trainer sees windows of at most 64
/// positions, so a longer context is one it was never trained on; and catching up a whole prompt
/// before the first draft would cost a prefill of the drafter (a tenth of the target's) per request.
pub const DRAFT_CONTEXT: usize = 64;

/// Per-sequence state: the target features seen so far and the drafter's KV cache over them.
#[derive(Default)]
struct SlotState {
    /// Concatenated target hidden states, `feature_size` floats per committed target position.
    features: Vec<f32>,
    /// Positions already in the drafter's KV cache (computed from target features, never drafts).
    cached: usize,
    /// Position of the first key held (older ones are dropped: see [`DRAFT_CONTEXT`]).
    kv_start: usize,
    keys: Option<Tensor>,
    values: Option<Tensor>,
    sampler: Option<Sampler>,
}

pub struct EagleDrafter {
    pub config: EagleConfig,
    weights: Arc<EagleWeights>,
    device: Device,
    slots: Vec<SlotState>,
    /// cos / sin tables [positions, head_dim], grown on demand.
    rope: Option<(Tensor, Tensor)>,
    /// Seconds and positions of catching up since the last `take_catch_up`.
    catch_up: (f64, usize),
    /// The projections' type while serving (norms stay f32). Drafts never change outputs, so a
    /// bf16 drafter only trades a little agreement for half the bytes read per draft token.
    serve_dtype: DType,
    /// Prompt lookup tried before the learned drafter (see `with_lookup`).
    lookup: Option<NgramDrafter>,
}

/// Every tensor present with its expected shape, and `d2t` mapping into the target's vocabulary.
pub fn check_shapes(config: &EagleConfig, weights: &EagleWeights) -> Result<()> {
    for (name, shape) in NAMES.iter().zip(EagleWeights::shapes(config)) {
        let t = weights.tensors.get(*name).ok_or_else(|| ModelError::Drafter(format!("missing tensor {name}")))?;
        if t.dims() != shape.as_slice() {
            return Err(ModelError::Drafter(format!(
                "EAGLE tensor {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
    }
    if weights.d2t.len() != config.draft_vocab_size || weights.d2t.iter().any(|&t| t as usize >= config.vocab_size) {
        return Err(ModelError::Drafter("EAGLE d2t does not map the draft vocabulary into the target's".into()));
    }
    Ok(())
}

/// Writes `dir/config.json` and `dir/model.safetensors` (d2t stored as EAGLE-3 offsets).
pub fn save_weights(config: &EagleConfig, weights: &EagleWeights, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::checkpoint(dir, e))?;
    let cfg_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(config).expect("config serialises");
    std::fs::write(&cfg_path, json).map_err(|e| ModelError::checkpoint(&cfg_path, e))?;
    let mut tensors: HashMap<String, Tensor> =
        weights.tensors.iter().map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let offsets: Vec<i64> = weights.d2t.iter().enumerate().map(|(i, &t)| t as i64 - i as i64).collect();
    tensors.insert("d2t".into(), Tensor::new(offsets, &Device::Cpu)?);
    // Write then rename, so a reader (or a crash) never sees half a checkpoint.
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(|e| ModelError::checkpoint(dir, e))?;
    Ok(())
}

impl EagleDrafter {
    pub fn new(config: EagleConfig, weights: EagleWeights, device: &Device) -> Result<Self> {
        check_shapes(&config, &weights)?;
        let weights = Arc::new(EagleWeights {
            tensors: weights
                .tensors
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(device)?)))
                .collect::<Result<_>>()?,
            d2t: weights.d2t,
        });
        Ok(EagleDrafter {
            config,
            weights,
            device: device.clone(),
            slots: Vec::new(),
            rope: None,
            catch_up: (0.0, 0),
            serve_dtype: DType::F32,
            lookup: None,
        })
    }

    /// Tries prompt lookup first: where the sequence's last `lookup.min_ngram` or more tokens
    /// occurred earlier in it, the draft is what followed them (free to compute, and right
    /// whenever the output copies its context: code being completed or explained, quotes);
    /// elsewhere the learned drafter proposes. Such drafts are marked `Draft::lookup`.
    pub fn with_lookup(mut self, lookup: Option<NgramDrafter>) -> Self {
        self.lookup = lookup;
        self
    }

    /// Serves the projections in `dtype` (f32 or bf16), now and for every later update.
    pub fn with_serving_dtype(mut self, dtype: DType) -> Result<Self> {
        self.serve_dtype = dtype;
        let w = self.weights.clone();
        self.set_weights(w)?;
        Ok(self)
    }

    /// `w` with its matrices in the serving type (norms, and `w` itself if nothing changes, kept).
    fn for_serving(&self, w: Arc<EagleWeights>) -> Result<Arc<EagleWeights>> {
        if w.tensors.values().all(|t| t.rank() != 2 || t.dtype() == self.serve_dtype) {
            return Ok(w);
        }
        let tensors = w
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), if t.rank() == 2 { t.to_dtype(self.serve_dtype)? } else { t.clone() })))
            .collect::<Result<_>>()?;
        Ok(Arc::new(EagleWeights { tensors, d2t: w.d2t.clone() }))
    }

    /// A freshly initialised drafter for `target`.
    pub fn random(target: &Model, draft_vocab_size: Option<usize>, seed: u64) -> Result<Self> {
        Self::fresh(target, draft_vocab_size, WarmStart::None, seed)
    }

    /// A fresh drafter for `target`, initialised as `warm` says.
    pub fn fresh(target: &Model, draft_vocab_size: Option<usize>, warm: WarmStart, seed: u64) -> Result<Self> {
        let config = EagleConfig::for_target(&target.config, draft_vocab_size);
        let weights = EagleWeights::init(&config, target, warm, seed)?;
        Self::new(config, weights, target.device())
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path, target: &Model) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::checkpoint(&cfg_path, e))?;
        let config: EagleConfig = serde_json::from_str(&text).map_err(|e| ModelError::checkpoint(&cfg_path, e))?;
        config.check(&target.config)?;
        let weights_path = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights_path, target.device())
            .map_err(|e| ModelError::checkpoint(&weights_path, e))?;
        let d2t = match tensors.remove("d2t") {
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
        tensors.remove("t2d");
        Self::new(config, EagleWeights { tensors, d2t }, target.device())
    }

    /// Writes `dir/config.json` and `dir/model.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_weights(&self.config, &self.weights, dir)
    }

    pub fn weights(&self) -> &Arc<EagleWeights> {
        &self.weights
    }

    /// Serves `weights` from the next draft on. The per-slot caches were computed with the old
    /// weights, so they are rebuilt from the kept target features.
    pub fn set_weights(&mut self, weights: Arc<EagleWeights>) -> Result<()> {
        check_shapes(&self.config, &weights)?;
        self.weights = self.for_serving(weights)?;
        for s in &mut self.slots {
            s.cached = 0;
            s.kv_start = 0;
            s.keys = None;
            s.values = None;
        }
        Ok(())
    }

    fn feature_size(&self) -> usize {
        self.config.target_layers.len() * self.config.hidden_size
    }

    fn rope_tables(&mut self, upto: usize) -> Result<(Tensor, Tensor)> {
        if self.rope.as_ref().is_none_or(|(c, _)| c.dim(0).unwrap_or(0) < upto) {
            self.rope = Some(rope_tables(&self.config, upto.next_power_of_two().max(256), &self.device)?);
        }
        Ok(self.rope.clone().expect("built above"))
    }

    /// One pass of the decoder layer over `t` new positions starting at `start`.
    /// `features`: [t, h] (fc output or fed-back hidden), `embeds`: [t, h]. Returns the layer output
    /// [t, h] and the new positions' keys and values [kv_heads, t, d].
    /// `kv_start` is the position of the first key in `past`.
    fn layer(
        &self,
        features: &Tensor,
        embeds: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
        kv_start: usize,
        start: usize,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let w = |n: &str| self.weights.get(n);
        let eps = c.rms_norm_eps;
        let t = features.dim(0)?;
        let x = Tensor::cat(
            &[
                rms_norm(embeds, w("midlayer.input_layernorm.weight"), eps)?,
                rms_norm(features, w("midlayer.hidden_norm.weight"), eps)?,
            ],
            1,
        )?;
        let (heads, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = fast_linear(&x, w("midlayer.self_attn.q_proj.weight"))?.reshape((t, heads, d))?;
        let k = fast_linear(&x, w("midlayer.self_attn.k_proj.weight"))?.reshape((t, kvh, d))?;
        let v = fast_linear(&x, w("midlayer.self_attn.v_proj.weight"))?.reshape((t, kvh, d))?;
        let cos = rope.0.narrow(0, start, t)?.unsqueeze(1)?;
        let sin = rope.1.narrow(0, start, t)?.unsqueeze(1)?;
        let q = apply_rope(&q, &cos, &sin)?.transpose(0, 1)?.contiguous()?; // [heads, t, d]
        let k = apply_rope(&k, &cos, &sin)?.transpose(0, 1)?.contiguous()?; // [kvh, t, d]
        let v = v.transpose(0, 1)?.contiguous()?;
        let (all_k, all_v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            None => (k.clone(), v.clone()),
        };
        let total = all_k.dim(1)?;
        let group = heads / kvh;
        let all_k = repeat_kv(&all_k, group)?;
        let all_v = repeat_kv(&all_v, group)?;
        // [heads, t, total]. Causal: new row i (position start + i) sees keys up to start + i;
        // key j is at kv_start + j.
        let scores = (q.matmul(&all_k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if kv_start + j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, total), &self.device)?;
        let probs = candle_softmax(&scores.broadcast_add(&mask)?)?;
        let attn = probs.matmul(&all_v)?.transpose(0, 1)?.reshape((t, heads * d))?;
        let h = (features + fast_linear(&attn, w("midlayer.self_attn.o_proj.weight"))?)?;
        let m = rms_norm(&h, w("midlayer.post_attention_layernorm.weight"), eps)?;
        let gate = fast_linear(&m, w("midlayer.mlp.gate_proj.weight"))?;
        let up = fast_linear(&m, w("midlayer.mlp.up_proj.weight"))?;
        let out = (&h + fast_linear(&(silu(&gate)? * up)?, w("midlayer.mlp.down_proj.weight"))?)?;
        Ok((out, k, v))
    }

    /// Draft-vocabulary logits of the last row of `hidden`.
    fn logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let last = hidden.i(hidden.dim(0)? - 1..)?;
        let normed = rms_norm(&last, self.weights.get("norm.weight"), self.config.rms_norm_eps)?;
        Ok(fast_linear(&normed, self.weights.get("lm_head.weight"))?.squeeze(0)?.to_vec1::<f32>()?)
    }

    fn propose_one(&mut self, target: &Model, r: &DraftRequest) -> Result<Draft> {
        let fs = self.feature_size();
        let n_tokens = r.tokens.len();
        let state = &self.slots[r.slot];
        let committed = state.features.len() / fs;
        if let Some(copied) = self.lookup.as_ref().map(|l| l.lookup(r.tokens, r.copy_k)).filter(|t| !t.is_empty()) {
            // The learned drafter catches up on these positions at its next draft.
            return Ok(Draft { tokens: copied, probs: None, lookup: true, alternatives: Vec::new() });
        }
        // The target must have committed every token but the pending last one.
        if r.k == 0 || committed == 0 || committed + 1 != n_tokens {
            return Ok(Draft::default());
        }
        let rope = self.rope_tables(committed + r.k + 1)?;
        // Catch up over committed positions not yet in the drafter's cache.
        let catch_up_start = std::time::Instant::now();
        let state = &mut self.slots[r.slot];
        if committed - state.cached > DRAFT_CONTEXT || state.keys.is_none() {
            // Too far behind (a new prompt, or steps without drafts): start over from the last
            // DRAFT_CONTEXT positions rather than catching up on all of them.
            let from = committed.saturating_sub(DRAFT_CONTEXT);
            (state.cached, state.kv_start, state.keys, state.values) = (from, from, None, None);
        }
        let (from, kv_start) = (state.cached, state.kv_start);
        let feats =
            Tensor::from_slice(&state.features[from * fs..committed * fs], (committed - from, fs), &self.device)?;
        let feats = fast_linear(&feats, self.weights.get("fc.weight"))?;
        let embeds = target.embed(&r.tokens[from + 1..committed + 1])?;
        let past = match (&state.keys, &state.values) {
            (Some(k), Some(v)) => Some((k.clone(), v.clone())),
            _ => None,
        };
        let (mut hidden, k, v) =
            self.layer(&feats, &embeds, past.as_ref().map(|(a, b)| (a, b)), kv_start, from, &rope)?;
        let (mut keys, mut values) = match past {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        let mut kv_start = kv_start;
        let held = keys.dim(1)?;
        if held > DRAFT_CONTEXT {
            // Keep the last DRAFT_CONTEXT keys: the context the trainer's windows give it.
            let drop = held - DRAFT_CONTEXT;
            keys = keys.narrow(1, drop, DRAFT_CONTEXT)?.contiguous()?;
            values = values.narrow(1, drop, DRAFT_CONTEXT)?.contiguous()?;
            kv_start += drop;
        }
        let state = &mut self.slots[r.slot];
        state.keys = Some(keys.clone());
        state.values = Some(values.clone());
        state.cached = committed;
        state.kv_start = kv_start;
        self.catch_up.0 += catch_up_start.elapsed().as_secs_f64();
        self.catch_up.1 += committed - from;
        let state = &mut self.slots[r.slot];
        if state.sampler.is_none() {
            state.sampler = Some(drafter_sampler(r.sampling));
        }
        let mut draft = Draft {
            tokens: Vec::with_capacity(r.k),
            probs: (r.sampling.temperature > 0.0).then(Vec::new),
            lookup: false,
            alternatives: Vec::new(),
        };
        let (mut keys, mut values) = (keys, values);
        for step in 0..r.k {
            let logits = self.logits(&hidden)?;
            let sampler = self.slots[r.slot].sampler.as_mut().expect("set above");
            let (id, q) = draft_token(sampler, &logits);
            let token = self.weights.d2t[id as usize];
            if step == 0 && q.is_none() && r.alternatives > 0 {
                // Only runners-up likely enough to pay for their row in the verification forward
                // (each costs ~4% of a step on SmolLM2 / CPU; a step emits ~1.5-2 tokens).
                let max = logits[id as usize];
                let z: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
                draft.alternatives = runners_up(&logits, id, r.alternatives)
                    .into_iter()
                    .filter(|&i| (logits[i as usize] - max).exp() / z >= ALTERNATIVE_MIN_PROB)
                    .map(|i| self.weights.d2t[i as usize])
                    .filter(|&t| t != token)
                    .collect();
            }
            draft.tokens.push(token);
            if let (Some(all), Some(q)) = (draft.probs.as_mut(), q) {
                all.push(q.into_iter().map(|(i, p)| (self.weights.d2t[i as usize], p)).collect());
            }
            if step + 1 == r.k {
                break;
            }
            // Feed back: own hidden state in place of the target's, with the token just drafted.
            let last = hidden.i(hidden.dim(0)? - 1..)?;
            let embeds = target.embed(&[token])?;
            let (h, k, v) = self.layer(&last, &embeds, Some((&keys, &values)), kv_start, committed + step, &rope)?;
            keys = Tensor::cat(&[&keys, &k], 1)?;
            values = Tensor::cat(&[&values, &v], 1)?;
            hidden = h;
        }
        Ok(draft)
    }
}

/// The drafter's least probability for a runner-up of the first draft token to be verified.
const ALTERNATIVE_MIN_PROB: f32 = 0.1;

/// The `n` highest logits but `best`'s, highest first.
fn runners_up(logits: &[f32], best: u32, n: usize) -> Vec<u32> {
    crate::sampling::top_n(logits, n + 1).into_iter().map(|(i, _)| i).filter(|&i| i != best).take(n).collect()
}

impl Drafter for EagleDrafter {
    fn name(&self) -> String {
        match self.lookup {
            Some(_) => "eagle+lookup".into(),
            None => "eagle".into(),
        }
    }

    fn prepare(&mut self, slots: usize, _max_seq_len: usize) -> Result<()> {
        self.slots = (0..slots).map(|_| SlotState::default()).collect();
        Ok(())
    }

    fn target_layers(&self) -> &[usize] {
        &self.config.target_layers
    }

    fn observe(&mut self, slot: usize, start: usize, hidden: &[Tensor]) -> Result<()> {
        let fs = self.feature_size();
        let state = &mut self.slots[slot];
        if start != state.features.len() / fs {
            // A gap (should not happen): start over from what we are given.
            *state = SlotState::default();
            if start != 0 {
                return Ok(());
            }
        }
        let joined = Tensor::cat(hidden, 1)?.to_dtype(DType::F32)?;
        state.features.extend(joined.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    fn propose(&mut self, target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        self.config.check(&target.config)?;
        requests.iter().map(|r| self.propose_one(target, r)).collect()
    }

    fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = SlotState::default();
        }
    }

    fn take_catch_up(&mut self) -> (f64, usize) {
        std::mem::take(&mut self.catch_up)
    }
}

impl TrainableDrafter for EagleDrafter {
    type Weights = EagleWeights;

    fn served_weights(&self) -> Arc<EagleWeights> {
        self.weights.clone()
    }

    fn update(&mut self, weights: Arc<EagleWeights>) -> Result<()> {
        self.set_weights(weights)
    }
}

/// cos / sin tables [n, head_dim] for positions 0..n in the HF layout (the two halves of each head
/// share frequencies: rotate_half). The drafter and its trainer use the same tables.
pub fn rope_tables(c: &EagleConfig, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let d = c.head_dim;
    let inv: Vec<f32> = (0..d / 2).map(|i| (c.rope_theta.powf(-2.0 * i as f64 / d as f64)) as f32).collect();
    let mut angles = Vec::with_capacity(n * d);
    for p in 0..n {
        for _half in 0..2 {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
    }
    let a = Tensor::from_vec(angles, (n, d), device)?;
    Ok((a.cos()?, a.sin()?))
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(1e-12);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Inference-only projection through the engine's streaming kernels (reads each weight row once;
/// candle's gemm is slow for the one-row products drafting makes). No autograd.
fn fast_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(tandem_models::ops::matmul_xwt(x, w, tandem_models::OpsPath::for_device(x.device()))?)
}

pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_core::Tensor::exp(&x.neg()?)?.affine(1.0, 1.0)?.recip()?)?)
}

pub fn candle_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// x: [t, heads, d]; cos, sin: [t, 1, d] in rotate-half layout.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// [kv_heads, n, d] -> [kv_heads * group, n, d], each kv head serving `group` query heads.
pub fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (kvh, n, d) = x.dims3()?;
    Ok(x.unsqueeze(1)?.expand((kvh, group, n, d))?.reshape((kvh * group, n, d))?)
}
