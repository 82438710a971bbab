//! `tandem bench prefix`: the paged KV cache on the traffic it is for, each workload run with
//! the prefix cache off and on in the same command (same model, same requests, greedy):
//! - system: requests sharing a long system prompt with different short questions; the first
//!   alone, then the rest at once;
//! - agents: several agents work on one long document (the shared system prompt); each takes
//!   several turns, resending its whole conversation plus a new question every turn;
//! - rl: groups of samples of one prompt (temperature 1, seeded), submitted together as a GRPO
//!   step asks for them;
//! - capacity: more requests than a KV budget could hold at full length, served from blocks
//!   (as many run as their tokens fit) against the same budget cut into fixed slots of
//!   max_seq_len (what the cache reserved per sequence before it was paged).
//!
//! Reports prompt tokens sent and computed, seconds, time to first token and output tok/s;
//! table on stdout, JSON file.
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};
use tandem_cli::{load_model, models, DtypeArg};
use tandem_engine::{Engine, EngineConfig, EngineHandle, Event, Fcfs, GenerationRequest};
use tandem_models::{Device, LoadedModel};
use tandem_runtime::SamplingParams;

#[derive(clap::Args)]
pub struct PrefixBenchArgs {
    /// Model: a path or `smollm2` / `qwen-coder`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Agents sharing the document.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Turns per agent.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Tokens of the shared document (the system prompt).
    #[arg(long, default_value_t = 1500)]
    system_tokens: usize,
    /// System workload: requests, and tokens of each one's question.
    #[arg(long, default_value_t = 32)]
    questions: usize,
    #[arg(long, default_value_t = 50)]
    question_tokens: usize,
    /// RL: prompts per step.
    #[arg(long, default_value_t = 4)]
    groups: usize,
    /// RL: samples per prompt.
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    /// Tokens generated per request (end of sequence is ignored).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Capacity: requests submitted at once, tokens each one generates, and the KV budget in
    /// tokens they share.
    #[arg(long, default_value_t = 32)]
    capacity_requests: usize,
    #[arg(long, default_value_t = 200)]
    capacity_output: usize,
    #[arg(long, default_value_t = 8192)]
    capacity_tokens: usize,
    /// Which workloads to run.
    #[arg(long, value_delimiter = ',', default_value = "system,agents,rl,capacity")]
    workloads: Vec<String>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[arg(long, default_value = "bench-results/prefix.json")]
    out: String,
}

#[derive(Serialize)]
struct Row {
    workload: &'static str,
    config: String,
    requests: usize,
    prompt_tokens: usize,
    /// Prompt tokens computed (sent minus those found cached).
    computed_tokens: usize,
    output_tokens: usize,
    seconds: f64,
    output_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_p90_ms: f64,
    /// Most requests running at once.
    most_running: usize,
}

/// One finished request.
struct Served {
    ttft: Duration,
    output: Vec<u32>,
}

/// A workload: submits its requests through the handle and returns each one's prompt length
/// with what it got.
type Workload<'a> = dyn Fn(&EngineHandle) -> Result<Vec<(usize, Served)>> + Sync + 'a;

/// A workload's run on one engine.
struct Measured {
    served: Vec<(usize, Served)>,
    seconds: f64,
    /// Prompt tokens found cached.
    hits: u64,
    /// Most requests running at once.
    most: usize,
}

/// The workloads' token ids, from the online benchmark's offline prompt stream.
struct Texts {
    /// The shared document (the agents' system prompt).
    document: Vec<u32>,
    /// Questions the agents ask, one per turn.
    questions: Vec<Vec<u32>>,
    /// Chat-templated math problems: the RL prompts.
    problems: Vec<Vec<u32>>,
}

/// Submits `request` and waits for all of it.
fn serve(handle: &EngineHandle, request: GenerationRequest) -> Result<Served> {
    let start = Instant::now();
    let mut rx = handle.submit(request).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut ttft, mut output) = (None, Vec::new());
    loop {
        match rx.blocking_recv().context("the engine stopped")? {
            Event::Token(t) => {
                ttft.get_or_insert_with(|| start.elapsed());
                output.push(t.id);
            }
            Event::Finished { .. } => break,
            Event::Failed(m) => bail!("a request failed: {m}"),
            Event::Scored(_) => {}
        }
    }
    Ok(Served { ttft: ttft.context("no token")?, output })
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling,
        stop_token_ids: Vec::new(),
        client: None,
        agent: None,
        weights: None,
        score: None,
    }
}

/// Runs `work` on a fresh engine with `config`.
fn measure(loaded: &LoadedModel, config: EngineConfig, work: &Workload) -> Result<Measured> {
    let (engine, handle) = Engine::new(loaded.model.clone(), config, Box::new(Fcfs::default()))?;
    let thread = engine.spawn();
    let start = Instant::now();
    let (served, most) = std::thread::scope(|s| {
        let job = s.spawn(|| work(&handle));
        let mut most = 0;
        while !job.is_finished() {
            most = most.max(handle.running());
            std::thread::sleep(Duration::from_millis(5));
        }
        (job.join().expect("the workload thread"), most)
    });
    let seconds = start.elapsed().as_secs_f64();
    let hits = handle.kv_usage().prefix_hits;
    handle.shutdown();
    let _ = thread.join();
    Ok(Measured { served: served?, seconds, hits, most })
}

fn row(workload: &'static str, config: String, m: Measured) -> Row {
    let Measured { served, seconds, hits, most } = m;
    let prompt_tokens: usize = served.iter().map(|s| s.0).sum();
    let output_tokens: usize = served.iter().map(|s| s.1.output.len()).sum();
    let mut ttft: Vec<f64> = served.iter().map(|s| s.1.ttft.as_secs_f64() * 1e3).collect();
    Row {
        workload,
        config,
        requests: served.len(),
        prompt_tokens,
        computed_tokens: prompt_tokens - hits as usize,
        output_tokens,
        seconds,
        output_tok_s: output_tokens as f64 / seconds,
        ttft_p50_ms: crate::bench_serve::percentile(&mut ttft, 0.5),
        ttft_p90_ms: crate::bench_serve::percentile(&mut ttft, 0.9),
        most_running: most,
    }
}

fn texts(loaded: &LoadedModel, system_tokens: usize) -> Result<Texts> {
    let stream = crate::workload::stream(40, 40, 40, crate::workload::STREAM_SEED)?;
    let encode = |t: &str| -> Result<Vec<u32>> {
        Ok(loaded.tokenizer.encode(t, false).map_err(anyhow::Error::msg)?.get_ids().to_vec())
    };
    let mut document = Vec::new();
    for p in stream.iter().filter(|p| p.domain == "code") {
        document.extend(encode(&p.text)?);
        if document.len() >= system_tokens {
            break;
        }
    }
    document.truncate(system_tokens);
    let chat: Vec<_> = stream.iter().filter(|p| p.domain == "chat").cloned().collect();
    let questions =
        chat.iter().map(|p| encode(&format!("\n\nQuestion: {}\nAnswer:", p.text))).collect::<Result<_>>()?;
    let math: Vec<_> = stream.iter().filter(|p| p.domain == "math").cloned().collect();
    Ok(Texts { document, questions, problems: crate::workload::chat_ids(loaded, &math)? })
}

pub fn run(args: PrefixBenchArgs) -> Result<()> {
    let path = models::resolve(Some(&args.model))?;
    let loaded = load_model(&path, &args.dtype.load_options(Device::Cpu))?;
    let Texts { document, questions, problems: rl_prompts } = texts(&loaded, args.system_tokens)?;
    let greedy = SamplingParams::default();
    let base = EngineConfig { max_batch: 8, max_seq_len: 4096, spec_k: 0, ..Default::default() };
    let agents = |h: &EngineHandle| -> Result<Vec<(usize, Served)>> {
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..args.agents)
                .map(|a| {
                    let (document, questions, greedy) = (&document, &questions, &greedy);
                    s.spawn(move || -> Result<Vec<(usize, Served)>> {
                        let mut conversation = document.clone();
                        let mut out = Vec::new();
                        for t in 0..args.turns {
                            conversation.extend(&questions[(a * args.turns + t) % questions.len()]);
                            let served = serve(h, request(conversation.clone(), args.max_tokens, greedy.clone()))?;
                            conversation.extend(&served.output);
                            out.push((conversation.len() - served.output.len(), served));
                        }
                        Ok(out)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for j in jobs {
                all.extend(j.join().expect("an agent thread")?);
            }
            Ok(all)
        })
    };
    let system = |h: &EngineHandle| -> Result<Vec<(usize, Served)>> {
        let prompt = |i: usize| -> Vec<u32> {
            let asked = questions[i % questions.len()].iter().chain(&questions[(i + 1) % questions.len()]);
            document.iter().chain(asked.take(args.question_tokens)).copied().collect()
        };
        let first = prompt(0);
        let mut all = vec![(first.len(), serve(h, request(first, args.max_tokens, greedy.clone()))?)];
        std::thread::scope(|s| {
            let jobs: Vec<_> = (1..args.questions)
                .map(|i| {
                    let p = prompt(i);
                    let r = request(p.clone(), args.max_tokens, greedy.clone());
                    s.spawn(move || serve(h, r).map(|served| (p.len(), served)))
                })
                .collect();
            for j in jobs {
                all.push(j.join().expect("a request thread")?);
            }
            Ok(all)
        })
    };
    let rl = |h: &EngineHandle| -> Result<Vec<(usize, Served)>> {
        std::thread::scope(|s| {
            let mut jobs = Vec::new();
            for g in 0..args.groups {
                for i in 0..args.group_size {
                    let prompt = rl_prompts[g % rl_prompts.len()].clone();
                    let sampling =
                        SamplingParams { temperature: 1.0, seed: Some((g * 1000 + i) as u64), ..greedy.clone() };
                    let r = request(prompt.clone(), args.max_tokens, sampling);
                    jobs.push(s.spawn(move || serve(h, r).map(|served| (prompt.len(), served))));
                }
            }
            jobs.into_iter().map(|j| j.join().expect("a sample thread")).collect()
        })
    };
    let mut rows = Vec::new();
    println!(
        "{:<9} {:<22} {:>5} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>5}",
        "workload", "config", "reqs", "prompt", "computed", "seconds", "out tok/s", "ttft p50", "ttft p90", "most"
    );
    let print = |r: &Row| {
        println!(
            "{:<9} {:<22} {:>5} {:>8} {:>9} {:>8.1} {:>9.1} {:>7.0}ms {:>7.0}ms {:>5}",
            r.workload,
            r.config,
            r.requests,
            r.prompt_tokens,
            r.computed_tokens,
            r.seconds,
            r.output_tok_s,
            r.ttft_p50_ms,
            r.ttft_p90_ms,
            r.most_running
        )
    };
    let workloads: [(&'static str, &Workload); 3] = [("system", &system), ("agents", &agents), ("rl", &rl)];
    for (name, work) in workloads.into_iter().filter(|(n, _)| args.workloads.iter().any(|w| w == n)) {
        for prefix_cache in [false, true] {
            let config = EngineConfig { prefix_cache, ..base.clone() };
            let label = format!("prefix cache {}", if prefix_cache { "on" } else { "off" });
            let r = row(name, label, measure(&loaded, config, work)?);
            print(&r);
            rows.push(r);
        }
    }
    // Capacity: requests of ~100 prompt tokens and `capacity_output` more under one budget.
    let capacity = |h: &EngineHandle| -> Result<Vec<(usize, Served)>> {
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..args.capacity_requests)
                .map(|i| {
                    let prompt = rl_prompts[i % rl_prompts.len()].clone();
                    let r = request(prompt.clone(), args.capacity_output, greedy.clone());
                    s.spawn(move || serve(h, r).map(|served| (prompt.len(), served)))
                })
                .collect();
            jobs.into_iter().map(|j| j.join().expect("a request thread")).collect()
        })
    };
    let max_seq_len = EngineConfig::default().max_seq_len;
    let slots = (args.capacity_tokens / max_seq_len).max(1);
    let capacity_runs = if args.workloads.iter().any(|w| w == "capacity") { 2 } else { 0 };
    for (label, max_batch) in
        [(format!("{slots} slots x {max_seq_len}"), slots), ("paged".to_string(), args.capacity_requests)]
            .into_iter()
            .take(capacity_runs)
    {
        let kv_tokens = Some(args.capacity_tokens);
        let config = EngineConfig { max_batch, max_seq_len, kv_tokens, prefix_cache: false, ..base.clone() };
        let r = row("capacity", label, measure(&loaded, config, &capacity)?);
        print(&r);
        rows.push(r);
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({ "model": loaded.name, "rows": rows });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    Ok(())
}
