//! The benchmark's two trainers that read a `warm` run's recorded traces instead of live ones:
//! `offline` (a drafter trained to completion before serving) and `none+train` (a trainer beside
//! plain serving, to measure what training alone costs it).
use super::OnlineBenchArgs;
use anyhow::{ensure, Context, Result};
use rand::SeedableRng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_models::LoadedModel;
use tandem_runtime::speculative::{EagleDrafter, WarmStart};
use tandem_speculator::traces_io::load_dir;
use tandem_speculator::{TracePool, TrainConfig, Trainer};

/// A fresh drafter, the traces in `dir` as a pool (an error naming `missing` if there are none),
/// and the online trainer's configuration and trainer for it.
fn from_traces(
    loaded: &LoadedModel,
    dir: &Path,
    args: &OnlineBenchArgs,
    missing: &str,
) -> Result<(EagleDrafter, TracePool, TrainConfig, Trainer)> {
    let drafter = EagleDrafter::fresh(&loaded.model, Some(args.draft_vocab), WarmStart::Full, 0)?;
    let mut pool = TracePool::new(usize::MAX);
    load_dir(dir)?.into_iter().for_each(|t| pool.add(t));
    ensure!(!pool.is_empty(), "{missing}");
    let tc = args.online.train.train_config(WarmStart::Full);
    let trainer = args.online.train.trainer(&drafter, &loaded.model, WarmStart::Full)?;
    Ok((drafter, pool, tc, trainer))
}

/// Trains a drafter offline from the traces in `dir` with the online trainer's code.
pub(super) fn train_offline(loaded: &LoadedModel, dir: &Path, args: &OnlineBenchArgs) -> Result<EagleDrafter> {
    let missing = format!("no traces in {}", dir.display());
    let (drafter, pool, tc, mut trainer) = from_traces(loaded, dir, args, &missing)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let vd = trainer.config.draft_vocab_size;
    let bar = indicatif::ProgressBar::new(args.offline_steps);
    for _ in 0..args.offline_steps {
        let b = pool
            .sample(&mut rng, tc.batch_positions, tc.window, vd, &|id| trainer.draft_id(id))
            .context("no positions")?;
        trainer.step(&b)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let dtype = args.draft_dtype.serve_as();
    Ok(EagleDrafter::new(drafter.config.clone(), trainer.weights()?, loaded.model.device())?.with_serving(dtype)?)
}

/// Trains on recorded traces in a background thread at the configured CPU share until stopped;
/// returns the steps it made.
pub(super) fn background_trainer(
    loaded: &LoadedModel,
    dir: &Path,
    args: &OnlineBenchArgs,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<Result<u64>>)> {
    let missing = "none+train needs the traces of a `warm` run first";
    let (_, pool, tc, mut trainer) = from_traces(loaded, dir, args, missing)?;
    let share = args.online.train.train_cpu_share.clamp(0.01, 1.0);
    let threads = args.online.train.train_threads;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || -> Result<u64> {
        let pool_threads = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let vd = trainer.config.draft_vocab_size;
        while !s.load(Ordering::SeqCst) {
            let b = pool
                .sample(&mut rng, tc.batch_positions, tc.window, vd, &|id| trainer.draft_id(id))
                .context("no positions")?;
            let t0 = Instant::now();
            pool_threads.install(|| trainer.step(&b))?;
            std::thread::sleep(Duration::from_secs_f64(t0.elapsed().as_secs_f64() * (1.0 - share) / share));
        }
        Ok(trainer.steps)
    });
    Ok((stop, thread))
}
