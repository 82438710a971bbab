//! `tandem bench`: prefill tok/s, single-stream decode tok/s, and the cost of one forward over k new
//! tokens (logits for all k, the draft-verification pattern) relative to k = 1, for each model and
//! weight mode. Prints a table and writes JSON. The other benchmarks are its subcommands (one module
//! each); `workload` builds the online benchmark's prompt stream, `plot` draws the PNGs.
mod bench_care;
mod bench_draft;
mod bench_evolve;
mod bench_fair;
mod bench_grammar;
mod bench_online;
mod bench_prefix;
mod bench_rl;
mod bench_serve;
mod bench_soak;
mod bench_spec;
mod bench_train;
mod plot;
mod turns;
pub mod workload;

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tandem_cli::{load_model, models};
use tandem_models::{KvCache, LoadOptions, LogitsFor, Model, SequenceInput, WeightDtype};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: Option<BenchTarget>,
    /// Models: paths or `smollm2` / `qwen-coder` (default: both).
    #[arg(long)]
    model: Vec<String>,
    /// Weight modes: f32 and bf16 (dense, dequantized) and quantized (GGUF blocks kept).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,quantized")]
    modes: Vec<String>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// KV depth at which the k-token forwards are timed.
    #[arg(long, default_value_t = 256)]
    depth: usize,
    // tandem's cache (llama.cpp's is f16 either way).
    #[command(flatten)]
    cache: tandem_cli::CacheArgs,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/bench.json")]
    out: String,
    /// Also time llama.cpp (llama-cpp-python, 2 threads) on the same file in the same run and report
    /// tandem / llama.cpp ratios. f32 and bf16 rows use an F32 / BF16 GGUF that llama.cpp's quantize
    /// tool makes once from the file.
    #[arg(long)]
    peer: bool,
}

const PEER_SCRIPT: &str = include_str!("../../../scripts/peer_llamacpp.py");

#[derive(Serialize, serde::Deserialize)]
struct PeerRow {
    model: String,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    k_forward_secs: Vec<(usize, f64)>,
    k_cost_ratio: Vec<(usize, f64)>,
}

/// Runs the llama.cpp peer on `path`; f32 mode compares against llama.cpp on an F32 GGUF.
fn run_peer(path: &std::path::Path, mode: &str, a: &BenchArgs) -> Result<PeerRow> {
    let script = std::env::temp_dir().join("tandem_peer_llamacpp.py");
    std::fs::write(&script, PEER_SCRIPT)?;
    let mut cmd = std::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    cmd.arg(&script).arg(path).args(["--reps", &a.reps.to_string(), "--depth", &a.depth.to_string()]);
    cmd.args(["--prompt-tokens", &a.prompt_tokens.to_string(), "--decode-tokens", &a.decode_tokens.to_string()]);
    if mode != "quantized" {
        cmd.args(["--dtype", mode]);
    }
    let out = cmd.stderr(std::process::Stdio::null()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "the llama.cpp peer failed (is llama-cpp-python installed? pip install llama-cpp-python==0.3.36)"
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[derive(clap::Subcommand)]
enum BenchTarget {
    /// The OpenAI server over HTTP: output tok/s, time to first token and inter-token latency at
    /// several concurrencies.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Speculative decoding: tok/s without drafts, with the n-gram drafter and with the oracle
    /// drafter (the upper bound) on "edit" and "write" code prompts.
    Spec(crate::bench_spec::SpecBenchArgs),
    /// Structured outputs: the token trie's build, each grammar's compile time, and decode tok/s
    /// with a JSON schema, any JSON object and a regex against the same prompt without one (plain
    /// and with n-gram drafts, which must not change the output).
    Grammar(crate::bench_grammar::GrammarBenchArgs),
    /// The EAGLE drafter's cost: one draft token for a batch of sequences relative to the
    /// target's decode step over the same batch, at several batch sizes.
    Draft(crate::bench_draft::DraftBenchArgs),
    /// Fair scheduling: the VTC paper's workloads (overload, on/off, heavy-light, length shift)
    /// under FCFS and the fair policy; service per client, latency, Jain's index, throughput, PNG.
    Fair(crate::bench_fair::FairBenchArgs),
    /// Online speculator training: a code -> math -> chat prompt stream under no speculation,
    /// n-gram, and EAGLE drafters trained online (from scratch, warm-started) or offline; acceptance
    /// length and tokens/s per window of requests, table, JSON and PNG.
    Online(Box<crate::bench_online::OnlineBenchArgs>),
    /// The paged KV cache: agents sharing a long document over several turns and RL groups of
    /// samples, prefix cache off and on (prompt tokens computed, seconds, time to first token),
    /// and how many requests one KV budget serves at once, paged against fixed slots.
    Prefix(crate::bench_prefix::PrefixBenchArgs),
    /// CARE conversions: held-out perplexity of svd / asvd / care-uniform / care-energy at
    /// several ranks beside the original, KV bytes per token, 2k-token sequences per KV budget,
    /// and decode tok/s at 1k / 4k context, original against converted.
    Care(crate::bench_care::CareBenchArgs),
    /// Test-time evolution on held-out arithmetic problems: single sample, majority vote, RSA and
    /// Squeeze Evolve at several percentiles over an expensive and a cheap model; accuracy
    /// against compute, per round, and confidence AUC; table, JSON and PNG.
    Evolve(crate::bench_evolve::EvolveBenchArgs),
    /// RL through the Tinker SDK (`examples/rl_grpo.py`) against `tandem serve` per serving
    /// configuration, same seed: rollout tokens/s, acceptance, draft length, drafter version,
    /// training time and reward per RL step; table, JSON and PNG.
    Rl(crate::bench_rl::RlBenchArgs),
    /// The training service: forward_backward tokens/s, LoRA and full weights, against the same
    /// model in PyTorch (when installed) on the same data.
    Train(crate::bench_train::TrainBenchArgs),
    /// A long run of `tandem serve` under mixed traffic (streaming chat with hang-ups, an RL loop
    /// through the Tinker API, the online drafter): requests, errors by kind, latency and memory
    /// per window; table, JSON and PNG. Not part of CI (30 minutes by default).
    Soak(crate::bench_soak::SoakBenchArgs),
}

const KS: [usize; 5] = [1, 2, 4, 8, 16];

#[derive(Serialize)]
struct Row {
    model: String,
    mode: String,
    weight_mb_per_token: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Median seconds of one forward over k tokens at the given depth.
    k_forward_secs: Vec<(usize, f64)>,
    /// The same, relative to k = 1.
    k_cost_ratio: Vec<(usize, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fake_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729 + 17) % vocab.min(30_000)) as u32).collect()
}

fn forward(model: &Model, cache: &mut KvCache, tokens: &[u32], logits: LogitsFor) -> Result<()> {
    model.forward(&[SequenceInput { slot: 0, tokens, logits, siblings: &[] }], cache, &[])?;
    Ok(())
}

fn bench_model(model: &Model, name: &str, mode: &str, a: &BenchArgs) -> Result<Row> {
    let vocab = model.config.vocab_size;
    let capacity = (a.depth + 32).max(a.prompt_tokens).max(16 + a.decode_tokens) + 1;
    let mut cache = KvCache::new(&model.config, 1, capacity, model.device())?;
    // Warm up caches and thread pools.
    forward(model, &mut cache, &fake_tokens(8, vocab, 0), LogitsFor::Last)?;

    let mut prefill = Vec::new();
    for r in 0..a.reps {
        cache.reset(0)?;
        let toks = fake_tokens(a.prompt_tokens, vocab, r + 1);
        let t = Instant::now();
        forward(model, &mut cache, &toks, LogitsFor::Last)?;
        prefill.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
    }

    let mut decode = Vec::new();
    for r in 0..a.reps.min(3) {
        cache.reset(0)?;
        forward(model, &mut cache, &fake_tokens(16, vocab, r + 7), LogitsFor::Last)?;
        let toks = fake_tokens(a.decode_tokens, vocab, r + 11);
        let t = Instant::now();
        for tok in &toks {
            forward(model, &mut cache, std::slice::from_ref(tok), LogitsFor::Last)?;
        }
        decode.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64());
    }

    cache.reset(0)?;
    let fill = fake_tokens(a.depth, vocab, 3);
    for chunk in fill.chunks(256) {
        forward(model, &mut cache, chunk, LogitsFor::None)?;
    }
    // Every k once per round, rounds repeated: a machine that slows down or speeds up over the
    // measurement then shifts all k alike instead of skewing their ratios.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); KS.len()];
    for _ in 0..a.reps.max(3) * 2 {
        for (i, &k) in KS.iter().enumerate() {
            let toks = fake_tokens(k, vocab, k);
            let t = Instant::now();
            forward(model, &mut cache, &toks, LogitsFor::All)?;
            times[i].push(t.elapsed().as_secs_f64());
            cache.truncate(0, a.depth)?;
        }
    }
    let k_secs: Vec<(usize, f64)> = KS.iter().zip(times).map(|(&k, t)| (k, median(t))).collect();
    let base = k_secs[0].1;
    Ok(Row {
        model: name.to_string(),
        mode: mode.to_string(),
        weight_mb_per_token: model.weight_bytes_per_token() as f64 / 1e6,
        prefill_tok_s: median(prefill),
        decode_tok_s: median(decode),
        k_cost_ratio: k_secs.iter().map(|&(k, s)| (k, s / base)).collect(),
        k_forward_secs: k_secs,
    })
}

impl BenchArgs {
    /// `bench online` (serving with a trainer beside it) and `bench draft` (which times that
    /// trainer's step as it runs there).
    pub fn is_online(&self) -> bool {
        matches!(self.target, Some(BenchTarget::Online(_) | BenchTarget::Draft(_)))
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.target {
        Some(BenchTarget::Serve(a)) => return crate::bench_serve::run(a),
        Some(BenchTarget::Spec(a)) => return crate::bench_spec::run(a),
        Some(BenchTarget::Draft(a)) => return crate::bench_draft::run(a),
        Some(BenchTarget::Grammar(a)) => return crate::bench_grammar::run(a),
        Some(BenchTarget::Fair(a)) => return crate::bench_fair::run(a),
        Some(BenchTarget::Online(a)) => return crate::bench_online::run(*a),
        Some(BenchTarget::Soak(a)) => return crate::bench_soak::run(a),
        Some(BenchTarget::Train(a)) => return crate::bench_train::run(a),
        Some(BenchTarget::Rl(a)) => return crate::bench_rl::run(a),
        Some(BenchTarget::Prefix(a)) => return crate::bench_prefix::run(a),
        Some(BenchTarget::Care(a)) => return crate::bench_care::run(a),
        Some(BenchTarget::Evolve(a)) => return crate::bench_evolve::run(a),
        None => {}
    }
    let names =
        if args.model.is_empty() { vec!["smollm2".to_string(), "qwen-coder".to_string()] } else { args.model.clone() };
    let mut rows = Vec::new();
    let mut peers = Vec::new();
    let kv = args.cache.kv();
    println!("KV cache {}; k-token forwards at depth {}", kv.name(), args.depth);
    println!(
        "{:<34} {:<9} {:>8} {:>10} {:>9}  {}",
        "model",
        "weights",
        "MB/tok",
        "prefill/s",
        "decode/s",
        KS.iter().map(|k| format!("k={k:<5}")).collect::<Vec<_>>().join(" ")
    );
    for name in &names {
        let path = models::resolve(Some(name))?;
        for mode in &args.modes {
            let weight_dtype = match mode.as_str() {
                "f32" | "quantized" => WeightDtype::F32,
                "bf16" => WeightDtype::Bf16,
                other => anyhow::bail!("unknown mode `{other}` (f32, bf16, quantized)"),
            };
            let opts = args.cache.apply(LoadOptions {
                keep_quantized: mode == "quantized",
                weight_dtype,
                ..Default::default()
            });
            let loaded = load_model(&path, &opts)?;
            let row = bench_model(&loaded.model, &loaded.name, mode, &args)?;
            print_row(
                &row.model,
                &row.mode,
                row.weight_mb_per_token,
                row.prefill_tok_s,
                row.decode_tok_s,
                &row.k_cost_ratio,
            );
            drop(loaded);
            if args.peer {
                let peer = run_peer(&path, mode, &args)?;
                print_row(
                    "  llama.cpp (same file, same run)",
                    mode,
                    row.weight_mb_per_token,
                    peer.prefill_tok_s,
                    peer.decode_tok_s,
                    &peer.k_cost_ratio,
                );
                println!(
                    "{:<34} {:<9} {:>8} {:>9.2}x {:>8.2}x",
                    "  tandem / llama.cpp",
                    mode,
                    "",
                    row.prefill_tok_s / peer.prefill_tok_s,
                    row.decode_tok_s / peer.decode_tok_s
                );
                peers.push(serde_json::json!({
                    "model": row.model,
                    "mode": mode,
                    "peer": peer,
                    "decode_ratio": row.decode_tok_s / peer.decode_tok_s,
                    "prefill_ratio": row.prefill_tok_s / peer.prefill_tok_s,
                }));
            }
            rows.push(row);
        }
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "machine": machine_description(),
        "threads": rayon_threads(),
        "kv_dtype": kv.name(),
        "depth": args.depth,
        "rows": rows,
        "llama_cpp": peers,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    Ok(())
}

fn print_row(model: &str, mode: &str, mb: f64, prefill: f64, decode: f64, ratios: &[(usize, f64)]) {
    println!(
        "{:<34} {:<9} {:>8.0} {:>10.1} {:>9.1}  {}",
        model,
        mode,
        mb,
        prefill,
        decode,
        ratios.iter().map(|(_, r)| format!("{r:<7.2}")).collect::<Vec<_>>().join(" ")
    );
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} threads", rayon_threads())
}
