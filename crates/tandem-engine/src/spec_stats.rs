//! Counters of speculative decoding, shared between the engine thread and metrics readers.
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
    /// Siblings of first draft tokens verified (`Draft::alternatives`), and steps where one won.
    pub alternatives_drafted: u64,
    pub alternatives_accepted: u64,
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
}

impl SpecCounters {
    pub fn snapshot(&self) -> SpecStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpecStats {
            drafter: self.drafter.lock().expect("not poisoned").clone(),
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
        }
    }

    pub fn add(&self, a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}
