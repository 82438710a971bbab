//! `tandem bench train`: forward_backward throughput of the training service's model code (LoRA
//! and full weights) on a real checkpoint, against the same model written plainly in PyTorch on the
//! same machine in the same run (scripts/peer_torch_train.py; skipped with a message when PyTorch
//! is not installed). Both start from the same weights, so their first losses must agree.
//! Each row also reports the peak memory one forward_backward adds (the process's peak resident
//! set, reset before the pass), for tandem and for the peer.
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use tandem_cli::{load_model, models, DtypeArg};
use tandem_models::{Device, LoraSpec, LoraTargets};
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
    /// How the base weights are held: f32 and/or auto (the file's quantized blocks, as
    /// `tandem serve` holds them: LoRA trains over them; full training always trains f32 copies,
    /// so it runs on f32 only).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,auto")]
    dtype: Vec<DtypeArg>,
    /// Python with PyTorch for the peer (default: $PYTHON or python3).
    #[arg(long)]
    torch_python: Option<String>,
    #[arg(long, default_value = "bench-results/train.json")]
    out: String,
}

const PEER_SCRIPT: &str = include_str!("../../../scripts/peer_torch_train.py");

#[derive(Serialize)]
struct Row {
    dtype: String,
    mode: String,
    tokens_per_s: f64,
    forward_only_tokens_per_s: f64,
    secs: f64,
    first_loss_sum: f64,
    torch_tokens_per_s: Option<f64>,
    torch_first_loss_sum: Option<f64>,
    ratio_vs_torch: Option<f64>,
    /// Growth of the peak resident set over one forward_backward, MiB.
    peak_mib: Option<f64>,
    torch_peak_mib: Option<f64>,
    /// One AdamW step after a forward_backward, seconds (PyTorch: torch.optim.AdamW's).
    optim_step_secs: f64,
    torch_optim_step_secs: Option<f64>,
}

/// Returns the heap's free memory to the system (tandem keeps freed memory for reuse): before a
/// peak is measured, and before the PyTorch peer runs beside this process (with Qwen's full
/// weights, their moments and gradients held until then, the two together outgrew 24 GB).
fn hand_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `f`, returning what it added to the process's peak resident set (MiB), where Linux lets
/// the peak be reset (`/proc/self/clear_refs`).
fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, Option<f64>) {
    let field = |key: &str| -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: f64 = status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    // Freed memory the allocator keeps resident (an earlier model's, an earlier pass's) would
    // hide the growth: hand it back first.
    hand_back_free_memory();
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = field("VmRSS:");
    let out = f();
    let grown = match (reset, before, field("VmHWM:")) {
        (true, Some(b), Some(peak)) => Some((peak - b).max(0.0)),
        _ => None,
    };
    (out, grown)
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
    let mut rows = Vec::new();
    let python = a.torch_python.clone().unwrap_or_else(|| std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    let has_torch = std::process::Command::new(&python)
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        eprintln!("PyTorch is not installed for {python}: the peer is skipped (pip install torch, or --torch-python)");
    }
    // The peer reads the same weights (dequantized when the file is quantized), written once as
    // safetensors with a small config; its rows depend only on the mode.
    let dir = std::env::temp_dir().join(format!("tandem-bench-train-{}", std::process::id()));
    let mut peer_rows: BTreeMap<String, PeerRow> = BTreeMap::new();
    let mut name = String::new();
    for &dtype in &a.dtype {
        let loaded = load_model(&path, &dtype.load_options(Device::Cpu))?;
        name = loaded.name.clone();
        let base = loaded.model;
        let c = base.config.clone();
        let batch = data(a.batch, a.seq_len, c.vocab_size);
        let tokens = (a.batch * a.seq_len) as f64;
        if has_torch && !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            let tensors: std::collections::HashMap<String, candle_core::Tensor> =
                base.export_hf()?.into_iter().collect();
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
            let config = serde_json::json!({
                "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_heads": c.num_heads,
                "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_interleaved": false,
            });
            std::fs::write(dir.join("tandem_config.json"), serde_json::to_vec(&config)?)?;
            std::fs::write(dir.join("peer.py"), PEER_SCRIPT)?;
        }
        for mode_name in &a.modes {
            let mode = match mode_name.as_str() {
                "lora" => Mode::Lora(LoraSpec {
                    rank: a.rank,
                    alpha: a.alpha,
                    targets: LoraTargets { attn: true, mlp: true, unembed: true },
                }),
                "full" if dtype != DtypeArg::F32 => continue,
                "full" => Mode::Full,
                other => anyhow::bail!("unknown mode `{other}` (lora, full)"),
            };
            let mut t = TrainingModel::new(&base, mode, 0)?;
            let mut times = Vec::new();
            // The warm-up pass measures the peak (it hands free memory back first); the timed
            // passes run as a server's do, on memory the allocator already holds.
            let (out, peak) = peak_growth(|| t.forward_backward(&batch, &LossFn::CrossEntropy, false));
            let first = out?.metrics["loss:sum"];
            for _ in 0..a.reps {
                // As the peer's passes (grad = None): no gradients pending to add into.
                t.discard_gradients();
                let start = Instant::now();
                t.forward_backward(&batch, &LossFn::CrossEntropy, false)?;
                times.push(start.elapsed().as_secs_f64());
            }
            let mut fwd = Vec::new();
            for _ in 0..a.reps.max(1) {
                let start = Instant::now();
                t.forward_backward(&batch, &LossFn::CrossEntropy, true)?;
                fwd.push(start.elapsed().as_secs_f64());
            }
            let optim_step_secs = time_optim_step(&mut t, &batch)?;
            drop(t);
            hand_back_free_memory();
            let secs = median(times);
            if has_torch && !peer_rows.contains_key(mode_name) {
                peer_rows.insert(mode_name.clone(), run_peer(&python, &dir, mode_name, &a)?);
            }
            let (torch_tps, torch_loss, torch_peak, torch_step) = peer_rows.get(mode_name).copied().unwrap_or_default();
            rows.push(Row {
                dtype: dtype.name().into(),
                mode: mode_name.clone(),
                tokens_per_s: tokens / secs,
                forward_only_tokens_per_s: tokens / median(fwd),
                secs,
                first_loss_sum: first,
                torch_tokens_per_s: torch_tps,
                torch_first_loss_sum: torch_loss,
                ratio_vs_torch: torch_tps.map(|p| tokens / secs / p),
                peak_mib: peak,
                torch_peak_mib: torch_peak,
                optim_step_secs,
                torch_optim_step_secs: torch_step,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "forward_backward, {} ({} x {} tokens, cross-entropy), this machine, {} threads",
        name,
        a.batch,
        a.seq_len,
        rayon::current_num_threads()
    );
    println!("| base | mode | tandem tok/s | tandem fwd-only tok/s | PyTorch tok/s | tandem / PyTorch | first loss tandem | first loss PyTorch | peak MiB tandem | peak MiB PyTorch | optim step s tandem | optim step s PyTorch |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {:.3} | {} | {} | {} | {:.3} | {} |",
            r.dtype,
            r.mode,
            r.tokens_per_s,
            r.forward_only_tokens_per_s,
            opt(r.torch_tokens_per_s, 1),
            opt(r.ratio_vs_torch, 2),
            r.first_loss_sum,
            opt(r.torch_first_loss_sum, 3),
            opt(r.peak_mib, 0),
            opt(r.torch_peak_mib, 0),
            r.optim_step_secs,
            opt(r.torch_optim_step_secs, 3)
        );
    }
    if let Some(parent) = std::path::Path::new(&a.out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::json!({
        "model": name, "batch": a.batch, "seq_len": a.seq_len, "rank": a.rank, "alpha": a.alpha,
        "threads": rayon::current_num_threads(), "rows": rows,
    });
    std::fs::write(&a.out, serde_json::to_vec_pretty(&json)?)?;
    println!("wrote {}", a.out);
    Ok(())
}

/// The optimizer step a training loop takes after each forward_backward (AdamW, the Tinker
/// default's parameters), timed on its second step: the first creates the moments.
fn time_optim_step(t: &mut TrainingModel, batch: &[Datum]) -> Result<f64> {
    let params = tandem_train::AdamParams::default();
    t.optim_step(&params)?;
    t.forward_backward(batch, &LossFn::CrossEntropy, false)?;
    let start = Instant::now();
    t.optim_step(&params)?;
    Ok(start.elapsed().as_secs_f64())
}

/// The PyTorch peer's tok/s, first summed loss, peak MiB and optimizer step seconds for one mode.
type PeerRow = (Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn run_peer(python: &str, dir: &std::path::Path, mode: &str, a: &TrainBenchArgs) -> Result<PeerRow> {
    let out = std::process::Command::new(python)
        .arg(dir.join("peer.py"))
        .arg(dir)
        .args(["--mode", mode, "--rank", &a.rank.to_string(), "--alpha", &a.alpha.to_string()])
        .args(["--batch", &a.batch.to_string(), "--seq-len", &a.seq_len.to_string(), "--reps", &a.reps.to_string()])
        .output()
        .context("running the PyTorch peer")?;
    if !out.status.success() {
        // A peer the kernel killed for memory (Qwen2.5-Coder at 4 x 1024 on 24 GiB) writes no
        // error of its own: say how it ended.
        let hint = if out.status.code().is_none() { ", likely killed for memory" } else { "" };
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("the PyTorch peer ({mode}) failed ({}{hint}) {}", out.status, stderr.trim_end());
        return Ok((None, None, None, None));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((v["tokens_per_s"].as_f64(), v["loss_sum"].as_f64(), v["peak_mib"].as_f64(), v["optim_step_secs"].as_f64()))
}
