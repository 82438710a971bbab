//! `tandem train-drafter --follow nats://...`: the fleet's trainer. It reads every server's traces
//! from the broker's stream through a durable consumer, trains the drafter on them, and publishes
//! each version to the broker's drafter store, where every server (`--drafter-source`) takes it.
//!
//! Nothing is lost to a crash: a trace is acknowledged only once a published version has trained
//! on it, so a trainer killed mid-stream leaves its traces unacknowledged and the broker delivers
//! them again (after `--ack-wait`) to the next one, which continues from the newest published
//! version and numbers its versions after it.
use anyhow::Result;
use async_nats::jetstream;
use rand::SeedableRng;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem_fleet::broker;
use tandem_fleet::drafters::DrafterStore;
use tandem_fleet::traces::TraceFeed;
use tandem_runtime::speculative::EagleConfig;
use tandem_speculator::{replay, Batch, Replay, TracePool, Trainer};

#[derive(clap::Args, Clone, Debug)]
pub struct FollowArgs {
    /// Train continuously from a fleet's traces in this NATS JetStream broker (servers started
    /// with `--trace-sink`) and publish each drafter version there (servers started with
    /// `--drafter-source` serve it). Runs until stopped.
    #[arg(long, value_name = "NATS_URL")]
    pub follow: Option<String>,
    /// Seconds the broker waits for a delivered trace's acknowledgement before delivering it
    /// again (to a restarted trainer). A version is published at least twice as often.
    #[arg(long, default_value_t = 30)]
    pub ack_wait: u64,
    /// Positions pooled before the first step.
    #[arg(long, default_value_t = 256)]
    pub min_positions: usize,
    /// Most positions kept (the oldest traces go first).
    #[arg(long, default_value_t = 50_000)]
    pub pool_positions: usize,
    /// Times each traced position is trained on, on average, before the trainer waits for new
    /// traces.
    #[arg(long, default_value_t = 8.0)]
    pub reuse: f64,
    /// Stop after publishing this many versions (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_versions: u64,
}

/// What the follow loop needs from the command line besides `FollowArgs`.
pub struct Follow<'a> {
    pub url: &'a str,
    pub model: &'a str,
    pub config: EagleConfig,
    pub trainer: Trainer,
    pub publish_every: u64,
    pub seed: u64,
    pub args: &'a FollowArgs,
    /// What the drafter trained on before, mixed into every step.
    pub replay: Option<std::sync::Arc<Replay>>,
}

pub fn run(f: Follow) -> Result<()> {
    broker::check_url("--follow", f.url).map_err(anyhow::Error::msg)?;
    // The client's connection runs on the worker thread while training blocks this one.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(follow(f))
}

/// Retries `what` every second until it succeeds, saying once why it waits.
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut said = false;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if !said => {
                eprintln!("waiting for the broker ({what}): {e}");
                said = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(mut f: Follow<'_>) -> Result<()> {
    let client = broker::connect(f.url, "tandem-trainer").await.map_err(anyhow::Error::msg)?;
    let js = jetstream::new(client.clone());
    let store = patiently("drafter store", || DrafterStore::open(&js, f.model)).await;
    // Numbered after the newest announcement, read before each publish.
    let mut version = 0;
    resume(&store, &f.config, &mut f.trainer).await;
    let ack_wait = Duration::from_secs(f.args.ack_wait.max(2));
    let feed = patiently("trace consumer", || TraceFeed::open(&js, f.model, ack_wait)).await;
    let fs = f.config.target_layers.len() * f.config.hidden_size;
    let vd = f.config.draft_vocab_size;
    let mut pool = TracePool::new(f.args.pool_positions);
    let mut rng = rand::rngs::StdRng::seed_from_u64(f.seed ^ 0xF011);
    // Delivered traces not yet acknowledged, by stream sequence (a redelivery replaces the entry).
    let mut pending: HashMap<u64, jetstream::Message> = HashMap::new();
    let (mut steps, mut since, mut last_publish) = (0u64, 0u64, Instant::now());
    let mut window = Window::default();
    let mut budget = 0.0;
    let publish_after = ack_wait / 2;
    eprintln!("following {} for {}: every {} steps or {:?} a version", f.url, f.model, f.publish_every, publish_after);
    loop {
        let ready = pool.positions() >= f.args.min_positions;
        let wait = if ready { Duration::from_millis(10) } else { Duration::from_secs(1) };
        match feed.next(64, wait).await {
            Ok(delivered) => {
                for d in delivered {
                    match d.trace {
                        Some(t) if t.feature_size == fs => {
                            if !pending.contains_key(&d.sequence) {
                                window.fresh(&f.trainer, &t, vd);
                                budget += t.positions() as f64 * f.args.reuse;
                                pool.add(t);
                            }
                            pending.insert(d.sequence, d.message);
                        }
                        other => {
                            if let Some(t) = other {
                                tracing::warn!(
                                    features = t.feature_size,
                                    expected = fs,
                                    "a trace of another drafter shape; skipped"
                                );
                            }
                            let _ = d.message.ack().await;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "no traces (broker away?)");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // Each new position buys `reuse` trainings of a position: a quiet fleet leaves the
        // trainer idle instead of overfitting what it has.
        if pool.positions() >= f.args.min_positions && budget >= f.trainer.train.batch_positions as f64 {
            let tc = f.trainer.train.clone();
            budget -= tc.batch_positions as f64;
            let replayed = f.replay.as_deref();
            let t2d = |id| f.trainer.draft_id(id);
            if let Some(batch) = replay::sample(&pool, replayed, &mut rng, tc.batch_positions, tc.window, vd, &t2d) {
                let s = f.trainer.step(&batch)?;
                window.loss += s.loss;
                (steps, since) = (steps + 1, since + 1);
            }
        }
        let due = since >= f.publish_every.max(1) || (since > 0 && last_publish.elapsed() >= publish_after);
        if !due || !broker::connected(&client) {
            continue;
        }
        let weights = f.trainer.weights()?;
        // After the newest announced version, whoever announced it (another trainer, an operator).
        if let Ok(Some(a)) = store.current().await {
            version = version.max(a.version);
        }
        match store.publish(version + 1, &f.config, &weights).await {
            Ok(a) => {
                version = a.version;
                let acked = pending.len();
                for (_, m) in pending.drain() {
                    let _ = m.ack().await;
                }
                eprintln!(
                    "version {version}: {steps} steps, loss {:.3}, fresh agreement {:.3} over {} new traces, {} positions pooled, {acked} traces acknowledged",
                    window.loss / since.max(1) as f64,
                    window.agreement(),
                    window.traces,
                    pool.positions()
                );
                window = Window::default();
                (since, last_publish) = (0, Instant::now());
                if f.args.max_versions > 0 && version >= f.args.max_versions {
                    return Ok(());
                }
            }
            Err(e) => tracing::warn!(error = %e, "publishing a drafter version failed; retrying"),
        }
    }
}

/// Continues from the newest announced version whose digest checks out and whose drafter has
/// this trainer's configuration (an operator or a broken publisher may have announced others);
/// none: from the start.
async fn resume(store: &DrafterStore, config: &EagleConfig, trainer: &mut Trainer) {
    let announced = match store.announcements().await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("no drafter history ({e}); training from the start");
            return;
        }
    };
    for a in announced {
        let loaded = match &a.config == config {
            true => store.fetch(&a).await.map_err(|e| e.to_string()),
            false => Err("another drafter configuration".into()),
        };
        match loaded.and_then(|w| trainer.reset_to(&w).map_err(|e| e.to_string())) {
            Ok(()) => {
                eprintln!("continuing from drafter version {}", a.version);
                return;
            }
            Err(e) => eprintln!("drafter version {} cannot be continued from ({e})", a.version),
        }
    }
}

/// Figures between two versions: the drafter's first-token agreement with the target on traces
/// before it trained on them (what drafting on new traffic would see), and the mean loss.
#[derive(Default)]
struct Window {
    agreement_sum: f64,
    traces: usize,
    loss: f64,
}

impl Window {
    fn fresh(&mut self, trainer: &Trainer, t: &tandem_engine::online::Trace, vd: usize) {
        if let Some(b) = Batch::outputs(t, 64, vd, &|id| trainer.draft_id(id)) {
            if let Ok(a) = trainer.first_token_agreement(&b) {
                self.agreement_sum += a;
                self.traces += 1;
            }
        }
    }

    fn agreement(&self) -> f64 {
        self.agreement_sum / self.traces.max(1) as f64
    }
}
