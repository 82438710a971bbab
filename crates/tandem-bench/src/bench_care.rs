//! `tandem bench care`: what a CARE conversion keeps and what it saves, in one run on one model.
//! - Perplexity on held-out text (CPython's LICENSE.txt; calibration is the Python Language
//!   Reference) of the original and of svd / asvd / care-uniform / care-energy at several ranks,
//!   each scored through the serving forward (the latent kernels).
//! - KV bytes per token, measured from an allocated cache's tensors.
//! - How many 2k-token sequences one KV budget holds: the cache for the budget is allocated and
//!   2k-token sequences are reserved in it until it refuses.
//! - Decode tokens/s at batch 1 after 1k and 4k tokens of context, original and converted (the
//!   cost of expanding keys from latents at every step).
//!
//! Everything runs on dense f32 weights (the converted folder is f32). Table on stdout, JSON file.
use anyhow::{anyhow, Result};
use serde::Serialize;
use std::time::Instant;
use tandem_care::{Allocation, Method};
use tandem_cli::care_arg::{self, bar, CalibrationArgs};
use tandem_cli::{load_model, models, DtypeArg};
use tandem_models::{KvCache, LogitsFor, Model, SequenceInput, BLOCK};

#[derive(clap::Args)]
pub struct CareBenchArgs {
    /// Model: a path or `smollm2` / `qwen-coder`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Average ranks as fractions of the K/V width.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    ranks: Vec<f64>,
    /// Conversions to score: svd, asvd, care-uniform, care-energy, care-energy-weighted (the
    /// reference code's weighting of the energy rule).
    #[arg(long, value_delimiter = ',', default_value = "svd,asvd,care-uniform,care-energy,care-energy-weighted")]
    methods: Vec<String>,
    #[command(flatten)]
    calibration: CalibrationArgs,
    /// Held-out tokens scored (windows of --window).
    #[arg(long, default_value_t = 4096)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// The KV budget whose capacity in 2k-token sequences is counted.
    #[arg(long, default_value = "256MiB")]
    kv_budget: String,
    /// Context depths of the decode measurement (0 skips it), and decode steps timed at each.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    decode_depths: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Which conversion's decode speed is measured beside the original: care-uniform at these
    /// rank fractions.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    decode_ranks: Vec<f64>,
    #[arg(long, default_value = "bench-results/care.json")]
    out: String,
}

#[derive(Serialize)]
struct Row {
    conversion: String,
    rank: usize,
    perplexity: f64,
    kv_bytes_per_token: usize,
    kv_ratio: f64,
    /// 2k-token sequences the KV budget holds.
    sequences_2k: usize,
    /// Mean share of whitened energy dropped per layer (K, V).
    dropped_k: f64,
    dropped_v: f64,
}

#[derive(Serialize)]
struct DecodeRow {
    conversion: String,
    rank: usize,
    depth: usize,
    tok_s: f64,
}

fn parse_conversion(name: &str) -> Result<(Method, Allocation)> {
    Ok(match name {
        "svd" => (Method::Svd, Allocation::Uniform),
        "asvd" => (Method::Asvd, Allocation::Uniform),
        "care-uniform" => (Method::Care, Allocation::Uniform),
        "care-energy" => (Method::Care, Allocation::Energy),
        "care-energy-weighted" => (Method::Care, Allocation::EnergyWeighted),
        other => {
            return Err(anyhow!(
                "unknown conversion `{other}` (svd, asvd, care-uniform, care-energy, care-energy-weighted)"
            ))
        }
    })
}

/// Bytes per token of `model`'s KV cache, from the tensors of an allocated cache.
fn measured_bytes_per_token(model: &Model) -> Result<usize> {
    let cache = KvCache::with_blocks(&model.config, 1, BLOCK, 4, model.device())?;
    Ok(cache.bytes() / (4 * BLOCK))
}

/// 2k-token sequences reserved, one after another, in the cache `budget` bytes buy.
fn sequences_in_budget(model: &Model, budget: usize) -> Result<usize> {
    const LEN: usize = 2048;
    let blocks = budget / (measured_bytes_per_token(model)? * BLOCK);
    let slots = blocks / LEN.div_ceil(BLOCK) + 1;
    if blocks < LEN / BLOCK {
        return Ok(0);
    }
    let mut cache = KvCache::with_blocks(&model.config, slots, LEN, blocks, model.device())?;
    Ok((0..slots).take_while(|&s| cache.reserve(s, 0, LEN).is_ok()).count())
}

fn perplexity(model: &Model, tokens: &[u32], window: usize, what: &str) -> Result<f64> {
    let bar = bar(&format!("scoring {what}"), "windows");
    let (nll, n) = tandem_models::eval::negative_log_likelihood(model, tokens, window, &mut |d, t| {
        bar.set_length(t as u64);
        bar.set_position(d as u64);
    })?;
    bar.finish_and_clear();
    Ok(tandem_models::eval::perplexity(nll, n))
}

/// Decode tokens/s at batch 1 after `depth` tokens of context.
fn decode_speed(model: &Model, tokens: &[u32], depth: usize, steps: usize) -> Result<f64> {
    let mut cache = KvCache::new(&model.config, 1, depth + steps + 1, model.device())?;
    let ctx: Vec<u32> = tokens.iter().cycle().take(depth).copied().collect();
    for chunk in ctx.chunks(512) {
        model.forward(
            &[SequenceInput { slot: 0, tokens: chunk, logits: LogitsFor::None, siblings: &[] }],
            &mut cache,
            &[],
        )?;
    }
    let t = Instant::now();
    for i in 0..steps {
        let tok = [tokens[i % tokens.len()]];
        model.forward(
            &[SequenceInput { slot: 0, tokens: &tok, logits: LogitsFor::Last, siblings: &[] }],
            &mut cache,
            &[],
        )?;
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

pub fn run(args: CareBenchArgs) -> Result<()> {
    let path = models::resolve(Some(&args.model))?;
    let loaded = load_model(&path, &DtypeArg::F32.load_options(tandem_cli::device(None)?))?;
    let model = &loaded.model;
    let width = model.config.kv_size();
    let budget = tandem_cli::parse_size(&args.kv_budget)?;
    let text = tandem_care::text::python_license().map_err(|e| anyhow!(e))?;
    let mut held_out = care_arg::encode(&loaded, &text)?;
    held_out.truncate(args.eval_tokens);
    let conversions = args.methods.iter().map(|m| Ok((m.clone(), parse_conversion(m)?))).collect::<Result<Vec<_>>>()?;
    let ranks: Vec<usize> = args.ranks.iter().map(|f| ((width as f64 * f).round() as usize).clamp(1, width)).collect();

    println!(
        "{} ({} layers, K/V width {width}), held-out: {} tokens of CPython's LICENSE.txt",
        loaded.name,
        model.config.num_layers,
        held_out.len()
    );
    println!(
        "{:<14} {:>5} {:>11} {:>10} {:>8} {:>10} {:>9} {:>9}",
        "conversion", "rank", "perplexity", "KV B/tok", "smaller", "2k seqs", "drop K", "drop V"
    );
    let original_bytes = measured_bytes_per_token(model)?;
    let print = |r: &Row| {
        println!(
            "{:<14} {:>5} {:>11.3} {:>10} {:>7.2}x {:>10} {:>8.1}% {:>8.1}%",
            r.conversion,
            r.rank,
            r.perplexity,
            r.kv_bytes_per_token,
            r.kv_ratio,
            r.sequences_2k,
            r.dropped_k * 100.0,
            r.dropped_v * 100.0
        )
    };
    let mut rows = vec![Row {
        conversion: "original".into(),
        rank: width,
        perplexity: perplexity(model, &held_out, args.window, "the original")?,
        kv_bytes_per_token: original_bytes,
        kv_ratio: 1.0,
        sequences_2k: sequences_in_budget(model, budget)?,
        dropped_k: 0.0,
        dropped_v: 0.0,
    }];
    print(&rows[0]);

    let tokens = care_arg::calibration_tokens(&loaded, &args.calibration)?;
    let cal = care_arg::calibrate(model, &tokens, &args.calibration)?;
    let mut decode_models = Vec::new();
    for method in [Method::Svd, Method::Asvd, Method::Care] {
        let wanted: Vec<_> = conversions.iter().filter(|(_, (m, _))| *m == method).collect();
        if wanted.is_empty() {
            continue;
        }
        let spectra = care_arg::spectra(model, &cal, method)?;
        for &rank in &ranks {
            for (name, (_, allocation)) in &wanted {
                let conv = tandem_care::convert(model, &spectra, rank, *allocation)?;
                let mean = |f: &dyn Fn(&(f64, f64)) -> f64| {
                    conv.dropped.iter().map(f).sum::<f64>() / conv.dropped.len() as f64
                };
                let bytes = measured_bytes_per_token(&conv.model)?;
                let row = Row {
                    conversion: name.clone(),
                    rank,
                    perplexity: perplexity(&conv.model, &held_out, args.window, &format!("{name} rank {rank}"))?,
                    kv_bytes_per_token: bytes,
                    kv_ratio: original_bytes as f64 / bytes as f64,
                    sequences_2k: sequences_in_budget(&conv.model, budget)?,
                    dropped_k: mean(&|d| d.0.max(0.0)),
                    dropped_v: mean(&|d| d.1.max(0.0)),
                };
                print(&row);
                rows.push(row);
                let decode_rank = args.decode_ranks.iter().any(|f| ((width as f64 * f).round() as usize) == rank);
                if name == "care-uniform" && decode_rank {
                    decode_models.push((name.to_string(), rank, conv.model));
                }
            }
        }
    }

    let mut decode = Vec::new();
    if args.decode_depths.iter().any(|&d| d > 0) {
        println!("\ndecode at batch 1 ({} steps after the context):", args.decode_steps);
        println!("{:<14} {:>5} {:>7} {:>9}", "conversion", "rank", "depth", "tok/s");
        let originals = std::iter::once(("original".to_string(), width, model));
        for (name, rank, m) in originals.chain(decode_models.iter().map(|(n, r, m)| (n.clone(), *r, m))) {
            for &depth in args.decode_depths.iter().filter(|&&d| d > 0) {
                let tok_s = decode_speed(m, &tokens, depth, args.decode_steps)?;
                println!("{name:<14} {rank:>5} {depth:>7} {tok_s:>9.2}");
                decode.push(DecodeRow { conversion: name.clone(), rank, depth, tok_s });
            }
        }
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "model": loaded.name, "machine": crate::machine_description(), "kv_budget_bytes": budget,
        "calibration_tokens": cal.tokens, "held_out_tokens": held_out.len(), "rows": rows, "decode": decode,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    Ok(())
}
