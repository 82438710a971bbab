//! `tandem convert care`: a GQA model's key and value projections become low-rank latents (CARE
//! or a baseline), written as a Hugging Face folder tandem serves with a smaller KV cache.
use anyhow::{Context, Result};
use std::path::PathBuf;
use tandem_care::{Allocation, Method};
use tandem_cli::care_arg::{self, CalibrationArgs};
use tandem_cli::{load_model, models, DtypeArg};

#[derive(clap::Subcommand)]
pub enum ConvertCommand {
    /// CARE (arXiv 2603.17946): covariance-aware low-rank K/V, so the cache holds r_K + r_V
    /// numbers per token and layer. Writes a Hugging Face folder (safetensors, config.json with
    /// the per-layer ranks, tokenizer) that `tandem serve --model DIR` serves.
    Care(CareArgs),
}

#[derive(clap::Args)]
pub struct CareArgs {
    /// A .gguf file, an HF model folder, or `smollm2` / `qwen-coder`.
    #[arg(long)]
    model: Option<String>,
    /// Average rank per layer, for K and for V (at most the K/V width, kv_heads x head_dim).
    #[arg(long)]
    rank: Option<usize>,
    /// How many times smaller the KV cache gets (instead of --rank): rank = K/V width / ratio.
    #[arg(long)]
    kv_ratio: Option<f64>,
    /// Per-layer ranks: the same everywhere (measured best on both default models at every
    /// rank), or energy-guided (CARE-E, the paper's: more rank where it removes more of a
    /// layer's remaining error).
    #[arg(long, value_enum, default_value_t = AllocateArg::Uniform)]
    allocate: AllocateArg,
    /// care (covariance-whitened), or the baselines asvd (activation-scaled) and svd (plain).
    #[arg(long, value_enum, default_value_t = MethodArg::Care)]
    method: MethodArg,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Heal the converted model for this many steps before writing it: cross-entropy on the
    /// calibration text plus distillation from the original (its top --heal-top-k tokens),
    /// through the training API's trainer. 0: no healing.
    #[arg(long, default_value_t = 0)]
    heal_steps: usize,
    /// AdamW's learning rate for healing (1e-4 is what docs/care.md measured with full weights).
    #[arg(long, default_value_t = 1e-4)]
    heal_lr: f64,
    /// Windows per healing step, and tokens per window.
    #[arg(long, default_value_t = 4)]
    heal_windows: usize,
    #[arg(long, default_value_t = 64)]
    heal_window: usize,
    /// The original's most likely next tokens the distillation term covers (0: text only).
    #[arg(long, default_value_t = 4)]
    heal_top_k: usize,
    /// Heal LoRA adapters of this rank (merged into the folder) instead of every weight.
    #[arg(long)]
    heal_lora: Option<usize>,
    /// Print held-out perplexity (CPython's LICENSE.txt, 2,048 tokens) of the original, the
    /// converted and (with healing) the healed model.
    #[arg(long)]
    eval: bool,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AllocateArg {
    Uniform,
    Energy,
    /// The energy rule with the reference code's weights (later ranks and later layers count less).
    EnergyWeighted,
}

impl AllocateArg {
    pub fn allocation(self) -> Allocation {
        match self {
            AllocateArg::Uniform => Allocation::Uniform,
            AllocateArg::Energy => Allocation::Energy,
            AllocateArg::EnergyWeighted => Allocation::EnergyWeighted,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MethodArg {
    Care,
    Asvd,
    Svd,
}

impl MethodArg {
    pub fn method(self) -> Method {
        match self {
            MethodArg::Care => Method::Care,
            MethodArg::Asvd => Method::Asvd,
            MethodArg::Svd => Method::Svd,
        }
    }
}

pub fn run(cmd: ConvertCommand) -> Result<()> {
    match cmd {
        ConvertCommand::Care(args) => care(args),
    }
}

fn care(args: CareArgs) -> Result<()> {
    let path = models::resolve(args.model.as_deref())?;
    // Dense f32: the factors are computed from exact weights, and the folder holds f32.
    let loaded = load_model(&path, &DtypeArg::F32.load_options(tandem_cli::device(None)?))?;
    let model = &loaded.model;
    if model.config.latent_kv.is_some() {
        anyhow::bail!("{} is already converted (its config has latent_kv)", path.display());
    }
    let rank = care_arg::average_rank(model, args.rank, args.kv_ratio)?;
    let tokens = care_arg::calibration_tokens(&loaded, &args.calibration)?;
    let cal = care_arg::calibrate(model, &tokens, &args.calibration)?;
    let (method, allocation) = (args.method.method(), args.allocate.allocation());
    let spectra = care_arg::spectra(model, &cal, method)?;
    let mut conv = tandem_care::convert(model, &spectra, rank, allocation)?;
    let held_out = match args.eval {
        true => {
            let text = tandem_care::text::python_license().map_err(anyhow::Error::msg)?;
            let mut t = care_arg::encode(&loaded, &text)?;
            t.truncate(2048);
            Some(t)
        }
        false => None,
    };
    let ppl = |m: &tandem_models::Model, what: &str| -> Result<()> {
        if let Some(t) = &held_out {
            let (nll, n) = tandem_models::eval::negative_log_likelihood(m, t, 512, &mut |_, _| {})?;
            println!("held-out perplexity, {what}: {:.3}", tandem_models::eval::perplexity(nll, n));
        }
        Ok(())
    };
    ppl(model, "original")?;
    ppl(&conv.model, "converted")?;
    let mut healed = None;
    if args.heal_steps > 0 {
        let mode = match args.heal_lora {
            Some(rank) => tandem_train::Mode::Lora(tandem_models::LoraSpec {
                rank,
                alpha: rank as f64,
                targets: tandem_models::LoraTargets { attn: true, mlp: true, unembed: false },
            }),
            None => tandem_train::Mode::Full,
        };
        let opts = tandem_care::heal::HealOptions {
            steps: args.heal_steps,
            learning_rate: args.heal_lr,
            windows: args.heal_windows,
            window: args.heal_window,
            top_k: args.heal_top_k,
            mode,
        };
        let bar = care_arg::bar("healing", "steps");
        let (m, losses) = tandem_care::heal::heal(model, &conv.model, &tokens, &opts, &mut |s, n, loss| {
            bar.set_length(n as u64);
            bar.set_position(s as u64);
            bar.set_message(format!("healing (loss {loss:.3})"));
        })?;
        bar.finish_and_clear();
        let k = losses.len().min(10);
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len().max(1) as f64;
        println!(
            "healing loss: first {k} steps {:.3}, last {k} steps {:.3}",
            mean(&losses[..k]),
            mean(&losses[losses.len() - k..])
        );
        ppl(&m, "healed")?;
        conv.model = m;
        healed = Some(serde_json::json!({"steps": args.heal_steps, "learning_rate": args.heal_lr,
            "windows": args.heal_windows, "window": args.heal_window, "top_k": args.heal_top_k,
            "lora_rank": args.heal_lora, "loss_first": mean(&losses[..k]), "loss_last": mean(&losses[losses.len() - k..])}));
    }
    let (before, after) = (model.config.kv_bytes_per_token(), conv.model.config.kv_bytes_per_token());
    let calibration = match args.calibration.calibration.is_empty() {
        true => "the Python Language Reference (CPython pydoc_data/topics.py)".to_string(),
        false => args.calibration.calibration.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    };
    let provenance = serde_json::json!({ "tandem_conversion": {
        "method": method.name(),
        "allocation": allocation.name(),
        "average_rank": rank,
        "source": path.display().to_string(),
        "calibration": calibration,
        "calibration_tokens": cal.tokens,
        "kv_bytes_per_token": { "original": before, "converted": after },
        "dropped_energy_share": conv.dropped.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(),
        "healing": healed,
    }});
    tandem_care::save(&loaded, &conv.model, provenance, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("layer  r_K  r_V  dropped K  dropped V   (share of whitened energy)");
    for (l, ((rk, rv), (dk, dv))) in conv.k_ranks.iter().zip(&conv.v_ranks).zip(&conv.dropped).enumerate() {
        println!("{l:>5} {rk:>4} {rv:>4} {:>9.2}% {:>9.2}%", dk * 100.0, dv * 100.0);
    }
    println!(
        "{} ({}, {}, average rank {rank} of {}): KV cache {before} -> {after} bytes per token ({:.2}x smaller); \
         written to {}",
        loaded.name,
        method.name(),
        allocation.name(),
        model.config.kv_size(),
        before as f64 / after as f64,
        args.out.display()
    );
    Ok(())
}
