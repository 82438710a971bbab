//! `tandem bench fair`: the VTC paper's workloads against an in-process `tandem serve` (real HTTP,
//! streaming completions, clients named by X-Tandem-Client), once with FCFS and once with the fair
//! policy. Reports per-client service, p50 / p99 latency, Jain's fairness index and total
//! throughput (table + JSON), and plots cumulative service per client over time (PNG).
use crate::bench_serve::percentile;
use anyhow::{bail, Result};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_cli::{load_model, models};
use tandem_engine::{EngineConfig, FairConfig, Fcfs, SchedulingPolicy, VirtualTokenCounter};
use tandem_models::LoadOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Clone)]
pub struct FairBenchArgs {
    /// Model path or `smollm2` / `qwen-coder`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Seconds each workload runs under each policy.
    #[arg(long, default_value_t = 40)]
    duration: u64,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',', default_value = "overload,on-off,heavy-light,shift")]
    workloads: Vec<String>,
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Tokens per engine step (decodes first, prompt chunks fill the rest); smaller keeps the
    /// decode steps of short requests quick while long prompts are read.
    #[arg(long, default_value_t = 16)]
    step_token_budget: usize,
    /// The fair policy's preemption margin (weighted tokens; 0: preempt only for clients with
    /// nothing running).
    #[arg(long, default_value_t = FairConfig::default().preempt_margin.unwrap_or(0.0))]
    preempt_margin: f64,
    #[arg(long, default_value = "bench-results/fair.json")]
    out: String,
}

/// One client's traffic: `streams` closed-loop streams, each sending a request, waiting for it, then
/// pausing `think` before the next; active only while `active(t)` holds.
#[derive(Clone)]
struct ClientLoad {
    name: &'static str,
    streams: usize,
    prompt_words: usize,
    max_tokens: Arc<dyn Fn(f64) -> usize + Send + Sync>,
    think: Duration,
    active: Arc<dyn Fn(f64) -> bool + Send + Sync>,
}

fn steady(name: &'static str, streams: usize, prompt_words: usize, max_tokens: usize) -> ClientLoad {
    ClientLoad {
        name,
        streams,
        prompt_words,
        max_tokens: Arc::new(move |_| max_tokens),
        think: Duration::ZERO,
        active: Arc::new(|_| true),
    }
}

fn workload(name: &str, duration: f64) -> Result<Vec<ClientLoad>> {
    Ok(match name {
        // Both clients send more than the engine can serve; "a" with three times the streams.
        "overload" => vec![steady("a", 12, 48, 64), steady("b", 4, 48, 64)],
        // "a" is always backlogged; "b" sends bursts, on for 5 s, off for 5 s.
        "on-off" => vec![
            steady("a", 12, 48, 64),
            ClientLoad { active: Arc::new(|t| ((t / 5.0) as u64).is_multiple_of(2)), ..steady("b", 8, 48, 64) },
        ],
        // A heavy client floods long requests; a light one sends short ones, one at a time.
        "heavy-light" => vec![
            steady("heavy", 16, 200, 128),
            ClientLoad { think: Duration::from_millis(500), ..steady("light", 1, 16, 16) },
        ],
        // "a" switches from short to long outputs halfway; "b" stays medium.
        "shift" => {
            let half = duration / 2.0;
            vec![
                ClientLoad { max_tokens: Arc::new(move |t| if t < half { 16 } else { 128 }), ..steady("a", 10, 48, 0) },
                steady("b", 10, 48, 64),
            ]
        }
        other => bail!("unknown workload `{other}` (overload, on-off, heavy-light, shift)"),
    })
}

/// What one request did, in seconds since the run started.
#[derive(Debug, Clone, Serialize)]
struct Record {
    client: &'static str,
    start: f64,
    end: f64,
    prompt_tokens: usize,
    /// Arrival time of each output token.
    token_times: Vec<f64>,
}

async fn one_request(port: u16, client: &'static str, prompt: &str, max_tokens: usize, t0: Instant) -> Result<Record> {
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "ignore_eos": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-Tandem-Client: {client}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let start = t0.elapsed().as_secs_f64();
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut seen = 0;
    let mut token_times = Vec::new();
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let now = t0.elapsed().as_secs_f64();
        buf.extend_from_slice(&chunk[..n]);
        const NEEDLE: &[u8] = b"\"finish_reason\":null";
        while let Some(pos) = buf[seen..].windows(NEEDLE.len()).position(|w| w == NEEDLE) {
            token_times.push(now);
            seen += pos + 1;
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("request failed: {}", String::from_utf8_lossy(&buf[..buf.len().min(300)]));
    }
    let text = String::from_utf8_lossy(&buf);
    let prompt_tokens = text
        .rfind("\"prompt_tokens\":")
        .and_then(|i| text[i + 16..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0);
    Ok(Record { client, start, end: t0.elapsed().as_secs_f64(), prompt_tokens, token_times })
}

fn prompt_text(words: usize, salt: usize) -> String {
    const WORDS: &[&str] =
        &["river", "stone", "lamp", "garden", "cloud", "engine", "paper", "window", "forest", "violin"];
    (0..words).map(|i| WORDS[(i * 7 + salt * 3) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

async fn drive(port: u16, loads: Vec<ClientLoad>, duration: f64) -> Vec<Record> {
    let t0 = Instant::now();
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for load in loads {
        for stream in 0..load.streams {
            let load = load.clone();
            let records = records.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while t0.elapsed().as_secs_f64() < duration {
                    let t = t0.elapsed().as_secs_f64();
                    if !(load.active)(t) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let prompt = prompt_text(load.prompt_words, stream * 1000 + n);
                    n += 1;
                    match one_request(port, load.name, &prompt, (load.max_tokens)(t), t0).await {
                        Ok(r) => records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(r),
                        Err(e) => eprintln!("{}: {e}", load.name),
                    }
                    if !load.think.is_zero() {
                        tokio::time::sleep(load.think).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let r = records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    r
}

#[derive(Serialize, Clone)]
struct ClientRow {
    client: String,
    requests: usize,
    /// Weighted service (1 per prompt token, 2 per output token) received during the run's window.
    service: f64,
    output_tokens: usize,
    latency_p50_s: f64,
    latency_p99_s: f64,
}

#[derive(Serialize, Clone)]
struct RunRow {
    workload: String,
    policy: String,
    clients: Vec<ClientRow>,
    jain_index: f64,
    output_tok_s: f64,
    /// Prompt plus output tokens processed per second: the engine's work rate, whatever the mix of
    /// short and long requests a policy ends up serving.
    total_tok_s: f64,
    /// Largest gap in cumulative weighted service between two clients during the run.
    max_service_gap: f64,
    /// Cumulative weighted service per client, sampled every 0.5 s.
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Service events (time, client, weighted amount): the prompt at its first token, then 2 per token.
/// Only service inside the measured window counts (requests still running at its end finish, but
/// their late tokens are not counted).
fn service_events(records: &[Record], duration: f64) -> Vec<(f64, &'static str, f64)> {
    let mut ev = Vec::new();
    for r in records {
        if let Some(&first) = r.token_times.first().filter(|&&t| t <= duration) {
            ev.push((first, r.client, r.prompt_tokens as f64));
        }
        ev.extend(r.token_times.iter().filter(|&&t| t <= duration).map(|&t| (t, r.client, 2.0)));
    }
    ev.sort_by(|a, b| a.0.total_cmp(&b.0));
    ev
}

fn summarize(workload: &str, policy: &str, records: &[Record], duration: f64) -> RunRow {
    let mut names: Vec<&'static str> = records.iter().map(|r| r.client).collect();
    names.sort();
    names.dedup();
    let events = service_events(records, duration);
    let mut totals = vec![0.0; names.len()];
    let mut max_gap: f64 = 0.0;
    let mut series: Vec<Vec<(f64, f64)>> = vec![vec![(0.0, 0.0)]; names.len()];
    let mut next_sample = 0.5;
    for (t, c, amount) in &events {
        while *t > next_sample {
            for (i, s) in series.iter_mut().enumerate() {
                s.push((next_sample, totals[i]));
            }
            next_sample += 0.5;
        }
        let i = names.iter().position(|n| n == c).expect("known client");
        totals[i] += amount;
        // The gap counts while both clients were active (the VTC measure); all are here.
        let hi = totals.iter().copied().fold(f64::MIN, f64::max);
        let lo = totals.iter().copied().fold(f64::MAX, f64::min);
        if *t > 2.0 {
            max_gap = max_gap.max(hi - lo);
        }
    }
    let clients: Vec<ClientRow> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mine: Vec<&Record> = records.iter().filter(|r| r.client == *n).collect();
            let mut latencies: Vec<f64> = mine.iter().map(|r| r.end - r.start).collect();
            ClientRow {
                client: n.to_string(),
                requests: mine.len(),
                service: totals[i],
                output_tokens: mine.iter().map(|r| r.token_times.iter().filter(|&&t| t <= duration).count()).sum(),
                latency_p50_s: percentile(&mut latencies.clone(), 0.5),
                latency_p99_s: percentile(&mut latencies, 0.99),
            }
        })
        .collect();
    let x: Vec<f64> = clients.iter().map(|c| c.service).collect();
    let jain = x.iter().sum::<f64>().powi(2) / (x.len() as f64 * x.iter().map(|v| v * v).sum::<f64>()).max(1e-9);
    let output: usize = clients.iter().map(|c| c.output_tokens).sum();
    let prompt: f64 = events.iter().filter(|e| e.2 != 2.0).map(|e| e.2).sum();
    RunRow {
        workload: workload.into(),
        policy: policy.into(),
        clients,
        jain_index: jain,
        output_tok_s: output as f64 / duration,
        total_tok_s: (output as f64 + prompt) / duration,
        max_service_gap: max_gap,
        series: names.iter().map(|n| n.to_string()).zip(series).collect(),
    }
}

fn start_server(
    loaded: tandem_models::LoadedModel,
    policy: Box<dyn SchedulingPolicy>,
    args: &FairBenchArgs,
    runtime: &tokio::runtime::Runtime,
) -> Result<(u16, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)> {
    let config = EngineConfig {
        max_batch: args.max_batch,
        step_token_budget: args.step_token_budget,
        max_seq_len: 1024,
        max_waiting: 4096,
        ..Default::default()
    };
    let (state, engine_thread) =
        tandem_server::AppState::start(loaded, config, policy, None, None).map_err(anyhow::Error::msg)?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let _ = tandem_server::serve(
            listener,
            tandem_server::Server::one(state),
            tandem_server::ServerOptions::default(),
            async move {
                let _ = stop_rx.await;
            },
        )
        .await;
    });
    Ok((port, stop_tx, engine_thread))
}

pub fn run(args: FairBenchArgs) -> Result<()> {
    let path = models::resolve(Some(&args.model))?;
    let opts = LoadOptions::default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let duration = args.duration as f64;
    let mut runs = Vec::new();
    let mut alone_light_p99 = None;
    println!(
        "{:<12} {:<6} {:<8} {:>5} {:>9} {:>8} {:>8} {:>8} {:>6} {:>8} {:>9}",
        "workload", "policy", "client", "reqs", "service", "out tok", "p50 s", "p99 s", "jain", "tok/s", "max gap"
    );
    for w in &args.workloads {
        let loads = workload(w, duration)?;
        if w == "heavy-light" {
            // The light client alone, for its baseline latency.
            let light: Vec<ClientLoad> = loads.iter().filter(|l| l.name == "light").cloned().collect();
            let loaded = load_model(&path, &opts)?;
            let (port, stop, thread) = start_server(loaded, Box::new(Fcfs::default()), &args, &runtime)?;
            let records = runtime.block_on(drive(port, light, duration.min(20.0)));
            let _ = stop.send(());
            let _ = thread.join();
            let row = summarize(w, "alone", &records, duration.min(20.0));
            alone_light_p99 = Some(row.clients[0].latency_p99_s);
            print_run(&row);
            runs.push(row);
        }
        for policy_name in ["fcfs", "fair"] {
            let policy: Box<dyn SchedulingPolicy> = if policy_name == "fcfs" {
                Box::new(Fcfs::default())
            } else {
                Box::new(VirtualTokenCounter::new(FairConfig {
                    preempt_margin: Some(args.preempt_margin),
                    ..Default::default()
                }))
            };
            let loaded = load_model(&path, &opts)?;
            let (port, stop, thread) = start_server(loaded, policy, &args, &runtime)?;
            let records = runtime.block_on(drive(port, loads.clone(), duration));
            let _ = stop.send(());
            let _ = thread.join();
            let row = summarize(w, policy_name, &records, duration);
            print_run(&row);
            runs.push(row);
        }
    }
    let mut verdicts = Vec::new();
    if let Some(alone) = alone_light_p99 {
        for p in ["fcfs", "fair"] {
            if let Some(r) = runs.iter().find(|r| r.workload == "heavy-light" && r.policy == p) {
                if let Some(l) = r.clients.iter().find(|c| c.client == "light") {
                    let ratio = l.latency_p99_s / alone;
                    println!(
                        "heavy-light, {p}: light client's p99 is {ratio:.2}x its p99 alone (target <= 1.5x for fair)"
                    );
                    verdicts.push(serde_json::json!({"policy": p, "light_p99_vs_alone": ratio}));
                }
            }
        }
    }
    for w in &args.workloads {
        let run = |p: &str| runs.iter().find(|r| &r.workload == w && r.policy == p);
        if let (Some(f), Some(c)) = (run("fair"), run("fcfs")) {
            println!(
                "{w}: fair / FCFS throughput: {:.3}x output tokens, {:.3}x all tokens (prompt + output)",
                f.output_tok_s / c.output_tok_s,
                f.total_tok_s / c.total_tok_s
            );
        }
    }
    let json = serde_json::json!({
        "machine": crate::machine_description(),
        "model": args.model, "duration_s": duration, "max_batch": args.max_batch,
        "step_token_budget": args.step_token_budget, "preempt_margin": args.preempt_margin,
        "runs": runs, "light_latency": verdicts,
    });
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    let png = args.out.trim_end_matches(".json").to_string() + ".png";
    match crate::plot::service_grid(
        &png,
        &runs
            .iter()
            .filter(|r| r.policy != "alone")
            .map(|r| (format!("{} / {}", r.workload, r.policy), r.series.clone()))
            .collect::<Vec<_>>(),
    ) {
        Ok(()) => println!("wrote {png}"),
        Err(e) => eprintln!("no plot: {e}"),
    }
    Ok(())
}

fn print_run(r: &RunRow) {
    for (i, c) in r.clients.iter().enumerate() {
        let (jain, tps, gap) = if i == 0 {
            (format!("{:.3}", r.jain_index), format!("{:.1}", r.output_tok_s), format!("{:.0}", r.max_service_gap))
        } else {
            (String::new(), String::new(), String::new())
        };
        println!(
            "{:<12} {:<6} {:<8} {:>5} {:>9.0} {:>8} {:>8.2} {:>8.2} {:>6} {:>8} {:>9}",
            r.workload,
            r.policy,
            c.client,
            c.requests,
            c.service,
            c.output_tokens,
            c.latency_p50_s,
            c.latency_p99_s,
            jain,
            tps,
            gap
        );
    }
}
