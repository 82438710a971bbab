//! `tandem bench train`: forward_backward throughput of the training service's model code (LoRA
//! and full weights) on a real checkpoint, against the same model written plainly in PyTorch on the
//! same machine in the same run (scripts/peer_torch_train.py; skipped with a message when PyTorch
//! is not installed). Both start from the same weights, so their first losses must agree. The
//! peer runs beside tandem and their timed passes alternate, so the ratio compares passes made
//! under the same host conditions.
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
    /// Timed repetitions after one warm-up, each a tandem pass and a PyTorch pass back to back (the
    /// medians are reported; the ratio is the median of the pairs' ratios).
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
    anyhow::ensure!(a.reps >= 1, "--reps must be at least 1 (the timed passes whose median is reported)");
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
    // safetensors with a small config; each row starts its own peer on them.
    let dir = std::env::temp_dir().join(format!("tandem-bench-train-{}", std::process::id()));
    let mut name = String::new();
    for &dtype in &a.dtype {
        let loaded = load_model(&path, &dtype.load_options(Device::Cpu))?;
        name = loaded.name.clone();
        let base = loaded.model;
        let c = base.config.clone();
        let batch = data(a.batch, a.seq_len, c.vocab_size);
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
            let peer = if has_torch { Peer::start(&python, &dir, mode_name, &a) } else { None };
            let t = TrainingModel::new(&base, mode, 0)?;
            rows.push(measure_row(t, &batch, peer, &a, (dtype, mode_name))?);
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
    println!(
        "tandem / PyTorch: the median over {} passes of each, paired back to back, of PyTorch's time over tandem's",
        a.reps
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

/// One row: tandem's warm-up (first loss, peak), its timed passes paired with the peer's, its
/// forward-only passes and its AdamW step, and the peer's figures.
fn measure_row(
    mut t: TrainingModel,
    batch: &[Datum],
    mut peer: Option<Peer>,
    a: &TrainBenchArgs,
    (dtype, mode): (DtypeArg, &str),
) -> Result<Row> {
    let (reps, tokens) = (a.reps, (a.batch * a.seq_len) as f64);
    // The warm-up pass measures the peak (it hands free memory back first); the timed
    // passes run as a server's do, on memory the allocator already holds.
    let (out, peak) = peak_growth(|| t.forward_backward(batch, &LossFn::CrossEntropy, false));
    let first = out?.metrics["loss:sum"];
    let (mut times, mut peer_times) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // Each tandem pass is paired with a peer pass, who goes first alternating, so a
        // change in the host's speed (10-25% between runs on some machines) reaches both.
        if rep % 2 == 1 {
            peer_pass(&mut peer, &mut peer_times);
        }
        // As the peer's passes (grad = None): no gradients pending to add into.
        t.discard_gradients();
        let start = Instant::now();
        t.forward_backward(batch, &LossFn::CrossEntropy, false)?;
        times.push(start.elapsed().as_secs_f64());
        if rep % 2 == 0 {
            peer_pass(&mut peer, &mut peer_times);
        }
    }
    let mut fwd = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        t.forward_backward(batch, &LossFn::CrossEntropy, true)?;
        fwd.push(start.elapsed().as_secs_f64());
    }
    // The peer's optimizer step, then the peer gone, before tandem's moments exist (Qwen's
    // full weights, their moments and gradients in both processes at once outgrow 24 GB).
    hand_back_free_memory();
    let torch_optim_step_secs = peer.as_mut().and_then(|p| p.optim_step().ok());
    let torch_first_loss_sum = peer.as_ref().map(|p| p.first_loss_sum);
    let torch_peak_mib = peer.as_ref().and_then(|p| p.peak_mib);
    let paired = peer.take().is_some() && peer_times.len() == times.len();
    let optim_step_secs = time_optim_step(&mut t, batch)?;
    drop(t);
    hand_back_free_memory();
    let ratio_vs_torch = paired.then(|| median(peer_times.iter().zip(&times).map(|(p, t)| p / t).collect()));
    let torch_tokens_per_s = paired.then(|| tokens / median(peer_times));
    let secs = median(times);
    Ok(Row {
        dtype: dtype.name().into(),
        mode: mode.into(),
        tokens_per_s: tokens / secs,
        forward_only_tokens_per_s: tokens / median(fwd),
        secs,
        first_loss_sum: first,
        torch_tokens_per_s,
        torch_first_loss_sum,
        ratio_vs_torch,
        peak_mib: peak,
        torch_peak_mib,
        optim_step_secs,
        torch_optim_step_secs,
    })
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

/// The PyTorch peer of one row: a process that has loaded the model and run its warm-up pass, and
/// times one more pass or an optimizer step when asked (scripts/peer_torch_train.py).
struct Peer {
    child: std::process::Child,
    /// None once closed (which ends the peer).
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    first_loss_sum: f64,
    peak_mib: Option<f64>,
}

impl Peer {
    /// Starts the peer for `mode`; on failure says why and returns None (the row goes on alone).
    fn start(python: &str, dir: &std::path::Path, mode: &str, a: &TrainBenchArgs) -> Option<Peer> {
        let started = std::process::Command::new(python)
            .arg(dir.join("peer.py"))
            .arg(dir)
            .args(["--mode", mode, "--rank", &a.rank.to_string(), "--alpha", &a.alpha.to_string()])
            .args(["--batch", &a.batch.to_string(), "--seq-len", &a.seq_len.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let mut child = match started {
            Ok(c) => c,
            Err(e) => {
                eprintln!("the PyTorch peer ({mode}) did not start: {e}");
                return None;
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else { return None };
        let mut peer = Peer {
            child,
            stdin: Some(stdin),
            stdout: std::io::BufReader::new(stdout),
            first_loss_sum: 0.0,
            peak_mib: None,
        };
        match peer.reply() {
            Ok(v) => {
                peer.first_loss_sum = v["loss_sum"].as_f64().unwrap_or(f64::NAN);
                peer.peak_mib = v["peak_mib"].as_f64();
                Some(peer)
            }
            Err(e) => {
                eprintln!("the PyTorch peer ({mode}) failed: {e:#}");
                None
            }
        }
    }

    /// Reads the peer's next JSON line; a peer that ended says how (a peer the kernel killed for
    /// memory, Qwen2.5-Coder at 4 x 1024 on 24 GiB, writes no error of its own).
    fn reply(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            let hint = if status.code().is_none() { ", likely killed for memory" } else { "" };
            anyhow::bail!("it ended ({status}{hint})");
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("reading the PyTorch peer's reply")?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("{e}");
        }
        Ok(v)
    }

    fn ask(&mut self, cmd: &str, field: &str) -> Result<f64> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().context("the PyTorch peer was closed")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        self.reply()?[field].as_f64().with_context(|| format!("the PyTorch peer's reply has no {field}"))
    }

    /// Seconds of one timed forward_backward.
    fn pass(&mut self) -> Result<f64> {
        self.ask("pass", "secs")
    }

    /// Seconds of one AdamW step (its second).
    fn optim_step(&mut self) -> Result<f64> {
        self.ask("step", "optim_step_secs")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing stdin ends the peer's loop; wait so no process outlives the benchmark.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// One timed peer pass into `times`; a peer that fails is dropped with a message and its row
/// reports no peer figures.
fn peer_pass(peer: &mut Option<Peer>, times: &mut Vec<f64>) {
    if let Some(p) = peer {
        match p.pass() {
            Ok(secs) => times.push(secs),
            Err(e) => {
                eprintln!("the PyTorch peer failed: {e:#}");
                *peer = None;
            }
        }
    }
}
