//! A model being trained: the engine's base weights (shared, never copied) plus either LoRA adapters
//! or a full set of trainable weights, with gradients accumulated across forward_backward calls
//! until an optimizer step applies them.
use crate::loss::LossFn;
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use tandem_models::ops::{adamw, head, sink};
use tandem_models::{Adapter, LoraSpec, Model};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The request is wrong (shapes, ids, names): the caller's to fix.
    #[error("{0}")]
    User(String),
    #[error(transparent)]
    Model(#[from] tandem_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(String),
}

impl TrainError {
    pub fn is_user(&self) -> bool {
        matches!(self, TrainError::User(_))
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// How many tokens a forward/backward pass packs, chosen before each pass. A pass is the unit of
/// the server's training turns: while serving has work, serving shares the cores with it and the
/// fair policy judges between turns, so turns stay short. Alone, bigger passes pay less: a pass
/// runs each of the model's ops once whatever its rows, and some costs are per op or per weight
/// (threads woken and spinning between ops, a quantized base dequantized for the backward), so
/// short RL rollouts paid them for every 8 or so datums: in a profile of LoRA over SmolLM2's Q4_1
/// base (8 x 128), dequantization fell from 8.8% to 2.8% of the samples and idle spinning from
/// 15% to 7% between 256- and 1,024-token passes. Measured (`tandem bench train --modes lora
/// --dtype auto`, 2026-12-04, AMD EPYC Zen 4, 2 threads): 64 x 30 tokens 157-167 -> 186 tok/s
/// (peak 0.4 -> 1.4 GB); 2,048 tokens a pass was slower again in a first try (outside the binary's
/// allocator policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassSize {
    /// Other clients are served beside the trainer (or were a moment ago): ~256 tokens a pass.
    Shared,
    /// The machine is the trainer's (its own client's rollouts aside): ~1,024 tokens a pass.
    Alone,
}

impl PassSize {
    /// Tokens a pass aims at (fewer where the memory budget holds fewer; a longer datum is a pass
    /// of its own).
    pub fn tokens(self) -> usize {
        match self {
            PassSize::Shared => 256,
            PassSize::Alone => 1024,
        }
    }
}

/// The largest learning rate an optimizer step takes (AdamW steps are about lr per value: beyond
/// this a step only destroys the weights).
const MAX_LEARNING_RATE: f64 = 1.0;
/// The largest magnitude of a per-token loss input (weights, advantages, logprobs): beyond it the
/// loss's f32 sums overflow (±1e38 weights gave a null loss).
const MAX_LOSS_INPUT: f32 = 1e6;

/// The inputs `loss` reads from a datum, by name (a missing one is all ones: `check` let only
/// optional ones be missing).
fn loss_inputs(d: &Datum, loss: &LossFn) -> Vec<(&'static str, Vec<f32>)> {
    let n = d.tokens.len();
    loss.inputs().iter().map(|&name| (name, d.inputs.get(name).cloned().unwrap_or_else(|| vec![1.0; n]))).collect()
}

/// The loss's gradient per token of a pass packing `group`, for the fused head
/// (`head::with_loss_gradient`): rows first.. may span several data.
fn loss_gradient(loss: &LossFn, group: &[Datum]) -> Rc<head::LossGradient> {
    let loss = loss.clone();
    let data: Vec<Vec<(&'static str, Vec<f32>)>> = group.iter().map(|d| loss_inputs(d, &loss)).collect();
    let lens: Vec<usize> = group.iter().map(|d| d.tokens.len()).collect();
    Rc::new(move |first, lp| {
        let mut out = Vec::with_capacity(lp.len());
        let mut start = 0;
        for (inputs, &n) in data.iter().zip(&lens) {
            let (lo, hi) = (first.max(start), (first + lp.len()).min(start + n));
            if lo < hi {
                let span: BTreeMap<&str, &[f32]> =
                    inputs.iter().map(|(k, v)| (*k, &v[lo - start..hi - start])).collect();
                out.extend(loss.token_gradients(&lp[lo - first..hi - first], &span)?);
            }
            start += n;
        }
        Ok(out)
    })
}

/// Adds `g` to the sum kept for `name` (in place: sums are the trainer's own, as
/// `pending_gradients` hands out copies), or makes it the sum.
fn add_gradient(sums: &mut BTreeMap<String, Tensor>, name: &str, g: Tensor) -> Result<()> {
    match sums.get_mut(name) {
        Some(sum) => adamw::accumulate(sum, &g)?,
        None => {
            sums.insert(name.to_string(), g);
        }
    }
    Ok(())
}

fn user<T>(msg: impl Into<String>) -> Result<T> {
    Err(TrainError::User(msg.into()))
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    Lora(LoraSpec),
    Full,
}

/// One training example: the tokens fed, the token to predict after each, and per-token inputs
/// of the loss (`weights`, `logprobs`, `advantages`), each as long as `tokens`.
#[derive(Debug, Clone, Default)]
pub struct Datum {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub inputs: BTreeMap<String, Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct ForwardBackwardOutput {
    /// Per datum, the model's logprob of each target token.
    pub logprobs: Vec<Vec<f32>>,
    /// `name:reduction` -> value; always `loss:sum`.
    pub metrics: BTreeMap<String, f64>,
}

/// The end of the pass that starts at `data[start]`: data packed into one forward and one
/// backward (bigger products than one datum alone; every datum attends only to itself) while
/// `fits` accepts them. The rest is shared out evenly between as few passes of about `aim` tokens
/// as it needs (a pass may pass its share by less than one datum): no short pass is left over at
/// the end, which would pay a pass's fixed costs for a few tokens. A datum is always a pass of its
/// own at least.
fn pass_end(data: &[Datum], start: usize, aim: usize, fits: &dyn Fn(&[Datum]) -> bool) -> usize {
    let rest: usize = data[start..].iter().map(|d| d.tokens.len()).sum();
    let share = rest.div_ceil(rest.div_ceil(aim.max(1)));
    let mut end = start + 1;
    let mut tokens_in = data[start].tokens.len();
    while end < data.len() && tokens_in < share && fits(&data[start..=end]) {
        tokens_in += data[end].tokens.len();
        end += 1;
    }
    end
}

/// AdamW's settings for one step (the training API sends them with each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 means none.
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams { learning_rate: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-12, weight_decay: 0.0, grad_clip_norm: 0.0 }
    }
}

/// What one forward_backward may take, set by the server: tokens per datum (the served context)
/// and the estimated peak memory of a pass (`memory::pass_bytes`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_tokens: usize,
    pub memory_bytes: u64,
}

pub struct TrainingModel {
    base: Model,
    mode: Mode,
    limits: Option<Limits>,
    vars: BTreeMap<String, Var>,
    grads: BTreeMap<String, Tensor>,
    /// AdamW moments per parameter.
    moments: BTreeMap<String, (Tensor, Tensor)>,
    steps: u64,
    /// Data whose gradients are waiting for an optimizer step.
    pending: usize,
}

impl TrainingModel {
    /// A fresh model to train on `base`: adapters with a = uniform(±1/sqrt(in)) from `seed` and
    /// b = 0 (so it starts equal to the base), or a trainable copy of every dense weight.
    pub fn new(base: &Model, mode: Mode, seed: u64) -> Result<Self> {
        let mut vars = BTreeMap::new();
        match mode {
            Mode::Lora(spec) => {
                if spec.rank == 0 || spec.rank > 1024 {
                    return user(format!("LoRA rank must be between 1 and 1024, got {}", spec.rank));
                }
                if !(spec.targets.attn || spec.targets.mlp || spec.targets.unembed) {
                    return user("LoRA must train at least one of attention, MLP or unembedding");
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                for (name, out, inp) in base.adapter_targets(&spec) {
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..spec.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
                    let a = Tensor::from_vec(a, (spec.rank, inp), base.device())?;
                    vars.insert(format!("{name}.a"), Var::from_tensor(&a)?);
                    vars.insert(format!("{name}.b"), Var::zeros((out, spec.rank), DType::F32, base.device())?);
                }
            }
            Mode::Full => {
                for (name, t) in base.parameters()? {
                    vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?.copy()?)?);
                }
            }
        }
        Ok(TrainingModel {
            base: base.clone(),
            mode,
            limits: None,
            vars,
            grads: BTreeMap::new(),
            moments: BTreeMap::new(),
            steps: 0,
            pending: 0,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Bounds every later forward_backward (without them, only the model's positions bound it).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = Some(limits);
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn base(&self) -> &Model {
        &self.base
    }

    /// The gradients waiting for the next optimizer step, by parameter name.
    pub fn pending_gradients(&self) -> Result<BTreeMap<String, Tensor>> {
        // Copies: the pending sums are added to in place by later passes.
        self.grads.iter().map(|(k, g)| Ok((k.clone(), g.copy()?))).collect()
    }

    /// Drops the gradients waiting for an optimizer step (and the count of their data).
    pub fn discard_gradients(&mut self) {
        self.grads.clear();
        self.pending = 0;
    }

    /// A trainable tensor by name (tests perturb it). Panics on an unknown name.
    pub fn variable(&self, name: &str) -> &Var {
        &self.vars[name]
    }

    /// Trainable values.
    pub fn num_parameters(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The model as it is now, its trainable tensors being the live variables (differentiable).
    fn live(&self) -> Result<Model> {
        let tensors: BTreeMap<String, Tensor> =
            self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        self.model_from(tensors)
    }

    fn model_from(&self, tensors: BTreeMap<String, Tensor>) -> Result<Model> {
        Ok(match self.mode {
            Mode::Lora(spec) => self.base.with_adapter(&Adapter { spec, tensors })?,
            Mode::Full => self.base.with_parameters(&tensors)?,
        })
    }

    /// A frozen copy of the current weights for sampling: adapters are copied (small); the base
    /// stays shared. Later training steps do not change it.
    pub fn snapshot(&self) -> Result<Model> {
        let tensors = self
            .vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        self.model_from(tensors)
    }

    fn check(&self, d: &Datum, loss: &LossFn, forward_only: bool, i: usize) -> Result<()> {
        let vocab = self.base.config.vocab_size;
        let n = d.tokens.len();
        if n == 0 {
            return user(format!("datum {i}: model_input is empty"));
        }
        if n > self.base.max_positions() {
            return user(format!(
                "datum {i}: {n} tokens, more than the model's {} positions",
                self.base.max_positions()
            ));
        }
        if let Some(l) = self.limits.filter(|l| n > l.max_tokens) {
            return user(format!("datum {i}: {n} tokens, more than the served context ({} tokens)", l.max_tokens));
        }
        // Data that fit are packed into passes within the memory budget; one that needs more in a
        // pass of its own cannot run.
        let need = self.pass_bytes(std::slice::from_ref(d), forward_only);
        if let Some(l) = self.limits.filter(|l| need > l.memory_bytes) {
            return user(format!(
                "datum {i}: a pass of its {n} tokens would need about {} of memory; the training budget \
                 is {} (--training-memory): send shorter data",
                crate::memory::human(need),
                crate::memory::human(l.memory_bytes)
            ));
        }
        if d.targets.len() != n {
            return user(format!("datum {i}: target_tokens has {} entries, model_input has {n}", d.targets.len()));
        }
        for (what, ids) in [("model_input", &d.tokens), ("target_tokens", &d.targets)] {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return user(format!("datum {i}: {what} holds token id {bad}, outside the vocabulary ({vocab})"));
            }
        }
        for name in loss.inputs() {
            match d.inputs.get(*name) {
                // Cross-entropy weights default to 1 (plain next-token loss).
                None if *name == "weights" => {}
                None => return user(format!("datum {i}: loss_fn {} needs input `{name}`", loss.name())),
                Some(v) if v.len() != n => {
                    return user(format!("datum {i}: `{name}` has {} entries, model_input has {n}", v.len()))
                }
                Some(v) if v.iter().any(|x| !x.is_finite() || x.abs() > MAX_LOSS_INPUT) => {
                    return user(format!(
                        "datum {i}: `{name}` holds a value that is not finite or beyond ±{MAX_LOSS_INPUT:e}"
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Logprobs of every datum's targets and the loss; unless `forward_only`, the gradients are
    /// added to those waiting for the next optimizer step. Data are checked before any work; the
    /// passes are as big as the machine is the trainer's alone.
    pub fn forward_backward(
        &mut self,
        data: &[Datum],
        loss: &LossFn,
        forward_only: bool,
    ) -> Result<ForwardBackwardOutput> {
        self.forward_backward_in_passes(data, loss, forward_only, &mut |_| PassSize::Alone)
    }

    /// `forward_backward`, calling `next_pass` before each pass with the tokens of the pass before
    /// it (0 before the first) for the size of the next: the server gives the cores back to the
    /// scheduling policy there, and takes its next turn.
    pub fn forward_backward_in_passes(
        &mut self,
        data: &[Datum],
        loss: &LossFn,
        forward_only: bool,
        next_pass: &mut dyn FnMut(usize) -> PassSize,
    ) -> Result<ForwardBackwardOutput> {
        if data.is_empty() {
            return user("no data");
        }
        for (i, d) in data.iter().enumerate() {
            self.check(d, loss, forward_only, i)?;
        }
        let model = if forward_only { self.snapshot_shared()? } else { self.live()? };
        let mut total = 0f64;
        let mut tokens = 0usize;
        let mut max_diff = 0f64;
        let mut logprobs = Vec::with_capacity(data.len());
        let mut new_grads: BTreeMap<String, Tensor> = BTreeMap::new();
        // This request's weight gradients, summed in place by the backward's ops (`sink`).
        let mut sums = sink::Sums::new(self.vars.values().map(|v| v.as_tensor()));
        let (mut start, mut last_pass) = (0, 0);
        while start < data.len() {
            let size = next_pass(last_pass);
            let group = &data[start..self.pass_end(data, start, size, forward_only)];
            start += group.len();
            last_pass = group.iter().map(|d| d.tokens.len()).sum();
            let t0 = std::time::Instant::now();
            let seqs: Vec<&[u32]> = group.iter().map(|d| d.tokens.as_slice()).collect();
            let targets: Vec<&[u32]> = group.iter().map(|d| d.targets.as_slice()).collect();
            // Planned: layers whose trained tensors all have sums run as one node each; the head
            // folds its backward into the forward when told the loss's gradient.
            let forward = || sums.plan(|| model.target_logprobs(&seqs, &targets));
            let lp_all = match forward_only {
                true => forward()?,
                false => head::with_loss_gradient(loss_gradient(loss, group), forward)?,
            };
            // Reported logprobs are the sampler's, bit for bit (the fused head computes them so).
            let lp_all_host: Vec<f32> = lp_all.to_vec1()?;
            let t_fwd = t0.elapsed();
            let mut group_loss: Option<Tensor> = None;
            let mut off = 0;
            for d in group {
                let n = d.tokens.len();
                let lp = lp_all.narrow(0, off, n)?;
                let lp_host = lp_all_host[off..off + n].to_vec();
                off += n;
                if let Some(q) = d.inputs.get("logprobs") {
                    for (a, b) in lp_host.iter().zip(q) {
                        max_diff = max_diff.max((a - b).abs() as f64);
                    }
                }
                let mut inputs = BTreeMap::new();
                for (name, v) in loss_inputs(d, loss) {
                    inputs.insert(name, Tensor::from_vec(v, n, model.device())?);
                }
                let l = loss.loss(&lp, &inputs)?;
                total += l.to_scalar::<f32>()? as f64;
                tokens += n;
                logprobs.push(lp_host);
                group_loss = Some(match group_loss {
                    None => l,
                    Some(acc) => (acc + l)?,
                });
            }
            let t_loss = t0.elapsed();
            if let (false, Some(l)) = (forward_only, group_loss) {
                let g = sink::collect(&mut sums, || l.backward())?;
                tracing::trace!(forward = ?t_fwd, loss = ?(t_loss - t_fwd), backward = ?(t0.elapsed() - t_loss), datums = group.len(), "pass");
                for (name, var) in &self.vars {
                    if let Some(gv) = g.get(var.as_tensor()) {
                        // Detached: a gradient computed from tracked tensors would otherwise keep
                        // this pass's whole graph alive.
                        add_gradient(&mut new_grads, name, gv.detach())?;
                    }
                }
            }
        }
        for (name, var) in &self.vars {
            if let Some(gv) = sums.take(var.as_tensor())? {
                add_gradient(&mut new_grads, name, gv)?;
            }
        }
        // Gradients join the accumulated ones only once the whole request succeeded.
        for (name, g) in new_grads {
            add_gradient(&mut self.grads, &name, g)?;
        }
        if !forward_only {
            self.pending += data.len();
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("loss:sum".to_string(), total);
        metrics.insert("num_tokens:sum".to_string(), tokens as f64);
        if data.iter().any(|d| d.inputs.contains_key("logprobs")) {
            metrics.insert("sampler_logprob_diff:max".to_string(), max_diff);
        }
        Ok(ForwardBackwardOutput { logprobs, metrics })
    }

    /// The estimated peak memory of `forward_backward(data, .., forward_only)`: its largest pass.
    /// Passes of either size are counted; a request whose passes change size midway packs them
    /// differently, but no pass of more than one datum exceeds the memory budget.
    pub fn peak_bytes(&self, data: &[Datum], forward_only: bool) -> u64 {
        [PassSize::Shared, PassSize::Alone]
            .into_iter()
            .flat_map(|size| self.passes(data, size, forward_only))
            .map(|g| self.pass_bytes(g, forward_only))
            .max()
            .unwrap_or(0)
    }

    /// `data` packed into passes of `size`.
    fn passes<'a>(&self, data: &'a [Datum], size: PassSize, forward_only: bool) -> Vec<&'a [Datum]> {
        let mut groups = Vec::new();
        let mut start = 0;
        while start < data.len() {
            let end = self.pass_end(data, start, size, forward_only);
            groups.push(&data[start..end]);
            start = end;
        }
        groups
    }

    /// The end of the pass of `size` that starts at `data[start]`, within the memory budget where
    /// a datum alone is.
    fn pass_end(&self, data: &[Datum], start: usize, size: PassSize, forward_only: bool) -> usize {
        let budget = self.limits.map_or(u64::MAX, |l| l.memory_bytes);
        pass_end(data, start, size.tokens(), &|g| self.pass_bytes(g, forward_only) <= budget)
    }

    fn pass_bytes(&self, group: &[Datum], forward_only: bool) -> u64 {
        use crate::memory::PassKind;
        let kind = match (forward_only, self.mode) {
            (true, _) => PassKind::ForwardOnly,
            (false, Mode::Lora(_)) => PassKind::Lora,
            (false, Mode::Full) => PassKind::Full { parameters: self.num_parameters() },
        };
        let lens: Vec<usize> = group.iter().map(|d| d.tokens.len()).collect();
        crate::memory::pass_bytes(&self.base.config, &lens, kind)
    }

    /// Current weights without copying (forward-only passes need no frozen copy).
    fn snapshot_shared(&self) -> Result<Model> {
        let tensors: BTreeMap<String, Tensor> =
            self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        self.model_from(tensors)
    }

    /// Applies the accumulated gradients with AdamW (decoupled weight decay, bias-corrected
    /// moments, optional global-norm clip), then clears them.
    pub fn optim_step(&mut self, p: &AdamParams) -> Result<BTreeMap<String, f64>> {
        if !(0.0..=MAX_LEARNING_RATE).contains(&p.learning_rate) {
            return user(format!("learning_rate must be in [0, {MAX_LEARNING_RATE}], got {}", p.learning_rate));
        }
        let finite_non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !(0.0..1.0).contains(&p.beta1)
            || !(0.0..1.0).contains(&p.beta2)
            || ![p.eps, p.grad_clip_norm, p.weight_decay].into_iter().all(finite_non_negative)
        {
            return user(
                "adam_params: beta1 and beta2 must be in [0, 1); eps, weight_decay and grad_clip_norm finite and >= 0",
            );
        }
        let mut sq = 0f64;
        for g in self.grads.values() {
            sq += adamw::sum_of_squares(g)?;
        }
        let norm = sq.sqrt();
        let clip = if p.grad_clip_norm > 0.0 && norm > p.grad_clip_norm { p.grad_clip_norm / norm } else { 1.0 };
        self.steps += 1;
        let step = adamw::AdamStep {
            lr: p.learning_rate,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
            t: self.steps as i32,
            scale: clip,
        };
        for (name, var) in &self.vars {
            let Some(g) = self.grads.get(name) else { continue };
            let (mut m, mut v) = match self.moments.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            adamw::step(var, g, &mut m, &mut v, &step)?;
            self.moments.insert(name.clone(), (m, v));
        }
        self.grads.clear();
        let mut metrics = BTreeMap::new();
        metrics.insert("grad_norm:max".to_string(), norm);
        metrics.insert("learning_rate:mean".to_string(), p.learning_rate);
        metrics.insert("num_datums:sum".to_string(), std::mem::take(&mut self.pending) as f64);
        Ok(metrics)
    }

    /// Saves the trainable weights (`weights.safetensors`), optionally the optimizer state
    /// (`optimizer.safetensors`: `m.NAME`, `v.NAME`) and `state.json` {mode, steps}.
    pub fn save(&self, dir: &Path, optimizer: bool) -> Result<()> {
        let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let weights: Vec<(String, Tensor)> =
            self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&weights.into_iter().collect(), dir.join("weights.safetensors"))?;
        if optimizer {
            let mut opt = std::collections::HashMap::new();
            for (k, (m, v)) in &self.moments {
                opt.insert(format!("m.{k}"), m.clone());
                opt.insert(format!("v.{k}"), v.clone());
            }
            candle_core::safetensors::save(&opt, dir.join("optimizer.safetensors"))?;
        }
        let state = serde_json::json!({"mode": self.mode, "steps": self.steps, "format": "tandem-train/1"});
        std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(&state).expect("json")).map_err(io)?;
        Ok(())
    }

    /// Loads weights saved by `save` into this model (same mode and shapes), and the optimizer
    /// state too when `optimizer` (else the moments restart). Pending gradients are dropped.
    pub fn load(&mut self, dir: &Path, optimizer: bool) -> Result<()> {
        let state: serde_json::Value = std::fs::read(dir.join("state.json"))
            .map_err(|e| TrainError::User(format!("{}: not a checkpoint ({e})", dir.display())))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| TrainError::User(format!("state.json: {e}"))))?;
        let mode: Mode = serde_json::from_value(state["mode"].clone())
            .map_err(|e| TrainError::User(format!("state.json mode: {e}")))?;
        if mode != self.mode {
            return user(format!("checkpoint was trained as {mode:?}, this model is {:?}", self.mode));
        }
        let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), self.base.device())?;
        for (name, var) in &self.vars {
            let t = weights.get(name).ok_or_else(|| TrainError::User(format!("checkpoint lacks {name}")))?;
            if t.dims() != var.dims() {
                return user(format!("checkpoint {name} has shape {:?}, expected {:?}", t.dims(), var.dims()));
            }
            var.set(t)?;
        }
        self.moments.clear();
        if optimizer {
            let path = dir.join("optimizer.safetensors");
            if !path.exists() {
                return user(format!("{} has no optimizer state", dir.display()));
            }
            let opt = candle_core::safetensors::load(path, self.base.device())?;
            for name in self.vars.keys() {
                if let (Some(m), Some(v)) = (opt.get(&format!("m.{name}")), opt.get(&format!("v.{name}"))) {
                    self.moments.insert(name.clone(), (m.clone(), v.clone()));
                }
            }
            self.steps = state["steps"].as_u64().unwrap_or(0);
        }
        self.grads.clear();
        self.pending = 0;
        Ok(())
    }

    /// Writes a Hugging Face folder of the merged weights that `tandem serve --model` loads:
    /// `model.safetensors`, `config.json` (the base's, or one written from the model's
    /// configuration), and the tokenizer files found in `tokenizer_dir`.
    pub fn export_hf(&self, config_dir: Option<&Path>, tokenizer_dir: &Path, out: &Path) -> Result<()> {
        let io = |e: std::io::Error| TrainError::Io(format!("{}: {e}", out.display()));
        std::fs::create_dir_all(out).map_err(io)?;
        let tensors = self.snapshot()?.export_hf()?;
        let untied = tensors.iter().any(|(n, _)| n == "lm_head.weight");
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, out.join("model.safetensors"))?;
        let mut config = match config_dir {
            Some(dir) => {
                let path = dir.join("config.json");
                std::fs::read(&path)
                    .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| TrainError::Io(format!("config.json: {e}"))))?
            }
            None => self.base.config.to_hf_json(),
        };
        // An adapter on a tied output projection unties it.
        if untied {
            config["tie_word_embeddings"] = serde_json::Value::Bool(false);
        }
        std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config).expect("json")).map_err(io)?;
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            let src = tokenizer_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, out.join(f)).map_err(io)?;
            }
        }
        Ok(())
    }
}
