//! The drafter's trainer: candle autograd over the EAGLE layer, AdamW (`adam`), gradient clipping.
//!
//! Loss, over windows of recorded traces (positions of prompts and outputs alike):
//! - soft cross-entropy (forward KL up to a constant) from the target's distribution at t + 1 to the
//!   drafter's prediction at t, unrolled over `ttt_steps` training-time-test steps in which the
//!   drafter reads its own previous output in place of the target's features, exactly as it does
//!   when drafting (step i weighted `step_decay^i`);
//! - a discard term on rejected proposals, `-log(1 - q(rejected))` at the step that drafted them,
//!   weighted `discard_weight`: it pushes mass away from tokens the target refused.
//!
//! The attention of step i mirrors drafting: a query at position t sees the target-feature keys up
//! to t - i (where its chain started) and the keys its own chain made at steps 1..=i.
use crate::adam::AdamW;
use crate::loss::{step_loss, LossTerms};
use crate::pool::Batch;
use crate::sampled::SampledVocab;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::ParamsAdamW;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tandem_models::ops::{self, RopeTables};
use tandem_models::{ModelError, OpsPath, Result};
use tandem_runtime::speculative::eagle::{layer::rope_tables, EagleLayer, EagleTensors, HEAD_NAMES};
use tandem_runtime::speculative::{EagleConfig, EagleWeights};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub lr: f64,
    /// Positions per optimizer step (windows are packed into one sequence).
    pub batch_positions: usize,
    /// Longest window taken from one trace.
    pub window: usize,
    pub ttt_steps: usize,
    pub step_decay: f64,
    pub discard_weight: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    pub weight_decay: f64,
    /// Keep `lm_head` and `norm` as initialised (EAGLE-1's choice with a head copied from the
    /// target): the drafter then only learns to produce hidden states the target's head reads.
    pub freeze_head: bool,
    /// Weight of positions labelled with the text's next token rather than the target's
    /// distribution (prompt positions) relative to output positions.
    pub prompt_weight: f64,
    /// Gaussian noise added to the target's features while training, as a share of each row's
    /// RMS (EAGLE's augmentation: the drafter must not rely on exact features it will not see).
    pub feature_noise: f64,
    /// Draft ids scored per training step (`sampled`: the labels' likely tokens plus uniformly
    /// drawn others standing for the rest); 0 or at least the draft vocabulary: all of them.
    /// Evaluation always scores the whole draft vocabulary. 1,024 of SmolLM2's 8,192: a step
    /// 1.9x cheaper, held-out agreement per step 0.00-0.02 lower over 400 steps from a warm
    /// start (0.443 against 0.460), so higher per unit of CPU (docs/speculative-decoding.md).
    pub sampled_vocab: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            batch_positions: 128,
            window: 64,
            ttt_steps: 3,
            step_decay: 0.8,
            discard_weight: 0.1,
            grad_clip: 2.5,
            weight_decay: 0.0,
            freeze_head: false,
            prompt_weight: 1.0,
            feature_noise: 0.0,
            sampled_vocab: 1024,
            seed: 0,
        }
    }
}

/// Figures of one optimizer step (or one evaluation).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// The whole weighted loss.
    pub loss: f64,
    /// Cross-entropy of the first step (what drafting the first token sees).
    pub ce0: f64,
    /// Share of labelled positions whose top drafter token is the target's top token, first step
    /// (in a step over a sampled vocabulary, the top among the ids scored).
    pub top1: f64,
    /// The same for the second step (the drafter reading its own previous output), when unrolled.
    pub top1_second: f64,
    pub discard: f64,
    pub grad_norm: f64,
    pub positions: usize,
}

impl StepStats {
    /// Adds a part's figures weighted by its `share` of the step's labelled rows.
    fn add(&mut self, part: &StepStats, share: f64) {
        self.loss += share * part.loss;
        self.ce0 += share * part.ce0;
        self.top1 += share * part.top1;
        self.top1_second += share * part.top1_second;
        self.discard += share * part.discard;
        self.positions += part.positions;
    }
}

pub struct Trainer {
    pub config: EagleConfig,
    pub train: TrainConfig,
    vars: EagleTensors<Var>,
    d2t: Vec<u32>,
    /// Target id -> draft id (-1: outside the draft vocabulary).
    t2d: Vec<i32>,
    /// The target's embedding table (frozen, shared with the target: no copy).
    embed: Tensor,
    /// The target's unembedding rows of the draft vocabulary and its final norm, when given:
    /// they turn a recorded last residual stream into the target's distribution (labels for
    /// prompt positions).
    target_head: Option<(Tensor, Tensor)>,
    opt: AdamW,
    device: Device,
    path: OpsPath,
    rope: RopeTables,
    /// With `freeze_head`: one copy of the head's tensors, the same in every published version,
    /// so the server keeps their served form instead of converting them again per version.
    frozen_head: Vec<(&'static str, Tensor)>,
    pub steps: u64,
}

impl Trainer {
    pub fn new(config: EagleConfig, weights: &EagleWeights, embed: Tensor, train: TrainConfig) -> Result<Self> {
        weights.check_shapes(&config)?;
        let device = embed.device().clone();
        // Every drafter tensor is trained (the embedding is the target's, frozen, and not among
        // them), except the head's with `freeze_head`.
        let vars = weights.tensors.try_map(|_, t| -> Result<Var> {
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(&device)?.copy()?)?)
        })?;
        let mut t2d = vec![-1i32; config.vocab_size];
        for (d, &t) in weights.d2t.iter().enumerate() {
            t2d[t as usize] = d as i32;
        }
        let params = ParamsAdamW { lr: train.lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: train.weight_decay };
        let frozen = |n: &str| train.freeze_head && HEAD_NAMES.contains(&n);
        let frozen_head = vars
            .named()
            .filter(|(n, _)| frozen(n))
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        let trained = vars.named().filter(|(n, _)| !frozen(n));
        let opt = AdamW::new(trained.map(|(_, v)| v.clone()).collect(), params)?;
        let rope = rope_tables(&config, crate::pool::MAX_POSITION, &device)?;
        Ok(Trainer {
            config,
            train,
            vars,
            d2t: weights.d2t.clone(),
            t2d,
            embed,
            target_head: None,
            opt,
            path: OpsPath::for_device(&device),
            device,
            rope,
            frozen_head,
            steps: 0,
        })
    }

    /// Labels positions that have the target's last residual stream recorded with the target's
    /// own distribution, computed here from its head (`Model::unembedding_rows` of the draft
    /// vocabulary: rows [draft_vocab, hidden], final norm [hidden]).
    pub fn with_target_head(mut self, rows: Tensor, norm: Tensor) -> Result<Self> {
        let (vd, h) = rows.dims2()?;
        if vd != self.config.draft_vocab_size || h != self.config.hidden_size || norm.dims1()? != h {
            return Err(ModelError::Drafter("the target head does not match the drafter".into()));
        }
        let f32 = DType::F32;
        self.target_head =
            Some((rows.to_dtype(f32)?.to_device(&self.device)?, norm.to_dtype(f32)?.to_device(&self.device)?));
        Ok(self)
    }

    /// `b` with its derived rows (see `Batch::derived`) labelled by the target's distribution
    /// over the draft vocabulary (softmax at temperature 1, as the recorded output positions),
    /// if this trainer holds the target's head; `b` itself otherwise.
    pub fn target_labels<'a>(&self, b: &'a Batch) -> Result<std::borrow::Cow<'a, Batch>> {
        let Some((rows, norm)) = &self.target_head else { return Ok(std::borrow::Cow::Borrowed(b)) };
        if b.derived.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(b));
        }
        let (m, h, vd) = (b.derived.len(), self.config.hidden_size, self.config.draft_vocab_size);
        let hidden = Tensor::from_slice(&b.derived_hidden, (m, h), &self.device)?;
        let normed = ops::rms_norm(&hidden, norm, self.config.rms_norm_eps, self.path)?;
        let logits = ops::matmul_xwt(&normed, rows, self.path)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let mut out = b.clone();
        for (&row, p) in b.derived.iter().zip(probs) {
            let best = p.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map_or(-1, |(i, _)| i as i64);
            out.labels[row * vd..(row + 1) * vd].copy_from_slice(&p);
            out.top_label[row] = best;
            out.has_label[row] = true;
            out.soft_label[row] = true;
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    /// A copy of the current weights (the trainer keeps updating its own in place).
    pub fn weights(&self) -> Result<EagleWeights> {
        let tensors = self.vars.try_map(|name, v| -> Result<Tensor> {
            match self.frozen_head.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => Ok(t.clone()),
                None => Ok(v.as_tensor().copy()?),
            }
        })?;
        Ok(EagleWeights { tensors, d2t: self.d2t.clone(), served: Default::default() })
    }

    /// Continues from `weights` (after a rollback), keeping the optimizer's moments.
    pub fn reset_to(&mut self, weights: &EagleWeights) -> Result<()> {
        for ((_, var), (_, t)) in self.vars.named().zip(weights.tensors.named()) {
            var.set(&t.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Writes everything a later run needs to go on exactly where this one is: every parameter,
    /// the optimizer's moments and the step counts (one safetensors file, replaced atomically).
    pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
        let mut tensors: std::collections::HashMap<String, Tensor> = self.opt.state()?.into_iter().collect();
        for (name, var) in self.vars.named() {
            tensors.insert(format!("param.{name}"), var.as_tensor().copy()?);
        }
        tensors.insert("steps".into(), Tensor::new(&[self.steps as i64], &Device::Cpu)?);
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::checkpoint(path, e))
    }

    /// Takes up the state `save_state` wrote (a trainer of the same drafter and configuration).
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<()> {
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| ModelError::checkpoint(path, e))?;
        for (name, var) in self.vars.named() {
            let t = tensors
                .get(&format!("param.{name}"))
                .ok_or_else(|| ModelError::checkpoint(path, format!("no {name}")))?;
            if t.dims() != var.dims() {
                return Err(ModelError::checkpoint(path, format!("{name} has another shape")));
            }
            var.set(&t.to_device(&self.device)?)?;
        }
        self.opt.restore(&tensors)?;
        let steps = tensors.get("steps").ok_or_else(|| ModelError::checkpoint(path, "no step count"))?;
        self.steps = steps.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }

    pub fn draft_id(&self, target: u32) -> Option<usize> {
        self.t2d.get(target as usize).and_then(|&d| (d >= 0).then_some(d as usize))
    }

    /// The parameters as the forward pass reads them: frozen ones detached, so no gradient is formed.
    fn params(&self) -> EagleTensors<Tensor> {
        let frozen = |name| self.train.freeze_head && HEAD_NAMES.contains(&name);
        self.vars.map(|name, v| if frozen(name) { v.as_tensor().detach() } else { v.as_tensor().clone() })
    }

    /// One optimizer step on `batch`.
    pub fn step(&mut self, batch: &Batch) -> Result<StepStats> {
        self.step_unrolled(batch, self.train.ttt_steps)
    }

    /// One optimizer step unrolled `ttt_steps` deep (at most the configured depth): the online
    /// trainer trains only as deep as serving drafts (plus one, so a longer draft can start to pay).
    pub fn step_unrolled(&mut self, batch: &Batch, ttt_steps: usize) -> Result<StepStats> {
        self.step_in_parts(std::slice::from_ref(batch), ttt_steps, &mut || {})
    }

    /// One optimizer step over the union of `parts`: each part's loss weighted by its share of
    /// the labelled rows, gradients summed. `between` runs after each part but the last: the
    /// online trainer waits there while serving needs the cores, so a step begun in idle time
    /// does not run on into a request.
    pub fn step_in_parts(&mut self, parts: &[Batch], ttt_steps: usize, between: &mut dyn FnMut()) -> Result<StepStats> {
        let depth = ttt_steps.clamp(1, self.train.ttt_steps.max(1));
        let total = parts.iter().map(Batch::labelled).sum::<usize>().max(1) as f64;
        let (mut grads, mut stats) = (None, StepStats::default());
        for (i, part) in parts.iter().enumerate() {
            let share = part.labelled() as f64 / total;
            let (loss, s, _) = self.forward(part, depth, true)?;
            let loss = if parts.len() == 1 { loss } else { loss.affine(share, 0.0)? };
            let g = loss.backward()?;
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => self.opt.accumulate(acc, &g)?,
            }
            stats.add(&s, share);
            if i + 1 < parts.len() {
                between();
            }
        }
        let mut grads = grads.ok_or_else(|| ModelError::Drafter("a step needs a batch".into()))?;
        let norm = self.opt.grad_norm(&grads)?;
        stats.grad_norm = norm;
        if !norm.is_finite() {
            return Err(ModelError::Drafter(format!("gradient norm is {norm}; step skipped")));
        }
        let clip = self.train.grad_clip;
        let scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
        self.opt.step(&mut grads, scale)?;
        self.steps += 1;
        Ok(stats)
    }

    /// The loss without a step, unrolled at least two steps (so the second token's agreement is
    /// measured whatever the training unroll).
    pub fn evaluate(&self, batch: &Batch) -> Result<StepStats> {
        Ok(self.forward(batch, self.train.ttt_steps.max(2), false)?.1)
    }

    /// Share of `batch`'s labelled rows where the drafter's first draft token is the target's top
    /// token (one step, no unroll: the cheapest figure of how well it drafts).
    pub fn first_token_agreement(&self, batch: &Batch) -> Result<f64> {
        Ok(self.forward(batch, 1, false)?.1.top1)
    }

    /// The drafter's first-step prediction (a draft id) for every row of `batch`.
    pub fn predict(&self, batch: &Batch) -> Result<Vec<u32>> {
        let (_, _, logits) = self.forward(batch, 1, false)?;
        Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }

    /// The weighted loss over `steps` training-time-test steps, its figures, and the first
    /// step's logits; `training` adds the configured feature noise.
    fn forward(&self, b: &Batch, steps: usize, training: bool) -> Result<(Tensor, StepStats, Tensor)> {
        let b = &*self.target_labels(b)?;
        let c = &self.config;
        let dev = &self.device;
        let n = b.rows();
        let params = self.params();
        let layer = EagleLayer { w: &params, stacked: None, config: c, rope: &self.rope, path: self.path };
        let feats = self.features(b, training)?;
        let ids = Tensor::from_slice(&b.next_tokens, n, dev)?;
        let embeds = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let positions: Vec<usize> = b.positions.iter().map(|&p| p as usize).collect();
        let normed_emb = layer.normed_embeds(&embeds)?;
        let scored = self.scored(b, &params, training)?;
        let mut total = Tensor::zeros((), DType::F32, dev)?;
        let mut stats = StepStats { positions: b.labelled(), ..Default::default() };
        let mut chain = Chain::default();
        let mut prev_out: Option<Tensor> = None;
        let mut first_logits = None;
        let fc = layer.features(&feats)?;
        for i in 0..steps {
            // Step 0 reads the target's features; step i the drafter's own output one position back.
            let x = match &prev_out {
                None => fc.clone(),
                Some(h) => shift_rows(h, 1)?,
            };
            let out = layer.forward(&x, &normed_emb, &positions, |q, k, v| chain.attend(c, b, i, q, k, v))?;
            let logits = scored.logits(&layer, &out)?;
            if i == 0 {
                first_logits = Some(logits.detach());
            }
            let (terms, count) = self.loss_terms(b, i, scored.vocab.as_ref());
            let has_discard = !terms.rejected.is_empty();
            let parts = step_loss(&logits, &scored.labels, terms)?;
            let (ce, discard) = (parts.get(0)?, parts.get(1)?);
            let weight = self.train.step_decay.powi(i as i32);
            if count > 0.0 {
                if i <= 1 {
                    let top1 = b.top1_agreement(&scored.best(&logits)?);
                    if i == 0 {
                        stats.ce0 = ce.to_scalar::<f32>()? as f64;
                        stats.top1 = top1;
                    } else {
                        stats.top1_second = top1;
                    }
                }
                total = (total + ce.affine(weight, 0.0)?)?;
            }
            if has_discard {
                stats.discard += discard.to_scalar::<f32>()? as f64;
                total = (total + discard.affine(weight * self.train.discard_weight, 0.0)?)?;
            }
            prev_out = Some(out);
        }
        stats.loss = total.to_scalar::<f32>()? as f64;
        Ok((total, stats, first_logits.expect("at least one step")))
    }

    /// The draft ids a forward scores: all of them, or (a training step with `sampled_vocab`) a
    /// sampled vocabulary, with its labels and head rows.
    fn scored(&self, b: &Batch, params: &EagleTensors<Tensor>, training: bool) -> Result<Scored> {
        let (n, vd, dev) = (b.rows(), self.config.draft_vocab_size, &self.device);
        let size = self.train.sampled_vocab;
        if !training || size == 0 || size >= vd {
            return Ok(Scored { labels: Tensor::from_slice(&b.labels, (n, vd), dev)?, head: None, vocab: None });
        }
        let mut rng = StdRng::seed_from_u64(self.train.seed ^ self.steps.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let vocab = SampledVocab::new(b, size, &mut rng);
        let cols = Tensor::from_slice(&vocab.cols, vocab.len(), dev)?;
        let bias = Tensor::from_slice(&vocab.bias, (1, vocab.len()), dev)?;
        let labels = Tensor::from_vec(vocab.labels(b), (n, vocab.len()), dev)?;
        let head = Some((params.lm_head.index_select(&cols, 0)?, bias));
        Ok(Scored { labels, head, vocab: Some(vocab) })
    }

    /// Step `i`'s loss terms over `b` (ids at their places in `vocab` when sampled), and the
    /// weighted count of its labelled rows.
    fn loss_terms(&self, b: &Batch, i: usize, vocab: Option<&SampledVocab>) -> (LossTerms, f32) {
        // Rows whose chain starts inside their window and that have a label.
        let valid: Vec<f32> = b
            .valid(i)
            .iter()
            .zip(&b.soft_label)
            .map(|(&v, &soft)| if soft { v } else { v * self.train.prompt_weight as f32 })
            .collect();
        let count: f32 = valid.iter().sum();
        let discard_on = self.train.discard_weight > 0.0;
        let rejected = b
            .rejected
            .iter()
            .filter(|r| r.2 == i && discard_on)
            .filter_map(|r| match vocab {
                None => Some((r.0, r.1)),
                Some(s) => s.position(r.1).map(|p| (r.0, p)),
            })
            .collect();
        let row_weights = valid.iter().map(|&v| if count > 0.0 { v / count } else { 0.0 }).collect();
        (LossTerms { row_weights, rejected }, count)
    }

    /// The target's concatenated hidden states of `b`'s rows [n, layers × h], with the configured
    /// noise when `training`.
    fn features(&self, b: &Batch, training: bool) -> Result<Tensor> {
        let c = &self.config;
        let n = b.rows();
        let feats = Tensor::from_slice(&b.features, (n, c.feature_size()), &self.device)?;
        if !training || self.train.feature_noise <= 0.0 {
            return Ok(feats);
        }
        // Scaled per row and per target layer: the layers' magnitudes differ widely.
        let layers = feats.reshape((n, c.target_layers.len(), c.hidden_size))?;
        let rms = layers.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
        let noise = Tensor::randn(0f32, 1f32, layers.shape(), &self.device)?.broadcast_mul(&rms)?;
        Ok((layers + noise.affine(self.train.feature_noise, 0.0)?)?.reshape((n, c.feature_size()))?)
    }
}

/// The draft ids a forward scores (see `Trainer::scored`).
struct Scored {
    /// Label rows over the scored ids.
    labels: Tensor,
    /// The head's rows of a sampled vocabulary and the offsets of its drawn ids.
    head: Option<(Tensor, Tensor)>,
    vocab: Option<SampledVocab>,
}

impl Scored {
    fn logits(&self, layer: &EagleLayer<'_, Tensor>, out: &Tensor) -> Result<Tensor> {
        match &self.head {
            None => layer.logits(out),
            Some((rows, bias)) => Ok(layer.logits_with(out, rows)?.broadcast_add(bias)?),
        }
    }

    /// Each row's top draft id among those scored.
    fn best(&self, logits: &Tensor) -> Result<Vec<usize>> {
        let mut best = row_argmax(logits)?;
        if let Some(v) = &self.vocab {
            best.iter_mut().for_each(|p| *p = v.cols[*p] as usize);
        }
        Ok(best)
    }
}

/// The keys and values of each training-time-test step so far ([heads, n, d], repeated per
/// query head), and the attention that mirrors drafting over them.
#[derive(Default)]
struct Chain {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl Chain {
    /// Attention of step `i`: a query at position t sees the target-feature keys of step 0 up to
    /// t - i (where its chain started, `Batch::mask`) and the keys its own chain made at steps
    /// 1..=i, step j's at position t - (i - j). q: [n, heads, d], k and v: [n, kv_heads, d];
    /// returns [n, heads × d].
    fn attend(&mut self, c: &EagleConfig, b: &Batch, i: usize, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let n = b.rows();
        let (heads, d) = (c.num_attention_heads, c.head_dim);
        let group = heads / c.num_key_value_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let q = q.transpose(0, 1)?.contiguous()?;
        self.keys.push(repeat_kv(&k.transpose(0, 1)?.contiguous()?, group)?);
        self.values.push(repeat_kv(&v.transpose(0, 1)?.contiguous()?, group)?);
        let mask = Tensor::from_vec(b.mask(i), (1, n, n), q.device())?;
        let s0 = (q.matmul(&self.keys[0].t()?)? * scale)?.broadcast_add(&mask)?; // [heads, n, n]
        let attn = if i == 0 {
            candle_nn::ops::softmax(&s0, D::Minus1)?.matmul(&self.values[0])?
        } else {
            let mut parts = vec![s0];
            let mut chain_v = Vec::new();
            for j in 1..=i {
                let kj = shift_rows3(&self.keys[j], i - j)?;
                parts.push(((&q * kj)?.sum_keepdim(D::Minus1)? * scale)?);
                chain_v.push(shift_rows3(&self.values[j], i - j)?);
            }
            let p = candle_nn::ops::softmax(&Tensor::cat(&parts, D::Minus1)?, D::Minus1)?;
            let mut out = p.narrow(D::Minus1, 0, n)?.matmul(&self.values[0])?;
            for (j, vj) in chain_v.iter().enumerate() {
                out = (out + p.narrow(D::Minus1, n + j, 1)?.broadcast_mul(vj)?)?;
            }
            out
        };
        Ok(attn.transpose(0, 1)?.reshape((n, heads * d))?)
    }
}

/// [kv_heads, n, d] -> [kv_heads * group, n, d], each kv head serving `group` query heads.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (kvh, n, d) = x.dims3()?;
    Ok(x.unsqueeze(1)?.expand((kvh, group, n, d))?.reshape((kvh * group, n, d))?)
}

/// The index of each row's largest logit.
fn row_argmax(logits: &Tensor) -> Result<Vec<usize>> {
    let (_, vd) = logits.dims2()?;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.chunks(vd).map(|row| ops::kernels::argmax(row) as usize).collect())
}

/// Rows moved down by `s` (row t gets row t - s; the first `s` rows are zero). x: [n, h].
fn shift_rows(x: &Tensor, s: usize) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    if s == 0 {
        return Ok(x.clone());
    }
    let s = s.min(n);
    let zeros = Tensor::zeros((s, h), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zeros, &x.narrow(0, 0, n - s)?], 0)?)
}

/// As `shift_rows` along dimension 1 of [heads, n, d].
fn shift_rows3(x: &Tensor, s: usize) -> Result<Tensor> {
    let (hh, n, d) = x.dims3()?;
    if s == 0 {
        return Ok(x.clone());
    }
    let s = s.min(n);
    let zeros = Tensor::zeros((hh, s, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&zeros, &x.narrow(1, 0, n - s)?], 1)?)
}
