//! `tandem bench train`: forward_backward throughput of the training service's model code (LoRA
//! and full weights) on a real checkpoint, against the same model written plainly in PyTorch on the
//! same machine in the same run (scripts/peer_torch_train.py; skipped with a message when PyTorch
//! is not installed). Both start from the same weights, so their first losses must agree.
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use tandem_cli::{load_model, models};
use tandem_models::{LoadOptions, LoraSpec, LoraTargets};
use tandem_train::{Datum, LossFn, Mode, TrainingModel};

#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// A .gguf file, an HF folder, or `smollm2` / `qwen-coder`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Sequences per forward_backward.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed repetitions after one warm-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// What is trained: lora (attention, MLP and unembedding, as Tinker's default) and/or full.
    #[arg(long, value_delimiter = ',', default_value = "lora,full")]
    modes: Vec<String>,
    /// Python with PyTorch for the peer (default: $PYTHON or python3).
    #[arg(long)]
    torch_python: Option<String>,
    #[arg(long, default_value = "bench-results/train.json")]
    out: String,
}

const PEER_SCRIPT: &str = include_str!("../../../scripts/peer_torch_train.py");

#[derive(Serialize)]
struct Row {
    mode: String,
    tokens_per_s: f64,
    forward_only_tokens_per_s: f64,
    secs: f64,
    first_loss_sum: f64,
    torch_tokens_per_s: Option<f64>,
    torch_first_loss_sum: Option<f64>,
    ratio_vs_torch: Option<f64>,
}

fn data(batch: usize, len: usize, vocab: usize) -> Vec<Datum> {
    (0..batch)
        .map(|i| {
            let ids: Vec<u32> = (0..=len).map(|j| ((i * 7919 + j * 104729 + 13) % vocab) as u32).collect();
            Datum { tokens: ids[..len].to_vec(), targets: ids[1..].to_vec(), inputs: BTreeMap::new() }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: TrainBenchArgs) -> Result<()> {
    let path = models::resolve(Some(&a.model))?;
    let loaded = load_model(&path, &LoadOptions::default())?;
    let base = loaded.model;
    let c = base.config.clone();
    let batch = data(a.batch, a.seq_len, c.vocab_size);
    let tokens = (a.batch * a.seq_len) as f64;

    // The peer reads the same weights, written once as safetensors with a small config.
    let dir = std::env::temp_dir().join(format!("tandem-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let python = a.torch_python.clone().unwrap_or_else(|| std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_torch {
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = base.export_hf()?.into_iter().collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let config = serde_json::json!({
            "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_interleaved": false,
        });
        std::fs::write(dir.join("tandem_config.json"), serde_json::to_vec(&config)?)?;
        std::fs::write(dir.join("peer.py"), PEER_SCRIPT)?;
    } else {
        eprintln!("PyTorch is not installed for {python}: the peer is skipped (pip install torch, or --torch-python)");
    }

    let mut rows = Vec::new();
    for mode_name in &a.modes {
        let mode = match mode_name.as_str() {
            "lora" => Mode::Lora(LoraSpec {
                rank: a.rank,
                alpha: a.alpha,
                targets: LoraTargets { attn: true, mlp: true, unembed: true },
            }),
            "full" => Mode::Full,
            other => anyhow::bail!("unknown mode `{other}` (lora, full)"),
        };
        let mut t = TrainingModel::new(&base, mode, 0)?;
        let mut times = Vec::new();
        let mut first = 0.0;
        for r in 0..=a.reps {
            let start = Instant::now();
            let out = t.forward_backward(&batch, &LossFn::CrossEntropy, false)?;
            if r == 0 {
                first = out.metrics["loss:sum"];
            } else {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let mut fwd = Vec::new();
        for _ in 0..a.reps.max(1) {
            let start = Instant::now();
            t.forward_backward(&batch, &LossFn::CrossEntropy, true)?;
            fwd.push(start.elapsed().as_secs_f64());
        }
        let secs = median(times);
        let mut row = Row {
            mode: mode_name.clone(),
            tokens_per_s: tokens / secs,
            forward_only_tokens_per_s: tokens / median(fwd),
            secs,
            first_loss_sum: first,
            torch_tokens_per_s: None,
            torch_first_loss_sum: None,
            ratio_vs_torch: None,
        };
        drop(t);
        if has_torch {
            let out = std::process::Command::new(&python)
                .arg(dir.join("peer.py"))
                .arg(&dir)
                .args(["--mode", mode_name, "--rank", &a.rank.to_string(), "--alpha", &a.alpha.to_string()])
                .args([
                    "--batch",
                    &a.batch.to_string(),
                    "--seq-len",
                    &a.seq_len.to_string(),
                    "--reps",
                    &a.reps.to_string(),
                ])
                .output()
                .context("running the PyTorch peer")?;
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                row.torch_tokens_per_s = v["tokens_per_s"].as_f64();
                row.torch_first_loss_sum = v["loss_sum"].as_f64();
                row.ratio_vs_torch = row.torch_tokens_per_s.map(|p| row.tokens_per_s / p);
            } else {
                eprintln!("the PyTorch peer failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "forward_backward, {} ({} x {} tokens, cross-entropy), this machine, {} threads",
        loaded.name,
        a.batch,
        a.seq_len,
        rayon::current_num_threads()
    );
    println!("| mode | tandem tok/s | tandem fwd-only tok/s | PyTorch tok/s | tandem / PyTorch | first loss tandem | first loss PyTorch |");
    println!("|---|---|---|---|---|---|---|");
    let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {:.3} | {} |",
            r.mode,
            r.tokens_per_s,
            r.forward_only_tokens_per_s,
            opt(r.torch_tokens_per_s, 1),
            opt(r.ratio_vs_torch, 2),
            r.first_loss_sum,
            opt(r.torch_first_loss_sum, 3)
        );
    }
    if let Some(parent) = std::path::Path::new(&a.out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::json!({
        "model": loaded.name, "batch": a.batch, "seq_len": a.seq_len, "rank": a.rank, "alpha": a.alpha,
        "threads": rayon::current_num_threads(), "rows": rows,
    });
    std::fs::write(&a.out, serde_json::to_vec_pretty(&json)?)?;
    println!("wrote {}", a.out);
    Ok(())
}
