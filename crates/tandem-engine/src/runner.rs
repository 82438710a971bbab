//! The model runner: owns the model, the KV cache and the drafter, and turns a `StepPlan` into a
//! `StepOutput` (logits rows and hidden states). It decides nothing about requests.
use crate::commit::CommitKv;
use crate::engine::WeightVersion;
use crate::scheduler::{DraftAsk, KvSlots, StepPlan};
use crate::sequence::Sequence;
use candle_core::Tensor;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use tandem_models::{KvCache, KvSnapshot, LogitsFor, Model, SequenceInput};
use tandem_runtime::speculative::{Draft, DraftRequest, Drafter, EagleWeights, TrainableDrafter};

/// What the forward of a step computed, in plan order.
pub struct StepOutput {
    /// Logits rows of the whole step.
    pub logits: Vec<Vec<f32>>,
    /// Which logits rows belong to each planned sequence.
    pub logit_rows: Vec<Range<usize>>,
    /// Hidden states of the layers asked for (`ModelRunner::hidden_layers`), one [tokens, hidden]
    /// tensor per layer, rows in plan order.
    pub hidden: Vec<Tensor>,
}

/// The drafter a server runs: a fixed one, or one whose weights online training swaps.
pub enum ServedDrafter {
    Fixed(Box<dyn Drafter>),
    Trained(Box<dyn TrainableDrafter<Weights = EagleWeights>>),
}

impl ServedDrafter {
    pub fn get(&self) -> &dyn Drafter {
        match self {
            ServedDrafter::Fixed(d) => d.as_ref(),
            ServedDrafter::Trained(d) => d.as_ref(),
        }
    }

    pub fn get_mut(&mut self) -> &mut dyn Drafter {
        match self {
            ServedDrafter::Fixed(d) => d.as_mut(),
            ServedDrafter::Trained(d) => d.as_mut(),
        }
    }
}

pub(crate) struct ModelRunner {
    pub model: Model,
    pub cache: KvCache,
    pub drafter: Option<ServedDrafter>,
    /// The drafter's layers, then (online training) the last residual stream for the trainer's
    /// labels (see `Trace::final_hidden`).
    pub hidden_layers: Vec<usize>,
}

impl ModelRunner {
    pub fn drafter(&self) -> Option<&dyn Drafter> {
        self.drafter.as_ref().map(|d| d.get())
    }

    pub fn drafter_mut(&mut self) -> Option<&mut dyn Drafter> {
        self.drafter.as_mut().map(|d| d.get_mut())
    }

    /// The drafter online training updates, if it is one.
    pub fn trained_mut(&mut self) -> Option<&mut dyn TrainableDrafter<Weights = EagleWeights>> {
        match self.drafter.as_mut()? {
            ServedDrafter::Trained(d) => Some(d.as_mut()),
            ServedDrafter::Fixed(_) => None,
        }
    }

    /// Runs the plan's forward. A panic inside it is an error of this step, not of the engine.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        // Each sibling stands beside a draft token, which is fed after the pending token.
        let beside: Vec<Vec<usize>> =
            plan.seqs.iter().map(|p| p.draft.alternatives.iter().map(|a| a.of + 1).collect()).collect();
        let batch: Vec<SequenceInput> = plan
            .seqs
            .iter()
            .zip(&beside)
            .map(|(p, beside)| SequenceInput {
                slot: p.slot,
                tokens: &p.tokens,
                logits: match (p.wants_logits, p.draft.tokens.is_empty()) {
                    _ if p.scores => LogitsFor::All,
                    (false, _) => LogitsFor::None,
                    (true, true) => LogitsFor::Last,
                    (true, false) => LogitsFor::All,
                },
                siblings: beside,
            })
            .collect();
        let versions: Vec<Option<&WeightVersion>> = plan.seqs.iter().map(|p| p.weights.as_ref()).collect();
        let (model, cache, layers) = (&self.model, &mut self.cache, &self.hidden_layers);
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| forward_versions(model, &versions, &batch, cache, layers)));
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(panic) => return Err(format!("internal error: {}", panic_message(&panic))),
        };
        let logits = out.logits.to_vec2::<f32>().map_err(|e| e.to_string())?;
        Ok(StepOutput { logits, logit_rows: out.logit_rows, hidden: out.hidden })
    }

    /// Each asking sequence's draft (`drafts[i]` for running sequence i; empty where none was
    /// asked or the drafter fails: a broken drafter slows serving down, it never fails a request).
    pub fn propose(&mut self, running: &[Sequence], asks: &[DraftAsk]) -> Vec<Draft> {
        let mut drafts = vec![Draft::default(); running.len()];
        let Some(drafter) = self.drafter.as_mut().map(|d| d.get_mut()) else { return drafts };
        if asks.is_empty() {
            return drafts;
        }
        let requests: Vec<DraftRequest> = asks
            .iter()
            .map(|a| {
                let s = &running[a.index];
                DraftRequest {
                    slot: s.slot,
                    tokens: &s.history,
                    k: a.k,
                    copy_k: a.copy_k,
                    alternatives: a.alternatives,
                    sampling: &s.request.sampling,
                }
            })
            .collect();
        let model = &self.model;
        match std::panic::catch_unwind(AssertUnwindSafe(|| drafter.propose(model, &requests))) {
            Ok(Ok(proposed)) => {
                let vocab = self.model.config.vocab_size as u32;
                for (a, d) in asks.iter().zip(proposed) {
                    drafts[a.index] = checked_draft(d, a, vocab);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "drafter failed; decoding without drafts this step"),
            Err(_) => tracing::warn!("drafter panicked; decoding without drafts this step"),
        }
        drafts
    }
}

impl CommitKv for ModelRunner {
    /// Keeps `kept` of the tokens a step fed from `start`, rolling back the rest; where a sibling
    /// (at row `sibling`) was accepted, its keys and values move into the last kept place, that of
    /// the draft token it beat.
    fn keep(&mut self, slot: usize, start: usize, fed: usize, kept: usize, sibling: Option<usize>) {
        if let Some(row) = sibling {
            if let Err(e) = self.cache.move_position(slot, start + row, start + kept - 1) {
                tracing::error!(error = %e, "KV move of an accepted sibling failed");
            }
        } else if kept < fed {
            if let Err(e) = self.cache.truncate(slot, start + kept) {
                tracing::error!(error = %e, "KV rollback failed");
            }
        }
    }

    /// Hands the drafter the target's hidden states of `n` committed positions from `start`, rows
    /// `offset..offset + n` of this step's batch.
    fn observe(&mut self, slot: usize, start: usize, offset: usize, n: usize, hidden: &[Tensor]) {
        let Some(drafter) = self.drafter_mut() else { return };
        if hidden.is_empty() || n == 0 {
            return;
        }
        let layers = &hidden[..drafter.target_layers().len().min(hidden.len())];
        let outcome = layers
            .iter()
            .map(|h| h.narrow(0, offset, n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(tandem_models::ModelError::from)
            .and_then(|rows| drafter.observe(slot, start, &rows));
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "drafter could not take hidden states");
        }
    }

    fn drafting(&self) -> bool {
        self.drafter.is_some()
    }
}

impl KvSlots for ModelRunner {
    fn snapshot(&self, slot: usize) -> Option<KvSnapshot> {
        self.cache.snapshot(slot).map_err(|e| tracing::warn!(error = %e, "KV swap-out failed")).ok()
    }

    fn restore(&mut self, slot: usize, snapshot: &KvSnapshot) -> bool {
        self.cache.restore(slot, snapshot).map_err(|e| tracing::warn!(error = %e, "KV restore failed")).is_ok()
    }

    fn release(&mut self, slot: usize) {
        if let Err(e) = self.cache.reset(slot) {
            tracing::error!(error = %e, slot, "KV slot reset failed");
        }
        if let Some(d) = self.drafter_mut() {
            d.release(slot);
        }
    }

    fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    fn share_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64, most: usize) -> usize {
        self.cache.share_prefix(slot, tokens, salt, most).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "prefix lookup failed");
            0
        })
    }

    fn index_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64) {
        if let Err(e) = self.cache.index_prefix(slot, tokens, salt) {
            tracing::warn!(error = %e, "prefix indexing failed");
        }
    }

    fn available_blocks(&self) -> usize {
        self.cache.available_blocks()
    }

    fn blocks_to_write(&self, slot: usize, from: usize, to: usize) -> usize {
        self.cache.blocks_to_write(slot, from, to)
    }
}

/// Whatever the drafter says, verify only what fits and exists: tokens within the vocabulary and
/// the asked length, siblings only in a learned greedy draft, of tokens it kept, in order of
/// position, each unlike the token it stands beside, as many as asked.
fn checked_draft(mut d: Draft, a: &DraftAsk, vocab: u32) -> Draft {
    let most = if d.lookup { a.copy_k } else { a.k };
    let valid = d.tokens.iter().take(most).take_while(|&&t| t < vocab).count();
    d.tokens.truncate(valid);
    let room = if d.lookup || d.probs.is_some() { 0 } else { a.alternatives };
    let tokens = &d.tokens;
    d.alternatives.retain(|s| s.of < tokens.len() && s.token < vocab && s.token != tokens[s.of]);
    d.alternatives.sort_by_key(|s| s.of);
    d.alternatives.dedup();
    d.alternatives.truncate(room);
    if let Some(p) = d.probs.as_mut() {
        if p.len() < valid {
            d.tokens.truncate(p.len());
        }
        p.truncate(d.tokens.len());
    }
    d
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// One forward per run of sequences that share weights (`versions[i]` belongs to `batch[i]`; runs
/// are contiguous), merged as if it were one: logits rows and hidden states in batch order.
fn forward_versions(
    base: &Model,
    versions: &[Option<&WeightVersion>],
    batch: &[SequenceInput],
    cache: &mut KvCache,
    layers: &[usize],
) -> tandem_models::Result<tandem_models::ForwardOutput> {
    let key = |v: &Option<&WeightVersion>| v.map(|w| w.id);
    if versions.iter().all(|v| key(v) == key(&versions[0])) {
        let model = versions[0].map_or(base, |w| w.model.as_ref());
        return model.forward(batch, cache, layers);
    }
    let mut logits = Vec::new();
    let mut logit_rows = Vec::new();
    let mut hidden: Vec<Vec<Tensor>> = vec![Vec::new(); layers.len()];
    let mut rows_so_far = 0;
    let mut start = 0;
    while start < batch.len() {
        let mut end = start + 1;
        while end < batch.len() && key(&versions[end]) == key(&versions[start]) {
            end += 1;
        }
        let model = versions[start].map_or(base, |w| w.model.as_ref());
        let out = model.forward(&batch[start..end], cache, layers)?;
        logit_rows.extend(out.logit_rows.iter().map(|r| r.start + rows_so_far..r.end + rows_so_far));
        rows_so_far += out.logits.dim(0)?;
        logits.push(out.logits);
        for (h, t) in hidden.iter_mut().zip(out.hidden) {
            h.push(t);
        }
        start = end;
    }
    Ok(tandem_models::ForwardOutput {
        logits: Tensor::cat(&logits, 0)?,
        logit_rows,
        hidden: hidden.iter().map(|h| Tensor::cat(h, 0)).collect::<candle_core::Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_runtime::speculative::Alternative;

    #[test]
    fn a_draft_is_cut_to_what_can_be_verified() {
        let ask = DraftAsk { index: 0, k: 2, copy_k: 4, alternatives: 2 };
        let beside = |of: usize, token: u32| Alternative { of, token };
        let draft = Draft {
            // Past k, and a token outside the vocabulary.
            tokens: vec![5, 6, 7, 99],
            // Unsorted; one beside a token cut off, one equal to its draft token, one outside the
            // vocabulary, a duplicate, and one more than the budget.
            alternatives: vec![beside(1, 8), beside(2, 9), beside(0, 5), beside(0, 50), beside(0, 3), beside(1, 8)],
            ..Draft::default()
        };
        let d = checked_draft(draft.clone(), &ask, 10);
        assert_eq!(d.tokens, vec![5, 6]);
        assert_eq!(d.alternatives, vec![beside(0, 3), beside(1, 8)]);
        // Copies and sampled drafts carry no siblings.
        let copied = checked_draft(Draft { lookup: true, ..draft.clone() }, &ask, 10);
        assert_eq!((copied.tokens.len(), copied.alternatives.len()), (3, 0));
        let sampled = checked_draft(Draft { probs: Some(vec![vec![]; 4]), ..draft }, &ask, 10);
        assert!(sampled.alternatives.is_empty());
    }
}
