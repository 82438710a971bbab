//! The serving side of online speculator training: traces of what happened at each verification
//! step (`trace`), what the trainer and the engine share (`exchange`: the weight slot, the idle
//! signal, metrics), the draft shape controller (`controller`), and the engine's judgement of each
//! drafter version (roll back one that lowers acceptance).
//!
//! Nothing here makes serving wait: the trace buffer is pushed with `try_lock` (a busy or full
//! buffer drops, and counts the drop), and new weights are taken between engine steps only when
//! the slot is free.
mod controller;
mod exchange;
mod trace;

pub(crate) use controller::ShapeController;
pub use controller::{KStat, SeqOutcome};
pub use exchange::{
    AtomicF64, DrafterExchange, IdleSignal, OnlineMetrics, SwapRecord, TrainerTurns, Turn, Version, WeightSlot,
    IDLE_GRACE,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
pub use trace::{top_probs, Rejection, Trace, TraceBuffer, TraceVersion};

/// Settings of the serving side of online training.
#[derive(Debug, Clone)]
pub struct OnlineConfig {
    /// Top entries of the target's distribution kept per position in traces.
    pub trace_top: usize,
    /// Roll a new version back when its first-token acceptance falls below this fraction of the
    /// previous version's (measured over `rollback_window` drafts each).
    pub rollback_ratio: f64,
    pub rollback_window: usize,
    /// Choose k by measured tokens/s (else the engine's acceptance heuristic applies).
    pub k_by_throughput: bool,
    /// Share of decode steps that try a draft shape other than the best one.
    pub explore: f64,
    /// The trainer derives the target's distribution at every position from the last residual
    /// stream traces record (through the served model's head), so the engine keeps no top entries
    /// where a trace records that stream (the served model's traces; a policy version's do not,
    /// and keep theirs). The engine's softmax over the vocabulary at every kept position took
    /// ~1.5% of a saturated server's time (perf, 2026-12-05).
    pub labels_from_hidden: bool,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig {
            trace_top: 8,
            rollback_ratio: 0.75,
            rollback_window: 200,
            k_by_throughput: true,
            explore: 0.08,
            labels_from_hidden: false,
        }
    }
}

/// Everything the engine needs for online training.
#[derive(Clone)]
pub struct OnlineHooks {
    pub traces: Arc<TraceBuffer>,
    pub exchange: Arc<DrafterExchange>,
    pub config: OnlineConfig,
}

impl OnlineHooks {
    /// A trace buffer of `trace_buffer_bytes` (full: the oldest traces are dropped), a fresh
    /// weight slot, the default settings.
    pub fn new(trace_buffer_bytes: usize) -> Self {
        OnlineHooks {
            traces: Arc::new(TraceBuffer::new(trace_buffer_bytes)),
            exchange: Arc::new(DrafterExchange::default()),
            config: OnlineConfig::default(),
        }
    }
}

/// First-token acceptance counts.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    drafts: usize,
    first_accepted: usize,
}

impl Window {
    fn rate(&self) -> f64 {
        self.first_accepted as f64 / self.drafts.max(1) as f64
    }
}

/// A weight-version family (`WeightVersion::family`); None: the served model.
pub type Family = Option<Arc<str>>;

/// Families whose controllers are kept; past it the least recently used one is forgotten.
const MAX_FAMILIES: usize = 16;

/// One family's draft shape controller (length and the draft tree's sibling budget).
struct DraftShape {
    family: Family,
    controller: ShapeController,
}

/// Engine-side state: versions, rollback judgement, and the draft shape controllers, one
/// per weight-version family: a policy under RL and the served model accept drafts differently,
/// and one measured over both would fit neither (nor would a new policy start from the
/// served model's k).
pub(crate) struct OnlineState {
    pub hooks: OnlineHooks,
    /// The version before the current one, to roll back to.
    previous: Option<Version>,
    current: Option<Version>,
    /// Recent drafts of the current version (a ring of outcomes), and of the previous one.
    recent: VecDeque<bool>,
    before: Option<Window>,
    after: Window,
    /// Most recently used last; the last one is the family of the step being run.
    shapes: Vec<DraftShape>,
    max_k: usize,
    max_alternatives: usize,
}

impl OnlineState {
    pub fn new(hooks: OnlineHooks, max_k: usize, max_alternatives: usize, initial: Option<Version>) -> Self {
        let mut state = OnlineState {
            hooks,
            previous: None,
            current: initial,
            recent: VecDeque::new(),
            before: None,
            after: Window::default(),
            shapes: Vec::new(),
            max_k,
            max_alternatives,
        };
        state.enter(&None);
        state
    }

    /// Makes `family`'s controllers the current ones (new ones for a family not seen yet).
    fn enter(&mut self, family: &Family) {
        if self.shapes.last().is_some_and(|s| &s.family == family) {
            return;
        }
        let shape = match self.shapes.iter().position(|s| &s.family == family) {
            Some(i) => self.shapes.remove(i),
            None => {
                if self.shapes.len() >= MAX_FAMILIES {
                    self.shapes.remove(0);
                }
                let controller = ShapeController::new(self.max_k, self.max_alternatives, self.hooks.config.explore);
                DraftShape { family: family.clone(), controller }
            }
        };
        self.shapes.push(shape);
    }

    fn shape(&self) -> &DraftShape {
        self.shapes.last().expect("a family is always entered")
    }

    fn shape_mut(&mut self) -> &mut DraftShape {
        self.shapes.last_mut().expect("a family is always entered")
    }

    /// The next step's draft length and sibling budget, for a step whose decoding sequences are
    /// mostly `family`'s: its controller measures the step.
    pub fn choose(&mut self, family: &Family) -> (usize, usize) {
        self.enter(family);
        self.shape_mut().controller.choose()
    }

    /// The draft shape controller of the current family.
    pub fn controller(&self) -> &ShapeController {
        &self.shape().controller
    }

    /// A decode-only step at shape `(k, budget)` took `secs`; `seqs`: each decoding sequence's part.
    pub fn record_shape(&mut self, shape: (usize, usize), seqs: &[SeqOutcome], secs: f64) {
        self.shape_mut().controller.record(shape, seqs, secs);
    }

    /// A version waiting to be served, remembering the current one for rollback.
    pub fn take_new(&mut self) -> Option<Version> {
        let v = self.hooks.exchange.weights.take()?;
        let window = self.window();
        self.before = (window.drafts >= self.hooks.config.rollback_window / 2).then_some(window);
        self.previous = self.current.replace(v.clone());
        self.recent.clear();
        self.after = Window::default();
        self.hooks.exchange.weights.record_swap(SwapRecord {
            version: v.number,
            accept_before: self.before.map(|w| w.rate()),
            accept_after: None,
            rolled_back: false,
        });
        tracing::info!(version = v.number, accept_before = ?self.before.map(|w| w.rate()), "drafter swapped in");
        Some(v)
    }

    fn window(&self) -> Window {
        Window { drafts: self.recent.len(), first_accepted: self.recent.iter().filter(|&&a| a).count() }
    }

    /// Records one verified draft; returns the version to roll back to when the current one has
    /// measurably lowered acceptance.
    pub fn record_draft(&mut self, first_accepted: bool) -> Option<Version> {
        self.recent.push_back(first_accepted);
        if self.recent.len() > self.hooks.config.rollback_window {
            self.recent.pop_front();
        }
        self.after.drafts += 1;
        self.after.first_accepted += first_accepted as usize;
        let m = &self.hooks.exchange.metrics;
        m.served_drafts.fetch_add(1, Ordering::Relaxed);
        m.served_first_accepted.fetch_add(first_accepted as u64, Ordering::Relaxed);
        let window = self.hooks.config.rollback_window;
        if self.after.drafts != window {
            return None;
        }
        // Judged once per version, after a full window of its own drafts.
        let after = self.after.rate();
        let slot = &self.hooks.exchange.weights;
        let before = self.before.map(|w| w.rate());
        let worse = before.is_some_and(|b| after < b * self.hooks.config.rollback_ratio - 0.02);
        slot.judge_last(after, worse && self.previous.is_some());
        if !worse {
            tracing::info!(version = self.current.as_ref().map(|v| v.number), accept = after, "drafter kept");
            return None;
        }
        let back = self.previous.take()?;
        let bad = self.current.replace(back.clone()).map(|v| v.number).unwrap_or(0);
        tracing::warn!(version = bad, accept_before = ?before, accept_after = after, back_to = back.number, "drafter rolled back");
        slot.reject(bad, back.number);
        self.recent.clear();
        self.before = None;
        Some(back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Controllers up to draft length `max_k` and `max_alternatives` siblings, default settings.
    fn state(max_k: usize, max_alternatives: usize) -> OnlineState {
        let hooks = OnlineHooks {
            traces: Arc::new(TraceBuffer::new(1 << 20)),
            exchange: Arc::new(DrafterExchange::default()),
            config: OnlineConfig::default(),
        };
        OnlineState::new(hooks, max_k, max_alternatives, None)
    }

    /// A step at `(k, _)` whose chain has its first `accepted` tokens accepted (no siblings),
    /// timed 2 ms + 0.4 ms a row + 0.3 ms a draft token.
    fn step(state: &mut OnlineState, (k, b): (usize, usize), accepted: usize) {
        let seq = SeqOutcome {
            rows: 1 + k,
            depth: 50,
            drafted: k,
            chain_accepted: accepted.min(k),
            siblings: 0,
            sibling_won: false,
        };
        state.record_shape((k, b), &[seq], (2.0 + 0.4 * (1 + k) as f64 + 0.3 * k as f64) / 1e3);
    }

    #[test]
    fn each_family_of_weight_versions_has_its_own_controllers() {
        let mut state = state(3, 0);
        let policy: Family = Some("policy".into());
        // The served model's drafts are never accepted; the policy's rollouts have their first two
        // accepted, so k = 2 is fastest for them (k = 3 costs more for the same tokens).
        for step_no in 0..3000 {
            let family = if step_no % 3 == 0 { None } else { policy.clone() };
            let shape = state.choose(&family);
            step(&mut state, shape, if family.is_some() { 2 } else { 0 });
        }
        state.choose(&None);
        assert_eq!(state.controller().best(), 0, "{:?}", state.controller().table());
        state.choose(&policy);
        assert_eq!(state.controller().best(), 2, "{:?}", state.controller().table());
        // A new family starts measuring from scratch, not from another's choice.
        state.choose(&Some("another".into()));
        assert!(state.controller().table().is_empty());
    }
}
