//! `--spec-train online` and the trainer's settings, shared by `serve`, `bench online` and
//! `train-drafter`.
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tandem_engine::online::{DrafterExchange, OnlineConfig, OnlineHooks, TraceBuffer};
use tandem_models::Model;
use tandem_runtime::spec::EagleDrafter;
use tandem_speculator::{OnlineTrainer, OnlineTrainerConfig, TrainConfig, Trainer, TrainerHandle};

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    pub train_lr: f64,
    /// Positions per optimizer step.
    #[arg(long, default_value_t = 128)]
    pub train_batch: usize,
    /// Training-time-test steps: the drafter is unrolled on its own outputs this many times.
    #[arg(long, default_value_t = 2)]
    pub train_ttt: usize,
    /// Weight of the discard term on rejected proposals (0 turns it off).
    #[arg(long, default_value_t = 0.1)]
    pub train_discard: f64,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = 2.5)]
    pub train_clip: f64,
    /// Share of wall time the trainer may compute; it sleeps the rest so serving keeps the CPU.
    #[arg(long, default_value_t = 0.5)]
    pub train_cpu_share: f64,
    /// Threads for the trainer's kernels.
    #[arg(long, default_value_t = 1)]
    pub train_threads: usize,
}

impl TrainArgs {
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            lr: self.train_lr,
            batch_positions: self.train_batch.max(8),
            ttt_steps: self.train_ttt.max(1),
            discard_weight: self.train_discard,
            grad_clip: self.train_clip,
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct OnlineArgs {
    /// `online`: train the EAGLE drafter on the traffic being served, in this process, and swap
    /// each new version in without pausing (rolled back if it lowers acceptance). Needs `--spec eagle`.
    #[arg(long, default_value = "off")]
    pub spec_train: String,
    /// Where the online drafter is checkpointed (periodically and at shutdown); also where
    /// `--drafter` would continue from next time.
    #[arg(long, default_value = "tandem-drafter")]
    pub drafter_save: PathBuf,
    /// Also write every trace to this folder (replay with `tandem train-drafter --traces DIR`).
    #[arg(long)]
    pub trace_dir: Option<PathBuf>,
    /// Memory for traces waiting for the trainer; when full the oldest are dropped (and counted).
    #[arg(long, default_value_t = 256)]
    pub trace_buffer_mib: usize,
    /// Optimizer steps between published drafter versions.
    #[arg(long, default_value_t = 10)]
    pub publish_every: u64,
    #[command(flatten)]
    pub train: TrainArgs,
}

impl OnlineArgs {
    pub fn enabled(&self) -> Result<bool> {
        match self.spec_train.as_str() {
            "off" | "none" => Ok(false),
            "online" => Ok(true),
            other => bail!("unknown --spec-train `{other}`: use online or off"),
        }
    }
}

/// Hooks for the engine and a running trainer, for `drafter` serving `target`.
pub fn start(args: &OnlineArgs, target: &Model, drafter: &EagleDrafter) -> Result<(OnlineHooks, TrainerHandle)> {
    let hooks = OnlineHooks {
        traces: Arc::new(TraceBuffer::new(args.trace_buffer_mib << 20)),
        exchange: Arc::new(DrafterExchange::default()),
        config: OnlineConfig::default(),
    };
    let handle = start_with(args, target, drafter, hooks.clone())?;
    Ok((hooks, handle))
}

/// A trainer for `drafter` fed by, and publishing through, `hooks`.
pub fn start_with(
    args: &OnlineArgs,
    target: &Model,
    drafter: &EagleDrafter,
    hooks: OnlineHooks,
) -> Result<TrainerHandle> {
    let trainer =
        Trainer::new(drafter.config.clone(), drafter.weights(), target.embedding_table(), args.train.train_config())?;
    let handle = OnlineTrainer::spawn(
        trainer,
        hooks.traces.clone(),
        hooks.exchange.clone(),
        OnlineTrainerConfig {
            publish_every: args.publish_every,
            cpu_share: args.train.train_cpu_share,
            threads: args.train.train_threads,
            checkpoint_dir: Some(args.drafter_save.clone()),
            spill_dir: args.trace_dir.clone(),
            ..Default::default()
        },
    );
    Ok(handle)
}
