//! Traces: what the target did on each sequence, for the drafter's trainer, and the bounded
//! buffer between the engine (producer) and the trainer (consumer).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tandem_runtime::sampling::{log_sum_exp, top_n};

/// The target's view of one finished sequence: everything the drafter's trainer needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Prompt and output (the last token may have no features: it was never fed), from position
    /// `skipped` of the sequence on.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Floats per position: the drafter's target layers, concatenated.
    pub feature_size: usize,
    /// `positions() * feature_size` floats: the target's hidden states at positions 0..positions().
    pub features: Vec<f32>,
    /// The target's distribution at position t (over token t + 1), top entries with their
    /// probabilities (softmax at temperature 1); the mass not listed is spread over the rest.
    /// Empty where the target computed no logits (prompt positions): the next token is the label.
    pub soft: Vec<Vec<(u32, f32)>>,
    /// `positions() * hidden` floats (or none): the target's last residual stream, before its
    /// final norm. With the target's head it gives the target's whole distribution at every
    /// position, prompt positions included, which the trainer computes off the serving path.
    pub final_hidden: Vec<f32>,
    /// Draft tokens the target rejected.
    pub rejected: Vec<Rejection>,
    /// The weight version that produced it (None: the served model).
    pub version: Option<TraceVersion>,
    /// Leading positions of the sequence the trace leaves out: a cached prefix, whose hidden
    /// states were computed for another sequence. While recording, positions are the
    /// sequence's; the finished trace starts at this one (rope makes the drafter's attention
    /// depend on distances only, so a shifted window trains the same).
    pub skipped: usize,
}

/// Which weights a trace came from: a version `id` of the training run `family`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceVersion {
    pub family: Arc<str>,
    pub id: u64,
}

/// A drafted token the target refused: at `pos + 1` the drafter proposed `token`, the target's
/// distribution at `pos` chose otherwise. `depth` is the draft step that proposed it (0 = first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub pos: usize,
    pub token: u32,
    pub depth: usize,
}

impl Trace {
    pub fn positions(&self) -> usize {
        self.features.len() / self.feature_size.max(1)
    }

    pub fn bytes(&self) -> usize {
        (self.features.len() + self.final_hidden.len() + self.tokens.len()) * 4
            + self.soft.iter().map(|s| s.len() * 8).sum::<usize>()
    }

    /// Floats per position of `final_hidden` (0: not recorded).
    pub fn final_size(&self) -> usize {
        self.final_hidden.len() / self.positions().max(1)
    }

    /// Records the target features (and last residual stream, if given) of positions `start..`,
    /// dropping anything recorded from `start` on (a recomputed sequence records the same
    /// positions again).
    pub(crate) fn record_features(&mut self, start: usize, rows: &[f32], last: Option<&[f32]>) {
        let fs = self.feature_size.max(1);
        // Rows of skipped positions (recomputed after a preemption) are not the trace's.
        let n = rows.len() / fs;
        let before = self.skipped.saturating_sub(start).min(n);
        let rows = &rows[before * fs..];
        let last = last.map(|l| &l[l.len() / n.max(1) * before..]);
        let Some(start) = (start + before).checked_sub(self.skipped) else { return };
        if rows.is_empty() {
            return;
        }
        if start > self.positions() {
            return; // a gap: keep what is consistent
        }
        let final_size = self.final_size();
        if start < self.positions() {
            // Recomputed after a preemption: the same positions again.
            self.features.truncate(start * fs);
            self.final_hidden.truncate(start * final_size);
            self.rejected.retain(|r| r.pos < start);
        }
        // The last stream only while it covers every position so far.
        let new_positions = (rows.len() / fs).max(1);
        match last {
            Some(l) if self.final_hidden.len() == start * (l.len() / new_positions) => {
                self.final_hidden.extend_from_slice(l)
            }
            _ => self.final_hidden.clear(),
        }
        self.features.extend_from_slice(rows);
        if self.soft.len() < self.positions() {
            self.soft.resize(self.positions(), Vec::new());
        }
    }

    pub(crate) fn record_soft(&mut self, pos: usize, logits: &[f32], top: usize) {
        let Some(pos) = pos.checked_sub(self.skipped) else { return };
        if pos >= self.soft.len() {
            self.soft.resize(pos + 1, Vec::new());
        }
        self.soft[pos] = top_probs(logits, top);
    }
}

/// The `n` most likely tokens of softmax(logits) with their probabilities, most likely first.
/// Runs on the engine thread for every kept position: one read of the row for its normaliser
/// (the vectorised log-sum-exp), one for the top entries, an exp for each of those alone.
pub fn top_probs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    top_n(logits, n.max(1)).into_iter().map(|(i, l)| (i, (l - lse).exp())).collect()
}

/// A bounded buffer of traces between the engine (producer) and a trainer (consumer).
pub struct TraceBuffer {
    inner: Mutex<VecDeque<Trace>>,
    capacity_bytes: usize,
    bytes: AtomicU64,
    pushed: AtomicU64,
    dropped: AtomicU64,
}

impl TraceBuffer {
    pub fn new(capacity_bytes: usize) -> Self {
        TraceBuffer {
            inner: Mutex::new(VecDeque::new()),
            capacity_bytes,
            bytes: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether anything is kept (a buffer of no bytes serves engines whose drafter learns
    /// elsewhere, or not at all: they make no traces).
    pub fn keeps_traces(&self) -> bool {
        self.capacity_bytes > 0
    }

    /// Never blocks: if the consumer holds the lock right now, this trace is dropped; if the buffer
    /// is over capacity, the oldest traces are.
    pub fn push(&self, trace: Trace) {
        let Ok(mut q) = self.inner.try_lock() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.pushed.fetch_add(1, Ordering::Relaxed);
        let mut bytes = self.bytes.load(Ordering::Relaxed) as usize + trace.bytes();
        q.push_back(trace);
        while bytes > self.capacity_bytes {
            let Some(old) = q.pop_front() else { break };
            bytes -= old.bytes();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.store(bytes as u64, Ordering::Relaxed);
    }

    /// Takes every buffered trace.
    pub fn drain(&self) -> Vec<Trace> {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.bytes.store(0, Ordering::Relaxed);
        q.drain(..).collect()
    }

    /// Holds the buffer's lock (tests use it to show a busy buffer never stalls serving).
    pub fn lock_for_test(&self) -> std::sync::MutexGuard<'_, VecDeque<Trace>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.inner.try_lock().map(|q| q.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn trace(n: usize) -> Trace {
        Trace { tokens: vec![1; n], feature_size: 2, features: vec![0.5; 2 * n], ..Default::default() }
    }

    #[test]
    fn full_buffer_drops_oldest() {
        let b = TraceBuffer::new(trace(10).bytes() * 3);
        for i in 0..5 {
            let mut t = trace(10);
            t.prompt_len = i;
            b.push(t);
        }
        assert_eq!(b.pushed(), 5);
        assert_eq!(b.dropped(), 2);
        let kept: Vec<usize> = b.drain().iter().map(|t| t.prompt_len).collect();
        assert_eq!(kept, vec![2, 3, 4]);
    }

    #[test]
    fn busy_buffer_drops_instead_of_waiting() {
        let b = Arc::new(TraceBuffer::new(1 << 20));
        let guard = b.lock_for_test();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.push(trace(4)));
        t.join().unwrap();
        drop(guard);
        assert_eq!(b.dropped(), 1);
        assert_eq!(b.pushed(), 0);
    }

    #[test]
    fn top_probs_sums_below_one() {
        let logits = vec![1.0, 3.0, 2.0, 0.0];
        let t = top_probs(&logits, 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f32 = t.iter().map(|x| x.1).sum();
        assert!(total < 1.0 && total > 0.8);
    }

    #[test]
    fn top_probs_equals_sorting_the_softmax() {
        // Pseudo-random logits over a vocabulary-sized row, some tied.
        let logits: Vec<f32> = (0..5000u32).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 1000) as f32 * 0.01).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let t = top_probs(&logits, 8);
        assert_eq!(t.len(), 8);
        for (&(id, p), &want) in t.iter().zip(&order) {
            assert_eq!(logits[id as usize], logits[want], "{t:?}");
            let exact = ((logits[want] - max) as f64).exp() / z;
            assert!((p as f64 - exact).abs() < 1e-6 * exact.max(1e-3), "{p} vs {exact}");
        }
    }
}
