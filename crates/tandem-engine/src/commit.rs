//! The commit stage of a step: turns the runner's logits into tokens (sampling, or verifying a
//! draft), rolls rejected drafts out of the KV cache, sends tokens, applies stop and length
//! checks, charges the policy, and reports what happened to each planned sequence.
use crate::engine::{EngineConfig, Event, TokenScore, Usage};
use crate::runner::StepOutput;
use crate::scheduler::{Scheduled, Scheduler, StepPlan};
use crate::sequence::Sequence;
use tandem_runtime::speculative::verify;
use tandem_runtime::{sampling, FinishReason, SampledToken};
use tokio::sync::mpsc::UnboundedSender;

/// What the commit did with one planned sequence.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    /// Row of the step's batch where its fed tokens begin.
    pub offset: usize,
    /// Fed positions kept in its cache (a decode: the pending token and the accepted drafts).
    pub kept: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
    /// The sibling (index in the draft's alternatives) accepted in place of the draft token it
    /// stands beside, if any: then the last kept position.
    pub alternative: Option<usize>,
    /// Tokens emitted (0 for a prompt chunk that is not the last).
    pub emitted: usize,
}

impl Committed {
    /// The kept positions as runs of consecutive batch rows, (first position, first row, count):
    /// one run, or where a sibling won, the chain before it and then the sibling's own row.
    pub fn kept_runs(&self, p: &Scheduled) -> impl Iterator<Item = (usize, usize, usize)> {
        let chain = self.kept - self.alternative.is_some() as usize;
        let sibling = self.alternative.map(|_| (p.start + chain, self.row_of(p, chain), 1));
        std::iter::once((p.start, self.offset, chain)).chain(sibling)
    }

    /// Where kept position i's row is in the step's batch (an accepted sibling's is not next).
    pub fn row_of(&self, p: &Scheduled, i: usize) -> usize {
        match self.alternative {
            Some(j) if i == p.draft.alternatives[j].of + 1 => self.offset + 1 + p.draft.tokens.len() + j,
            _ => self.offset + i,
        }
    }
}

/// What the commit stage asks of the model runner (a fake in the scheduler's tests).
pub(crate) trait CommitKv {
    /// Keeps `kept` of the `fed` positions from `start`; `sibling`: the batch row (relative to
    /// the sequence's first) of an accepted sibling that moves into the last kept place.
    fn keep(&mut self, slot: usize, start: usize, fed: usize, kept: usize, sibling: Option<usize>);
    /// Hands the drafter the hidden states of `n` kept positions from `start` (batch rows from
    /// `offset`).
    fn observe(&mut self, slot: usize, start: usize, offset: usize, n: usize, hidden: &[candle_core::Tensor]);
    /// A drafter is on (speculation figures are kept).
    fn drafting(&self) -> bool;
}

/// A step's outcome: per planned sequence, and the sequences that ended.
#[derive(Default)]
pub(crate) struct StepReport {
    pub seqs: Vec<Committed>,
    /// Running indices that finished (stop, length, or a client gone).
    pub finished: Vec<usize>,
    /// Finished events, sent once the step's accounting is published (a client that reads
    /// /metrics after its response then sees it counted).
    pub finishing: Vec<(UnboundedSender<Event>, Event)>,
}

/// Commits every planned sequence of a step whose forward gave `out`.
pub(crate) fn commit(
    sched: &mut Scheduler,
    runner: &mut dyn CommitKv,
    config: &EngineConfig,
    plan: &StepPlan,
    out: &StepOutput,
) -> StepReport {
    let mut report = StepReport::default();
    let spec_on = runner.drafting();
    let mut offset = 0;
    for (p, rows) in plan.seqs.iter().zip(&out.logit_rows) {
        if !p.decode {
            sched.charge_prompt(p.index, p.start + p.tokens.len());
        }
        let c = match p.wants_logits {
            false => {
                if p.scores
                    && score_chunk(&mut sched.running[p.index], p, &out.logits[rows.clone()], &mut report.finishing)
                {
                    report.finished.push(p.index);
                }
                Committed { offset, kept: p.tokens.len(), accepted: 0, alternative: None, emitted: 0 }
            }
            true => {
                let (c, emitted) = sample_or_verify(&mut sched.running[p.index], p, &out.logits[rows.clone()], offset);
                let sibling = c.alternative.map(|_| c.row_of(p, c.kept - 1) - offset);
                runner.keep(p.slot, p.start, p.tokens.len(), c.kept, sibling);
                let s = &mut sched.running[p.index];
                if p.decode && spec_on {
                    adapt_draft_lengths(s, p, c.accepted, config);
                }
                let before = s.generated;
                if emit(s, p, &c, emitted, config.max_seq_len, spec_on, &mut report.finishing) {
                    report.finished.push(p.index);
                }
                let after = sched.running[p.index].generated;
                // Output is charged as it is emitted (speculative tokens only if accepted).
                sched.charge_output(p.index, after - before);
                c
            }
        };
        sched.running[p.index].computed = p.start + c.kept;
        observe_committed(runner, p, &c, &out.hidden);
        offset += p.tokens.len();
        report.seqs.push(c);
    }
    report
}

/// The tokens a sequence's logits rows give: one sample, or a verified draft.
fn sample_or_verify(
    s: &mut Sequence,
    p: &Scheduled,
    rows: &[Vec<f32>],
    offset: usize,
) -> (Committed, Vec<SampledToken>) {
    let (emitted, accepted, alternative) = if p.draft.tokens.is_empty() {
        (vec![s.sampler.sample(&rows[0], &s.history)], 0, None)
    } else {
        let rows: Vec<&[f32]> = rows.iter().map(|l| l.as_slice()).collect();
        let v = verify(&mut s.sampler, &rows, &p.draft, &s.history);
        (v.tokens, v.accepted, v.alternative)
    };
    // Keep the pending token and the accepted drafts; rejected ones are rolled back.
    let kept = if p.decode { 1 + accepted } else { p.tokens.len() };
    let c = Committed { offset, kept, accepted, alternative, emitted: emitted.len() };
    (c, emitted)
}

/// A scoring request's chunk: its logits rows become the scores of the prompt tokens they predict
/// (each position once, even when a preempted request computes it again), and after the last
/// chunk the request finishes. True when it has finished (or its client has gone).
fn score_chunk(
    s: &mut Sequence,
    p: &Scheduled,
    rows: &[Vec<f32>],
    finishing: &mut Vec<(UnboundedSender<Event>, Event)>,
) -> bool {
    let Some(spec) = s.request.score else { return false };
    let prompt = &s.request.prompt;
    let mut scores = Vec::new();
    for (j, row) in rows.iter().enumerate() {
        // Row j holds the logits at position start + j, which predict the token after it.
        let next = p.start + j + 1;
        if next < spec.from.max(s.scored) || next >= prompt.len() {
            continue;
        }
        let lse = sampling::log_sum_exp(row);
        let top = sampling::top_n(row, spec.top_k).into_iter().map(|(id, l)| (id, l - lse)).collect();
        scores.push(TokenScore { token: prompt[next], logprob: row[prompt[next] as usize] - lse, top });
        s.scored = next + 1;
    }
    if !scores.is_empty() && s.events.send(Event::Scored(scores)).is_err() {
        return true;
    }
    if p.start + p.tokens.len() < prompt.len() {
        return false;
    }
    let usage = Usage { prompt_tokens: prompt.len(), cached_tokens: s.cached, completion_tokens: 0, speculation: None };
    finishing.push((s.events.clone(), Event::Finished { reason: FinishReason::Length, usage }));
    true
}

/// Per-sequence speculation figures, and its draft lengths adapted to its acceptance: +2 after
/// a draft accepted whole, -1 (down to 1) after a rejection (see `EngineConfig::spec_adaptive`).
fn adapt_draft_lengths(s: &mut Sequence, p: &Scheduled, accepted: usize, config: &EngineConfig) {
    s.spec.drafted_tokens += p.draft.tokens.len();
    s.spec.accepted_tokens += accepted;
    s.spec.decode_steps += 1;
    let all_in = accepted == p.draft.tokens.len();
    let adapt = |k: usize| if all_in { (k + 2).min(config.spec_k) } else { k.saturating_sub(1).max(1) };
    if p.draft.lookup {
        s.copy_k = adapt(s.copy_k);
    } else if config.spec_adaptive && !p.draft.tokens.is_empty() {
        s.draft_k = adapt(s.draft_k);
    }
}

/// Sends the emitted tokens until a stop token, the output limit or the slot's end; returns true
/// when the sequence has finished.
fn emit(
    s: &mut Sequence,
    p: &Scheduled,
    c: &Committed,
    emitted: Vec<SampledToken>,
    max_seq_len: usize,
    spec_on: bool,
    finishing: &mut Vec<(UnboundedSender<Event>, Event)>,
) -> bool {
    let usage = |s: &Sequence| Usage {
        prompt_tokens: s.request.prompt.len(),
        cached_tokens: s.cached,
        completion_tokens: s.generated,
        speculation: spec_on.then_some(s.spec),
    };
    let count = emitted.len();
    for (j, token) in emitted.into_iter().enumerate() {
        if s.request.stop_token_ids.contains(&token.id) {
            finishing.push((s.events.clone(), Event::Finished { reason: FinishReason::Stop, usage: usage(s) }));
            return true;
        }
        s.history.push(token.id);
        s.generated += 1;
        let id = token.id;
        if s.events.send(Event::Token(token)).is_err() {
            return true;
        }
        // As plain decoding would judge it: the cache would hold p.start + 1 + j tokens
        // (p.start + kept for a prompt's first token) with this one pending.
        let cached = if p.decode { p.start + 1 + j } else { p.start + c.kept };
        if s.generated >= s.request.max_tokens || cached + 1 > max_seq_len {
            finishing.push((s.events.clone(), Event::Finished { reason: FinishReason::Length, usage: usage(s) }));
            return true;
        }
        if j + 1 == count {
            s.pending = Some(id);
        }
    }
    false
}

/// Gives the drafter the target's hidden states at the positions the sequence kept.
fn observe_committed(runner: &mut dyn CommitKv, p: &Scheduled, c: &Committed, hidden: &[candle_core::Tensor]) {
    for (start, row, n) in c.kept_runs(p) {
        runner.observe(p.slot, start, row, n, hidden);
    }
}
