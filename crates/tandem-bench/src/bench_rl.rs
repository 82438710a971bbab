//! `tandem bench rl`: the GRPO example (`examples/rl_grpo.py`, the Tinker SDK) run against `tandem
//! serve` once per serving configuration, with the same seed: rollouts without speculation, and
//! with the EAGLE drafter trained online on those very rollouts from a warm start. Per RL step:
//! rollout tokens/s, acceptance length, chosen draft length, drafter version, training time and
//! reward; table, JSON and PNG. Sampling is lossless, so the reward curves differ only by the
//! sampler's random draws (the seeds are the same, the batching is not).
//!
//! With `--serving-client MS`, a chat client beside the RL loop (its own client in the fair
//! policy) sends a short request, waits for the answer and pauses MS ms, over and over: its
//! latency alone (before the loop starts) and beside the loop says what the loop's sampling and
//! training cost everyone else. `+uncharged` runs the same with training charged nothing.
use crate::bench_soak::{http, post, start_server};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct RlBenchArgs {
    /// A .gguf file, an HF model folder, or `smollm2` / `qwen-coder` (default: smollm2).
    #[arg(long)]
    model: Option<String>,
    /// Serving configurations, in order: `none` (no speculation), `ngram`, `online` (EAGLE +
    /// prompt lookup, trained online from a warm start), `day0:DIR` (the same from a saved
    /// drafter); `+idle` after an online one trains only while serving is idle; `+uncharged`:
    /// the fair policy charges training nothing (`--fair-train-weight 0`), the comparison for
    /// `--serving-client`.
    #[arg(long, value_delimiter = ',', default_value = "none,online")]
    configs: Vec<String>,
    /// The example's task (`count`: 40-80-token rollouts; `addition`: 3 tokens).
    #[arg(long, default_value = "count")]
    task: String,
    /// RL steps per run.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    problems: usize,
    /// Samples per problem (the GRPO group).
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps before the speed-up is judged (the drafter's warm-up).
    #[arg(long, default_value_t = 10)]
    after: usize,
    /// The example script (run from the repository root).
    #[arg(long, default_value = "examples/rl_grpo.py")]
    script: PathBuf,
    /// A chat client beside the RL loop: one request (32 tokens) at a time, then this many ms of
    /// pause; its latency alone and beside the loop is reported (0: none).
    #[arg(long, default_value_t = 0)]
    serving_client: u64,
    #[arg(long, default_value = "bench-results/bench-rl.json")]
    out: String,
}

/// `tandem serve` flags of a configuration; `+idle` (e.g. `online+idle`): the drafter trains only
/// while serving is idle (its share of a core while serving near zero).
fn serve_flags(config: &str) -> Result<Vec<String>> {
    if let Some(base) = config.strip_suffix("+uncharged") {
        return Ok([serve_flags(base)?, vec!["--fair-train-weight".into(), "0".into()]].concat());
    }
    if let Some(base) = config.strip_suffix("+idle") {
        let idle = ["--train-cpu-share", "0.01", "--train-min-share", "0.01"].map(String::from);
        return Ok([serve_flags(base)?, idle.to_vec()].concat());
    }
    let online = ["--spec", "eagle", "--spec-train", "online"];
    let flags: Vec<&str> = match config.split_once(':') {
        None if config == "none" => vec!["--spec", "none"],
        None if config == "ngram" => vec!["--spec", "ngram"],
        None if config == "online" => online.to_vec(),
        Some(("day0", dir)) => {
            return Ok([&online[..], &["--drafter", dir]].concat().iter().map(|s| s.to_string()).collect())
        }
        _ => anyhow::bail!("unknown configuration `{config}` (none, ngram, online, day0:DIR)"),
    };
    Ok(flags.iter().map(|s| s.to_string()).collect())
}

/// One run of the example against a fresh server in `config`; returns its JSON summary.
fn run_config(args: &RlBenchArgs, model: &std::path::Path, config: &str, dir: &std::path::Path) -> Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut flags: Vec<String> = ["--max-batch", "16", "--step-token-budget", "256"].map(String::from).to_vec();
    flags.extend(serve_flags(config)?);
    let run_dir = dir.join(config.replace(['/', ':'], "_"));
    std::fs::create_dir_all(&run_dir)?;
    let _server = start_server(model, port, &run_dir, &flags)?;
    let pause = Duration::from_millis(args.serving_client);
    let alone = match args.serving_client {
        0 => None,
        _ => Some(ServingClient::start(port, pause)?.stop_after(Duration::from_secs(20))),
    };
    let beside = alone.as_ref().map(|_| ServingClient::start(port, pause)).transpose()?;
    let out = run_dir.join("rl");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    println!("== {config}: tandem serve --model {} {}", model.display(), flags.join(" "));
    let status = std::process::Command::new(&python)
        .arg(&args.script)
        .args(["--task", &args.task, "--steps", &args.steps.to_string(), "--minutes", "100000"])
        .args(["--problems", &args.problems.to_string(), "--group", &args.group.to_string()])
        .args(["--seed", &args.seed.to_string(), "--base-url", &format!("http://127.0.0.1:{port}")])
        .arg("--out")
        .arg(&out)
        .status()
        .with_context(|| format!("running {} (pip install tinker==0.38.0)", args.script.display()))?;
    anyhow::ensure!(status.success(), "{} failed under `{config}`", args.script.display());
    let text = std::fs::read_to_string(out.with_extension("json"))?;
    let mut run: Value = serde_json::from_str(&text)?;
    if let (Some(alone), Some(beside)) = (alone, beside) {
        run["serving_client"] = json!({"alone": alone.summary(), "beside_rl": beside.finish().summary()});
    }
    Ok(run)
}

/// A chat client that sends one short request at a time, pausing between them, and times each.
struct ServingClient {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<f64>>>,
}

impl ServingClient {
    fn start(port: u16, pause: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let models: Value = serde_json::from_slice(&http(port, "GET", "/v1/models", None).await?.1)?;
                let model = models["data"][0]["id"].as_str().context("no model")?.to_string();
                let mut latencies = Vec::new();
                for i in 0u64.. {
                    if halt.load(Ordering::SeqCst) {
                        break;
                    }
                    let body = json!({
                        "model": model, "max_tokens": 32, "temperature": 0.0,
                        "messages": [{"role": "user", "content": format!("Name a use of prime numbers ({i}).")}],
                    });
                    let started = Instant::now();
                    post(port, "/v1/chat/completions", body).await?;
                    latencies.push(started.elapsed().as_secs_f64());
                    tokio::time::sleep(pause).await;
                }
                Ok(latencies)
            })
        });
        Ok(ServingClient { stop, thread })
    }

    /// Runs for `d`, then stops; the request latencies (seconds).
    fn stop_after(self, d: Duration) -> Latencies {
        std::thread::sleep(d);
        self.finish()
    }

    fn finish(self) -> Latencies {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(Ok(l)) => Latencies(l),
            Ok(Err(e)) => {
                eprintln!("the serving client failed: {e:#}");
                Latencies(Vec::new())
            }
            Err(_) => Latencies(Vec::new()),
        }
    }
}

struct Latencies(Vec<f64>);

impl Latencies {
    fn summary(&self) -> Value {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
        json!({"requests": v.len(), "mean_s": mean(v.iter().copied()), "p50_s": at(0.5), "p95_s": at(0.95), "max_s": at(1.0)})
    }
}

fn steps(run: &Value) -> Vec<Value> {
    run["steps"].as_array().cloned().unwrap_or_default()
}

fn field(step: &Value, name: &str) -> f64 {
    step[name].as_f64().unwrap_or(f64::NAN)
}

/// The mean of the finite values (NaN when there are none).
fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    v.iter().sum::<f64>() / v.len() as f64
}

pub fn run(args: RlBenchArgs) -> Result<()> {
    let model = tandem_cli::models::resolve(args.model.as_deref())?;
    let dir = std::env::temp_dir().join(format!("tandem-bench-rl-{}", std::process::id()));
    let mut runs = Vec::new();
    for config in &args.configs {
        runs.push((config.clone(), run_config(&args, &model, config, &dir)?));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let base = steps(&runs[0].1);
    println!(
        "\nRL steps, task {} ({} problems x {} samples), seed {}",
        args.task, args.problems, args.group, args.seed
    );
    let mut header = format!("{:>4}", "step");
    for (c, _) in &runs {
        header += &format!(" | {c:>10} reward  tok/s  x{:<5} accept  k  ver train_s", runs[0].0);
    }
    println!("{header}");
    for (i, b) in base.iter().enumerate() {
        let mut line = format!("{i:>4}");
        for (_, run) in &runs {
            let Some(s) = run["steps"].get(i) else { continue };
            let ratio = field(s, "rollout_tok_s") / field(b, "rollout_tok_s");
            line += &format!(
                " | {:>17.3} {:>6.1} {:>6.2} {:>7.2} {:>2.0} {:>4.0} {:>7.1}",
                field(s, "reward"),
                field(s, "rollout_tok_s"),
                ratio,
                field(s, "acceptance"),
                field(s, "chosen_k"),
                field(s, "drafter_version"),
                field(s, "train_s")
            );
        }
        println!("{line}");
    }
    let mut summary = Vec::new();
    for (config, run) in &runs {
        let s = steps(run);
        let ratios: Vec<f64> =
            s.iter().zip(&base).map(|(x, b)| field(x, "rollout_tok_s") / field(b, "rollout_tok_s")).collect();
        let late = |v: &[f64]| mean(v.iter().skip(args.after).copied());
        let toks: Vec<f64> = s.iter().map(|x| field(x, "rollout_tok_s")).collect();
        let base_toks: Vec<f64> = base.iter().map(|x| field(x, "rollout_tok_s")).collect();
        let mut row = json!({
            "config": config,
            "rollout_tok_s_after": late(&toks),
            "ratio_after": late(&toks) / late(&base_toks),
            "min_step_ratio": ratios.iter().copied().fold(f64::INFINITY, f64::min),
            "acceptance_after": mean(s.iter().skip(args.after).map(|x| field(x, "acceptance"))),
            "reward_first_fifth": run["first_fifth_reward"],
            "reward_last_fifth": run["last_fifth_reward"],
            "train_s_mean": mean(s.iter().map(|x| field(x, "train_s"))),
        });
        println!(
            "{config:>10}: rollout {:.1} tok/s from step {} on ({:.2}x {}), lowest step {:.2}x, acceptance {:.2}, reward {:.3} -> {:.3}",
            row["rollout_tok_s_after"].as_f64().unwrap_or(0.0),
            args.after,
            row["ratio_after"].as_f64().unwrap_or(0.0),
            runs[0].0,
            row["min_step_ratio"].as_f64().unwrap_or(0.0),
            row["acceptance_after"].as_f64().unwrap_or(f64::NAN),
            row["reward_first_fifth"].as_f64().unwrap_or(0.0),
            row["reward_last_fifth"].as_f64().unwrap_or(0.0),
        );
        if let Some(c) = run.get("serving_client") {
            let f = |w: &str, k: &str| c[w][k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{config:>10}: serving client alone {} requests, p50 {:.2} s, p95 {:.2} s; beside the RL loop {} requests, p50 {:.2} s, p95 {:.2} s",
                c["alone"]["requests"], f("alone", "p50_s"), f("alone", "p95_s"),
                c["beside_rl"]["requests"], f("beside_rl", "p50_s"), f("beside_rl", "p95_s"),
            );
        }
        if let Some(c) = run.get("serving_client") {
            row["serving_client"] = c.clone();
        }
        summary.push(row);
    }
    if let Some(d) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(d)?;
    }
    let report = json!({
        "machine": crate::machine_description(),
        "model": model.display().to_string(),
        "task": args.task, "steps": args.steps, "problems": args.problems, "group": args.group, "seed": args.seed,
        "summary": summary,
        "runs": runs.iter().map(|(c, r)| json!({"config": c, "run": r})).collect::<Vec<_>>(),
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    let png = args.out.replace(".json", ".png");
    let series = |name: &str| -> crate::plot::Series {
        let points = |r: &Value| {
            steps(r).iter().map(|s| (field(s, "step"), field(s, name))).filter(|p| p.1.is_finite()).collect()
        };
        runs.iter().map(|(c, r)| (c.clone(), points(r))).collect()
    };
    let panels = vec![
        ("rollout tokens/s".to_string(), "RL step".to_string(), "tok/s".to_string(), series("rollout_tok_s")),
        ("reward".to_string(), "RL step".to_string(), "mean reward".to_string(), series("reward")),
        ("acceptance length".to_string(), "RL step".to_string(), "tokens per step".to_string(), series("acceptance")),
        ("training time".to_string(), "RL step".to_string(), "seconds".to_string(), series("train_s")),
    ];
    match crate::plot::line_grid(&png, &panels) {
        Ok(()) => println!("wrote {} and {png}", args.out),
        Err(e) => println!("wrote {} (no plot: {e})", args.out),
    }
    Ok(())
}
