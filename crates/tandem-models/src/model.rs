//! The decoder-only transformer shared by Llama, Qwen2 and Qwen3: pre-norm blocks of GQA attention
//! with rope and a SwiGLU MLP. The model holds only weights; the caller owns the KV cache and
//! says, per forward, which sequences (slots) advance by which tokens.
//!
//! Over 600 lines because loading (building the blocks from any checkpoint) and the forward
//! (serving's batched one and training's whole-sequence one, sharing `blocks_forward`) belong
//! together: both follow the same weight layout.
use crate::config::{KvDtype, ModelConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::ops::quant::QWeight;
use crate::ops::{self, OpsPath, RopeTables, TokenSlot};
use crate::weights::{Weight, WeightSource};
use candle_core::{Device, Tensor};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct Block {
    pub(crate) attn_norm: Tensor,
    /// q, k and v projections as one [q + 2 kv, hidden] product.
    pub(crate) qkv: Linear,
    pub(crate) q_norm: Option<Tensor>,
    pub(crate) k_norm: Option<Tensor>,
    pub(crate) o_proj: Linear,
    pub(crate) mlp_norm: Tensor,
    /// gate and up projections as one [2 intermediate, hidden] product.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
    /// Set when keys and values are factored (CARE): `qkv` then computes q and the two latents.
    pub(crate) latent: Option<LatentExpansion>,
}

pub(crate) use crate::latent::LatentExpansion;
pub use crate::latent::{KvProjections, LatentFactors};

/// The token embedding table: dense, or GGUF blocks whose rows are dequantized as they are
/// gathered (a tied output projection shares the same blocks).
#[derive(Clone)]
pub(crate) enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QWeight>),
}

impl Embedding {
    /// Rows `ids` [ids.len(), hidden], in the table's dtype (quantized: f32).
    fn rows(&self, ids: &[u32], path: OpsPath, device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(crate::ops::gather_rows(t, ids, path)?),
            Embedding::Quantized(w) => {
                let mut rows = vec![0f32; ids.len() * w.cols];
                for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(w.cols)) {
                    w.dequantize_row(id as usize, out);
                }
                Ok(Tensor::from_vec(rows, (ids.len(), w.cols), device)?)
            }
        }
    }

    /// The whole table (a dequantized copy when quantized).
    pub(crate) fn table(&self) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.clone()),
            Embedding::Quantized(w) => Ok(Tensor::from_vec(w.dequantize(), (w.rows, w.cols), &Device::Cpu)?),
        }
    }

    pub(crate) fn dense(&self) -> Option<&Tensor> {
        match self {
            Embedding::Dense(t) => Some(t),
            Embedding::Quantized(_) => None,
        }
    }
}

/// Cloning a model shares its weights (candle tensors are reference counted): a clone with
/// adapters or replaced weights (`with_lora`, `with_parameters`) is a new weight version at the
/// cost of only what changed.
#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    pub(crate) rope: RopeTables,
    pub(crate) device: Device,
    pub(crate) path: OpsPath,
}

/// Sees each layer's attention input (`Model::observe_attention_inputs`).
type Observer<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

/// Which positions of a sequence's new tokens get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
    /// Indices into the sequence's new tokens.
    Positions(Vec<usize>),
}

/// One sequence's share of a batched forward: its new tokens are appended to its cache slot.
#[derive(Debug, Clone)]
pub struct SequenceInput<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
    /// The last `siblings.len()` tokens are alternatives (a draft tree: the chain with branches of
    /// one token): sibling j stands beside tokens[siblings[j]] (an index of at least 1 into the
    /// chain), at that token's position, and attends to the cache, the chain before that position
    /// and itself only. Their keys and values land after the chain's; `KvCache::move_position`
    /// puts a chosen one in place. Empty for a plain run of consecutive tokens.
    pub siblings: &'a [usize],
}

#[derive(Debug)]
pub struct ForwardOutput {
    /// [rows, vocab] f32: the selected positions of every sequence, in batch order.
    pub logits: Tensor,
    /// For each sequence, its rows in `logits`.
    pub logit_rows: Vec<Range<usize>>,
    /// For each requested layer, the residual stream after that layer: [total new tokens, hidden],
    /// sequences in batch order.
    pub hidden: Vec<Tensor>,
}

/// How dense projection weights are held in memory (norms, biases and activations stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    /// Half the bytes streamed per token; products still accumulate in f32.
    Bf16,
}

/// Options to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Keep GGUF block-quantized weights as they are (smaller, compute-bound) instead of dense.
    pub keep_quantized: bool,
    pub weight_dtype: WeightDtype,
    /// What the KV cache holds (`ModelConfig::kv_dtype`).
    pub kv_dtype: crate::config::KvDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            keep_quantized: false,
            weight_dtype: WeightDtype::F32,
            kv_dtype: Default::default(),
        }
    }
}

struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    opts: &'a LoadOptions,
    loaded: usize,
    total: usize,
    progress: &'a mut dyn FnMut(usize, usize),
}

impl Builder<'_> {
    fn fetch(&mut self, name: &str, keep_quantized: bool) -> Result<Option<Weight>> {
        let w = self.source.get(name, keep_quantized && self.opts.keep_quantized)?;
        self.loaded += 1;
        (self.progress)(self.loaded.min(self.total), self.total);
        Ok(w)
    }

    fn check_shape(&self, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual != expected {
            return Err(ModelError::WrongShape {
                path: self.source.path().into(),
                name: name.into(),
                actual: actual.to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    /// A dense projection matrix in the requested storage type.
    fn projection(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self.opts.weight_dtype {
            WeightDtype::F32 => t,
            WeightDtype::Bf16 => t.to_dtype(candle_core::DType::BF16)?,
        })
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor { path: self.source.path().into(), name: name.into() }
    }

    fn dense_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        match self.fetch(name, false)? {
            None => Ok(None),
            Some(Weight::Dense(t)) => {
                self.check_shape(name, t.dims(), shape)?;
                Ok(Some(t))
            }
            Some(Weight::Quantized(q)) => {
                self.check_shape(name, q.shape().dims(), shape)?;
                Ok(Some(q.dequantize(&self.opts.device)?))
            }
        }
    }

    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.dense_opt(name, shape)?.ok_or_else(|| self.missing(name))
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = match self.fetch(&name, true)? {
            None => return Err(self.missing(&name)),
            Some(w) => w,
        };
        let bias = if bias { Some(self.dense(&format!("{prefix}.bias"), &[out])?) } else { None };
        match weight {
            Weight::Dense(t) => {
                self.check_shape(&name, t.dims(), &[out, inp])?;
                Ok(Linear::dense(self.projection(t)?, bias))
            }
            Weight::Quantized(q) => {
                self.check_shape(&name, q.shape().dims(), &[out, inp])?;
                Ok(Linear::quantized(q, bias)?)
            }
        }
    }
}

impl Model {
    /// Builds the model from a weight source; `progress(done, total)` is called per tensor.
    /// The rope tables cover `config.max_position_embeddings`, the longest usable sequence.
    pub fn load(
        mut config: ModelConfig,
        source: &mut dyn WeightSource,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        config.kv_dtype = opts.kv_dtype;
        let c = &config;
        let (hidden, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_size, kv_size) = (c.q_size(), c.kv_size());
        let latent_parts = if c.latent_kv.is_some() { 2 } else { 0 };
        let total = 3 + c.num_layers
            * (9 + latent_parts + if c.attention_bias { 3 } else { 0 } + if c.qk_norm { 2 } else { 0 });
        let mut b = Builder { source, opts, loaded: 0, total, progress };

        let embed_name = "model.embed_tokens.weight";
        let embed_q = b.fetch(embed_name, true)?.ok_or_else(|| b.missing(embed_name))?;
        let (embed, tied_head) = match embed_q {
            Weight::Dense(t) => {
                b.check_shape(embed_name, t.dims(), &[vocab, hidden])?;
                let head =
                    if c.tie_word_embeddings { Some(Linear::dense(b.projection(t.clone())?, None)) } else { None };
                (Embedding::Dense(t), head)
            }
            Weight::Quantized(q) => {
                b.check_shape(embed_name, q.shape().dims(), &[vocab, hidden])?;
                // Kept as blocks (shared with a tied output projection) where the kernels take
                // the format, else dense.
                match Linear::quantized(q, None)? {
                    Linear::Quantized { weight, bias } => {
                        (Embedding::Quantized(weight.clone()), Some(Linear::Quantized { weight, bias }))
                    }
                    dense => (Embedding::Dense(dense.dense_weight().expect("dense").clone()), Some(dense)),
                }
            }
        };

        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let attn_norm = b.dense(&format!("{p}.input_layernorm.weight"), &[hidden])?;
            let q = b.linear(&format!("{p}.self_attn.q_proj"), q_size, hidden, c.attention_bias)?;
            let (k, v, latent) = if c.latent_kv.is_some() {
                let (r_k, r_v) = c.kv_widths(i);
                let k = b.linear(&format!("{p}.self_attn.k_a_proj"), r_k, hidden, false)?;
                let v = b.linear(&format!("{p}.self_attn.v_a_proj"), r_v, hidden, false)?;
                let up = |b: &mut Builder, name: &str, r: usize| -> Result<(Tensor, Option<Tensor>)> {
                    let w = b.dense(&format!("{p}.self_attn.{name}.weight"), &[kv_size, r])?;
                    let bias = match c.attention_bias {
                        true => Some(b.dense(&format!("{p}.self_attn.{name}.bias"), &[kv_size])?),
                        false => None,
                    };
                    Ok((w.to_dtype(candle_core::DType::F32)?, bias))
                };
                let (k_up, k_bias) = up(&mut b, "k_b_proj", r_k)?;
                let (v_up, v_bias) = up(&mut b, "v_b_proj", r_v)?;
                (k, v, Some(LatentExpansion { k_up, k_bias, v_up, v_bias }))
            } else {
                let k = b.linear(&format!("{p}.self_attn.k_proj"), kv_size, hidden, c.attention_bias)?;
                let v = b.linear(&format!("{p}.self_attn.v_proj"), kv_size, hidden, c.attention_bias)?;
                (k, v, None)
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(b.dense(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?),
                    Some(b.dense(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?),
                )
            } else {
                (None, None)
            };
            let o_proj = b.linear(&format!("{p}.self_attn.o_proj"), hidden, q_size, false)?;
            let mlp_norm = b.dense(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?;
            let gate = b.linear(&format!("{p}.mlp.gate_proj"), inter, hidden, false)?;
            let up = b.linear(&format!("{p}.mlp.up_proj"), inter, hidden, false)?;
            let down = b.linear(&format!("{p}.mlp.down_proj"), hidden, inter, false)?;
            blocks.push(Block {
                attn_norm,
                qkv: Linear::fuse(vec![q, k, v])?,
                q_norm,
                k_norm,
                o_proj,
                mlp_norm,
                gate_up: Linear::fuse(vec![gate, up])?,
                down,
                latent,
            });
        }
        let norm = b.dense("model.norm.weight", &[hidden])?;
        let lm_head = if let (true, Some(head)) = (c.tie_word_embeddings, tied_head) {
            head
        } else {
            match b.fetch("lm_head.weight", true)? {
                Some(Weight::Dense(t)) => {
                    b.check_shape("lm_head.weight", t.dims(), &[vocab, hidden])?;
                    Linear::dense(b.projection(t)?, None)
                }
                Some(Weight::Quantized(q)) => {
                    b.check_shape("lm_head.weight", q.shape().dims(), &[vocab, hidden])?;
                    Linear::quantized(q, None)?
                }
                None => return Err(b.missing("lm_head.weight")),
            }
        };
        let rope =
            RopeTables::new(c.head_dim, c.rope_theta, c.max_position_embeddings, c.rope_interleaved, &opts.device)?;
        Ok(Model {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device: opts.device.clone(),
            path: OpsPath::for_device(&opts.device),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when every projection is a dense matrix (training differentiates through them).
    pub fn is_dense(&self) -> bool {
        let dense = |l: &Linear| l.dense_weight().is_some();
        dense(&self.lm_head)
            && self.blocks.iter().all(|b| dense(&b.qkv) && dense(&b.o_proj) && dense(&b.gate_up) && dense(&b.down))
    }

    /// Longest sequence the rope tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Chooses the op implementations (tests run the generic path on CPU to check it).
    pub fn set_ops_path(&mut self, path: OpsPath) {
        self.path = path;
    }

    /// The op implementations in use.
    pub fn ops_path(&self) -> OpsPath {
        self.path
    }

    /// Bytes of weights streamed by one decode step (the embedding table is only gathered).
    pub fn weight_bytes_per_token(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.blocks
            .iter()
            .map(|b| {
                b.qkv.weight_bytes()
                    + b.o_proj.weight_bytes()
                    + b.gate_up.weight_bytes()
                    + b.down.weight_bytes()
                    + dense(&b.attn_norm)
                    + dense(&b.mlp_norm)
                    + b.latent.as_ref().map_or(0, |l| dense(&l.k_up) + dense(&l.v_up))
            })
            .sum::<usize>()
            + self.lm_head.weight_bytes()
            + dense(&self.norm)
    }

    /// The embedding table itself (shares storage with the model: no copy; a quantized table is
    /// dequantized into a copy, which the drafter's trainer reads).
    pub fn embedding_table(&self) -> Result<Tensor> {
        self.embed.table()
    }

    /// Rows `ids` of the output projection (and the final norm's weight) as f32, for drafters that
    /// start from the target's unembedding.
    pub fn unembedding_rows(&self, ids: &[u32]) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        let rows = match &self.lm_head {
            Linear::Dense { weight, .. } => weight.index_select(&idx, 0)?,
            Linear::Quantized { weight, .. } => {
                let mut rows = vec![0f32; ids.len() * weight.cols];
                for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(weight.cols)) {
                    weight.dequantize_row(id as usize, out);
                }
                Tensor::from_vec(rows, (ids.len(), weight.cols), &self.device)?
            }
            _ => self.embed.rows(ids, self.path, &self.device)?,
        };
        let f32 = candle_core::DType::F32;
        Ok((rows.to_dtype(f32)?, self.norm.to_dtype(f32)?))
    }

    /// f32 weights of block `layer` under Hugging Face names (`self_attn.q_proj.weight`, ...),
    /// quantized blocks dequantized. Drafters may start from them.
    pub fn layer_weights(&self, layer: usize) -> Option<std::collections::HashMap<String, Tensor>> {
        let b = self.blocks.get(layer)?;
        let dense = |l: &Linear| match l {
            Linear::Dense { weight, .. } => weight.to_dtype(candle_core::DType::F32).ok(),
            // Quantized blocks are dequantized: a drafter warm-started from a quantized target
            // gets the same layer it would from the f32 file.
            Linear::Quantized { weight, .. } => {
                Tensor::from_vec(weight.dequantize(), (weight.rows, weight.cols), &self.device).ok()
            }
            _ => None,
        };
        let c = &self.config;
        let (q, i) = (c.q_size(), c.intermediate_size);
        let qkv = dense(&b.qkv)?;
        let gate_up = dense(&b.gate_up)?;
        let mut m = std::collections::HashMap::new();
        m.insert("self_attn.q_proj.weight".into(), qkv.narrow(0, 0, q).ok()?);
        let kv = self.kv_projections(layer).ok()?;
        m.insert("self_attn.k_proj.weight".into(), kv.k);
        m.insert("self_attn.v_proj.weight".into(), kv.v);
        m.insert("self_attn.o_proj.weight".into(), dense(&b.o_proj)?);
        m.insert("mlp.gate_proj.weight".into(), gate_up.narrow(0, 0, i).ok()?);
        m.insert("mlp.up_proj.weight".into(), gate_up.narrow(0, i, i).ok()?);
        m.insert("mlp.down_proj.weight".into(), dense(&b.down)?);
        m.insert("input_layernorm.weight".into(), b.attn_norm.to_dtype(candle_core::DType::F32).ok()?);
        m.insert("post_attention_layernorm.weight".into(), b.mlp_norm.to_dtype(candle_core::DType::F32).ok()?);
        Some(m)
    }

    /// Token embeddings as f32 rows [ids.len(), hidden] (drafters share the target's table).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.embed.rows(ids, self.path, &self.device)?.to_dtype(candle_core::DType::F32)?)
    }

    /// Appends each sequence's tokens to its cache slot and returns the requested logits and
    /// hidden states. `hidden_layers` are 0-based layer indices.
    pub fn forward(
        &self,
        batch: &[SequenceInput],
        cache: &mut KvCache,
        hidden_layers: &[usize],
    ) -> Result<ForwardOutput> {
        ops::on_compute_threads(|| self.forward_here(batch, cache, hidden_layers))
    }

    /// `forward` on the calling thread.
    fn forward_here(
        &self,
        batch: &[SequenceInput],
        cache: &mut KvCache,
        hidden_layers: &[usize],
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut tokens = Vec::new();
        // RoPE positions: a sibling's is its first sibling's, not its cache row's.
        let mut positions = Vec::new();
        let mut rows = Vec::new();
        let mut logit_rows = Vec::with_capacity(batch.len());
        let mut seen = vec![false; cache.num_slots()];
        let limit = cache.capacity().min(self.max_positions());
        for seq in batch {
            if seq.slot >= cache.num_slots() {
                return Err(ModelError::InvalidBatch(format!(
                    "slot {} does not exist ({} slots)",
                    seq.slot,
                    cache.num_slots()
                )));
            }
            if std::mem::replace(&mut seen[seq.slot], true) {
                return Err(ModelError::InvalidBatch(format!("slot {} appears twice in one batch", seq.slot)));
            }
            if seq.tokens.is_empty() {
                return Err(ModelError::InvalidBatch(format!("slot {} has no new tokens", seq.slot)));
            }
            let start = cache.len(seq.slot);
            if start + seq.tokens.len() > limit {
                return Err(ModelError::InvalidBatch(format!(
                    "slot {} would hold {} tokens, more than the {} it can",
                    seq.slot,
                    start + seq.tokens.len(),
                    limit
                )));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::InvalidBatch(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            let chain = seq.tokens.len().saturating_sub(seq.siblings.len());
            if let Some(&of) = seq.siblings.iter().find(|&&of| of == 0 || of >= chain) {
                return Err(ModelError::InvalidBatch(format!(
                    "slot {}: a sibling of token {of} needs a token before it and one to stand beside \
                     ({chain} in the chain)",
                    seq.slot
                )));
            }
            let base = ids.len();
            let first_row = rows.len();
            match &seq.logits {
                LogitsFor::None => {}
                LogitsFor::Last => rows.push((base + seq.tokens.len() - 1) as u32),
                LogitsFor::All => rows.extend((0..seq.tokens.len()).map(|i| (base + i) as u32)),
                LogitsFor::Positions(ps) => {
                    for &p in ps {
                        if p >= seq.tokens.len() {
                            return Err(ModelError::InvalidBatch(format!(
                                "logits position {p} is past the {} new tokens",
                                seq.tokens.len()
                            )));
                        }
                        rows.push((base + p) as u32);
                    }
                }
            }
            logit_rows.push(first_row..rows.len());
            ids.extend_from_slice(seq.tokens);
            let beside = |i: usize| if i < chain { i } else { seq.siblings[i - chain] };
            tokens.extend((0..seq.tokens.len()).map(|i| match i < chain {
                true => TokenSlot::causal(seq.slot, start + i),
                false => TokenSlot { slot: seq.slot, pos: start + i, prefix: start + beside(i) },
            }));
            positions.extend((0..seq.tokens.len()).map(|i| start + beside(i)));
        }
        if let Some(&l) = hidden_layers.iter().find(|&&l| l >= c.num_layers) {
            return Err(ModelError::InvalidBatch(format!("layer {l} does not exist ({} layers)", c.num_layers)));
        }
        cache.reserve_batch(batch.iter().map(|s| (s.slot, s.tokens.len())))?;

        let path = self.path;
        let x = self.embed.rows(&ids, self.path, &self.device)?;
        let mut attend = |l: usize, q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            ops::cache_write(&cache.keys[l], k, &tokens, &cache.tables, path)?;
            ops::cache_write(&cache.values[l], v, &tokens, &cache.tables, path)?;
            let (kc, vc, tables) = (&cache.keys[l], &cache.values[l], &cache.tables);
            Ok(match self.latent_weights(l) {
                Some(w) => ops::latent::latent_attention(q, kc, vc, &tokens, &positions, tables, &w, path)?,
                None => ops::attention(q, kc, vc, &tokens, tables, path)?,
            })
        };
        let (x, hidden) = self.blocks_forward(x, &positions, hidden_layers, &mut attend, None, None)?;
        for seq in batch {
            let len = cache.len(seq.slot) + seq.tokens.len();
            cache.set_len(seq.slot, len);
        }
        let logits = if rows.is_empty() {
            Tensor::zeros((0, c.vocab_size), candle_core::DType::F32, &self.device)?
        } else {
            let n = rows.len();
            let sel = x.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
            let sel = ops::rms_norm(&sel, &self.norm, c.rms_norm_eps, path)?;
            self.lm_head.forward(&sel, path)?
        };
        Ok(ForwardOutput { logits, logit_rows, hidden })
    }

    /// The blocks over embedded tokens x: [t, hidden] at `positions`; `attend(layer, q, k, v)`
    /// does the attention (a latent layer passes its latents as k [t, 1, r_K] and v [t, 1, r_V],
    /// unroped), except in plain layers when `packed` gives the lengths of whole sequences packed
    /// one after another (their self-attention is then one op on qkv); `observe(layer, h)`, if
    /// given, sees each layer's attention input. Returns the final residual stream and the
    /// requested layers' streams in the order asked.
    fn blocks_forward(
        &self,
        mut x: Tensor,
        positions: &[usize],
        hidden_layers: &[usize],
        attend: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        packed: Option<&[usize]>,
        mut observe: Option<Observer>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let path = self.path;
        let mut hidden = Vec::with_capacity(hidden_layers.len());
        for (l, b) in self.blocks.iter().enumerate() {
            let plain = b.latent.is_none() && b.q_norm.is_none() && b.k_norm.is_none();
            if let Some(out) = self.trained_layer(l, &x, positions, packed.filter(|_| plain && observe.is_none()))? {
                x = out;
                if hidden_layers.contains(&l) {
                    hidden.push((l, x.clone()));
                }
                continue;
            }
            let h = ops::rms_norm(&x, &b.attn_norm, c.rms_norm_eps, path)?;
            if let Some(f) = observe.as_mut() {
                f(l, &h)?;
            }
            let qkv = b.qkv.forward(&h, path)?;
            let a = match packed.filter(|_| plain) {
                Some(lens) => {
                    let heads = (c.num_heads, c.num_kv_heads, c.head_dim);
                    ops::packed_self_attention(&qkv, heads, positions, &self.rope, lens, c.kv_dtype, path)?
                }
                None => {
                    let (q, k, v) = self.split_qkv(l, &qkv, positions)?;
                    attend(l, &q, &k, &v)?
                }
            };
            x = ops::add(&x, &b.o_proj.forward(&a, path)?, path)?;
            let h = ops::rms_norm(&x, &b.mlp_norm, c.rms_norm_eps, path)?;
            let m = ops::silu_mul(&b.gate_up.forward(&h, path)?, path)?;
            x = ops::add(&x, &b.down.forward(&m, path)?, path)?;
            if hidden_layers.contains(&l) {
                hidden.push((l, x.clone()));
            }
        }
        let hidden = hidden_layers
            .iter()
            .map(|l| hidden.iter().find(|(hl, _)| hl == l).map(|(_, t)| t.clone()).expect("layer recorded"))
            .collect();
        Ok((x, hidden))
    }

    /// Layer `l` as one node of the training graph (`ops::layer`), for whole sequences of
    /// `packed` lengths on the CPU kernels; None where it cannot be (the caller builds the layer
    /// from separate ops).
    fn trained_layer(
        &self,
        l: usize,
        x: &Tensor,
        positions: &[usize],
        packed: Option<&[usize]>,
    ) -> Result<Option<Tensor>> {
        let (Some(lens), OpsPath::CpuKernels) = (packed, self.path) else { return Ok(None) };
        let (c, b) = (&self.config, &self.blocks[l]);
        let weights = ops::layer::LayerWeights {
            attn_norm: b.attn_norm.clone(),
            qkv: b.qkv.clone(),
            o_proj: b.o_proj.clone(),
            mlp_norm: b.mlp_norm.clone(),
            gate_up: b.gate_up.clone(),
            down: b.down.clone(),
            eps: c.rms_norm_eps,
            heads: (c.num_heads, c.num_kv_heads, c.head_dim),
            kv: c.kv_dtype,
        };
        Ok(ops::layer::trained_layer(x, weights, positions, &self.rope, lens)?)
    }

    /// Layer `l`'s q [t, heads, d] (normed, roped), k (normed, roped; a latent layer's unroped
    /// latents [t, 1, r_K]) and v from its projection qkv [t, q + k + v].
    fn split_qkv(&self, l: usize, qkv: &Tensor, positions: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        let (c, b, path, t) = (&self.config, &self.blocks[l], self.path, positions.len());
        let q_size = c.q_size();
        let (k_w, v_w) = c.kv_widths(l);
        let mut q = qkv.narrow(1, 0, q_size)?.reshape((t, c.num_heads, c.head_dim))?;
        let (k, v) = if b.latent.is_some() {
            (qkv.narrow(1, q_size, k_w)?.reshape((t, 1, k_w))?, qkv.narrow(1, q_size + k_w, v_w)?.reshape((t, 1, v_w))?)
        } else {
            let mut k = qkv.narrow(1, q_size, k_w)?.reshape((t, c.num_kv_heads, c.head_dim))?;
            if let Some(kn) = &b.k_norm {
                k = ops::rms_norm(&k, kn, c.rms_norm_eps, path)?;
            }
            let v = qkv.narrow(1, q_size + k_w, v_w)?.reshape((t, c.num_kv_heads, c.head_dim))?;
            (ops::rope(&k, positions, &self.rope, path)?, v)
        };
        if let Some(qn) = &b.q_norm {
            q = ops::rms_norm(&q, qn, c.rms_norm_eps, path)?;
        }
        Ok((ops::rope(&q, positions, &self.rope, path)?, k, v))
    }

    /// Layer `l`'s latent expansions as the attention ops take them (None: a plain layer).
    fn latent_weights(&self, l: usize) -> Option<ops::latent::LatentWeights<'_>> {
        let b = &self.blocks[l];
        let lat = b.latent.as_ref()?;
        Some(ops::latent::LatentWeights {
            k_up: &lat.k_up,
            k_bias: lat.k_bias.as_ref(),
            v_up: &lat.v_up,
            v_bias: lat.v_bias.as_ref(),
            k_norm: b.k_norm.as_ref().map(|n| (n, self.config.rms_norm_eps)),
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            rope: &self.rope,
        })
    }

    /// Logits [t, vocab] at every position of one whole sequence, without a KV cache. Gradients
    /// flow to any weights or adapters that are candle `Var`s (training); the values equal the
    /// rows serving computes for the same tokens and weights.
    pub fn forward_sequence(&self, tokens: &[u32]) -> Result<Tensor> {
        self.forward_sequences(&[tokens])
    }

    /// `forward_sequence` of several sequences in one pass (each attends only to itself): their
    /// logits rows one after another. Bigger products, fewer ops; the same values.
    pub fn forward_sequences(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.final_hidden(seqs)?, self.path)?)
    }

    /// The logprob of `targets[s][i]` after position i of sequence s, for whole sequences packed
    /// as in `forward_sequences` -> [total tokens]. Differentiable (the training losses' input),
    /// computed without vocabulary-sized logits (`ops::head`); the values are the sampler's
    /// logprobs bit for bit.
    pub fn target_logprobs(&self, seqs: &[&[u32]], targets: &[&[u32]]) -> Result<Tensor> {
        if seqs.len() != targets.len() || seqs.iter().zip(targets).any(|(s, t)| s.len() != t.len()) {
            return Err(ModelError::InvalidBatch("every sequence needs one target per token".into()));
        }
        let h = self.final_hidden(seqs)?;
        let all: Vec<u32> = targets.concat();
        Ok(ops::head::target_logprobs(&h, &self.lm_head, &all, self.path)?)
    }

    /// The final norm's output for whole sequences packed one after another: [total tokens, hidden].
    fn final_hidden(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut lens = Vec::with_capacity(seqs.len());
        for tokens in seqs {
            if tokens.is_empty() {
                return Err(ModelError::InvalidBatch("a sequence is empty".into()));
            }
            if tokens.len() > self.max_positions() {
                return Err(ModelError::InvalidBatch(format!(
                    "a sequence has {} tokens, more than the {} the model holds",
                    tokens.len(),
                    self.max_positions()
                )));
            }
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::InvalidBatch(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            ids.extend_from_slice(tokens);
            positions.extend(0..tokens.len());
            lens.push(tokens.len());
        }
        if ids.is_empty() {
            return Err(ModelError::InvalidBatch("no sequences".into()));
        }
        let (x, _) = self.sequences_forward(&ids, &positions, &lens, None)?;
        Ok(ops::rms_norm(&x, &self.norm, c.rms_norm_eps, self.path)?)
    }

    /// The blocks over packed whole sequences (no cache): a latent layer's keys and values are
    /// expanded in full (gradients reach the latents and the expansions).
    fn sequences_forward(
        &self,
        ids: &[u32],
        positions: &[usize],
        lens: &[usize],
        observe: Option<Observer>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let path = self.path;
        let x = self.embed.rows(ids, self.path, &self.device)?;
        let kv = self.config.kv_dtype;
        let mut attend = |l: usize, q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            Ok(match self.latent_weights(l) {
                // Serving's cache holds the latents (rounded as it holds them) and expands them
                // in f32: the expanded keys and values are not rounded again.
                Some(w) => {
                    let (k, v) = (ops::as_cached(&k.squeeze(1)?, kv)?, ops::as_cached(&v.squeeze(1)?, kv)?);
                    let k = ops::latent::expand_keys_on(&k, positions, &w, path)?;
                    let v = ops::latent::expand_values(&v, &w, path)?;
                    ops::self_attention(q, &k, &v, lens, KvDtype::F32, path)?
                }
                None => ops::self_attention(q, k, v, lens, kv, path)?,
            })
        };
        self.blocks_forward(x, positions, &[], &mut attend, Some(lens), observe)
    }

    /// Runs whole sequences through the model and shows `observe(layer, h)` each layer's
    /// attention input h [tokens, hidden] (the normed stream k, v and q are projected from): the
    /// calibration pass of a KV conversion. Only one layer's inputs exist at a time.
    pub fn observe_attention_inputs(
        &self,
        seqs: &[&[u32]],
        observe: &mut (dyn FnMut(usize, &Tensor) -> Result<()> + Send),
    ) -> Result<()> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs {
            ids.extend_from_slice(s);
            positions.extend(0..s.len());
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        ops::on_compute_threads(|| {
            let observe: &mut dyn FnMut(usize, &Tensor) -> Result<()> = observe;
            self.sequences_forward(&ids, &positions, &lens, Some(observe)).map(|_| ())
        })
    }
}
