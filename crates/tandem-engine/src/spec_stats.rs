//! Counters of speculative decoding, shared between the engine thread and metrics readers.
use crate::commit::StepReport;
use crate::scheduler::StepPlan;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Speculation figures of one request (reported as an extension of `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecUsage {
    /// Draft tokens the target verified.
    pub drafted_tokens: usize,
    /// Of those, the ones accepted.
    pub accepted_tokens: usize,
    /// Target forwards that produced this request's output tokens while a drafter was on.
    pub decode_steps: usize,
}

impl SpecUsage {
    /// Output tokens per target forward (1.0 without any accepted draft).
    pub fn acceptance_length(&self, completion_tokens: usize) -> f64 {
        completion_tokens as f64 / self.decode_steps.max(1) as f64
    }
}

/// Engine-wide totals since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    /// The drafter's name, or None when speculation is off.
    pub drafter: Option<String>,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    /// Per-sequence decode steps and the tokens they emitted.
    pub decode_steps: u64,
    pub emitted_tokens: u64,
    /// Seconds spent proposing drafts, and running the target forward plus verification.
    pub draft_secs: f64,
    pub verify_secs: f64,
    /// Of the drafted and accepted tokens, those copied by prompt lookup (`Draft::lookup`).
    pub lookup_drafted_tokens: u64,
    pub lookup_accepted_tokens: u64,
    /// Siblings of draft tokens verified (`Draft::alternatives`), and steps where one won.
    pub alternatives_drafted: u64,
    pub alternatives_accepted: u64,
    /// Every step's wall time by kind (counted with or without a drafter): where speculation's
    /// gain goes, since prompts cost what they cost and each verified row costs more on a busy CPU.
    pub steps: StepKinds,
}

/// Steps of one kind: how many, their seconds (all of it, and of that the drafting and the
/// target's forward; the rest is committing: verification, cache rollback, events, learning's
/// observation), rows fed and tokens emitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTally {
    pub steps: u64,
    pub secs: f64,
    /// Scheduling, with the drafter's proposals (all of it where there is a drafter).
    pub drafting_secs: f64,
    /// The target's forward and its logits' copy to the host.
    pub forward_secs: f64,
    pub rows: u64,
    pub emitted: u64,
}

/// Steps by kind: with prompt rows (prefill, alone or beside decodes); decodes with no draft;
/// decodes whose drafts were all copied by prompt lookup (`Draft::lookup`); decodes with a draft of the
/// drafter's own (learned, n-gram or draft model).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepKinds {
    pub prefill: StepTally,
    pub plain: StepTally,
    pub copied: StepTally,
    pub drafted: StepTally,
}

impl StepKinds {
    pub fn named(&self) -> [(&'static str, StepTally); 4] {
        [("prefill", self.prefill), ("plain", self.plain), ("copied", self.copied), ("drafted", self.drafted)]
    }

    fn kind(&mut self, plan: &StepPlan) -> &mut StepTally {
        if !plan.seqs.iter().all(|s| s.decode) {
            &mut self.prefill
        } else if plan.seqs.iter().all(|s| s.draft.tokens.is_empty()) {
            &mut self.plain
        } else if plan.seqs.iter().all(|s| s.draft.lookup || s.draft.tokens.is_empty()) {
            &mut self.copied
        } else {
            &mut self.drafted
        }
    }
}

impl SpecStats {
    /// Tokens emitted per sequence per verification step.
    pub fn acceptance_length(&self) -> f64 {
        self.emitted_tokens as f64 / self.decode_steps.max(1) as f64
    }
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted_tokens as f64 / self.drafted_tokens.max(1) as f64
    }
}

/// One step's seconds: all of it, and of that the drafting and the target's forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTime {
    pub total: f64,
    pub drafting: f64,
    pub forward: f64,
}

#[derive(Default)]
pub(crate) struct SpecCounters {
    pub drafter: Mutex<Option<String>>,
    pub drafted: AtomicU64,
    pub accepted: AtomicU64,
    pub decode_steps: AtomicU64,
    pub emitted: AtomicU64,
    pub draft_nanos: AtomicU64,
    pub verify_nanos: AtomicU64,
    pub lookup_drafted: AtomicU64,
    pub lookup_accepted: AtomicU64,
    pub alternatives_drafted: AtomicU64,
    pub alternatives_accepted: AtomicU64,
    pub steps: Mutex<StepKinds>,
}

impl SpecCounters {
    pub fn snapshot(&self) -> SpecStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpecStats {
            drafter: self.drafter.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            drafted_tokens: get(&self.drafted),
            accepted_tokens: get(&self.accepted),
            decode_steps: get(&self.decode_steps),
            emitted_tokens: get(&self.emitted),
            draft_secs: get(&self.draft_nanos) as f64 * 1e-9,
            verify_secs: get(&self.verify_nanos) as f64 * 1e-9,
            lookup_drafted_tokens: get(&self.lookup_drafted),
            lookup_accepted_tokens: get(&self.lookup_accepted),
            alternatives_drafted: get(&self.alternatives_drafted),
            alternatives_accepted: get(&self.alternatives_accepted),
            steps: *self.steps.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Adds a committed step's wall time to its kind's tally.
    pub(crate) fn add_time(&self, plan: &StepPlan, report: &StepReport, time: StepTime) {
        let mut kinds = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let t = kinds.kind(plan);
        t.steps += 1;
        t.secs += time.total;
        t.drafting_secs += time.drafting;
        t.forward_secs += time.forward;
        t.rows += plan.seqs.iter().map(|s| s.tokens.len() as u64).sum::<u64>();
        t.emitted += report.seqs.iter().map(|c| c.emitted as u64).sum::<u64>();
    }

    /// Adds a committed step's decodes.
    pub(crate) fn add_step(&self, plan: &StepPlan, report: &StepReport, draft_nanos: u64, verify_nanos: u64) {
        let add = |a: &AtomicU64, n: usize| a.fetch_add(n as u64, Ordering::Relaxed);
        for (p, c) in plan.seqs.iter().zip(&report.seqs).filter(|(p, _)| p.decode) {
            add(&self.drafted, p.draft.tokens.len());
            add(&self.accepted, c.accepted);
            add(&self.decode_steps, 1);
            add(&self.emitted, c.emitted);
            add(&self.alternatives_drafted, p.draft.alternatives.len());
            add(&self.alternatives_accepted, c.alternative.is_some() as usize);
            if p.draft.lookup {
                add(&self.lookup_drafted, p.draft.tokens.len());
                add(&self.lookup_accepted, c.accepted);
            }
        }
        self.draft_nanos.fetch_add(draft_nanos, Ordering::Relaxed);
        self.verify_nanos.fetch_add(verify_nanos, Ordering::Relaxed);
    }
}
