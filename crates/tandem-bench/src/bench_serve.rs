//! `tandem bench serve`: starts the server in-process on a free port and drives it over real HTTP
//! with streaming chat requests at several concurrencies; reports output tok/s and time-to-first-
//! token / inter-token latency percentiles (table + JSON).
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};
use tandem_cli::{load_model, models, DtypeArg};
use tandem_engine::EngineConfig;
use tandem_models::Device;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Clone)]
pub struct ServeBenchArgs {
    /// Models: paths or `smollm2` / `qwen-coder` (default: both).
    #[arg(long)]
    model: Vec<String>,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Tokens generated per request (end-of-sequence is ignored so every request is this long).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[arg(long, default_value = "bench-results/serve.json")]
    out: String,
}

#[derive(Serialize)]
struct Row {
    model: String,
    concurrency: usize,
    requests: usize,
    output_tokens: usize,
    seconds: f64,
    output_tok_s: f64,
    ttft_p50_ms: f64,
    ttft_p90_ms: f64,
    ttft_p99_ms: f64,
    itl_p50_ms: f64,
    itl_p90_ms: f64,
    itl_p99_ms: f64,
}

struct Timing {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One streamed chat request over a raw HTTP/1.1 connection; records when each chunk arrives.
async fn one_request(port: u16, model: &str, i: usize, max_tokens: usize) -> Result<Timing> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Write a short story about a robot named Unit {i}.")}],
        "max_tokens": max_tokens, "temperature": 0, "stream": true, "ignore_eos": true,
    })
    .to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let start = Instant::now();
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut seen = 0; // bytes already scanned for events
    let mut arrivals = Vec::new();
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        // Each content delta is one event carrying `"content":"` with text.
        const NEEDLE: &[u8] = b"\"delta\":{\"content\":\"";
        while let Some(pos) = find(&buf[seen..], NEEDLE) {
            let at = seen + pos;
            if buf.get(at + NEEDLE.len()) != Some(&b'"') {
                arrivals.push(now);
            }
            seen = at + 1;
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("request failed: {}", String::from_utf8_lossy(&buf[..buf.len().min(300)]));
    }
    let Some(&first) = arrivals.first() else { bail!("no tokens streamed") };
    let gaps = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Timing { ttft: first - start, gaps, tokens: arrivals.len() })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let names =
        if args.model.is_empty() { vec!["smollm2".to_string(), "qwen-coder".to_string()] } else { args.model.clone() };
    let mut rows = Vec::new();
    println!(
        "{:<34} {:>4} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "model", "conc", "tok/s", "x c=1", "ttft p50", "ttft p90", "ttft p99", "itl p50", "itl p90", "itl p99"
    );
    for name in &names {
        let path = models::resolve(Some(name))?;
        let opts = args.dtype.load_options(Device::Cpu);
        let loaded = load_model(&path, &opts)?;
        let model_name = loaded.name.clone();
        let max_batch = args.concurrency.iter().copied().max().unwrap_or(1);
        let config = EngineConfig { max_batch, max_seq_len: 512 + args.max_tokens, ..Default::default() };
        let (state, engine_thread) =
            tandem_server::AppState::start(loaded, config, Box::new(tandem_engine::Fcfs::default()), None, None)
                .map_err(anyhow::Error::msg)?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let mut single = None;
        runtime.block_on(async {
            let server = InProcess::start(state).await?;
            let port = server.port;
            one_request(port, &model_name, 0, 4).await.context("warm-up request")?;
            for &c in &args.concurrency {
                let start = Instant::now();
                let clients: Vec<_> = (0..c)
                    .map(|client| {
                        let model_name = model_name.clone();
                        let (per, max_tokens) = (args.requests_per_client, args.max_tokens);
                        tokio::spawn(async move {
                            let mut out = Vec::new();
                            for r in 0..per {
                                out.push(one_request(port, &model_name, client * 100 + r, max_tokens).await?);
                            }
                            anyhow::Ok(out)
                        })
                    })
                    .collect();
                let mut timings = Vec::new();
                for c in clients {
                    timings.extend(c.await??);
                }
                let seconds = start.elapsed().as_secs_f64();
                let output_tokens: usize = timings.iter().map(|t| t.tokens).sum();
                let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
                let mut itl: Vec<f64> =
                    timings.iter().flat_map(|t| t.gaps.iter().map(|g| g.as_secs_f64() * 1e3)).collect();
                let row = Row {
                    model: model_name.clone(),
                    concurrency: c,
                    requests: timings.len(),
                    output_tokens,
                    seconds,
                    output_tok_s: output_tokens as f64 / seconds,
                    ttft_p50_ms: percentile(&mut ttft, 0.5),
                    ttft_p90_ms: percentile(&mut ttft, 0.9),
                    ttft_p99_ms: percentile(&mut ttft, 0.99),
                    itl_p50_ms: percentile(&mut itl, 0.5),
                    itl_p90_ms: percentile(&mut itl, 0.9),
                    itl_p99_ms: percentile(&mut itl, 0.99),
                };
                if c == 1 {
                    single = Some(row.output_tok_s);
                }
                println!(
                    "{:<34} {:>4} {:>9.1} {:>7.2}x {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>6.0}ms {:>6.0}ms {:>6.0}ms",
                    row.model,
                    c,
                    row.output_tok_s,
                    single.map(|s| row.output_tok_s / s).unwrap_or(f64::NAN),
                    row.ttft_p50_ms,
                    row.ttft_p90_ms,
                    row.ttft_p99_ms,
                    row.itl_p50_ms,
                    row.itl_p90_ms,
                    row.itl_p99_ms
                );
                rows.push(row);
            }
            server.stop().await?;
            anyhow::Ok(())
        })?;
        let _ = engine_thread.join();
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&serde_json::json!({ "rows": rows }))?)?;
    println!("wrote {}", args.out);
    Ok(())
}

/// `tandem_server::serve` over one model on a free local port, in the current tokio runtime.
pub(crate) struct InProcess {
    pub port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    pub async fn start(state: std::sync::Arc<tandem_server::AppState>) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tandem_server::serve(
            listener,
            tandem_server::Server::one(state),
            tandem_server::ServerOptions::default(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(InProcess { port, stop, task })
    }

    /// Stops accepting, lets running requests finish, and shuts the model's engine down.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}
