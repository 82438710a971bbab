//! Healing: a short fine-tune of a converted model toward the original, through the trainer the
//! Tinker API uses (`tandem_train::TrainingModel`, full weights or LoRA). Each step's loss, per
//! token of calibration text, is the cross-entropy of the text's next token plus a distillation
//! term: the cross-entropy against the original model's `top_k` most likely next tokens, each
//! weighted by the original's probability of it (the KL to the original restricted to its top
//! k, up to the original's entropy, which does not depend on the weights). Both are the training
//! API's `cross_entropy` loss with per-token weights: the distillation term is k more copies of
//! each window, copy j targeting the original's j-th token.
use crate::Result;
use candle_core::D;
use rand::{Rng, SeedableRng};
use tandem_models::{Model, ModelError};
use tandem_train::{AdamParams, Datum, LossFn, Mode, TrainingModel};

#[derive(Debug, Clone, Copy)]
pub struct HealOptions {
    pub steps: usize,
    pub learning_rate: f64,
    /// Windows per step, and tokens per window.
    pub windows: usize,
    pub window: usize,
    /// The original's top tokens the distillation term covers (0: cross-entropy only).
    pub top_k: usize,
    pub mode: Mode,
}

fn train_err(e: tandem_train::TrainError) -> ModelError {
    ModelError::Adapter(format!("healing: {e}"))
}

/// For each rank j < k, the original's j-th most likely next token at every position, and its
/// probability: ids[j][i], probs[j][i].
struct TopK {
    ids: Vec<Vec<u32>>,
    probs: Vec<Vec<f32>>,
}

fn teacher_top_k(original: &Model, tokens: &[u32], k: usize) -> Result<TopK> {
    let logits = original.forward_sequence(tokens)?;
    let probs = softmax(&logits)?;
    let rows: Vec<Vec<f32>> = probs.to_vec2()?;
    let (mut ids, mut ps) = (vec![Vec::new(); k], vec![Vec::new(); k]);
    for row in rows {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
        for j in 0..k {
            ids[j].push(order[j] as u32);
            ps[j].push(row[order[j]]);
        }
    }
    Ok(TopK { ids, probs: ps })
}

/// softmax over the last dimension.
fn softmax(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Trains `converted` toward `original` on windows of `tokens`; returns the healed model and the
/// loss of each step (per token). `progress(step, steps, loss)` after each step.
pub fn heal(
    original: &Model,
    converted: &Model,
    tokens: &[u32],
    opts: &HealOptions,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<(Model, Vec<f64>)> {
    let n = opts.window;
    if tokens.len() <= n + 1 {
        return Err(ModelError::Adapter(format!("healing needs more than {} tokens of text", n + 1)));
    }
    let mut trainer = TrainingModel::new(converted, opts.mode, 0).map_err(train_err)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let adam = AdamParams { learning_rate: opts.learning_rate, grad_clip_norm: 1.0, ..Default::default() };
    let per_token = 1.0 / (opts.windows * n) as f32;
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let mut data = Vec::new();
        for _ in 0..opts.windows {
            let at = rng.random_range(0..tokens.len() - n - 1);
            let (input, next) = (&tokens[at..at + n], &tokens[at + 1..at + n + 1]);
            let weights = |w: Vec<f32>| [("weights".to_string(), w)].into_iter().collect();
            data.push(Datum { tokens: input.to_vec(), targets: next.to_vec(), inputs: weights(vec![per_token; n]) });
            if opts.top_k > 0 {
                let top = teacher_top_k(original, input, opts.top_k)?;
                for (targets, p) in top.ids.into_iter().zip(top.probs) {
                    let w = p.iter().map(|p| p * per_token).collect();
                    data.push(Datum { tokens: input.to_vec(), targets, inputs: weights(w) });
                }
            }
        }
        let out = trainer.forward_backward(&data, &LossFn::CrossEntropy, false).map_err(train_err)?;
        trainer.optim_step(&adam).map_err(train_err)?;
        let loss = out.metrics.get("loss:sum").copied().unwrap_or(f64::NAN);
        losses.push(loss);
        progress(step + 1, opts.steps, loss);
    }
    Ok((trainer.snapshot().map_err(train_err)?, losses))
}
