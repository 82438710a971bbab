//! `--schedule` and the fair policy's settings.
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tandem_engine::{FairConfig, Fcfs, SchedulingPolicy, VirtualTokenCounter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// First come, first served.
    Fcfs,
    /// Virtual token counters per client (or agent): no backlogged client falls behind another by
    /// more than a bounded amount of service; with one client it is FCFS.
    Fair,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ScheduleArgs {
    /// Which waiting request runs next.
    #[arg(long, value_enum, default_value_t = Schedule::Fair)]
    pub schedule: Schedule,
    /// A client's weight, e.g. `--client-weight alice=2` (repeatable; default weight 1). Clients are
    /// named by the X-Tandem-Client header, else the API key, else the `user` field.
    #[arg(long = "client-weight", value_name = "NAME=WEIGHT")]
    pub client_weights: Vec<String>,
    /// Cost of a prompt token and of an output token in the fair policy's counters.
    #[arg(long, default_value_t = FairConfig::default().input_weight)]
    pub fair_input_weight: f64,
    #[arg(long, default_value_t = FairConfig::default().output_weight)]
    pub fair_output_weight: f64,
    /// Cost of a token of training (a Tinker client's forward_backward; a forward-only request
    /// costs as its prompt tokens). Training runs while its client trails in service.
    #[arg(long, default_value_t = FairConfig::default().train_weight)]
    pub fair_train_weight: f64,
    /// Counter gap (weighted tokens) past which a waiting client preempts the most-served running
    /// one; 0 turns preemption off.
    #[arg(long, default_value_t = FairConfig::default().preempt_margin.unwrap_or(0.0))]
    pub preempt_margin: f64,
    /// A JSON file with the same settings: {"client_weights": {"alice": 2}, "input_weight": 1,
    /// "output_weight": 2, "train_weight": 3, "preempt_margin": 1024}; flags given on the command
    /// line add to it.
    #[arg(long)]
    pub fair_config: Option<std::path::PathBuf>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    client_weights: Option<HashMap<String, f64>>,
    input_weight: Option<f64>,
    output_weight: Option<f64>,
    train_weight: Option<f64>,
    preempt_margin: Option<f64>,
}

pub fn build(args: &ScheduleArgs) -> Result<Box<dyn SchedulingPolicy>> {
    if args.schedule == Schedule::Fcfs {
        return Ok(Box::new(Fcfs::default()));
    }
    let file = match &args.fair_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not a fair-scheduling config", p.display()))?
        }
        None => FileConfig::default(),
    };
    let mut weights = file.client_weights.unwrap_or_default();
    for w in &args.client_weights {
        let Some((name, weight)) = w.split_once('=') else { bail!("--client-weight `{w}`: use NAME=WEIGHT") };
        let weight: f64 = weight.parse().with_context(|| format!("--client-weight `{w}`: bad number"))?;
        weights.insert(name.to_string(), weight);
    }
    if let Some((name, w)) = weights.iter().find(|(_, w)| !(**w > 0.0 && w.is_finite())) {
        bail!("the weight of client `{name}` must be positive, got {w}");
    }
    let margin = file.preempt_margin.unwrap_or(args.preempt_margin);
    let config = FairConfig {
        input_weight: file.input_weight.unwrap_or(args.fair_input_weight),
        output_weight: file.output_weight.unwrap_or(args.fair_output_weight),
        train_weight: file.train_weight.unwrap_or(args.fair_train_weight),
        client_weights: weights,
        preempt_margin: (margin > 0.0).then_some(margin),
    };
    let costs = [("input", config.input_weight), ("output", config.output_weight), ("train", config.train_weight)];
    if let Some((kind, w)) = costs.iter().find(|(_, w)| !(*w >= 0.0 && w.is_finite())) {
        bail!("the fair policy's {kind} weight must be a number >= 0, got {w}");
    }
    Ok(Box::new(VirtualTokenCounter::new(config)))
}
