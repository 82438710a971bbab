//! The trainer thread beside serving: drains traces, trains, publishes numbered drafter versions,
//! follows the engine's rollbacks, writes checkpoints, and keeps to its share of the CPU.
use crate::pool::{Batch, TracePool};
use crate::replay::{self, Replay};
use crate::traces_io::TraceSpill;
use crate::trainer::{StepStats, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_engine::online::{DrafterExchange, TraceBuffer, Turn, Version};
use tandem_models::Result;
use tandem_runtime::speculative::eagle::ServeAs;
use tandem_runtime::speculative::EagleWeights;

#[derive(Debug, Clone)]
pub struct OnlineTrainerConfig {
    /// Optimizer steps between published versions.
    pub publish_every: u64,
    /// Positions pooled before the first step.
    pub min_positions: usize,
    /// Most positions kept in the pool (the oldest traces go first). Each holds 3 x hidden f32
    /// features: 50,000 positions are ~350 MB for SmolLM2.
    pub pool_positions: usize,
    /// Share of serving time the engine lends the trainer on a saturated server (busy for at least
    /// `SATURATED` of the last `LOAD_WINDOW`: no idle time to train in) while the drafter is
    /// learning: at first, while its agreement with the target on traffic it has not trained on
    /// is rising, and after that agreement drops (a domain shift). Serving pauses for those turns
    /// and loses that share of its speed (`TrainerTurns`). Below saturation the trainer computes
    /// only while serving is idle: on a 2-vCPU machine anything beside the engine slows it by a
    /// quarter or more, and a server with pauses leaves the trainer all its cores in them.
    pub cpu_share: f64,
    /// The share once that agreement has stopped rising (a plateau: more training buys little).
    pub min_share: f64,
    /// Run the trainer's threads at the lowest OS priority (Linux SCHED_IDLE), so that a part
    /// of a step that runs on into a request takes only what serving leaves unused.
    pub background_priority: bool,
    /// Threads for the trainer's kernels (it computes in idle time or in turns, when every core
    /// is free).
    pub threads: usize,
    /// Drafter checkpoints: every `checkpoint_every` steps and at shutdown.
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_every: u64,
    /// Also write every trace here (replayable with `tandem train-drafter --traces`).
    pub spill_dir: Option<PathBuf>,
    /// What the drafter was trained on before it served, mixed into every step (`replay`).
    pub replay: Option<Arc<Replay>>,
    /// How the engine serves the drafter's matrices: each version is converted so here, on the
    /// trainer's low-priority thread, and the engine's swap is a pointer exchange (None: the
    /// engine converts).
    pub serve_as: Option<ServeAs>,
}

impl Default for OnlineTrainerConfig {
    fn default() -> Self {
        OnlineTrainerConfig {
            publish_every: 10,
            min_positions: 256,
            pool_positions: 50_000,
            cpu_share: 0.05,
            min_share: 0.01,
            background_priority: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            checkpoint_dir: None,
            checkpoint_every: 200,
            spill_dir: None,
            replay: None,
            serve_as: None,
        }
    }
}

/// What the trainer has done so far.
#[derive(Debug, Clone, Default)]
pub struct TrainerStatus {
    pub steps: u64,
    pub last: StepStats,
    pub version: u64,
    pub pooled_positions: usize,
    pub traces_seen: u64,
    pub compute_secs: f64,
    pub error: Option<String>,
}

pub struct TrainerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub status: Arc<Mutex<TrainerStatus>>,
}

impl TrainerHandle {
    /// Stops the trainer after its current step; it writes its final checkpoint before this returns.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn status(&self) -> TrainerStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TrainerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

pub struct OnlineTrainer;

impl OnlineTrainer {
    pub fn spawn(
        trainer: Trainer,
        traces: Arc<TraceBuffer>,
        exchange: Arc<DrafterExchange>,
        config: OnlineTrainerConfig,
    ) -> TrainerHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(TrainerStatus::default()));
        let (s, st) = (stop.clone(), status.clone());
        let thread = std::thread::Builder::new()
            .name("tandem-trainer".into())
            .spawn(move || {
                // A panic in training must not take serving down: it ends training, and says why.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(trainer, traces, exchange, config, s, st.clone())
                }));
                if r.is_err() {
                    tracing::error!("the drafter trainer panicked; serving continues with the last drafter");
                    st.lock().unwrap_or_else(|e| e.into_inner()).error = Some("trainer panicked".into());
                }
            })
            .expect("spawning the trainer thread");
        TrainerHandle { stop, thread: Some(thread), status }
    }
}

fn run(
    mut trainer: Trainer,
    traces: Arc<TraceBuffer>,
    exchange: Arc<DrafterExchange>,
    config: OnlineTrainerConfig,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<TrainerStatus>>,
) {
    let low = config.background_priority;
    if low {
        lower_priority();
    }
    let threads = rayon_pool(config.threads, low);
    let mut pool = TracePool::new(config.pool_positions);
    let mut rng = StdRng::seed_from_u64(trainer.train.seed ^ 0x7EA1);
    let mut spill = config.spill_dir.as_ref().and_then(|d| match TraceSpill::new(d) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot spill traces; keeping them in memory only");
            None
        }
    });
    // Recent published versions, to continue from the one the engine rolled back to.
    let mut versions: BTreeMap<u64, Arc<EagleWeights>> = BTreeMap::new();
    if let Ok(w) = trainer.weights() {
        versions.insert(0, Arc::new(w));
    }
    let mut next_version = 1u64;
    let mut progress = Progress::default();
    let mut live = LiveAgreement::default();
    let mut load = Load::new(LOAD_WINDOW);
    while !stop.load(Ordering::SeqCst) {
        live.read(&exchange, &mut progress);
        let share = if progress.learning() { config.cpu_share } else { config.min_share }.clamp(0.01, 1.0);
        for t in traces.drain() {
            if let Some(s) = spill.as_mut() {
                if let Err(e) = s.write(&t) {
                    tracing::warn!(error = %e, "trace spill failed");
                }
            }
            pool.add(t);
        }
        if !exchange.weights.take_rejected().is_empty() {
            let back = exchange.weights.serving_version.load(Ordering::Relaxed);
            if let Some(w) = versions.get(&back) {
                tracing::info!(version = back, "trainer continues from the version serving fell back to");
                if let Err(e) = trainer.reset_to(w) {
                    tracing::warn!(error = %e, "trainer reset failed");
                }
            }
        }
        if pool.positions() < config.min_positions {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let tc = trainer.train.clone();
        let vd = trainer.config.draft_vocab_size;
        let batches: Vec<Batch> = (0..STEP_PARTS)
            .filter_map(|_| {
                let rows = tc.batch_positions / STEP_PARTS;
                replay::sample(&pool, config.replay.as_deref(), &mut rng, rows, tc.window, vd, &|id| {
                    trainer.draft_id(id)
                })
            })
            .collect();
        if batches.len() < STEP_PARTS {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // Each part of the step in its own room: idle time, or a turn the engine lends.
        let Some(first) = room(share, &mut load, &exchange, &stop) else { break };
        let mut current = Some(first);
        let start = Instant::now();
        let depth = exchange.metrics.chosen_k.load(Ordering::Relaxed) as usize + 1;
        let mut waited = Duration::ZERO;
        let mut between = || {
            current = None;
            let t = Instant::now();
            current = room(share, &mut load, &exchange, &stop);
            waited += t.elapsed();
        };
        let result = on(&threads, || trainer.step_in_parts(&batches, depth, &mut between));
        let secs = (start.elapsed() - waited).as_secs_f64();
        drop(current);
        // Copying a version and making its served form is a part like the step's, in its own idle
        // time or turn: run beside a request in flight it slowed every step of it (Zen 5, think
        // time: 1.22x against 1.35x unpublished).
        let publish = result.is_ok() && trainer.steps.is_multiple_of(config.publish_every.max(1));
        let fresh = publish.then(|| {
            let _room = room(share, &mut load, &exchange, &stop);
            trainer.weights().and_then(|w| prepared(w, config.serve_as, versions.values().next_back()))
        });
        let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
        st.compute_secs += secs;
        st.pooled_positions = pool.positions();
        st.traces_seen = pool.seen;
        match result {
            Ok(s) => {
                st.steps = trainer.steps;
                st.last = s;
                exchange.metrics.train_loss.set(s.loss);
                exchange.metrics.train_steps.store(trainer.steps, Ordering::Relaxed);
                exchange.metrics.train_positions.fetch_add(s.positions as u64, Ordering::Relaxed);
                if let Some(fresh) = fresh {
                    match fresh {
                        Ok(w) => {
                            let w = Arc::new(w);
                            exchange.weights.publish(Version { number: next_version, weights: w.clone() });
                            versions.insert(next_version, w);
                            while versions.len() > 8 {
                                versions.pop_first();
                            }
                            st.version = next_version;
                            tracing::debug!(version = next_version, loss = s.loss, top1 = s.top1, "drafter published");
                            next_version += 1;
                        }
                        Err(e) => tracing::warn!(error = %e, "could not copy the drafter's weights"),
                    }
                }
                if trainer.steps.is_multiple_of(config.checkpoint_every.max(1)) {
                    checkpoint(&trainer, &config);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "training step failed");
                st.error = Some(e.to_string());
            }
        }
    }
    checkpoint(&trainer, &config);
}

/// `w` with the form the engine serves made (see `OnlineTrainerConfig::serve_as`), sharing the
/// forms of tensors unchanged since `previous` (a frozen head).
fn prepared(w: EagleWeights, serve_as: Option<ServeAs>, previous: Option<&Arc<EagleWeights>>) -> Result<EagleWeights> {
    if let Some(serve_as) = serve_as {
        w.prepare(serve_as, previous.map(|p| &**p))?;
    }
    Ok(w)
}

/// The drafter's first-token agreement on the drafts it serves, read off the engine's counters
/// once at least `LIVE_GROUP` more were served: traffic it has never trained on, measured at no
/// cost (an evaluation forward per trace would take a saturated server's turns).
#[derive(Default)]
struct LiveAgreement {
    drafts: u64,
    accepted: u64,
}

/// Drafts per agreement figure: about a trace's worth of positions, so one figure varies by ~0.1.
const LIVE_GROUP: u64 = 64;

impl LiveAgreement {
    fn read(&mut self, exchange: &DrafterExchange, progress: &mut Progress) {
        let m = &exchange.metrics;
        let (drafts, accepted) =
            (m.served_drafts.load(Ordering::Relaxed), m.served_first_accepted.load(Ordering::Relaxed));
        if drafts >= self.drafts + LIVE_GROUP {
            progress.record((accepted - self.accepted) as f64 / (drafts - self.drafts) as f64);
            m.fresh_agreement.set(progress.fast);
            (self.drafts, self.accepted) = (drafts, accepted);
        }
    }
}

/// Where the trainer may compute now; a lent turn ends when this is dropped.
struct Room<'a> {
    _turn: Option<Turn<'a>>,
}

/// Waits until the trainer may compute: serving idle (for longer than a gap between
/// back-to-back requests: every core is free), or, on a saturated server, a turn the engine
/// lends at `share` of serving time. Below saturation it waits for idle time. None when stopping.
fn room<'a>(share: f64, load: &mut Load, exchange: &'a DrafterExchange, stop: &AtomicBool) -> Option<Room<'a>> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        if exchange.idle.is_idle() {
            return Some(Room { _turn: None });
        }
        let saturated = exchange.idle.assumes_saturated() || load.update(exchange.idle.busy_secs()) >= SATURATED;
        exchange.metrics.train_share.set(if saturated { share } else { 0.0 });
        if !saturated {
            std::thread::sleep(Duration::from_millis(10));
        } else if let Some(turn) = exchange.turns.take(share, Duration::from_millis(10)) {
            return Some(Room { _turn: Some(turn) });
        }
    }
}

/// Parts of a step, each in its own idle time or turn: a request arriving mid-step shares the
/// cores with the trainer for at most a part, and a turn pauses serving for one part (~20-40 ms
/// on two threads for SmolLM2's drafter).
const STEP_PARTS: usize = 4;

/// Serving busier than this share of `LOAD_WINDOW` leaves no idle time to train in.
pub const SATURATED: f64 = 0.9;
/// How far back the trainer judges how busy serving is.
const LOAD_WINDOW: Duration = Duration::from_secs(5);

/// The share of recent wall time serving was busy, from the engine's busy-time clock.
struct Load {
    window: Duration,
    /// (when, busy seconds then), oldest first, at least a tenth of the window apart.
    samples: std::collections::VecDeque<(Instant, f64)>,
}

impl Load {
    fn new(window: Duration) -> Self {
        Load { window, samples: Default::default() }
    }

    /// Records the busy clock now; returns the busy share since the oldest sample within the
    /// window (0 until a tenth of the window has passed).
    fn update(&mut self, busy_secs: f64) -> f64 {
        let now = Instant::now();
        if self.samples.back().is_none_or(|(t, _)| now - *t >= self.window / 10) {
            self.samples.push_back((now, busy_secs));
        }
        while self.samples.len() > 2 && now - self.samples[1].0 >= self.window {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let wall = (now - t0).as_secs_f64();
        if wall < self.window.as_secs_f64() / 10.0 {
            return 0.0;
        }
        ((busy_secs - b0) / wall).clamp(0.0, 1.0)
    }
}

/// The drafter's first-token agreement with the target on the drafts it serves (prequential:
/// always traffic it has not trained on), smoothed fast and slow. Training pays while the fast
/// average is above the slow one (still learning) or well below it (the traffic changed).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub fast: f64,
    pub slow: f64,
    pub traces: u64,
}

impl Progress {
    /// Traces before a drop can be read as a change of traffic rather than noise.
    const WARMUP: u64 = 30;
    /// Below this agreement a drafter is still cold: training it pays most, rising or not.
    const COLD: f64 = 0.35;

    pub fn record(&mut self, agreement: f64) {
        // One trace's agreement varies by ~0.1 (64 positions, varied requests): averages over ~10
        // and ~50 traces, and margins above their noise (~0.025 apart), so a plateau reads as one.
        // Until there are that many traces each is the mean of all so far (a first trace's noise
        // would otherwise hold the slow average off for a hundred traces).
        self.traces += 1;
        let n = self.traces as f64;
        self.fast += (0.1f64).max(1.0 / n) * (agreement - self.fast);
        self.slow += (0.02f64).max(1.0 / n) * (agreement - self.slow);
    }

    /// Still learning (cold, or rising, or relearning after a shift), so worth the larger share.
    /// A day-0 drafter that starts good is not assumed to be: on a saturated server every turn
    /// the trainer takes is serving's time.
    pub fn learning(&self) -> bool {
        let shifted = self.traces >= Self::WARMUP && self.fast < self.slow - 0.05;
        self.traces == 0 || self.fast < Self::COLD || self.fast > self.slow + 0.02 || shifted
    }
}

fn checkpoint(trainer: &Trainer, config: &OnlineTrainerConfig) {
    let Some(dir) = &config.checkpoint_dir else { return };
    let saved = trainer.weights().and_then(|w| w.save(&trainer.config, dir));
    let saved = saved.and_then(|()| config.replay.as_ref().map_or(Ok(()), |r| r.keep_beside(dir)));
    match saved {
        Ok(()) => tracing::info!(dir = %dir.display(), steps = trainer.steps, "drafter checkpoint written"),
        Err(e) => tracing::warn!(error = %e, "drafter checkpoint failed"),
    }
}

/// Runs `f` on `pool`'s threads (the calling thread when there is none).
fn on<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

fn rayon_pool(threads: usize, low_priority: bool) -> Option<rayon::ThreadPool> {
    if threads == 0 {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("tandem-train-{i}"))
        .start_handler(move |_| {
            if low_priority {
                lower_priority();
            }
        })
        .build()
        .ok()
}

/// Moves the calling thread to SCHED_IDLE: the kernel runs it only when no normal thread wants
/// the core, so training fills the gaps serving leaves (between requests, the engine thread's
/// single-threaded work) instead of competing with it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter struct.
        let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if r != 0 {
            tracing::debug!("could not lower the trainer's priority; it keeps to its CPU share only");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_load_is_the_busy_share_of_recent_time() {
        let mut load = Load::new(Duration::from_millis(200));
        let tick = Duration::from_millis(20);
        let mut busy = 0.0;
        assert_eq!(load.update(busy), 0.0, "no time has passed");
        let nap = |d: Duration| {
            let t = Instant::now();
            std::thread::sleep(d);
            t.elapsed().as_secs_f64()
        };
        // Busy all the time, then busy a third of the time: the share follows within a window.
        for _ in 0..12 {
            busy += nap(tick / 4);
            load.update(busy);
        }
        assert!(load.update(busy) > 0.95, "{}", load.update(busy));
        for i in 0..3 * 24 {
            let slept = nap(tick / 2);
            busy += if i % 3 == 0 { slept } else { 0.0 };
            load.update(busy);
        }
        let share = load.update(busy);
        assert!((0.2..0.5).contains(&share), "{share}");
    }

    #[test]
    fn the_trainer_backs_off_at_a_plateau_and_returns_after_a_shift() {
        let mut p = Progress::default();
        // A cold drafter learning: agreement rising from 0 to 0.4 over 60 traces.
        for i in 0..60 {
            p.record(0.4 * i as f64 / 60.0);
            assert!(p.learning(), "trace {i}: {p:?}");
        }
        // A plateau: the slow average catches up and training backs off.
        for _ in 0..150 {
            p.record(0.4);
        }
        assert!(!p.learning(), "{p:?}");
        // Traffic changes: agreement falls, training resumes within a few traces.
        for _ in 0..4 {
            p.record(0.1);
        }
        assert!(p.learning(), "{p:?}");
    }

    #[test]
    fn a_drafter_that_starts_good_is_not_assumed_to_be_learning() {
        let mut p = Progress::default();
        let mut learning = 0;
        // A day-0 drafter: 0.65 from the first trace, each trace's figure off by up to 0.1.
        for i in 0..100 {
            p.record(0.65 + 0.1 * ((i * 7 % 11) as f64 / 5.0 - 1.0));
            learning += p.learning() as usize;
        }
        assert!(learning < 30, "{learning} of 100 traces read as learning: {p:?}");
    }
}
