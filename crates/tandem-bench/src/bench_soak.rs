//! `tandem bench soak`: `tandem serve` (EAGLE drafter trained online, training API on) under mixed
//! traffic for a long time — streaming chat from many clients, some hanging up mid-stream, and an
//! RL loop through the Tinker API — reporting per window the requests served, errors by kind,
//! latency percentiles and the server's resident memory (table, JSON, PNG). Nothing may be lost and
//! memory must stay flat after warm-up.
use crate::bench_serve::percentile;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Clone)]
pub struct SoakBenchArgs {
    /// A .gguf file, an HF model folder, or `smollm2` / `qwen-coder` (default: smollm2).
    #[arg(long)]
    model: Option<String>,
    /// Minutes of traffic.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Minutes per reported window.
    #[arg(long, default_value_t = 5.0)]
    window_minutes: f64,
    /// Streaming chat clients, each sending one request after another.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Share of chat requests whose client hangs up mid-stream.
    #[arg(long, default_value_t = 0.25)]
    disconnect_share: f64,
    #[arg(long, default_value = "bench-results/soak.json")]
    out: String,
}

/// What one finished request (or RL step) left behind.
#[derive(Clone, Serialize)]
struct Event {
    /// Seconds since the traffic started.
    at: f64,
    kind: &'static str,
    seconds: f64,
    /// None when it succeeded (a deliberate hang-up counts as success).
    error: Option<String>,
}

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    /// (seconds, resident bytes) of the server.
    rss: Vec<(f64, u64)>,
}

type Shared = Arc<Mutex<Log>>;

#[derive(Serialize)]
struct Window {
    start_min: f64,
    chat_served: usize,
    chat_hung_up: usize,
    chat_p50_ms: f64,
    chat_p99_ms: f64,
    rl_steps: usize,
    rl_step_p50_s: f64,
    errors: BTreeMap<String, usize>,
    rss_mb: f64,
}

/// Opens a connection and sends one HTTP/1.1 request (the server closes after answering).
async fn send(port: u16, method: &str, path: &str, body: &str) -> Result<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    Ok(s)
}

/// A raw HTTP/1.1 exchange: status and body.
pub(crate) async fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Vec<u8>)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = send(port, method, path, &body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let status = std::str::from_utf8(out.get(9..12).unwrap_or_default()).ok().and_then(|s| s.parse().ok());
    let Some(status) = status else { bail!("not an HTTP response") };
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
    Ok((status, out[at..].to_vec()))
}

/// POST a JSON body; a non-200 answer is an error named by its status.
pub(crate) async fn post(port: u16, path: &str, body: Value) -> Result<Value> {
    let (status, data) = http(port, "POST", path, Some(&body)).await?;
    if status != 200 {
        bail!("http {status} on {path}: {}", String::from_utf8_lossy(&data[..data.len().min(200)]));
    }
    Ok(serde_json::from_slice(&data)?)
}

/// Submits a Tinker request and waits for its future.
async fn tinker(port: u16, path: &str, body: Value) -> Result<Value> {
    let id = post(port, path, body).await?["request_id"].as_str().context("no request_id")?.to_string();
    loop {
        let out = post(port, "/api/v1/retrieve_future", json!({"request_id": id})).await?;
        if out["type"] == "try_again" {
            continue;
        }
        if let Some(e) = out.get("error") {
            bail!("training request failed: {e}");
        }
        return Ok(out);
    }
}

/// One streamed chat request; hangs up after `hang_up` content events when given.
async fn chat(port: u16, model: &str, i: u64, max_tokens: usize, hang_up: Option<usize>) -> Result<()> {
    let topics = ["a lighthouse", "sorting a list in Rust", "the moon's phases", "a recipe for bread", "prime numbers"];
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Tell me about {} (note {i}).", topics[i as usize % topics.len()])}],
        "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": true,
    })
    .to_string();
    let mut s = send(port, "POST", "/v1/chat/completions", &body).await?;
    let (mut buf, mut chunk) = (Vec::new(), [0u8; 16384]);
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let events = buf.windows(6).filter(|w| w == b"data: ").count();
        if hang_up.is_some_and(|h| events >= h) {
            return Ok(()); // dropping the socket hangs up
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("http {}", String::from_utf8_lossy(buf.get(9..12).unwrap_or_default()));
    }
    if !buf.windows(12).any(|w| w == b"data: [DONE]") {
        bail!("stream ended without [DONE]");
    }
    Ok(())
}

/// The error's kind for the report: its first words (a status or an I/O error), not its details.
fn kind_of(e: &anyhow::Error) -> String {
    e.to_string().split(':').next().unwrap_or("error").chars().take(60).collect()
}

fn record(log: &Shared, started: Instant, kind: &'static str, began: Instant, result: Result<()>) {
    let event = Event {
        at: started.elapsed().as_secs_f64(),
        kind,
        seconds: began.elapsed().as_secs_f64(),
        error: result.err().map(|e| kind_of(&e)),
    };
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).events.push(event);
}

/// A chat client: requests until the deadline; `hang` marks those it hangs up on.
async fn chat_client(port: u16, model: String, client: u64, args: SoakBenchArgs, log: Shared, started: Instant) {
    let deadline = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(client);
    let mut i = client * 1_000_000;
    while Instant::now() < deadline {
        i += 1;
        let max_tokens = rng.random_range(16..=128);
        let hang = rng.random::<f64>() < args.disconnect_share;
        let hang_up = hang.then(|| rng.random_range(2..=12));
        let began = Instant::now();
        let result = chat(port, &model, i, max_tokens, hang_up).await;
        record(&log, started, if hang { "chat-hung-up" } else { "chat" }, began, result);
    }
}

/// One RL step on the Tinker API: sample 4 continuations from the current weights, reward the
/// share of low token ids, and take an importance-sampling step on the group's advantages.
async fn rl_step(port: u16, model_id: &str, seq: &mut i64, vocab: u32, step: u64) -> Result<()> {
    let mut next = || {
        *seq += 1;
        *seq
    };
    let sampler = tinker(port, "/api/v1/save_weights_for_sampler", json!({"model_id": model_id, "seq_id": next()}))
        .await?["sampling_session_id"]
        .as_str()
        .context("no sampling_session_id")?
        .to_string();
    let prompt: Vec<u32> = (0..8).map(|j| 10 + (step as u32 * 7 + j * 3) % 200).collect();
    let sample = json!({"sampling_session_id": sampler, "prompt": {"input_ids": prompt}, "num_samples": 4,
                        "sampling_params": {"max_tokens": 16, "temperature": 1.0, "seed": step}});
    let out = tinker(port, "/api/v1/asample", sample).await?;
    let seqs = out["sequences"].as_array().context("no sequences")?;
    let rewards: Vec<f64> = seqs
        .iter()
        .map(|s| {
            let t = s["tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
            t.iter().filter(|x| x.as_u64().is_some_and(|x| x < vocab as u64 / 4)).count() as f64 / t.len().max(1) as f64
        })
        .collect();
    let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    let data: Vec<Value> = seqs
        .iter()
        .zip(&rewards)
        .map(|(s, r)| {
            let sampled: Vec<u64> = s["tokens"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            let lps: Vec<f64> =
                s["logprobs"].as_array().into_iter().flatten().map(|x| x.as_f64().unwrap_or(0.0)).collect();
            let all: Vec<u64> = prompt.iter().map(|&t| t as u64).chain(sampled.iter().copied()).collect();
            let n = all.len() - 1;
            let first = prompt.len() - 1; // the first target that is a sampled token
            let logprobs: Vec<f64> = (0..n).map(|i| if i >= first { lps[i - first] } else { 0.0 }).collect();
            let advantages: Vec<f64> = (0..n).map(|i| if i >= first { r - mean } else { 0.0 }).collect();
            json!({"model_input": {"input_ids": &all[..n]},
                   "loss_fn_inputs": {"target_tokens": &all[1..], "logprobs": logprobs, "advantages": advantages}})
        })
        .collect();
    let fb = json!({"model_id": model_id, "seq_id": next(), "forward_backward_input": {
        "data": data, "loss_fn": "importance_sampling", "loss_fn_params": {}}});
    tinker(port, "/api/v1/forward_backward", fb).await?;
    tinker(
        port,
        "/api/v1/optim_step",
        json!({"model_id": model_id, "seq_id": next(),
                                              "adam_params": {"learning_rate": 1e-4}}),
    )
    .await?;
    Ok(())
}

async fn rl_client(port: u16, base: String, vocab: u32, args: SoakBenchArgs, log: Shared, started: Instant) {
    let deadline = started + Duration::from_secs_f64(args.minutes * 60.0);
    let setup = async {
        let session = post(port, "/api/v1/create_session", json!({})).await?["session_id"]
            .as_str()
            .context("no session_id")?
            .to_string();
        let create = json!({"session_id": session, "model_seq_id": 0, "base_model": base, "lora_config": {"rank": 8}});
        let model = tinker(port, "/api/v1/create_model", create).await?["model_id"]
            .as_str()
            .context("no model_id")?
            .to_string();
        anyhow::Ok((session, model))
    };
    let began = Instant::now();
    let (session, model) = match setup.await {
        Ok(s) => s,
        Err(e) => return record(&log, started, "rl-step", began, Err(e)),
    };
    let (mut seq, mut step) = (0i64, 0u64);
    while Instant::now() < deadline {
        step += 1;
        let began = Instant::now();
        let beat = post(port, "/api/v1/session_heartbeat", json!({"session_id": session})).await.map(|_| ());
        let result = match beat {
            Ok(()) => rl_step(port, &model, &mut seq, vocab, step).await,
            Err(e) => Err(e),
        };
        record(&log, started, "rl-step", began, result);
    }
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|k| k * 1024)
}

/// The server, started as its own process (what an operator runs), stopped on drop.
pub(crate) struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && self.0.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem serve` on `model` at `port` with its training directory under `dir` and `flags`; returns
/// once /health answers.
pub(crate) fn start_server(
    model: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
    flags: &[String],
) -> Result<Server> {
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--port", &port.to_string()])
        .args(flags)
        .arg("--training-dir")
        .arg(dir.join("training"))
        .arg("--model")
        .arg(model)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting tandem serve")?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(180);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    while runtime.block_on(http(port, "GET", "/health", None)).map(|r| r.0).ok() != Some(200) {
        if Instant::now() > deadline {
            bail!("the server did not come up");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(server)
}

fn windows(log: &Log, args: &SoakBenchArgs) -> Vec<Window> {
    let width = args.window_minutes * 60.0;
    let count = (args.minutes * 60.0 / width).ceil().max(1.0) as usize;
    (0..count)
        .map(|w| {
            let (from, to) = (w as f64 * width, (w + 1) as f64 * width);
            let here: Vec<&Event> =
                log.events.iter().filter(|e| e.at >= from && (e.at < to || w + 1 == count)).collect();
            let ok = |kind: &'static str| here.iter().filter(move |e| e.kind == kind && e.error.is_none());
            let mut chat_ms: Vec<f64> = ok("chat").map(|e| e.seconds * 1e3).collect();
            let mut rl_s: Vec<f64> = ok("rl-step").map(|e| e.seconds).collect();
            let mut errors = BTreeMap::new();
            for e in &here {
                if let Some(k) = &e.error {
                    *errors.entry(format!("{}: {k}", e.kind)).or_insert(0) += 1;
                }
            }
            let rss = log.rss.iter().rfind(|r| r.0 < to).map_or(0.0, |r| r.1 as f64 / 1e6);
            Window {
                start_min: from / 60.0,
                chat_served: chat_ms.len(),
                chat_hung_up: ok("chat-hung-up").count(),
                chat_p50_ms: percentile(&mut chat_ms, 0.5),
                chat_p99_ms: percentile(&mut chat_ms, 0.99),
                rl_steps: rl_s.len(),
                rl_step_p50_s: percentile(&mut rl_s, 0.5),
                errors,
                rss_mb: rss,
            }
        })
        .collect()
}

pub fn run(args: SoakBenchArgs) -> Result<()> {
    let path = tandem_cli::models::resolve(args.model.as_deref())?;
    let dir = std::env::temp_dir().join(format!("tandem-soak-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let flags = ["--max-batch", &args.concurrency.max(1).to_string(), "--spec", "eagle", "--spec-train", "online"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--drafter-save".to_string(), dir.join("drafter").display().to_string()])
        .collect::<Vec<_>>();
    let server = start_server(&path, port, &dir, &flags)?;
    let pid = server.0.id();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let log: Shared = Arc::default();
    let (model, base) = runtime.block_on(async {
        let models: Value = serde_json::from_slice(&http(port, "GET", "/v1/models", None).await?.1)?;
        let caps: Value = serde_json::from_slice(&http(port, "GET", "/api/v1/get_server_capabilities", None).await?.1)?;
        let name = models["data"][0]["id"].as_str().context("no model")?.to_string();
        let base = caps["supported_models"][0]["model_name"].as_str().unwrap_or(&name).to_string();
        anyhow::Ok((name, base))
    })?;
    // The RL reward needs the vocabulary size: read from the file's configuration.
    let vocab = tandem_models::load(&path, &tandem_models::LoadOptions::default(), &mut |_, _| {})
        .map(|l| l.model.config.vocab_size as u32)
        .unwrap_or(32_000);
    eprintln!(
        "soak: {} for {} min: {} chat clients ({:.0}% hang up), an RL loop, the online drafter; server pid {pid}",
        model,
        args.minutes,
        args.concurrency,
        args.disconnect_share * 100.0
    );
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..args.concurrency as u64 {
            tasks.push(tokio::spawn(chat_client(port, model.clone(), c, args.clone(), log.clone(), started)));
        }
        tasks.push(tokio::spawn(rl_client(port, base.clone(), vocab, args.clone(), log.clone(), started)));
        let sampler_log = log.clone();
        let minutes = args.minutes;
        tasks.push(tokio::spawn(async move {
            while started.elapsed().as_secs_f64() < minutes * 60.0 {
                if let Some(b) = rss_bytes(pid) {
                    sampler_log
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .rss
                        .push((started.elapsed().as_secs_f64(), b));
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }));
        for t in tasks {
            let _ = t.await;
        }
    });
    let metrics = runtime
        .block_on(http(port, "GET", "/metrics", None))
        .map(|r| String::from_utf8_lossy(&r.1).to_string())
        .unwrap_or_default();
    let drafter_version = metrics
        .lines()
        .find(|l| l.starts_with("tandem_drafter_version "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    drop(server);
    let log = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    report(&log, &args, &model, &drafter_version)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn report(log: &Log, args: &SoakBenchArgs, model: &str, drafter_version: &str) -> Result<()> {
    let rows = windows(log, args);
    println!(
        "{:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8} errors",
        "window", "chat ok", "hung up", "p50 ms", "p99 ms", "RL steps", "RL p50 s", "RSS MB"
    );
    for w in &rows {
        let errors: Vec<String> = w.errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        println!(
            "{:>7.1}'  {:>8} {:>8} {:>9.0} {:>9.0} {:>8} {:>9.2} {:>8.0} {}",
            w.start_min,
            w.chat_served,
            w.chat_hung_up,
            w.chat_p50_ms,
            w.chat_p99_ms,
            w.rl_steps,
            w.rl_step_p50_s,
            w.rss_mb,
            if errors.is_empty() { "none".to_string() } else { errors.join(", ") }
        );
    }
    let errors: usize = rows.iter().map(|w| w.errors.values().sum::<usize>()).sum();
    let (first, last) = (rows.first().map_or(0.0, |w| w.rss_mb), rows.last().map_or(0.0, |w| w.rss_mb));
    println!(
        "{} requests and RL steps, {errors} errors; RSS after the first window {first:.0} MB, at the end {last:.0} MB \
         ({:+.1}%); drafter version {drafter_version}",
        log.events.len(),
        (last / first.max(1.0) - 1.0) * 100.0
    );
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = json!({"model": model, "minutes": args.minutes, "concurrency": args.concurrency,
                     "disconnect_share": args.disconnect_share, "machine": crate::machine_description(),
                     "drafter_version": drafter_version, "windows": rows, "rss": log.rss, "events": log.events.len()});
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)?;
    let png = args.out.trim_end_matches(".json").to_string() + ".png";
    let minutes = |s: f64| s / 60.0;
    let rss: Vec<(f64, f64)> = log.rss.iter().map(|&(t, b)| (minutes(t), b as f64 / 1e6)).collect();
    let p50: Vec<(f64, f64)> = rows.iter().map(|w| (w.start_min, w.chat_p50_ms)).filter(|p| p.1.is_finite()).collect();
    let p99: Vec<(f64, f64)> = rows.iter().map(|w| (w.start_min, w.chat_p99_ms)).filter(|p| p.1.is_finite()).collect();
    let served: Vec<(f64, f64)> = rows.iter().map(|w| (w.start_min, w.chat_served as f64)).collect();
    crate::plot::line_grid(
        &png,
        &[
            ("server RSS".into(), "minutes".into(), "MB".into(), vec![("RSS".into(), rss)]),
            (
                "chat latency per window".into(),
                "minutes".into(),
                "ms".into(),
                vec![("p50".into(), p50), ("p99".into(), p99)],
            ),
            (
                "chat requests served per window".into(),
                "minutes".into(),
                "requests".into(),
                vec![("served".into(), served)],
            ),
        ],
    )?;
    println!("wrote {} and {png}", args.out);
    Ok(())
}
