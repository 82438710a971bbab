//! `tandem bench spec`: decode speed with and without speculation on code prompts, through the
//! serving engine (one sequence), for the n-gram drafter and the oracle drafter (which proposes the
//! target's own greedy continuation: the upper bound for each k). Two prompts: "edit" (rewrite a
//! given module, so the output mostly copies the prompt) and "write" (new code). Every speculative
//! output is checked to equal plain greedy decoding. Optionally llama.cpp, plain and with its
//! prompt-lookup drafting, on the same file and prompt tokens in the same run.
use anyhow::{ensure, Result};
use serde::Serialize;
use std::time::Instant;
use tandem_cli::{load_model, models, DtypeArg};
use tandem_engine::{Engine, EngineConfig, Event, Fcfs, GenerationRequest};
use tandem_models::{Device, LoadedModel, Model};
use tandem_runtime::speculative::{Drafter, NgramDrafter, OracleDrafter};
use tandem_runtime::{ChatTemplate, Message, SamplingParams};

const EDIT_MODULE: &str = include_str!("bench_prompts/inventory.py");
const PEER_SCRIPT: &str = include_str!("../../../scripts/peer_llamacpp_spec.py");
const PEER_BASE: &str = include_str!("../../../scripts/peer_llamacpp.py");

#[derive(clap::Args)]
pub struct SpecBenchArgs {
    /// Models: paths or `smollm2` / `qwen-coder` (default: both).
    #[arg(long)]
    model: Vec<String>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// Tokens generated per run (greedy; the model may stop earlier at end of turn).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Draft lengths for the oracle drafter.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    oracle_k: Vec<usize>,
    /// Draft lengths for the n-gram drafter.
    #[arg(long, value_delimiter = ',', default_value = "4,8,12")]
    ngram_k: Vec<usize>,
    /// Also run llama.cpp (llama-cpp-python, 2 threads) plain and with prompt lookup.
    #[arg(long)]
    peer: bool,
    #[arg(long, default_value = "bench-results/spec.json")]
    out: String,
}

#[derive(Serialize, Clone)]
struct Row {
    model: String,
    prompt: String,
    drafter: String,
    k: usize,
    tokens: usize,
    decode_tok_s: f64,
    speedup: f64,
    /// Tokens per target forward.
    acceptance_length: f64,
    /// Output equals plain greedy decoding.
    identical: bool,
}

pub(crate) struct Run {
    pub tokens: Vec<u32>,
    pub decode_tok_s: f64,
    pub acceptance_length: f64,
}

fn prompts(loaded: &LoadedModel) -> Result<Vec<(&'static str, Vec<u32>)>> {
    let template =
        ChatTemplate::new(loaded.chat_template.as_deref(), loaded.bos_token.as_deref(), loaded.eos_token.as_deref())
            .map_err(anyhow::Error::msg)?;
    let edit = format!(
        "Rewrite this Python module with type hints on every function and method. Output only the code.\n\n```python\n{EDIT_MODULE}```"
    );
    let write = "Write a Python module implementing an LRU cache class with get, put and a capacity, \
                 then unittest tests for it. Output only the code."
        .to_string();
    let mut out = Vec::new();
    for (kind, text) in [("edit", edit), ("write", write)] {
        let rendered = template.render(&[Message::new("user", &text)], true).map_err(anyhow::Error::msg)?;
        let ids = loaded.tokenizer.encode(rendered.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        out.push((kind, ids));
    }
    Ok(out)
}

/// Generates from `prompt` on a one-slot engine (greedily, unless `sampling` says otherwise);
/// returns the model for the next run.
pub(crate) fn run_once(
    model: Model,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    drafter: Option<(Box<dyn Drafter>, usize)>,
    adaptive: bool,
    sampling: SamplingParams,
) -> Result<(Run, Model)> {
    let spec_k = drafter.as_ref().map_or(0, |d| d.1);
    let config = EngineConfig {
        max_batch: 1,
        max_seq_len: prompt.len() + max_tokens + 16,
        step_token_budget: 512,
        max_waiting: 1,
        spec_k,
        spec_adaptive: adaptive,
        spec_alternatives: 0,
        swap_bytes: None,
        kv_tokens: None,
        // Each configuration prefills the same prompts: measured, not cached.
        prefix_cache: false,
    };
    let (mut engine, handle) = Engine::new(model, config, Box::new(Fcfs::default()))?;
    if let Some((d, _)) = drafter {
        engine = engine.with_drafter(d)?;
    }
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        max_tokens,
        sampling,
        stop_token_ids: stop.to_vec(),
        client: None,
        agent: None,
        weights: None,
        score: None,
    };
    let mut rx = handle.submit(request)?;
    let mut tokens = Vec::new();
    let mut first = None;
    let mut spec = None;
    let done = loop {
        engine.step();
        let mut finished = false;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token(t) => {
                    first.get_or_insert_with(Instant::now);
                    tokens.push(t.id);
                }
                Event::Finished { usage, .. } => {
                    spec = usage.speculation;
                    finished = true;
                }
                Event::Failed(m) => anyhow::bail!("generation failed: {m}"),
                Event::Scored(_) => {}
            }
        }
        if finished {
            break Instant::now();
        }
    };
    let secs = first.map_or(0.0, |f| (done - f).as_secs_f64());
    let run = Run {
        decode_tok_s: tokens.len().saturating_sub(1) as f64 / secs.max(1e-9),
        acceptance_length: spec.map_or(1.0, |s| s.acceptance_length(tokens.len())),
        tokens,
    };
    Ok((run, engine.into_model()))
}

#[derive(serde::Deserialize, Serialize, Clone)]
pub(crate) struct PeerRow {
    prompt: String,
    mode: String,
    k: usize,
    pub tokens: usize,
    pub decode_tok_s: f64,
}

/// llama.cpp on `prompts` (name, token ids): plain, and with prompt lookup at each of `ks`
/// (comma-separated; "none" for plain only), on the weights tandem ran (`dtype`: the file as it
/// is, or an F32 / BF16 GGUF made from it).
pub(crate) fn run_peer(
    path: &std::path::Path,
    dtype: DtypeArg,
    prompts: &[(&str, Vec<u32>)],
    max_tokens: usize,
    ks: &str,
) -> Result<Vec<PeerRow>> {
    let dir = std::env::temp_dir().join("tandem-peer-spec");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("peer_llamacpp.py"), PEER_BASE)?;
    std::fs::write(dir.join("peer_llamacpp_spec.py"), PEER_SCRIPT)?;
    let input: serde_json::Map<String, serde_json::Value> =
        prompts.iter().map(|(k, ids)| (k.to_string(), serde_json::json!(ids))).collect();
    let mut child = std::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(dir.join("peer_llamacpp_spec.py"))
        .arg(path)
        .args(match dtype {
            DtypeArg::Auto => vec![],
            other => vec!["--dtype", other.name()],
        })
        .args(["--max-tokens", &max_tokens.to_string(), "--k", ks])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().expect("piped").write_all(serde_json::to_string(&input)?.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the llama.cpp peer failed (pip install llama-cpp-python==0.3.36)");
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn run(args: SpecBenchArgs) -> Result<()> {
    let names =
        if args.model.is_empty() { vec!["smollm2".to_string(), "qwen-coder".to_string()] } else { args.model.clone() };
    let mut rows: Vec<Row> = Vec::new();
    let mut peers = Vec::new();
    println!(
        "{:<36} {:<6} {:<8} {:>2} {:>6} {:>9} {:>8} {:>10} {:>9}",
        "model", "prompt", "drafter", "k", "tokens", "tok/s", "speedup", "tok/fwd", "identical"
    );
    for name in &names {
        let path = models::resolve(Some(name))?;
        let loaded = load_model(&path, &args.dtype.load_options(Device::Cpu))?;
        let model_name = format!("{} {}", loaded.name, args.dtype.name());
        let prompts = prompts(&loaded)?;
        let stop = loaded.stop_token_ids.clone();
        let vocab = loaded.model.config.vocab_size;
        let mut model = loaded.model;
        // Warm-up: thread pools and page cache.
        (_, model) = run_once(model, &prompts[0].1[..32], 4, &stop, None, false, SamplingParams::default())?;
        for (kind, prompt) in &prompts {
            let (plain, m) = run_once(model, prompt, args.max_tokens, &stop, None, false, SamplingParams::default())?;
            model = m;
            let mut print = |drafter: &str, k: usize, r: &Run| {
                let row = Row {
                    model: model_name.clone(),
                    prompt: kind.to_string(),
                    drafter: drafter.into(),
                    k,
                    tokens: r.tokens.len(),
                    decode_tok_s: r.decode_tok_s,
                    speedup: r.decode_tok_s / plain.decode_tok_s,
                    acceptance_length: r.acceptance_length,
                    identical: r.tokens == plain.tokens,
                };
                println!(
                    "{:<36} {:<6} {:<8} {:>2} {:>6} {:>9.1} {:>7.2}x {:>10.2} {:>9}",
                    row.model,
                    row.prompt,
                    row.drafter,
                    row.k,
                    row.tokens,
                    row.decode_tok_s,
                    row.speedup,
                    row.acceptance_length,
                    if row.identical { "yes" } else { "NO" }
                );
                rows.push(row);
            };
            print("none", 0, &plain);
            let sequence: Vec<u32> = prompt.iter().chain(&plain.tokens).copied().collect();
            for &k in &args.ngram_k {
                // n-gram drafts adapt their length (the default when serving); the oracle keeps k
                // fixed, since it is the upper bound for each k.
                let ngram: Box<dyn Drafter> = Box::new(NgramDrafter::default());
                let (r, m) =
                    run_once(model, prompt, args.max_tokens, &stop, Some((ngram, k)), true, SamplingParams::default())?;
                model = m;
                print("ngram", k, &r);
            }
            for &k in &args.oracle_k {
                let oracle = OracleDrafter::new(vec![sequence.clone()], vocab);
                let greedy = SamplingParams::default();
                let (r, m) =
                    run_once(model, prompt, args.max_tokens, &stop, Some((Box::new(oracle), k)), false, greedy)?;
                model = m;
                print("oracle", k, &r);
            }
        }
        if args.peer {
            for p in run_peer(&path, args.dtype, &prompts, args.max_tokens, "4,10")? {
                println!(
                    "{:<36} {:<6} {:<8} {:>2} {:>6} {:>9.1}",
                    format!("llama.cpp {}", model_name),
                    p.prompt,
                    if p.mode == "plain" { "none" } else { "lookup" },
                    p.k,
                    p.tokens,
                    p.decode_tok_s
                );
                peers.push(serde_json::json!({"model": model_name, "row": p}));
            }
        }
    }
    let all_identical = rows.iter().all(|r| r.identical);
    let json = serde_json::json!({
        "machine": crate::machine_description(),
        "max_tokens": args.max_tokens,
        "rows": rows,
        "llama_cpp": peers,
    });
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    ensure!(all_identical, "a speculative output differed from plain greedy decoding");
    Ok(())
}
