//! Online learning as an observer of committed steps: after the commit stage, `on_step` records
//! what the target did into each sequence's trace (its distributions, hidden states and rejected
//! draft tokens) and judges the served drafter version; `on_finished` hands finished traces to
//! the trainer; `on_decode_step` feeds the draft shape controller. Nothing here decides a token.
use crate::commit::{Committed, StepReport};
use crate::online::{OnlineState, Rejection, SeqOutcome, Trace, Version};
use crate::runner::StepOutput;
use crate::scheduler::{Scheduled, StepPlan};
use crate::sequence::Sequence;
use candle_core::Tensor;
use std::sync::atomic::Ordering;

impl OnlineState {
    /// Records a committed step into the traces of `running` (the scheduler's list, indexed as in
    /// the plan). `layers`: how many of the hidden states are the drafter's features (the rest is
    /// the last residual stream). Returns a drafter version to roll back to, applied between steps.
    pub(crate) fn on_step(
        &mut self,
        running: &mut [Sequence],
        plan: &StepPlan,
        report: &StepReport,
        out: &StepOutput,
        layers: usize,
    ) -> Option<Version> {
        let mut rollback = None;
        for ((p, c), rows) in plan.seqs.iter().zip(&report.seqs).zip(&out.logit_rows) {
            // Copied (prompt-lookup) drafts say nothing about the learned drafter.
            let learned = p.decode && !p.draft.lookup && !p.draft.tokens.is_empty();
            if learned {
                rollback = self.record_draft(c.accepted > 0).or(rollback);
            }
            let Some(trace) = running[p.index].trace.as_mut() else { continue };
            let derived = self.hooks.config.labels_from_hidden && trace.version.is_none();
            if p.wants_logits && !derived {
                // The target's distribution at every kept position that has logits. Logit rows
                // are the last rows.len() of the fed tokens.
                let first = p.start + p.tokens.len() - rows.len();
                for j in (0..rows.len()).filter(|&j| first + j < p.start + c.kept) {
                    let row = rows.start + c.row_of(p, j) - c.offset;
                    trace.record_soft(first + j, &out.logits[row], self.hooks.config.trace_top);
                }
            }
            // Where a sibling won, the draft token beside it was the one rejected.
            let judged = learned.then(|| c.accepted - c.alternative.is_some() as usize);
            if let Some(judged) = judged.filter(|&j| j < p.draft.tokens.len()) {
                let token = p.draft.tokens[judged];
                let pos = (p.start + judged).saturating_sub(trace.skipped);
                trace.rejected.push(Rejection { pos, token, depth: judged });
            }
            for (start, row, n) in c.kept_runs(p) {
                record_features(trace, start, row, n, &out.hidden, layers);
            }
        }
        rollback
    }

    /// Finished sequences' traces go to the trainer.
    pub(crate) fn on_finished(&self, ended: Vec<Sequence>) {
        for mut s in ended {
            if let Some(trace) = s.trace.take().filter(|t| t.positions() >= 2) {
                let skipped = trace.skipped.min(s.history.len());
                let tokens = s.history.split_off(skipped);
                let prompt_len = trace.prompt_len.saturating_sub(skipped);
                self.hooks.traces.push(Trace { tokens, prompt_len, skipped: 0, ..trace });
            }
        }
    }

    /// A decode-only step at draft shape `(k, budget)` took `step_secs` (drafting included, of
    /// which `catch_up` = (seconds, positions) the drafter spent catching up). The measurement of
    /// the controller of the family `choose` was given for this step, published for /metrics
    /// (that family's figures).
    pub(crate) fn on_decode_step(
        &mut self,
        shape: (usize, usize),
        plan: &StepPlan,
        report: &StepReport,
        step_secs: f64,
        (catch_up_secs, positions): (f64, usize),
    ) {
        let seqs: Vec<SeqOutcome> = plan.seqs.iter().zip(&report.seqs).map(|(p, c)| outcome(p, c)).collect();
        // Steady drafting catches up about one position per emitted token; a backlog left by
        // steps without drafts is not this shape's cost.
        let emitted: usize = report.seqs.iter().map(|c| c.emitted).sum();
        let steady = catch_up_secs / positions.max(1) as f64 * (emitted as f64).min(positions as f64);
        self.record_shape(shape, &seqs, step_secs - catch_up_secs + steady);
        let m = &self.hooks.exchange.metrics;
        m.chosen_k.store(self.controller().best() as u64, Ordering::Relaxed);
        m.chosen_alternatives.store(self.controller().best_siblings() as u64, Ordering::Relaxed);
        m.gain.set(self.controller().gain());
        if let Ok(mut t) = m.k_table.try_lock() {
            *t = self.controller().table();
        }
        if let Ok(mut t) = m.alternatives_table.try_lock() {
            *t = self.controller().sibling_table();
        }
    }
}

/// The target's features (and last residual stream) of `n` kept positions from `start`, rows
/// `offset..offset + n` of the step's hidden states.
fn record_features(trace: &mut Trace, start: usize, offset: usize, n: usize, hidden: &[Tensor], layers: usize) {
    if hidden.is_empty() || n == 0 {
        return;
    }
    let (features, last) = hidden.split_at(layers.min(hidden.len()));
    // The trainer derives prompt labels through the served model's head; another version's head
    // may differ (adapters on the unembedding), so its prompt positions keep the text's labels.
    let last = if trace.version.is_some() { &[] } else { last };
    let floats = |t: candle_core::Result<Tensor>| {
        t.and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
    };
    let rows: candle_core::Result<Vec<Tensor>> = features.iter().map(|h| h.narrow(0, offset, n)).collect();
    let joined = floats(rows.and_then(|r| Tensor::cat(&r, 1)));
    let last = last.first().map(|l| floats(l.narrow(0, offset, n))).transpose();
    match (joined, last) {
        (Ok(v), Ok(l)) => trace.record_features(start, &v, l.as_deref()),
        (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "trace capture failed"),
    }
}

/// What a decoding sequence's part of a step tells the draft shape controller: a copied draft is
/// counted as rows only (its length is not the learned drafter's).
fn outcome(p: &Scheduled, c: &Committed) -> SeqOutcome {
    let learned = !p.draft.lookup;
    let sibling_won = c.alternative.is_some();
    SeqOutcome {
        rows: p.tokens.len(),
        depth: p.start,
        drafted: if learned { p.draft.tokens.len() } else { 0 },
        chain_accepted: c.accepted - sibling_won as usize,
        siblings: if learned { p.draft.alternatives.len() } else { 0 },
        sibling_won,
    }
}
