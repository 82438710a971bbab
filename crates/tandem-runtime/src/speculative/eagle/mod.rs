//! An EAGLE-3-style drafter: a single decoder layer that reads the target's own hidden states.
//!
//! Position t of the drafter takes the target's hidden states at t from three layers (concatenated,
//! then `fc`: 3h -> h) and the RMS-normed embedding of token t+1 (the target's table, frozen); the
//! two are concatenated (2h) into one decoder layer whose attention runs over the drafter's own KV
//! cache; a final norm and `lm_head` (over the target vocabulary or a pruned draft vocabulary,
//! with `d2t` mapping draft ids to target ids) predict token t+2. Drafting k tokens feeds the
//! layer's output hidden state back in place of the target's for steps 2..k.
//!
//! One step drafts for every sequence at once: the catch-up rows of all of them in one forward of
//! the layer, then one row per sequence per further draft token, each product reading the
//! drafter's weights once for the whole batch ([`layer`] is the forward, shared with the trainer).
//!
//! Checkpoint: a folder with `config.json` ([`EagleConfig`]) and `model.safetensors` using the
//! tensor names of published EAGLE-3 drafters ([`weights::TENSOR_NAMES`], plus `d2t`).
pub mod layer;
pub mod weights;

pub use layer::{EagleLayer, LayerWeight};
pub use weights::{EagleConfig, EagleTensors, EagleWeights, WarmStart, HEAD_NAMES, TENSOR_NAMES};

use super::{draft_token, drafter_sampler, Alternative, Draft, DraftRequest, Drafter, NgramDrafter, TrainableDrafter};
use crate::sampling::Sampler;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, TensorId};
use std::path::Path;
use std::sync::Arc;
use tandem_models::linear::Linear;
use tandem_models::ops::{self, RopeTables, TokenSlot};
use tandem_models::{Model, OpsPath, Result};

/// How the drafter's matrices are held while serving (norms stay f32, and the trainer keeps f32
/// weights). Drafts never change outputs, so a narrower type only trades a little agreement for
/// fewer bytes read per draft token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeAs {
    F32,
    Bf16,
    /// GGUF's Q8_0 blocks (8.5 bits a value) through the quantized kernels, where a matrix's
    /// rows are whole blocks (else bf16).
    Q8_0,
    /// GGUF's Q4_1 blocks (5 bits a value), likewise: 60% of Q8_0's bytes, which a draft step
    /// reads from memory after the target's weights have passed through the cache.
    Q4_1,
}

impl ServeAs {
    /// `t` as a served weight: norms (vectors) dense f32, matrices as `self` says.
    fn serve(self, t: &Tensor) -> Result<Linear> {
        let t = t.to_dtype(DType::F32)?;
        if t.rank() != 2 {
            return Ok(Linear::dense(t, None));
        }
        let blocks = t.dim(1)?.is_multiple_of(GgmlDType::Q8_0.block_size()) && t.device().is_cpu();
        let format = match self {
            ServeAs::Q8_0 => Some(GgmlDType::Q8_0),
            ServeAs::Q4_1 => Some(GgmlDType::Q4_1),
            ServeAs::F32 | ServeAs::Bf16 => None,
        };
        Ok(match (self, format) {
            (ServeAs::F32, _) => Linear::dense(t, None),
            (_, Some(format)) if blocks => {
                // A fresh copy: candle's quantizer reads the storage from its start, and a
                // matrix taken from a fused one (a warm start's up_proj) begins past it.
                let rows = Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.shape(), t.device())?;
                Linear::quantized(QTensor::quantize(&rows, format)?, None)?
            }
            _ => Linear::dense(t.to_dtype(DType::BF16)?, None),
        })
    }
}

/// The drafter's weights as drafting reads them (see [`ServeAs`]). Made where cores are to spare
/// (a trainer's thread: [`EagleWeights::prepare`]) serving a new version on the engine's thread is
/// a pointer swap; made there, converting a version took ~30-90 ms of the engine's steps.
#[derive(Clone)]
pub struct Served {
    serve_as: ServeAs,
    /// The tensors the forms were made from: one unchanged in the next version (a frozen head,
    /// most of the drafter's bytes) keeps its form.
    ids: [TensorId; 13],
    tensors: EagleTensors<Linear>,
    /// q/k/v and gate/up of `tensors` stacked (see [`layer::Stacked`]); None where their types
    /// differ and cannot stack.
    stacked: Option<(Linear, Linear)>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Served({:?})", self.serve_as)
    }
}

impl Served {
    /// `weights` served as `serve_as`; a tensor that `previous` (same `serve_as`) was made from
    /// keeps its form.
    pub fn new(weights: &EagleWeights, serve_as: ServeAs, previous: Option<&Served>) -> Result<Served> {
        let previous = previous.filter(|p| p.serve_as == serve_as);
        let mut i = 0;
        let tensors = weights.tensors.try_map(|_, t| {
            let kept = previous.filter(|p| p.ids[i] == t.id()).map(|p| p.tensors.as_array()[i].clone());
            i += 1;
            kept.map_or_else(|| serve_as.serve(t), Ok)
        })?;
        let ids = weights.tensors.as_array().map(|t| t.id());
        Ok(Served { serve_as, ids, stacked: stack(&tensors), tensors })
    }
}

/// q/k/v and gate/up of the served matrices, each group as one matrix (None if a group's types
/// differ, e.g. one fell back to bf16).
fn stack(served: &EagleTensors<Linear>) -> Option<(Linear, Linear)> {
    let s = served;
    let qkv = Linear::fuse(vec![s.q_proj.clone(), s.k_proj.clone(), s.v_proj.clone()]).ok()?;
    let gate_up = Linear::fuse(vec![s.gate_proj.clone(), s.up_proj.clone()]).ok()?;
    Some((qkv, gate_up))
}

/// Positions of its own past the drafter attends to. Its trainer sees windows of at most 64
/// positions, so a longer context is one it was never trained on; and catching up a whole prompt
/// before the first draft would cost a prefill of the drafter (a tenth of the target's) per request.
pub const DRAFT_CONTEXT: usize = 64;

/// Per-sequence state: the target features seen so far and which of them the drafter's KV cache holds.
#[derive(Default)]
struct SlotState {
    /// Concatenated target hidden states, `feature_size` floats per committed target position
    /// from `features_from` on.
    features: Vec<f32>,
    /// The first position with features: 0, or where the target started computing this
    /// sequence (after a cached prefix, or a preemption that kept its KV but not this state).
    features_from: usize,
    /// Position of the first row in the slot's cache (older ones are dropped: see [`DRAFT_CONTEXT`]).
    kv_start: usize,
    /// Rows held: positions kv_start..kv_start + held, computed from target features (never drafts).
    held: usize,
    sampler: Option<Sampler>,
}

impl SlotState {
    fn cached(&self) -> usize {
        self.kv_start + self.held
    }

    /// Positions with features: features_from..committed.
    fn committed(&self, feature_size: usize) -> usize {
        self.features_from + self.features.len() / feature_size
    }
}

/// The drafter's KV cache, [slots, kv_heads, rows, head_dim], read by the engine's attention
/// kernel as a cache of one block per slot.
struct DraftCache {
    keys: Tensor,
    values: Tensor,
    tables: Vec<Vec<u32>>,
}

/// One row of a drafter forward: which sequence, at which position, in which cache row.
#[derive(Clone, Copy)]
struct Row {
    slot: usize,
    position: usize,
    cache_row: usize,
}

/// A sequence being drafted for in this step.
struct Drafting {
    request: usize,
    committed: usize,
}

pub struct EagleDrafter {
    pub config: EagleConfig,
    /// The weights as given (f32): what the trainer publishes and a rollback returns to.
    weights: Arc<EagleWeights>,
    /// The same, as drafting reads them.
    served: Arc<Served>,
    device: Device,
    path: OpsPath,
    slots: Vec<SlotState>,
    cache: Option<DraftCache>,
    rope: Option<RopeTables>,
    /// Seconds and positions of catching up since the last `take_catch_up`.
    caught_up: (f64, usize),
    serve_as: ServeAs,
    /// Prompt lookup tried before the learned drafter (see `with_lookup`).
    lookup: Option<NgramDrafter>,
    /// The folder it was loaded from (None: made fresh).
    source: Option<std::path::PathBuf>,
}

impl EagleDrafter {
    pub fn new(config: EagleConfig, weights: EagleWeights, device: &Device) -> Result<Self> {
        weights.check_shapes(&config)?;
        let tensors =
            weights.tensors.try_map(|_, t| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(device)?) })?;
        let weights = EagleWeights { tensors, d2t: weights.d2t, served: Default::default() };
        Ok(EagleDrafter {
            config,
            served: Arc::new(Served::new(&weights, ServeAs::F32, None)?),
            weights: Arc::new(weights),
            device: device.clone(),
            path: OpsPath::for_device(device),
            slots: Vec::new(),
            cache: None,
            rope: None,
            caught_up: (0.0, 0),
            serve_as: ServeAs::F32,
            lookup: None,
            source: None,
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

    /// Serves the matrices as `serve_as` says, now and for every later update.
    pub fn with_serving(mut self, serve_as: ServeAs) -> Result<Self> {
        self.serve_as = serve_as;
        let w = self.weights.clone();
        self.set_weights(w)?;
        Ok(self)
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
        let config = EagleConfig::load(dir)?;
        config.check(&target.config)?;
        let weights = EagleWeights::load(dir, &config, target.device())?;
        Ok(EagleDrafter { source: Some(dir.to_path_buf()), ..Self::new(config, weights, target.device())? })
    }

    /// How the matrices are served (a trainer prepares its versions so: [`EagleWeights::prepare`]).
    pub fn serve_as(&self) -> ServeAs {
        self.serve_as
    }

    /// The folder the drafter was loaded from (None: made fresh): a drafter trained before.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Writes `dir/config.json` and `dir/model.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.weights.save(&self.config, dir)
    }

    pub fn weights(&self) -> &Arc<EagleWeights> {
        &self.weights
    }

    /// Serves `weights` from the next draft on, in the form they carry if it was prepared for
    /// this drafter's `ServeAs`, else made here (reusing the forms of tensors served now, where
    /// they were made for the same `ServeAs`). The per-slot caches were computed with the old
    /// weights, so they are rebuilt from the kept target features.
    pub fn set_weights(&mut self, weights: Arc<EagleWeights>) -> Result<()> {
        weights.check_shapes(&self.config)?;
        self.served = match weights.served.get().filter(|s| s.serve_as == self.serve_as) {
            Some(s) => s.clone(),
            None => Arc::new(Served::new(&weights, self.serve_as, Some(&self.served))?),
        };
        self.weights = weights;
        for s in &mut self.slots {
            (s.kv_start, s.held) = (0, 0);
        }
        Ok(())
    }

    /// Rope tables covering positions below `upto`, grown on demand.
    fn ensure_rope(&mut self, upto: usize) -> Result<()> {
        if self.rope.as_ref().is_none_or(|r| r.max_positions() < upto) {
            let n = upto.next_power_of_two().max(256);
            self.rope = Some(layer::rope_tables(&self.config, n, &self.device)?);
        }
        Ok(())
    }

    /// A cache with room for every slot's context, its catch-up and `k` drafted rows.
    fn ensure_cache(&mut self, k: usize) -> Result<()> {
        let rows = 2 * DRAFT_CONTEXT + k.max(16);
        if self.cache.as_ref().is_some_and(|c| c.keys.dim(2).is_ok_and(|r| r >= rows)) {
            return Ok(());
        }
        let c = &self.config;
        let shape = (self.slots.len().max(1), c.num_key_value_heads, rows, c.head_dim);
        // A new geometry loses the rows held: every slot starts over from its features.
        for s in &mut self.slots {
            (s.kv_start, s.held) = (0, 0);
        }
        self.cache = Some(DraftCache {
            keys: Tensor::zeros(shape, DType::F32, &self.device)?,
            values: Tensor::zeros(shape, DType::F32, &self.device)?,
            tables: ops::kernels::contiguous_tables(shape.0),
        });
        Ok(())
    }

    /// The served layer (rope tables built by `ensure_rope` before drafting).
    fn layer(&self) -> EagleLayer<'_, Linear> {
        let rope = self.rope.as_ref().expect("built before drafting");
        let stacked = self.served.stacked.as_ref().map(|(qkv, gate_up)| layer::Stacked { qkv, gate_up });
        EagleLayer { w: &self.served.tensors, stacked, config: &self.config, rope, path: self.path }
    }

    /// The layer over `rows`: their keys and values go into the cache, and each attends to its
    /// slot's rows up to its own. `x`, `embeds`: [rows, h]. Returns the outputs [rows, h].
    fn forward_rows(&self, x: &Tensor, embeds: &Tensor, rows: &[Row]) -> Result<Tensor> {
        let cache = self.cache.as_ref().expect("allocated before drafting");
        let layer = self.layer();
        let positions: Vec<usize> = rows.iter().map(|r| r.position).collect();
        let slots: Vec<TokenSlot> = rows.iter().map(|r| TokenSlot::causal(r.slot, r.cache_row)).collect();
        let normed = layer.normed_embeds(embeds)?;
        layer.forward(x, &normed, &positions, |q, k, v| {
            ops::cache_write(&cache.keys, &k, &slots, &cache.tables, self.path)?;
            ops::cache_write(&cache.values, &v, &slots, &cache.tables, self.path)?;
            Ok(ops::attention(&q, &cache.keys, &cache.values, &slots, &cache.tables, self.path)?)
        })
    }

    /// Keeps the last [`DRAFT_CONTEXT`] rows of `slot`'s cache, moved to its front.
    fn trim(&mut self, slot: usize) -> Result<()> {
        let state = &self.slots[slot];
        if state.held <= DRAFT_CONTEXT {
            return Ok(());
        }
        let drop = state.held - DRAFT_CONTEXT;
        let cache = self.cache.as_ref().expect("allocated before drafting");
        let moved: Vec<TokenSlot> = (0..DRAFT_CONTEXT).map(|p| TokenSlot::causal(slot, p)).collect();
        for t in [&cache.keys, &cache.values] {
            // [kv_heads, kept, d] -> [kept, kv_heads, d], a copy, written back from row 0.
            let kept = t.get(slot)?.narrow(1, drop, DRAFT_CONTEXT)?.transpose(0, 1)?.contiguous()?;
            ops::cache_write(t, &kept, &moved, &cache.tables, self.path)?;
        }
        let state = &mut self.slots[slot];
        state.kv_start += drop;
        state.held = DRAFT_CONTEXT;
        Ok(())
    }

    /// Catches every drafting sequence up on its committed positions in one forward; returns the
    /// last row's output of each (the hidden state that predicts its first draft token).
    fn catch_up(&mut self, target: &Model, requests: &[DraftRequest], drafting: &[Drafting]) -> Result<Tensor> {
        let started = std::time::Instant::now();
        let fs = self.config.feature_size();
        let (mut rows, mut feats, mut ids, mut last) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for d in drafting {
            let r = &requests[d.request];
            let state = &mut self.slots[r.slot];
            if d.committed - state.cached() > DRAFT_CONTEXT || state.held == 0 {
                // Too far behind (a new prompt, or steps without drafts): start over from the last
                // DRAFT_CONTEXT positions rather than catching up on all of them.
                let first = d.committed.saturating_sub(DRAFT_CONTEXT).max(state.features_from);
                (state.kv_start, state.held) = (first, 0);
            } else if state.cached() == d.committed {
                // Nothing new since the last draft: redo the last row, whose output starts the draft.
                state.held -= 1;
            }
            let from = state.cached();
            for p in from..d.committed {
                rows.push(Row { slot: r.slot, position: p, cache_row: p - state.kv_start });
            }
            let at = state.features_from;
            feats.extend_from_slice(&state.features[(from - at) * fs..(d.committed - at) * fs]);
            ids.extend_from_slice(&r.tokens[from + 1..d.committed + 1]);
            state.held += d.committed - from;
            last.push((rows.len() - 1) as u32);
        }
        let x = self.layer().features(&Tensor::from_vec(feats, (rows.len(), fs), &self.device)?)?;
        let out = self.forward_rows(&x, &target.embed(&ids)?, &rows)?;
        for d in drafting {
            self.trim(requests[d.request].slot)?;
        }
        self.caught_up.0 += started.elapsed().as_secs_f64();
        self.caught_up.1 += rows.len();
        Ok(out.index_select(&Tensor::from_vec(last, drafting.len(), &self.device)?, 0)?)
    }

    /// Draft-vocabulary logits of each row of `hidden`, one vector per row.
    fn logits(&self, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(self.layer().logits(hidden)?.to_vec2::<f32>()?)
    }

    /// Which requests the learned drafter drafts for (the others get a lookup copy or nothing).
    fn plan(&self, requests: &[DraftRequest], drafts: &mut [Draft]) -> Vec<Drafting> {
        let fs = self.config.feature_size();
        let mut drafting = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if let Some(copied) = self.lookup.as_ref().map(|l| l.lookup(r.tokens, r.copy_k)).filter(|t| !t.is_empty()) {
                // The learned drafter catches up on these positions at its next draft.
                drafts[i] = Draft { tokens: copied, probs: None, lookup: true, alternatives: Vec::new() };
                continue;
            }
            let state = &self.slots[r.slot];
            let committed = state.committed(fs);
            // The target must have committed every token but the pending last one.
            if r.k > 0 && !state.features.is_empty() && committed + 1 == r.tokens.len() {
                drafting.push(Drafting { request: i, committed });
            }
        }
        drafting
    }

    /// Drafts for every sequence of `drafting` at once: catch-up, then one row per sequence per
    /// further token, each fed its own previous output in place of the target's features.
    fn draft_batch(
        &mut self,
        target: &Model,
        requests: &[DraftRequest],
        drafting: Vec<Drafting>,
        drafts: &mut [Draft],
    ) -> Result<()> {
        let max_k = drafting.iter().map(|d| requests[d.request].k).max().unwrap_or(0);
        let max_pos = drafting.iter().map(|d| d.committed + requests[d.request].k + 1).max().unwrap_or(0);
        self.ensure_rope(max_pos)?;
        self.ensure_cache(max_k)?;
        for d in &drafting {
            let r = &requests[d.request];
            let state = &mut self.slots[r.slot];
            state.sampler.get_or_insert_with(|| drafter_sampler(r.sampling));
            drafts[d.request].probs = (r.sampling.temperature > 0.0).then(Vec::new);
        }
        let mut hidden = self.catch_up(target, requests, &drafting)?;
        // Per request: the drafter's own chance that the chain gets this far, and runners-up
        // with their chance of being the target's token (the tree's candidate branches).
        let mut reach = vec![1f32; requests.len()];
        let mut branches: Vec<Vec<(f32, Alternative)>> = vec![Vec::new(); requests.len()];
        // Indices into `drafting` of the sequences still drafting, one row of `hidden` each.
        let mut live: Vec<usize> = (0..drafting.len()).collect();
        let mut step = 0;
        loop {
            let logits = self.logits(&hidden)?;
            for (&i, logits) in live.iter().zip(&logits) {
                let r = drafting[i].request;
                let token = self.push_token(&requests[r], logits, &mut drafts[r]);
                // Past a reach below the least chance a branch needs, none can qualify.
                if requests[r].alternatives > 0 && drafts[r].probs.is_none() && reach[r] >= ALTERNATIVE_MIN_PROB {
                    let d2t = &self.weights.d2t;
                    let (chance, runners_up) = runners_up(logits, token, requests[r].alternatives, reach[r]);
                    let beside = |(c, i): (f32, u32)| (c, Alternative { of: step, token: d2t[i as usize] });
                    branches[r].extend(runners_up.into_iter().map(beside));
                    reach[r] *= chance;
                }
            }
            // Sequences wanting more tokens continue from their own last output.
            let wants_more = |&j: &u32| requests[drafting[live[j as usize]].request].k > step + 1;
            let keep: Vec<u32> = (0..live.len() as u32).filter(wants_more).collect();
            if keep.is_empty() {
                break;
            }
            let x = hidden.index_select(&Tensor::from_slice(&keep, keep.len(), &self.device)?, 0)?;
            live = keep.iter().map(|&j| live[j as usize]).collect();
            let rows: Vec<Row> = live
                .iter()
                .map(|&i| {
                    let (d, slot) = (&drafting[i], requests[drafting[i].request].slot);
                    Row { slot, position: d.committed + step, cache_row: self.slots[slot].held + step }
                })
                .collect();
            let ids: Vec<u32> =
                live.iter().map(|&i| *drafts[drafting[i].request].tokens.last().expect("drafted")).collect();
            hidden = self.forward_rows(&x, &target.embed(&ids)?, &rows)?;
            step += 1;
        }
        for (r, mut b) in branches.into_iter().enumerate() {
            // The likeliest branches within the node budget, in order of position.
            b.sort_by(|x, y| y.0.total_cmp(&x.0));
            b.truncate(requests[r].alternatives);
            drafts[r].alternatives = b.into_iter().map(|(_, a)| a).collect();
            drafts[r].alternatives.sort_by_key(|a| a.of);
        }
        Ok(())
    }

    /// Chooses the request's next draft token from `logits` and appends it to `draft` (with its
    /// distribution when sampling); returns its draft-vocabulary id.
    fn push_token(&mut self, r: &DraftRequest, logits: &[f32], draft: &mut Draft) -> u32 {
        let sampler = self.slots[r.slot].sampler.as_mut().expect("set before drafting");
        let (id, q) = draft_token(sampler, logits);
        draft.tokens.push(self.weights.d2t[id as usize]);
        if let (Some(all), Some(q)) = (draft.probs.as_mut(), q) {
            all.push(q.into_iter().map(|(i, p)| (self.weights.d2t[i as usize], p)).collect());
        }
        id
    }
}

/// The least chance, by the drafter's own probabilities, that a runner-up is the target's token
/// for it to be verified as a sibling: each costs a row of the verification forward (~3-7% of a
/// step on SmolLM2 / CPU), and a step emits ~1.5-2 tokens.
const ALTERNATIVE_MIN_PROB: f32 = 0.1;

/// At a draft position the chain reaches with chance `reach`, where the drafter chose `best`: the
/// drafter's probability of `best`, and up to `n` other tokens (highest first) with their chance
/// `reach` · p of being the target's token there, those of at least `ALTERNATIVE_MIN_PROB`.
fn runners_up(logits: &[f32], best: u32, n: usize, reach: f32) -> (f32, Vec<(f32, u32)>) {
    // The vectorised normaliser: over 8,192 draft-vocabulary entries 5.2-5.7 µs against 19-20 µs
    // for a scalar exp each (the Xeon of docs/speculative-decoding.md, 2026-12-07), at every
    // position a chain reaches with chance ALTERNATIVE_MIN_PROB or more.
    let lse = crate::sampling::log_sum_exp(logits);
    let p = |i: u32| (logits[i as usize] - lse).exp();
    let others = crate::sampling::top_n(logits, n + 1)
        .into_iter()
        .map(|(i, _)| i)
        .filter(|&i| i != best)
        .take(n)
        .map(|i| (reach * p(i), i))
        .filter(|&(c, _)| c >= ALTERNATIVE_MIN_PROB)
        .collect();
    (p(best), others)
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
        self.cache = None;
        Ok(())
    }

    fn target_layers(&self) -> &[usize] {
        &self.config.target_layers
    }

    fn observe(&mut self, slot: usize, start: usize, hidden: &[Tensor]) -> Result<()> {
        let fs = self.config.feature_size();
        let state = &mut self.slots[slot];
        if start != state.committed(fs) {
            // The target starts (or starts again) at `start` without the positions before it
            // here: a cached prefix, or a preempted sequence back. Draft from what comes.
            *state = SlotState { features_from: start, ..SlotState::default() };
        }
        let joined = Tensor::cat(hidden, 1)?.to_dtype(DType::F32)?;
        state.features.extend(joined.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    fn propose(&mut self, target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        self.config.check(&target.config)?;
        let mut drafts = vec![Draft::default(); requests.len()];
        let drafting = self.plan(requests, &mut drafts);
        if !drafting.is_empty() {
            // On the compute team, as the target's forward is: a draft step is ~15 small
            // products, and the team's awake workers split them for less than waking a pool's
            // threads costs. A draft token costs 5-7% of a target step this way against 8-10% on
            // one thread (`tandem bench draft`, batch 1 and 4, 2026-12-02). On a saturated server
            // the trainer, which lives on idle cores, gets less of them: serving comes first.
            tandem_models::ops::on_compute_threads(|| self.draft_batch(target, requests, drafting, &mut drafts))?;
        }
        Ok(drafts)
    }

    fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = SlotState::default();
        }
    }

    fn take_catch_up(&mut self) -> (f64, usize) {
        std::mem::take(&mut self.caught_up)
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
