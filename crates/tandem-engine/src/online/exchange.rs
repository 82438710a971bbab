//! Between the trainer and the engine, four small things with one job each: the slot through
//! which the trainer publishes drafter weights and the engine takes (or rolls back) them, the
//! engine's idle signal, the turns the engine lends the trainer on a saturated server, and the
//! figures both publish for /metrics.
use super::controller::KStat;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tandem_runtime::speculative::EagleWeights;

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

/// Where the trainer publishes drafter weights and the engine takes them between steps.
#[derive(Default)]
pub struct WeightSlot {
    pending: Mutex<Option<Version>>,
    /// Versions the engine rolled back (the trainer restarts from the last good one).
    rejected: Mutex<Vec<u64>>,
    history: Mutex<Vec<SwapRecord>>,
    /// The version the engine serves, the newest published, and rollbacks so far.
    pub serving_version: AtomicU64,
    pub published: AtomicU64,
    pub rollbacks: AtomicU64,
}

impl WeightSlot {
    /// Offers `version` to the engine; a version not yet taken is replaced by the newer one.
    pub fn publish(&self, version: Version) {
        self.published.store(version.number, Ordering::Relaxed);
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
    }

    /// The engine's side: a new version if one is waiting and the lock is free.
    pub(crate) fn take(&self) -> Option<Version> {
        self.pending.try_lock().ok()?.take()
    }

    /// The engine's side: `version` now serves (a swap, recorded with the acceptance before it).
    pub(crate) fn record_swap(&self, record: SwapRecord) {
        self.serving_version.store(record.version, Ordering::Relaxed);
        self.history.lock().unwrap_or_else(|e| e.into_inner()).push(record);
    }

    /// The engine's side: the newest swap's acceptance after it, and whether it was rolled back.
    pub(crate) fn judge_last(&self, accept_after: f64, rolled_back: bool) {
        if let Some(rec) = self.history.lock().unwrap_or_else(|e| e.into_inner()).last_mut() {
            rec.accept_after = Some(accept_after);
            rec.rolled_back = rolled_back;
        }
    }

    /// The engine's side: `bad` was rolled back to `back`.
    pub(crate) fn reject(&self, bad: u64, back: u64) {
        self.rollbacks.fetch_add(1, Ordering::Relaxed);
        self.rejected.lock().unwrap_or_else(|e| e.into_inner()).push(bad);
        self.serving_version.store(back, Ordering::Relaxed);
    }

    /// Versions rolled back since the last call.
    pub fn take_rejected(&self) -> Vec<u64> {
        std::mem::take(&mut *self.rejected.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn history(&self) -> Vec<SwapRecord> {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// When the engine last ran out of work, and how long it has served in all: the trainer takes
/// every core only in real idle time, and computes beside serving only when serving leaves no
/// idle time to train in (a saturated server).
#[derive(Default)]
pub struct IdleSignal {
    /// Nanoseconds after `epoch()` when the engine ran out of work, 0 while it has work.
    since: AtomicU64,
    /// Nanoseconds after `epoch()` when the engine last found work (valid while `since` is 0).
    busy_from: AtomicU64,
    /// Nanoseconds the engine had work, up to its last idle moment.
    busy_total: AtomicU64,
    /// The engine stands for a saturated server whatever its own idle time says (a benchmark
    /// whose engines take turns: one engine's idle time is another's serving).
    assume_saturated: AtomicBool,
    /// The engine's idle time is not its trainer's for now (a benchmark whose engines take turns
    /// with think time: between its own client's pauses, its idle time is the others' serving).
    held: AtomicBool,
}

impl IdleSignal {
    /// The engine's side: it ran out of work (`true`) or has work again.
    pub fn set(&self, idle: bool) {
        let now = now_nanos();
        let from = self.busy_from.load(Ordering::Relaxed);
        let was_idle = self.since.load(Ordering::Relaxed) > 0;
        if idle && !was_idle {
            // from == 0: it never had work yet.
            if from > 0 {
                self.busy_total.fetch_add(now.saturating_sub(from), Ordering::Relaxed);
            }
            self.since.store(now, Ordering::Relaxed);
        } else if !idle && (was_idle || from == 0) {
            self.busy_from.store(now, Ordering::Relaxed);
            self.since.store(0, Ordering::Relaxed);
        }
    }

    /// How long the engine has had nothing to do (None while it serves).
    pub fn idle_for(&self) -> Option<f64> {
        let since = self.since.load(Ordering::Relaxed);
        (since > 0).then(|| now_nanos().saturating_sub(since) as f64 * 1e-9)
    }

    /// Whether the trainer may take every core: the engine has been idle for at least
    /// [`IDLE_GRACE`]. The gap between back-to-back requests lasts a few milliseconds, and a step
    /// started in it runs on into the next request and slows its steps; a client's think time or
    /// a quiet server lasts longer.
    pub fn is_idle(&self) -> bool {
        !self.assumes_saturated()
            && !self.held.load(Ordering::Relaxed)
            && self.idle_for().is_some_and(|s| s >= IDLE_GRACE)
    }

    /// While `held`, the engine's idle time is not its trainer's (see the field).
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    /// From now on the engine counts as saturated: its idle time is never the trainer's.
    pub fn assume_saturated(&self) {
        self.assume_saturated.store(true, Ordering::Relaxed);
    }

    pub fn assumes_saturated(&self) -> bool {
        self.assume_saturated.load(Ordering::Relaxed)
    }

    /// Seconds the engine has had work since it started (a clock the trainer reads twice to
    /// know how busy serving was in between).
    pub fn busy_secs(&self) -> f64 {
        let mut total = self.busy_total.load(Ordering::Relaxed);
        let from = self.busy_from.load(Ordering::Relaxed);
        if self.since.load(Ordering::Relaxed) == 0 && from > 0 {
            total += now_nanos().saturating_sub(from);
        }
        total as f64 * 1e-9
    }
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64 + 1
}

/// The shortest idle time the trainer treats as room to take every core.
pub const IDLE_GRACE: f64 = 0.02;

/// The process's reference instant for the engine's idle timestamps.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// Turns the engine lends the trainer on a saturated server. Beside the engine on a 2-vCPU
/// machine a trainer slows every step by a quarter or more (the engine's threads wait for each
/// other at every product), and at the lowest OS priority it gets almost nothing (2 steps in 500
/// busy requests). So the engine pauses between steps and the trainer takes every core for one
/// part of a step, as often as its share of serving time allows: serving loses that share and no
/// more, and the trainer learns at a rate it can count on.
#[derive(Default)]
pub struct TrainerTurns {
    state: Mutex<TurnState>,
    changed: Condvar,
    /// Turns lent and seconds they lasted, for /metrics.
    pub lent: AtomicU64,
    pub lent_secs: AtomicF64,
}

#[derive(Default)]
struct TurnState {
    /// The trainer waits for a turn; the share of serving time it may take.
    wanted: Option<f64>,
    /// A turn is on: the engine waits for it to end.
    on: bool,
    /// No turn before serving has been busy this long in all (the last turn paid for by
    /// serving time at the trainer's share; serving time, not wall time, so an engine that waits
    /// for work does not bank turns).
    next: Option<f64>,
}

/// The longest the engine waits for a turn to end: a trainer that hangs must not stop serving
/// (a turn is one part of a step, ~20-60 ms).
const TURN_LIMIT: Duration = Duration::from_secs(2);

impl TrainerTurns {
    fn state(&self) -> std::sync::MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's side, between steps, with the seconds it has been busy so far (its clock of
    /// serving time, turns included): if the trainer waits for a turn and its share allows one,
    /// lends it every core and waits until it ends. Returns how long it waited.
    pub fn lend(&self, busy_secs: f64) -> Option<Duration> {
        // Never wait for the lock: the trainer's threads run at the lowest priority, and one
        // preempted while holding it would hold up serving (it asks again within 10 ms).
        let mut s = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let share = s.wanted?;
        if s.next.is_some_and(|n| busy_secs < n) {
            return None;
        }
        let start = Instant::now();
        (s.wanted, s.on) = (None, true);
        self.changed.notify_all();
        let (mut s, wait) = self.changed.wait_timeout_while(s, TURN_LIMIT, |s| s.on).unwrap_or_else(|e| e.into_inner());
        if wait.timed_out() {
            s.on = false;
            tracing::warn!("the drafter trainer's turn ran past {TURN_LIMIT:?}; serving goes on beside it");
        }
        let took = start.elapsed();
        tracing::debug!(ms = took.as_secs_f64() * 1e3, "trainer turn");
        let share = share.clamp(0.001, 0.9);
        s.next = Some(busy_secs + took.as_secs_f64() / share);
        self.lent.fetch_add(1, Ordering::Relaxed);
        self.lent_secs.set(self.lent_secs.get() + took.as_secs_f64());
        Some(took)
    }

    /// The trainer's side: asks for a turn at `share` of serving time and waits for it up to `wait`.
    /// The turn lasts until the returned guard is dropped; None if none came (the request is
    /// withdrawn, so the engine never waits for a trainer that is not there).
    pub fn take(&self, share: f64, wait: Duration) -> Option<Turn<'_>> {
        let mut s = self.state();
        s.wanted = Some(share);
        let (mut s, _) = self.changed.wait_timeout_while(s, wait, |s| !s.on).unwrap_or_else(|e| e.into_inner());
        if s.on {
            return Some(Turn(self));
        }
        s.wanted = None;
        None
    }
}

/// A turn lent to the trainer; dropping it gives the cores back to the engine.
pub struct Turn<'a>(&'a TrainerTurns);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.state().on = false;
        self.0.changed.notify_all();
    }
}

/// An f64 read and written atomically (a figure one thread publishes and others read).
#[derive(Default)]
pub struct AtomicF64(AtomicU64);

impl AtomicF64 {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed)
    }
}

/// Figures of online training for /metrics and benchmarks: the engine's draft-length choice and
/// the trainer's progress.
#[derive(Default)]
pub struct OnlineMetrics {
    pub chosen_k: AtomicU64,
    /// Measured decode figures per draft length.
    pub k_table: Mutex<Vec<KStat>>,
    /// The draft tree's sibling budget chosen by measured throughput, and its figures (`KStat::k`
    /// is the budget there).
    pub chosen_alternatives: AtomicU64,
    pub alternatives_table: Mutex<Vec<KStat>>,
    /// Measured decode tokens/s at the chosen draft length over that without drafts (0 until
    /// measured): what speculation currently earns.
    pub gain: AtomicF64,
    /// The trainer's last loss, optimizer steps and positions trained on.
    pub train_loss: AtomicF64,
    pub train_steps: AtomicU64,
    pub train_positions: AtomicU64,
    /// The share of serving time the trainer currently takes in turns (0: idle time only).
    pub train_share: AtomicF64,
    /// The drafter's first-token agreement with the target on traffic it had not yet trained on,
    /// smoothed.
    pub fresh_agreement: AtomicF64,
    /// Drafts the learned drafter served, and those whose first token the target accepted: its
    /// agreement on live traffic, measured for free (the trainer reads it to judge its progress).
    pub served_drafts: AtomicU64,
    pub served_first_accepted: AtomicU64,
}

impl OnlineMetrics {
    /// Speculation's measured speed-up (1.0 until measured, or when it does not pay).
    pub fn speedup(&self) -> f64 {
        self.gain.get().max(1.0)
    }
}

/// What the trainer and the engine share.
#[derive(Default)]
pub struct DrafterExchange {
    pub weights: WeightSlot,
    pub idle: IdleSignal,
    pub turns: TrainerTurns,
    pub metrics: OnlineMetrics,
    /// The weights the engine started serving: every later version must have their shapes.
    reference: std::sync::OnceLock<Arc<EagleWeights>>,
}

impl DrafterExchange {
    /// The engine's side of `TrainerTurns::lend`, on its own busy clock.
    pub(crate) fn lend_turn(&self) -> Option<Duration> {
        self.turns.lend(self.idle.busy_secs())
    }

    /// Records the weights serving started with (the engine does, once).
    pub(crate) fn set_reference(&self, weights: Arc<EagleWeights>) {
        let _ = self.reference.set(weights);
    }

    /// The one check of weights from outside the process (a file, a broker) before they are
    /// offered: every tensor and the draft vocabulary shaped as the served drafter's.
    pub fn check_fits(&self, w: &EagleWeights) -> Result<(), String> {
        let Some(reference) = self.reference.get() else { return Ok(()) };
        for ((name, t), (_, r)) in w.tensors.named().zip(reference.tensors.named()) {
            if t.dims() != r.dims() {
                return Err(format!(
                    "drafter tensor {name} has shape {:?}; the served drafter's is {:?}",
                    t.dims(),
                    r.dims()
                ));
            }
        }
        if w.d2t.len() != reference.d2t.len() {
            return Err(format!(
                "the drafter drafts {} tokens; the served drafter {}",
                w.d2t.len(),
                reference.d2t.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_after_the_grace() {
        let x = IdleSignal::default();
        assert_eq!(x.idle_for(), None);
        assert!(!x.is_idle(), "never idle yet");
        x.set(true);
        assert!(!x.is_idle(), "a gap between back-to-back requests is not idle time");
        std::thread::sleep(std::time::Duration::from_secs_f64(IDLE_GRACE + 0.005));
        assert!(x.idle_for().is_some_and(|s| s >= IDLE_GRACE));
        assert!(x.is_idle());
        x.hold(true);
        assert!(!x.is_idle(), "idle time held for other engines is not the trainer's");
        x.hold(false);
        assert!(x.is_idle());
        x.set(false);
        assert_eq!(x.idle_for(), None);
        assert!(!x.is_idle());
    }

    #[test]
    fn the_engine_lends_turns_at_the_trainers_share_of_serving_time() {
        let turns = TrainerTurns::default();
        let start = Instant::now();
        // The engine's busy clock: serving all the time here.
        let busy = || start.elapsed().as_secs_f64();
        assert!(turns.lend(busy()).is_none(), "no trainer waits: the engine goes straight on");
        assert!(turns.take(0.5, Duration::from_millis(5)).is_none(), "no engine lends one");
        assert!(turns.lend(busy()).is_none(), "a request that timed out is withdrawn");
        let hold = Duration::from_millis(30);
        std::thread::scope(|s| {
            let trainer = s.spawn(|| {
                let turn = turns.take(0.5, Duration::from_secs(5)).expect("a turn");
                std::thread::sleep(hold);
                drop(turn);
            });
            let took = loop {
                if let Some(took) = turns.lend(busy()) {
                    break took;
                }
                std::thread::yield_now();
            };
            assert!(took >= hold, "the engine waited for the turn to end: {took:?}");
            trainer.join().unwrap();
        });
        // At half the serving time, the next turn comes after as much serving as the last turn took.
        std::thread::scope(|s| {
            let trainer = s.spawn(|| turns.take(0.5, Duration::from_secs(5)).is_some());
            let asked = Instant::now();
            // An engine that waits for work does not bank turns: its busy clock stands still.
            let idle_clock = busy();
            std::thread::sleep(Duration::from_millis(40));
            assert!(turns.lend(idle_clock).is_none(), "lent for time not served");
            while turns.lend(busy()).is_none() {
                std::thread::yield_now();
            }
            assert!(asked.elapsed() >= Duration::from_millis(20), "lent too soon: {:?}", asked.elapsed());
            assert!(trainer.join().unwrap());
        });
        assert_eq!(turns.lent.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn busy_time_counts_only_time_with_work() {
        let x = IdleSignal::default();
        let nap = |s: f64| std::thread::sleep(std::time::Duration::from_secs_f64(s));
        x.set(true);
        nap(0.03);
        assert_eq!(x.busy_secs(), 0.0, "idle from the start");
        x.set(false);
        nap(0.05);
        x.set(true);
        let busy = x.busy_secs();
        assert!((0.05..0.2).contains(&busy), "{busy}");
        nap(0.05);
        assert_eq!(x.busy_secs(), busy, "idle time is not busy time");
        x.set(false);
        nap(0.02);
        assert!(x.busy_secs() >= busy + 0.02, "a busy period in progress counts");
    }
}
