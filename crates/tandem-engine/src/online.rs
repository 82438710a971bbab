//! The serving side of online speculator training: traces of what happened at each verification
//! step, the exchange through which a trainer publishes new drafter weights (and through which a
//! worse drafter is rolled back), and the draft-length controller that picks k, including k = 0,
//! from measured end-to-end tokens per second.
//!
//! Nothing here makes serving wait: the trace buffer is pushed with `try_lock` (a busy or full
//! buffer drops, and counts the drop), and new weights are taken between engine steps only when
//! the exchange is free.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tandem_runtime::sampling::top_n;
use tandem_runtime::speculative::EagleWeights;

/// The target's view of one finished sequence: everything the drafter's trainer needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Prompt and output (the last token may have no features: it was never fed).
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
        if pos >= self.soft.len() {
            self.soft.resize(pos + 1, Vec::new());
        }
        self.soft[pos] = top_probs(logits, top);
    }
}

/// The `n` most likely tokens of softmax(logits) with their probabilities, most likely first.
/// Runs on the engine thread for every verified position: the partition function takes the
/// vectorised exp.
pub fn top_probs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut e = logits.to_vec();
    let inv = tandem_models::ops::kernels::exp_shifted(&mut e);
    top_n(logits, n.max(1)).into_iter().map(|(i, _)| (i, e[i as usize] * inv)).collect()
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

/// A numbered set of drafter weights.
#[derive(Clone)]
pub struct Version {
    pub number: u64,
    pub weights: Arc<EagleWeights>,
}

/// What happened to a published version, as seen by the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SwapRecord {
    pub version: u64,
    /// First-draft-token acceptance of the previous version before the swap, and of this one
    /// after (None until measured).
    pub accept_before: Option<f64>,
    pub accept_after: Option<f64>,
    pub rolled_back: bool,
}

/// Where a trainer publishes weights and the engine takes them; shared figures for /metrics.
#[derive(Default)]
pub struct DrafterExchange {
    pending: Mutex<Option<Version>>,
    /// Versions the engine rolled back (the trainer restarts from the last good one).
    rejected: Mutex<Vec<u64>>,
    history: Mutex<Vec<SwapRecord>>,
    pub serving_version: AtomicU64,
    pub published: AtomicU64,
    pub rollbacks: AtomicU64,
    pub chosen_k: AtomicU64,
    /// Measured decode figures per draft length.
    pub k_table: Mutex<Vec<KStat>>,
    /// Trainer figures (f64 bits): last loss, optimizer steps, traces trained on.
    pub train_loss_bits: AtomicU64,
    pub train_steps: AtomicU64,
    pub train_positions: AtomicU64,
    /// When the engine last ran out of work (nanoseconds after `epoch()`, 0 while it has work).
    idle_since: AtomicU64,
    /// Measured decode tokens/s at the chosen draft length over that without drafts (f64 bits;
    /// 0 until measured): what speculation currently earns.
    pub gain_bits: AtomicU64,
    /// The CPU share the trainer currently allows itself (f64 bits).
    pub train_share_bits: AtomicU64,
    /// The drafter's first-token agreement with the target on traces it had not yet trained on,
    /// smoothed (f64 bits).
    pub fresh_agreement_bits: AtomicU64,
}

impl DrafterExchange {
    /// Offers `version` to the engine; a version not yet taken is replaced by the newer one.
    pub fn publish(&self, version: Version) {
        self.published.store(version.number, Ordering::Relaxed);
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
    }

    /// The engine's side: a new version if one is waiting and the lock is free.
    fn take(&self) -> Option<Version> {
        self.pending.try_lock().ok()?.take()
    }

    /// Versions rolled back since the last call.
    pub fn take_rejected(&self) -> Vec<u64> {
        std::mem::take(&mut *self.rejected.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn history(&self) -> Vec<SwapRecord> {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_loss(&self, loss: f64) {
        self.train_loss_bits.store(loss.to_bits(), Ordering::Relaxed);
    }

    pub fn loss(&self) -> f64 {
        f64::from_bits(self.train_loss_bits.load(Ordering::Relaxed))
    }

    /// Speculation's measured speed-up (1.0 until measured, or when it does not pay).
    pub fn gain(&self) -> f64 {
        f64::from_bits(self.gain_bits.load(Ordering::Relaxed)).max(1.0)
    }

    pub fn fresh_agreement(&self) -> f64 {
        f64::from_bits(self.fresh_agreement_bits.load(Ordering::Relaxed))
    }

    pub fn train_share(&self) -> f64 {
        f64::from_bits(self.train_share_bits.load(Ordering::Relaxed))
    }

    /// The engine's side: it ran out of work (`true`) or has work again.
    pub fn set_idle(&self, idle: bool) {
        let now = if idle { epoch().elapsed().as_nanos() as u64 + 1 } else { 0 };
        self.idle_since.store(now, Ordering::Relaxed);
    }

    /// How long the engine has had nothing to do (None while it serves).
    pub fn idle_for(&self) -> Option<f64> {
        let since = self.idle_since.load(Ordering::Relaxed);
        (since > 0).then(|| (epoch().elapsed().as_nanos() as u64 + 1).saturating_sub(since) as f64 * 1e-9)
    }

    /// Whether the trainer may take every core: the engine has been idle for at least
    /// [`IDLE_GRACE`]. The gap between back-to-back requests lasts a few milliseconds, and a step
    /// started in it runs on into the next request and slows its steps; a client's think time or
    /// a quiet server lasts longer.
    pub fn is_idle(&self) -> bool {
        self.idle_for().is_some_and(|s| s >= IDLE_GRACE)
    }
}

/// The shortest idle time the trainer treats as room to take every core.
pub const IDLE_GRACE: f64 = 0.02;

/// The process's reference instant for the engine's idle timestamps.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

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
    /// Share of decode steps that try a draft length other than the best one.
    pub explore: f64,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig { trace_top: 8, rollback_ratio: 0.75, rollback_window: 200, k_by_throughput: true, explore: 0.08 }
    }
}

/// Everything the engine needs for online training.
#[derive(Clone)]
pub struct OnlineHooks {
    pub traces: Arc<TraceBuffer>,
    pub exchange: Arc<DrafterExchange>,
    pub config: OnlineConfig,
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

/// Engine-side state: versions, rollback judgement, and the draft length controller.
pub(crate) struct OnlineState {
    pub hooks: OnlineHooks,
    /// The version before the current one, to roll back to.
    previous: Option<Version>,
    current: Option<Version>,
    /// Recent drafts of the current version (a ring of outcomes), and of the previous one.
    recent: VecDeque<bool>,
    before: Option<Window>,
    after: Window,
    pub k: KController,
}

impl OnlineState {
    pub fn new(hooks: OnlineHooks, max_k: usize, initial: Option<Version>) -> Self {
        let k = KController::new(max_k, hooks.config.explore);
        OnlineState {
            hooks,
            previous: None,
            current: initial,
            recent: VecDeque::new(),
            before: None,
            after: Window::default(),
            k,
        }
    }

    /// A version waiting to be served, remembering the current one for rollback.
    pub fn take_new(&mut self) -> Option<Version> {
        let v = self.hooks.exchange.take()?;
        let window = self.window();
        self.before = (window.drafts >= self.hooks.config.rollback_window / 2).then_some(window);
        self.previous = self.current.replace(v.clone());
        self.recent.clear();
        self.after = Window::default();
        let ex = &self.hooks.exchange;
        ex.serving_version.store(v.number, Ordering::Relaxed);
        let mut h = ex.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push(SwapRecord {
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
        let window = self.hooks.config.rollback_window;
        if self.after.drafts != window {
            return None;
        }
        // Judged once per version, after a full window of its own drafts.
        let after = self.after.rate();
        let ex = &self.hooks.exchange;
        let mut h = ex.history.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.before.map(|w| w.rate());
        let worse = before.is_some_and(|b| after < b * self.hooks.config.rollback_ratio - 0.02);
        if let Some(rec) = h.last_mut() {
            rec.accept_after = Some(after);
            rec.rolled_back = worse && self.previous.is_some();
        }
        drop(h);
        if !worse {
            tracing::info!(version = self.current.as_ref().map(|v| v.number), accept = after, "drafter kept");
            return None;
        }
        let back = self.previous.take()?;
        let bad = self.current.replace(back.clone()).map(|v| v.number).unwrap_or(0);
        tracing::warn!(version = bad, accept_before = ?before, accept_after = after, back_to = back.number, "drafter rolled back");
        ex.rollbacks.fetch_add(1, Ordering::Relaxed);
        ex.rejected.lock().unwrap_or_else(|e| e.into_inner()).push(bad);
        ex.serving_version.store(back.number, Ordering::Relaxed);
        self.recent.clear();
        self.before = None;
        Some(back)
    }
}

/// What the engine measured at one draft length (exponentially weighted, like the choice).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct KStat {
    pub k: usize,
    pub tokens_per_sec: f64,
    /// Tokens emitted per decode step: how much of a draft the target accepts.
    pub tokens_per_step: f64,
    /// Seconds per decode step (drafting, the forward over k + 1 rows, bookkeeping): what a draft
    /// costs. Against k = 0's, the two figures say whether acceptance or cost limits the gain.
    pub step_secs: f64,
    pub steps: u64,
}

/// Picks the draft length by measured end-to-end decode throughput: an exponentially weighted
/// tokens/s per k (0 = no speculation), mostly the best, sometimes a neighbour (so a drafter that
/// improves is noticed, and one that worsens is left).
pub(crate) struct KController {
    max_k: usize,
    explore: f64,
    /// Per k: weighted tokens/s, samples.
    rate: Vec<(f64, u64)>,
    /// Per k: weighted tokens per step and seconds per step (reported, not used to choose).
    shape: Vec<(f64, f64)>,
    best: usize,
    step: u64,
    rng: u64,
}

impl KController {
    pub fn new(max_k: usize, explore: f64) -> Self {
        KController {
            max_k,
            explore,
            rate: vec![(0.0, 0); max_k + 1],
            shape: vec![(0.0, 0.0); max_k + 1],
            best: 0,
            step: 0,
            rng: 0x2545_F491_4F6C_DD1D,
        }
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*: exploration needs no quality randomness, only no pattern that aligns with steps.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The draft length for the next step.
    pub fn choose(&mut self) -> usize {
        self.step += 1;
        // Until k = 0 and k = 1 are measured, alternate them: both are cheap.
        for k in 0..=self.max_k.min(1) {
            if self.rate[k].1 < 8 {
                return k;
            }
        }
        if self.next_random() < self.explore {
            let up = self.next_random() < 0.5;
            return if up { (self.best + 1).min(self.max_k) } else { self.best.saturating_sub(1) };
        }
        self.best
    }

    /// A decode-only step ran with draft length `k`, emitting `tokens` in `secs`.
    pub fn record(&mut self, k: usize, tokens: usize, secs: f64) {
        if k > self.max_k || secs <= 0.0 {
            return;
        }
        let r = tokens as f64 / secs;
        let (avg, n) = &mut self.rate[k];
        let alpha = if *n < 16 { 1.0 / (*n + 1) as f64 } else { 0.05 };
        *avg += alpha * (r - *avg);
        *n += 1;
        let (per_step, step_secs) = &mut self.shape[k];
        *per_step += alpha * (tokens as f64 - *per_step);
        *step_secs += alpha * (secs - *step_secs);
        let best = self.best;
        let measured = |k: usize| self.rate[k].1 >= 8;
        // Move to a measured neighbour that is clearly faster: step times are noisy (batch
        // composition, a trainer sharing the CPU), and a wrong move to a longer draft costs more
        // than staying a little longer at a shorter one.
        for cand in [best.saturating_sub(1), (best + 1).min(self.max_k)] {
            let margin = if cand > best { 1.03 } else { 1.0 };
            if cand != best && measured(cand) && self.rate[cand].0 > self.rate[self.best].0 * margin {
                self.best = cand;
            }
        }
        if !measured(self.best) {
            self.best = 0;
        }
    }

    pub fn best(&self) -> usize {
        self.best
    }

    /// tokens/s at the best draft length over tokens/s without drafts (1.0 until both are measured).
    pub fn gain(&self) -> f64 {
        let (base, best) = (self.rate[0], self.rate[self.best]);
        if self.best == 0 || base.1 < 8 || best.1 < 8 || base.0 <= 0.0 {
            return 1.0;
        }
        best.0 / base.0
    }

    /// The figures of every k measured.
    pub fn table(&self) -> Vec<KStat> {
        (0..=self.max_k)
            .filter(|&k| self.rate[k].1 > 0)
            .map(|k| KStat {
                k,
                tokens_per_sec: self.rate[k].0,
                tokens_per_step: self.shape[k].0,
                step_secs: self.shape[k].1,
                steps: self.rate[k].1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn idle_only_after_the_grace() {
        let x = DrafterExchange::default();
        assert_eq!(x.idle_for(), None);
        assert!(!x.is_idle(), "never idle yet");
        x.set_idle(true);
        assert!(!x.is_idle(), "a gap between back-to-back requests is not idle time");
        std::thread::sleep(std::time::Duration::from_secs_f64(IDLE_GRACE + 0.005));
        assert!(x.idle_for().is_some_and(|s| s >= IDLE_GRACE));
        assert!(x.is_idle());
        x.set_idle(false);
        assert_eq!(x.idle_for(), None);
        assert!(!x.is_idle());
    }

    #[test]
    fn k_controller_finds_the_fastest_length() {
        let mut c = KController::new(6, 0.1);
        // Throughput peaks at k = 3.
        let speed = |k: usize| 30.0 - 2.0 * (k as f64 - 3.0).powi(2);
        for _ in 0..2000 {
            let k = c.choose();
            c.record(k, (speed(k) * 10.0) as usize, 1.0);
        }
        assert_eq!(c.best(), 3, "{:?}", c.table());
        // Its report: per k, tokens per step and seconds per step, whose ratio is the rate.
        for s in c.table() {
            assert!((s.step_secs - 1.0).abs() < 1e-9, "{s:?}");
            assert!((s.tokens_per_step - (speed(s.k) * 10.0).floor()).abs() < 1e-6, "{s:?}");
            assert!((s.tokens_per_sec - s.tokens_per_step / s.step_secs).abs() < 1e-6, "{s:?}");
        }
        // A drafter that is useless: k = 0 wins.
        let mut c = KController::new(6, 0.1);
        for _ in 0..500 {
            let k = c.choose();
            c.record(k, 10, 1.0 + 0.2 * k as f64);
        }
        assert_eq!(c.best(), 0);
    }
}
