//! `tandem train-drafter`: trains an EAGLE drafter offline from traces a server recorded
//! (`tandem serve --spec eagle --spec-train online --trace-dir DIR`), with the online trainer's code.
use crate::online_arg::TrainArgs;
use crate::spec_arg::{self, SpecArgs};
use crate::{load_model, models};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::PathBuf;
use tandem_models::LoadOptions;
use tandem_speculator::traces_io::{load_trace, trace_files};
use tandem_speculator::{Batch, TracePool, Trainer};

#[derive(clap::Args)]
pub struct TrainDrafterArgs {
    /// Folder of recorded traces (`trace-*.safetensors`).
    #[arg(long)]
    traces: PathBuf,
    /// The target model the traces came from (default: smollm2).
    #[arg(long)]
    model: Option<String>,
    /// Where to write the trained drafter (config.json + model.safetensors).
    #[arg(long, default_value = "tandem-drafter")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 500)]
    steps: u64,
    /// Keep the last N trace files out of training and report the drafter's agreement with the
    /// target on their output positions (what drafting would see on unseen traffic).
    #[arg(long, default_value_t = 0)]
    holdout: usize,
    /// Steps between reports.
    #[arg(long, default_value_t = 50)]
    report_every: u64,
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    train: TrainArgs,
}

pub fn run(args: TrainDrafterArgs) -> Result<()> {
    let path = models::resolve(args.model.as_deref())?;
    let loaded = load_model(&path, &LoadOptions::default())?;
    let drafter = spec_arg::build_eagle(&args.spec, &loaded)?;
    let mut pool = TracePool::new(usize::MAX);
    let files = trace_files(&args.traces)?;
    if files.len() <= args.holdout {
        bail!("{} traces in {}: need more than --holdout {}", files.len(), args.traces.display(), args.holdout);
    }
    let fs = drafter.config.target_layers.len() * drafter.config.hidden_size;
    let mut held = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let t = load_trace(f).with_context(|| format!("reading {}", f.display()))?;
        if t.feature_size != fs {
            bail!(
                "{} holds {}-float features; this drafter reads {fs}: traces of another model?",
                f.display(),
                t.feature_size
            );
        }
        if i + args.holdout >= files.len() {
            held.push(t);
        } else {
            pool.add(t);
        }
    }
    eprintln!("{} traces, {} positions ({} held out)", files.len() - held.len(), pool.positions(), held.len());
    let tc = args.train.train_config(args.spec.warm_start);
    let mut trainer = args.train.trainer(&drafter, &loaded.model, args.spec.warm_start)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(tc.seed);
    let vd = trainer.config.draft_vocab_size;
    let bar = ProgressBar::new(args.steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps {msg} [{elapsed} < {eta}]").expect("valid template"),
    );
    // Held-out batches: each held trace's output positions (from the last prompt position on).
    let held: Vec<Batch> =
        held.iter().filter_map(|t| Batch::outputs(t, usize::MAX, vd, &|id| trainer.draft_id(id))).collect();
    // Held-out figures: first-token agreement, second-token agreement (reading its own output,
    // as drafting does), first-token cross-entropy.
    let evaluate = |trainer: &Trainer| -> Result<String> {
        let (mut top1, mut second, mut ce, mut n) = (0.0, 0.0, 0.0, 0.0);
        for b in &held {
            let s = trainer.evaluate(b)?;
            let w = s.positions as f64;
            top1 += s.top1 * w;
            second += s.top1_second * w;
            ce += s.ce0 * w;
            n += w;
        }
        let n = f64::max(n, 1.0);
        Ok(format!(
            "held-out top-1 agreement {:.3} (second token {:.3}), cross-entropy {:.3}",
            top1 / n,
            second / n,
            ce / n
        ))
    };
    if !held.is_empty() {
        eprintln!("step 0: {}", evaluate(&trainer)?);
    }
    let every = args.report_every.max(1);
    let mut avg = (0.0, 0.0);
    for step in 1..=args.steps {
        let batch = pool
            .sample(&mut rng, tc.batch_positions, tc.window, vd, &|id| trainer.draft_id(id))
            .context("the traces hold no trainable positions")?;
        let s = trainer.step(&batch)?;
        bar.set_message(format!("loss {:.3} top-1 {:.2}", s.loss, s.top1));
        bar.inc(1);
        avg = (avg.0 + s.loss, avg.1 + s.top1);
        if step % every == 0 {
            let held_out = match held.is_empty() {
                true => String::new(),
                false => format!("; {}", evaluate(&trainer)?),
            };
            bar.suspend(|| {
                eprintln!(
                    "step {step}: loss {:.3}, top-1 agreement {:.3} (mean of the last {every} batches){held_out}",
                    avg.0 / every as f64,
                    avg.1 / every as f64
                )
            });
            avg = (0.0, 0.0);
        }
    }
    bar.finish();
    tandem_runtime::spec::eagle::save_weights(&trainer.config, &trainer.weights()?, &args.out)?;
    eprintln!("drafter written to {} (serve it with --spec eagle:{})", args.out.display(), args.out.display());
    Ok(())
}
