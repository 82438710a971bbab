//! `--spec-train online` and the trainer's settings, shared by `serve`, `bench online` and
//! `train-drafter`.
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tandem_engine::online::OnlineHooks;
use tandem_models::Model;
use tandem_runtime::speculative::{EagleDrafter, WarmStart};
use tandem_speculator::replay::{self, Replay};
use tandem_speculator::{OnlineTrainer, OnlineTrainerConfig, TrainConfig, Trainer, TrainerHandle};

/// Runs candle's element-wise CPU ops on the thread that calls them (CANDLE_NUM_THREADS=1, unless
/// the user set it). candle otherwise hands them to one process-wide pool of spinning worker
/// threads, pinned to cores, at normal priority and behind one lock: the trainer's ops then run
/// outside its SCHED_IDLE threads, and the engine's wait behind them (perf, a 26-request online
/// run: 11% of all samples on that pool's worker). Must run before any candle op (the pool is
/// sized once) and while the process has one thread.
pub fn keep_candle_ops_on_their_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Online training's learning rate for a drafter trained before: fine-tuning a day-0 drafter on
/// code traces (200 steps, held-out answers), 1e-3 lowered its agreement on math and chat
/// (0.790 -> 0.765, 0.843 -> 0.799) and barely raised code's (0.574 -> 0.585); 3e-4 with replay
/// raised code's to 0.601 and kept the others (0.796, 0.845).
pub const ADAPT_LR: f64 = 3e-4;

/// Whether the drafter's `lm_head` and final norm train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainHead {
    /// Frozen when the warm start copied the target's head.
    Auto,
    Frozen,
    Trained,
}

/// What labels prompt positions in the drafter's training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptLabels {
    /// The target's own distribution (from its last hidden state, recorded while serving).
    Target,
    /// The prompt's next token.
    Text,
}

/// `--spec-train`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpecTrain {
    #[value(alias = "none")]
    Off,
    /// Train the EAGLE drafter on the traffic being served.
    Online,
}

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Learning rate (AdamW). Default: 1e-3 for a fresh drafter and offline training; online
    /// training of a drafter trained before (`--spec eagle:DIR`, `--drafter`) adapts it at 3e-4,
    /// which learns the traffic without unlearning the rest (measured in docs/speculative-decoding.md).
    #[arg(long)]
    pub train_lr: Option<f64>,
    /// Positions per optimizer step.
    #[arg(long, default_value_t = TrainConfig::default().batch_positions)]
    pub train_batch: usize,
    /// Most training-time-test steps: the drafter is unrolled on its own outputs this many times
    /// (online, only as deep as serving drafts plus one: a cold drafter trains one step deep).
    #[arg(long, default_value_t = TrainConfig::default().ttt_steps)]
    pub train_ttt: usize,
    /// Weight of the discard term on rejected proposals (0 turns it off).
    #[arg(long, default_value_t = TrainConfig::default().discard_weight)]
    pub train_discard: f64,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = TrainConfig::default().grad_clip)]
    pub train_clip: f64,
    /// Share of serving time a saturated server lends the trainer while the drafter is still
    /// learning (its agreement with the target on fresh traffic rising, or fallen after a change
    /// of traffic): serving pauses between steps for turns of every core, and is that much
    /// slower. Below saturation the trainer takes every core while nothing is served, never
    /// beside serving.
    #[arg(long, default_value_t = OnlineTrainerConfig::default().cpu_share)]
    pub train_cpu_share: f64,
    /// The trainer's share once that agreement has levelled off.
    #[arg(long, default_value_t = OnlineTrainerConfig::default().min_share)]
    pub train_min_share: f64,
    /// `frozen`: keep the drafter's `lm_head` and final norm as initialised, so a head copied from
    /// the target (`--warm-start head|full`) reads the drafter's hidden states as the target's own
    /// would (cheaper steps, and it generalises better from little traffic); `trained`; `auto`:
    /// frozen when the warm start copied the head.
    #[arg(long, value_enum, default_value_t = TrainHead::Auto)]
    pub train_head: TrainHead,
    /// Weight in the loss of positions labelled with the prompt's next token (`--train-prompt-labels
    /// text`, or traces recorded without the target's last hidden state) against positions
    /// labelled with the target's own distribution.
    #[arg(long, default_value_t = TrainConfig::default().prompt_weight)]
    pub train_prompt_weight: f64,
    /// Noise added to the target's features while training, as a share of their RMS (0: none).
    #[arg(long, default_value_t = TrainConfig::default().feature_noise)]
    pub train_feature_noise: f64,
    /// Weight decay (AdamW, decoupled).
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub train_weight_decay: f64,
    /// Labels of prompt positions: `target` (the target's own distribution, computed by the
    /// trainer from the target's last hidden state, recorded while serving) or `text` (the next
    /// token of the prompt). Output positions always carry the target's distribution.
    #[arg(long, value_enum, default_value_t = PromptLabels::Target)]
    pub train_prompt_labels: PromptLabels,
    /// Threads for the trainer's kernels (it computes while serving is idle or in the turns a
    /// saturated server lends it, so every core is free).
    #[arg(long, default_value_t = OnlineTrainerConfig::default().threads)]
    pub train_threads: usize,
    /// Draft ids scored per training step: the tokens the batch's labels make likely plus
    /// uniformly drawn others that stand for the rest of the vocabulary (sampled softmax: the
    /// head's products shrink with it); 0: the whole draft vocabulary.
    #[arg(long, default_value_t = TrainConfig::default().sampled_vocab)]
    pub train_sampled_vocab: usize,
}

impl TrainArgs {
    /// A trainer for `drafter` of `target` with these settings.
    pub fn trainer(&self, drafter: &EagleDrafter, target: &Model, warm: WarmStart) -> Result<Trainer> {
        let tc = self.train_config(warm);
        let trainer = Trainer::new(drafter.config.clone(), drafter.weights(), target.embedding_table()?, tc)?;
        Ok(match self.train_prompt_labels {
            PromptLabels::Target => {
                let (rows, norm) = target.unembedding_rows(&drafter.weights().d2t)?;
                trainer.with_target_head(rows, norm)?
            }
            PromptLabels::Text => trainer,
        })
    }

    /// The settings online training uses for `drafter`: one trained before (loaded from a folder)
    /// adapts at `ADAPT_LR` unless `--train-lr` says otherwise.
    pub fn for_online(&self, drafter: &EagleDrafter) -> TrainArgs {
        let adapt = drafter.source().is_some() && self.train_lr.is_none();
        TrainArgs { train_lr: self.train_lr.or(adapt.then_some(ADAPT_LR)), ..self.clone() }
    }

    /// The trainer's settings for a drafter initialised as `warm` says.
    pub fn train_config(&self, warm: WarmStart) -> TrainConfig {
        TrainConfig {
            lr: self.train_lr.unwrap_or(TrainConfig::default().lr),
            batch_positions: self.train_batch.max(8),
            ttt_steps: self.train_ttt.max(1),
            discard_weight: self.train_discard,
            grad_clip: self.train_clip,
            prompt_weight: self.train_prompt_weight,
            feature_noise: self.train_feature_noise,
            weight_decay: self.train_weight_decay,
            sampled_vocab: self.train_sampled_vocab,
            freeze_head: match self.train_head {
                TrainHead::Frozen => true,
                TrainHead::Trained => false,
                TrainHead::Auto => warm != WarmStart::None,
            },
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct OnlineArgs {
    /// `online`: train the EAGLE drafter on the traffic being served, in this process, and swap
    /// each new version in without pausing (rolled back if it lowers acceptance). Needs `--spec eagle`.
    #[arg(long, value_enum, default_value_t = SpecTrain::Off)]
    pub spec_train: SpecTrain,
    /// Where the online drafter is checkpointed (periodically and at shutdown); also where
    /// `--drafter` would continue from next time. Default: $TANDEM_DATA/drafter, else
    /// ~/.local/share/tandem/drafter (never the directory the server was started in).
    #[arg(long)]
    pub drafter_save: Option<PathBuf>,
    /// Also write every trace to this folder (replay with `tandem train-drafter --traces DIR`).
    #[arg(long)]
    pub trace_dir: Option<PathBuf>,
    /// Memory for traces waiting for the trainer; when full the oldest are dropped (and counted).
    #[arg(long, default_value_t = 256)]
    pub trace_buffer_mib: usize,
    /// Optimizer steps between published drafter versions.
    #[arg(long, default_value_t = OnlineTrainerConfig::default().publish_every)]
    pub publish_every: u64,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub replay: ReplayArgs,
}

/// What online training replays of the drafter's earlier training (`tandem_speculator::replay`).
#[derive(clap::Args, Clone, Debug)]
pub struct ReplayArgs {
    /// Traces mixed into every online training step (a folder of `trace-*.safetensors`). Default:
    /// the `replay` folder beside the saved drafter served (`tandem train-drafter` writes one: a
    /// sample of what it trained on), so learning today's traffic does not undo what the drafter
    /// knew of other kinds.
    #[arg(long)]
    pub train_replay: Option<PathBuf>,
    /// Share of each step's positions drawn from the replay traces (0: none).
    #[arg(long, default_value_t = tandem_speculator::replay::REPLAY_SHARE)]
    pub train_replay_share: f64,
}

impl ReplayArgs {
    /// The replay set for `drafter`: `--train-replay`, else the set in the folder it was loaded
    /// from, else none.
    pub fn load(&self, drafter: &EagleDrafter) -> Result<Option<Arc<Replay>>> {
        if self.train_replay_share <= 0.0 {
            return Ok(None);
        }
        let Some(dir) = self.train_replay.clone().or_else(|| drafter.source().and_then(replay::replay_dir)) else {
            return Ok(None);
        };
        let fs = drafter.config.target_layers.len() * drafter.config.hidden_size;
        let r = Replay::load(&dir, fs, self.train_replay_share)
            .with_context(|| format!("loading the replay traces in {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), traces = r.traces(), positions = r.positions(), share = self.train_replay_share, "online training replays the drafter's earlier training data");
        Ok(Some(Arc::new(r)))
    }
}

impl OnlineArgs {
    /// The engine's side of training in this process, with a trace buffer of `trace_buffer_bytes`.
    /// With the target's labels (`--train-prompt-labels target`) the trainer derives every
    /// position's distribution from the recorded last hidden state, so the engine need not keep
    /// top entries; traces written to `--trace-dir` keep them (whoever replays them may not).
    pub fn hooks(&self, trace_buffer_bytes: usize) -> OnlineHooks {
        let mut hooks = OnlineHooks::new(trace_buffer_bytes);
        hooks.config.labels_from_hidden =
            self.train.train_prompt_labels == PromptLabels::Target && self.trace_dir.is_none();
        hooks
    }

    /// `--drafter-save`, or its default under tandem's data folder.
    pub fn drafter_save_dir(&self) -> PathBuf {
        self.drafter_save.clone().unwrap_or_else(|| crate::models::data_dir().join("drafter"))
    }
}

impl OnlineArgs {
    pub fn enabled(&self) -> bool {
        self.spec_train == SpecTrain::Online
    }
}

/// Hooks for the engine and a running trainer, for `drafter` serving `target`.
pub fn start(
    args: &OnlineArgs,
    target: &Model,
    drafter: &EagleDrafter,
    warm: WarmStart,
) -> Result<(OnlineHooks, TrainerHandle)> {
    let hooks = args.hooks(args.trace_buffer_mib << 20);
    let handle = start_with(args, target, drafter, warm, hooks.clone())?;
    Ok((hooks, handle))
}

/// A trainer for `drafter` fed by, and publishing through, `hooks`.
pub fn start_with(
    args: &OnlineArgs,
    target: &Model,
    drafter: &EagleDrafter,
    warm: WarmStart,
    hooks: OnlineHooks,
) -> Result<TrainerHandle> {
    let trainer = args.train.for_online(drafter).trainer(drafter, target, warm)?;
    let replay = args.replay.load(drafter)?;
    let handle = OnlineTrainer::spawn(
        trainer,
        hooks.traces.clone(),
        hooks.exchange.clone(),
        OnlineTrainerConfig {
            publish_every: args.publish_every,
            cpu_share: args.train.train_cpu_share,
            min_share: args.train.train_min_share,
            threads: args.train.train_threads,
            checkpoint_dir: Some(args.drafter_save_dir()),
            spill_dir: args.trace_dir.clone(),
            replay,
            serve_as: Some(drafter.serve_as()),
            ..Default::default()
        },
    );
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tandem_engine::online::Trace;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        online: OnlineArgs,
    }

    fn args(extra: &[&str]) -> OnlineArgs {
        Cli::parse_from(std::iter::once("tandem").chain(extra.iter().copied())).online
    }

    /// A drafter trained before adapts at the lower rate and replays the set saved beside it; a
    /// fresh one learns at the full rate with nothing to replay; what the user says wins.
    #[test]
    fn online_training_adapts_a_trained_drafter_and_replays_what_it_learnt() {
        let target = tandem_models::load(
            &tandem_testkit::tiny("llama-gqa-untied-sharded"),
            &tandem_models::LoadOptions::default(),
            &mut |_, _| {},
        )
        .unwrap()
        .model;
        let fresh = EagleDrafter::fresh(&target, None, WarmStart::Full, 1).unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-adapt-{}", std::process::id()));
        fresh.save(&dir).unwrap();
        let saved = EagleDrafter::load(&dir, &target).unwrap();
        let lr = |a: &OnlineArgs, d: &EagleDrafter| a.train.for_online(d).train_config(WarmStart::Full).lr;
        let plain = args(&[]);
        assert_eq!(lr(&plain, &fresh), TrainConfig::default().lr);
        assert_eq!(lr(&plain, &saved), ADAPT_LR);
        assert_eq!(lr(&args(&["--train-lr", "0.002"]), &saved), 0.002);
        // No replay set beside it yet; once one is, it is loaded (and 0 turns it off).
        assert!(plain.replay.load(&saved).unwrap().is_none());
        let fs = saved.config.target_layers.len() * saved.config.hidden_size;
        let trace = Trace {
            tokens: vec![5; 9],
            prompt_len: 1,
            feature_size: fs,
            features: vec![0.25; 8 * fs],
            ..Default::default()
        };
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        replay::write(&[Arc::new(trace)], 100, &dir, &mut rng).unwrap();
        let again = EagleDrafter::load(&dir, &target).unwrap();
        assert_eq!(plain.replay.load(&again).unwrap().map(|r| r.positions()), Some(8));
        assert!(plain.replay.load(&fresh).unwrap().is_none());
        assert!(args(&["--train-replay-share", "0"]).replay.load(&again).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
