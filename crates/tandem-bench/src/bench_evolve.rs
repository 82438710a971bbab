//! `tandem bench evolve`: where test-time evolution buys accuracy per token on an offline task
//! with exact answers (`tandem_evolve::task`, held-out seed), served in-process by tandem's own
//! engines through the same evolving-model code the server runs.
//!
//! Methods, every one reading answers with the same extractor:
//! - single sample: the mean accuracy of the majority run's samples (one sample's expected
//!   accuracy), at one sample's cost;
//! - majority vote of N x T independent samples of the expensive model (the same number of
//!   generations as an evolution);
//! - RSA on the expensive model alone (N, K, T), its candidates also scored by the cheap model
//!   to measure how well confidence separates groups; the scores do not change RSA's calls, so
//!   the same run is Squeeze Evolve at p = 100, whose cost adds the scoring;
//! - Squeeze Evolve at the other percentiles (expensive first round, later groups routed).
//!
//! Cost: tokens per model and a compute proxy, 2 x parameters x tokens computed (prompt tokens
//! not found in the KV cache plus generated ones), in expensive-model-token units so the models'
//! sizes count. Table on stdout, JSON and a PNG (accuracy against cost, accuracy per round).
use anyhow::{Context, Result};
use futures::StreamExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tandem_cli::{load_model, models, DtypeArg};
use tandem_engine::EngineConfig;
use tandem_evolve::task::{arithmetic, Problem, HELD_OUT_SEED};
use tandem_evolve::{Cost, EvolveConfig, Outcome, Route};
use tandem_server::evolve::Evolving;
use tandem_server::AppState;

#[derive(clap::Args)]
pub struct EvolveBenchArgs {
    /// The expensive tier (writes every first population).
    #[arg(long, default_value = "qwen-coder")]
    expensive: String,
    /// The cheap tier, which also scores confidence.
    #[arg(long, default_value = "smollm2")]
    cheap: String,
    /// Held-out problems, and operations per problem.
    #[arg(long, default_value_t = 24)]
    problems: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Population N, group size K, rounds T.
    #[arg(long, default_value_t = 8)]
    n: usize,
    #[arg(long, default_value_t = 4)]
    k: usize,
    #[arg(long, default_value_t = 3)]
    t: usize,
    /// Longest candidate, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Squeeze Evolve percentiles run besides RSA (= p 100).
    #[arg(long, value_delimiter = ',', default_value = "0,10,30")]
    percentiles: Vec<f64>,
    /// Problems evolved at once (their generations share the engines' batches).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only the scoring call against echo + logprobs (on one problem's samples), not the methods.
    #[arg(long)]
    scoring_only: bool,
    #[arg(long, default_value = "bench-results/evolve.json")]
    out: String,
}

/// One method's figures over the problem set.
#[derive(Serialize, Clone)]
struct Row {
    method: String,
    accuracy: f64,
    /// Per round t: the population's mean accuracy and its majority vote's accuracy.
    round_mean: Vec<f64>,
    round_majority: Vec<f64>,
    /// Mean per problem.
    tokens: BTreeMap<String, Cost>,
    compute: f64,
    seconds: f64,
    /// Groups sent to the expensive tier, of all later-round groups.
    expensive_share: Option<f64>,
    /// How well group confidence separates groups holding a right answer from those without.
    auc: Option<f64>,
}

pub fn run(args: EvolveBenchArgs) -> Result<()> {
    let opts = args.dtype.load_options(candle_core::Device::Cpu);
    let mut states = Vec::new();
    for name in [&args.expensive, &args.cheap] {
        let loaded = load_model(&models::resolve(Some(name))?, &opts)?;
        let flops = flops_per_token(&loaded.model.config);
        let config = EngineConfig { max_batch: args.max_batch, max_seq_len: 4096, ..Default::default() };
        let policy = Box::new(tandem_engine::Fcfs::default());
        let (state, _thread) = AppState::start(loaded, config, policy, None, None).map_err(anyhow::Error::msg)?;
        states.push((state, flops));
    }
    let (big, small) = (states[0].0.model_name.clone(), states[1].0.model_name.clone());
    let unit = states[0].1;
    let compute_of = |cost: &BTreeMap<String, Cost>| -> f64 {
        cost.iter()
            .map(|(m, c)| {
                let f = if m.starts_with(&small) { states[1].1 } else { states[0].1 };
                f / unit * (c.prompt_tokens - c.cached_tokens + c.completion_tokens) as f64
            })
            .sum()
    };
    let problems = arithmetic(HELD_OUT_SEED, if args.scoring_only { 1 } else { args.problems }, args.steps);
    let base = |tiers: Vec<&str>| EvolveConfig {
        n: args.n,
        k: args.k,
        t: args.t,
        tiers: tiers.into_iter().map(String::from).collect(),
        percentile: 100.0,
        vote_percentile: 0.0,
        scorer: None,
        confidence_top_k: 20,
        max_tokens: args.max_tokens,
        temperature: 1.0,
        answer: Default::default(),
        seed: None,
    };
    let mut runs: Vec<(String, EvolveConfig)> = Vec::new();
    runs.push(("majority".into(), EvolveConfig { n: args.n * args.t, t: 1, ..base(vec![&big]) }));
    if !args.scoring_only {
        runs.push(("rsa".into(), EvolveConfig { scorer: Some(small.clone()), ..base(vec![&big]) }));
    }
    for &p in args.percentiles.iter().filter(|_| !args.scoring_only) {
        runs.push((format!("squeeze p={p}"), EvolveConfig { percentile: p, ..base(vec![&big, &small]) }));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    let mut details = Vec::new();
    // The majority run's first candidates, for the scoring measurement.
    let mut details_texts: Vec<String> = Vec::new();
    println!(
        "evolve: {} held-out problems ({} steps), N={} K={} T={}, expensive {big}, cheap {small}",
        problems.len(),
        args.steps,
        args.n,
        args.k,
        args.t
    );
    for (name, config) in runs {
        config.validate().map_err(anyhow::Error::msg)?;
        let models = config.models().iter().map(|m| (m.to_string(), state_of(&states, m))).collect();
        let evolving = Arc::new(Evolving::new(name.clone(), config.clone(), models));
        let started = Instant::now();
        let outcomes = runtime.block_on(evolve_all(&evolving, &problems, args.concurrency, args.seed))?;
        let seconds = started.elapsed().as_secs_f64();
        if details_texts.is_empty() {
            details_texts = outcomes.first().map(|o| o.rounds[0].texts.clone()).unwrap_or_default();
        }
        let row = summarize(&name, &problems, &outcomes, &config, seconds, &compute_of);
        print_row(&row);
        if name == "rsa" {
            // The same calls are Squeeze Evolve at p = 100; its cost includes the scoring.
            let mut p100 = row.clone();
            p100.method = "squeeze p=100".into();
            p100.expensive_share = Some(1.0);
            rows.push(strip_scoring(row, &compute_of, &outcomes, problems.len()));
            print_row(rows.last().expect("pushed"));
            rows.push(p100);
        } else {
            rows.push(row);
        }
        details.push(serde_json::json!({"method": name, "outcomes": outcomes.iter().map(|o| serde_json::json!({
            "answer": o.answer, "votes": o.votes, "rounds": o.rounds, "cost": o.cost})).collect::<Vec<_>>()}));
    }
    let single = single_row(&rows[0], args.n * args.t);
    rows.insert(0, single);
    print_table(&rows);
    // Last: serving HTTP, then stopping, ends the cheap model's engine.
    let candidates = candidates_of(&details_texts, &problems);
    let scoring = runtime.block_on(scoring_cost(states[1].0.clone(), candidates))?;
    println!(
        "scoring {} candidates on {small}: /tandem/v1/score {:.3} s ({} bytes) vs echo + logprobs=20 {:.3} s ({} bytes): {:.1}x faster",
        scoring.candidates,
        scoring.score_secs,
        scoring.score_bytes,
        scoring.echo_secs,
        scoring.echo_bytes,
        scoring.echo_secs / scoring.score_secs.max(1e-9)
    );
    let json = serde_json::json!({
        "machine": crate::machine_description(),
        "expensive": big, "cheap": small, "problems": problems.len(), "steps": args.steps,
        "n": args.n, "k": args.k, "t": args.t, "max_tokens": args.max_tokens, "seed": args.seed,
        "rows": rows, "scoring": scoring, "details": details,
    });
    std::fs::create_dir_all(std::path::Path::new(&args.out).parent().unwrap_or(std::path::Path::new(".")))?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?).with_context(|| args.out.clone())?;
    let png = args.out.trim_end_matches(".json").to_string() + ".png";
    match plot(&png, &rows) {
        Ok(()) => println!("wrote {} and {png}", args.out),
        Err(e) => println!("wrote {} (no plot: {e})", args.out),
    }
    Ok(())
}

/// The first problem's question with up to 16 real candidates (the majority run's samples).
fn candidates_of(texts: &[String], problems: &[Problem]) -> (String, Vec<String>) {
    let q = problems.first().map(|p| p.question.clone()).unwrap_or_default();
    (q, texts.iter().filter(|t| !t.trim().is_empty()).take(16).cloned().collect())
}

/// The scoring call against what an OpenAI-API user does instead (`echo` with `logprobs: 20`
/// and `max_tokens: 0` per candidate, all at once), through HTTP on one model: median seconds
/// of three calls each, and response bytes.
#[derive(Serialize, Default)]
struct ScoringCost {
    candidates: usize,
    score_secs: f64,
    echo_secs: f64,
    score_bytes: usize,
    echo_bytes: usize,
}

async fn scoring_cost(state: Arc<AppState>, (question, candidates): (String, Vec<String>)) -> Result<ScoringCost> {
    use serde_json::json;
    let rendered =
        state.template.render(&[tandem_runtime::Message::new("user", &question)], true).map_err(anyhow::Error::msg)?;
    let model = state.model_name.clone();
    let server = crate::bench_serve::InProcess::start(state).await?;
    let port = server.port;
    let score_body = json!({"model": model, "messages": [{"role": "user", "content": question}],
                            "continuations": candidates, "top_k": 20});
    let mut out = ScoringCost { candidates: candidates.len(), ..Default::default() };
    let (mut score_times, mut echo_times) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let (status, data) = crate::bench_soak::http(port, "POST", "/tandem/v1/score", Some(&score_body)).await?;
        anyhow::ensure!(status == 200, "score: http {status}");
        score_times.push(t.elapsed().as_secs_f64());
        out.score_bytes = data.len();
        let t = Instant::now();
        let calls = candidates.iter().map(|c| {
            let body = json!({"model": model, "prompt": format!("{rendered}{c}"), "max_tokens": 0, "echo": true, "logprobs": 20});
            async move { crate::bench_soak::http(port, "POST", "/v1/completions", Some(&body)).await }
        });
        let answers = futures::future::join_all(calls).await;
        echo_times.push(t.elapsed().as_secs_f64());
        out.echo_bytes = 0;
        for a in answers {
            let (status, data) = a?;
            anyhow::ensure!(status == 200, "echo: http {status}");
            out.echo_bytes += data.len();
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (out.score_secs, out.echo_secs) = (median(score_times), median(echo_times));
    server.stop().await?;
    Ok(out)
}

fn state_of(states: &[(Arc<AppState>, f64)], name: &str) -> Arc<AppState> {
    states.iter().find(|s| s.0.model_name == name).map(|s| s.0.clone()).expect("a loaded model")
}

/// 2 x weights touched per token: every layer's projections and the output head.
fn flops_per_token(c: &tandem_models::ModelConfig) -> f64 {
    let (h, hd) = (c.hidden_size as f64, c.head_dim as f64);
    let attn = h * hd * (2.0 * c.num_heads as f64 + 2.0 * c.num_kv_heads as f64);
    let mlp = 3.0 * h * c.intermediate_size as f64;
    2.0 * (c.num_layers as f64 * (attn + mlp) + c.vocab_size as f64 * h)
}

async fn evolve_all(v: &Arc<Evolving>, problems: &[Problem], concurrency: usize, seed: u64) -> Result<Vec<Outcome>> {
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    bar.set_message(v.name.clone());
    let results: Vec<(usize, Result<Outcome, String>)> = futures::stream::iter(problems.iter().enumerate())
        .map(|(i, p)| {
            let (v, bar) = (v.clone(), bar.clone());
            async move {
                let backend = v.backend(Some("bench".into()), None);
                let out =
                    v.run(&backend, &p.question, seed.wrapping_mul(1000).wrapping_add(i as u64), &mut |_| {}).await;
                bar.inc(1);
                (i, out)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let mut sorted: Vec<_> = results.into_iter().collect();
    sorted.sort_by_key(|r| r.0);
    sorted.into_iter().map(|(i, r)| r.map_err(|e| anyhow::anyhow!("problem {i}: {e}"))).collect()
}

fn summarize(
    name: &str,
    problems: &[Problem],
    outcomes: &[Outcome],
    config: &EvolveConfig,
    seconds: f64,
    compute_of: &dyn Fn(&BTreeMap<String, Cost>) -> f64,
) -> Row {
    let count = problems.len().max(1) as f64;
    let right = |p: &Problem, a: &Option<String>| p.check_answer(a.as_deref()) as usize as f64;
    let accuracy = problems.iter().zip(outcomes).map(|(p, o)| right(p, &o.answer)).sum::<f64>() / count;
    let rounds = outcomes.first().map_or(0, |o| o.rounds.len());
    let round_mean = (0..rounds)
        .map(|t| {
            problems
                .iter()
                .zip(outcomes)
                .map(|(p, o)| {
                    let a = &o.rounds[t].answers;
                    a.iter().map(|x| right(p, x)).sum::<f64>() / a.len().max(1) as f64
                })
                .sum::<f64>()
                / count
        })
        .collect();
    let round_majority = (0..rounds)
        .map(|t| {
            let maj = |o: &Outcome| o.rounds[t].majority.as_ref().map(|m| m.0.clone());
            problems.iter().zip(outcomes).map(|(p, o)| right(p, &maj(o))).sum::<f64>() / count
        })
        .collect();
    let tokens = total_cost(outcomes, |_| true);
    let compute = compute_of(&tokens) / count;
    let per_problem = tokens.into_iter().map(|(m, c)| (m, scale(c, count))).collect();
    let groups: Vec<&tandem_evolve::Group> =
        outcomes.iter().flat_map(|o| o.rounds.iter().flat_map(|r| &r.groups)).collect();
    let expensive_share = (!groups.is_empty() && config.tiers.len() == 2)
        .then(|| groups.iter().filter(|g| g.route == Route::Tier(0)).count() as f64 / groups.len() as f64);
    Row {
        method: name.to_string(),
        accuracy,
        round_mean,
        round_majority,
        tokens: per_problem,
        compute,
        seconds,
        expensive_share,
        auc: auc(problems, outcomes),
    }
}

/// Every evolution's tokens per model (of the models `keep` accepts), summed.
fn total_cost(outcomes: &[Outcome], keep: impl Fn(&str) -> bool) -> BTreeMap<String, Cost> {
    let mut tokens: BTreeMap<String, Cost> = BTreeMap::new();
    for o in outcomes {
        for (m, c) in o.cost.iter().filter(|(m, _)| keep(m)) {
            *tokens.entry(m.clone()).or_default() += *c;
        }
    }
    tokens
}

fn scale(c: Cost, by: f64) -> Cost {
    let d = |x: usize| (x as f64 / by).round() as usize;
    Cost {
        calls: d(c.calls),
        prompt_tokens: d(c.prompt_tokens),
        cached_tokens: d(c.cached_tokens),
        completion_tokens: d(c.completion_tokens),
    }
}

/// RSA's own row: the same run without the scoring calls it made only to observe.
fn strip_scoring(
    mut row: Row,
    compute_of: &dyn Fn(&BTreeMap<String, Cost>) -> f64,
    outcomes: &[Outcome],
    count: usize,
) -> Row {
    row.tokens.retain(|m, _| !m.ends_with("(score)"));
    let tokens = total_cost(outcomes, |m| !m.ends_with("(score)"));
    row.compute = compute_of(&tokens) / count.max(1) as f64;
    row
}

/// One sample: the majority run's samples judged one by one, at one sample's cost.
fn single_row(majority: &Row, samples: usize) -> Row {
    let per = |c: &Cost| scale(*c, samples as f64);
    Row {
        method: "single sample".into(),
        accuracy: majority.round_mean.first().copied().unwrap_or(0.0),
        round_mean: majority.round_mean.clone(),
        round_majority: Vec::new(),
        tokens: majority.tokens.iter().map(|(m, c)| (m.clone(), per(c))).collect(),
        compute: majority.compute / samples as f64,
        seconds: majority.seconds / samples as f64,
        expensive_share: None,
        auc: None,
    }
}

/// Area under the ROC curve of group confidence for "the group holds a right answer" (the
/// probability that a random such group is more confident than a random group without one).
fn auc(problems: &[Problem], outcomes: &[Outcome]) -> Option<f64> {
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for (p, o) in problems.iter().zip(outcomes) {
        for w in o.rounds.windows(2) {
            for g in &w[1].groups {
                let Some(f) = g.fitness else { continue };
                let holds = g.members.iter().any(|&m| p.check_answer(w[0].answers[m].as_deref()));
                if holds {
                    pos.push(f)
                } else {
                    neg.push(f)
                }
            }
        }
    }
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for a in &pos {
        for b in &neg {
            wins += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (pos.len() * neg.len()) as f64)
}

fn print_row(r: &Row) {
    eprintln!("  {:<16} accuracy {:.3}  compute {:>9.0}  {:.0} s", r.method, r.accuracy, r.compute, r.seconds);
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<16} {:>8} {:>11} {:>12} {:>12} {:>9} {:>7} {:>6}  per-round mean / majority",
        "method", "accuracy", "compute/pb", "gen tok/pb", "prompt/pb", "seconds", "exp%", "AUC"
    );
    for r in rows {
        let gen: usize = r.tokens.values().map(|c| c.completion_tokens).sum();
        let prompt: usize = r.tokens.values().map(|c| c.prompt_tokens - c.cached_tokens).sum();
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        println!(
            "{:<16} {:>8.3} {:>11.0} {:>12} {:>12} {:>9.1} {:>7} {:>6}  {} / {}",
            r.method,
            r.accuracy,
            r.compute,
            gen,
            prompt,
            r.seconds,
            r.expensive_share.map_or("-".into(), |s| format!("{:.0}", s * 100.0)),
            r.auc.map_or("-".into(), |a| format!("{a:.2}")),
            fmt(&r.round_mean),
            fmt(&r.round_majority)
        );
    }
    println!("compute/pb: expensive-model tokens computed per problem (cheap ones weighted by size)");
}

fn plot(path: &str, rows: &[Row]) -> Result<()> {
    let points = |r: &Row| vec![(r.compute, r.accuracy)];
    let mut cost: crate::plot::Series =
        rows.iter().filter(|r| !r.method.starts_with("squeeze")).map(|r| (r.method.clone(), points(r))).collect();
    let mut squeeze: Vec<&Row> = rows.iter().filter(|r| r.method.starts_with("squeeze")).collect();
    squeeze.sort_by(|a, b| a.compute.total_cmp(&b.compute));
    cost.push(("squeeze (p = 0 .. 100)".into(), squeeze.iter().map(|r| (r.compute, r.accuracy)).collect()));
    let per_round: crate::plot::Series = rows
        .iter()
        .filter(|r| r.round_majority.len() > 1)
        .map(|r| (r.method.clone(), r.round_majority.iter().enumerate().map(|(t, a)| ((t + 1) as f64, *a)).collect()))
        .collect();
    crate::plot::line_grid(
        path,
        &[
            (
                "accuracy against compute per problem".into(),
                "expensive-token equivalents".into(),
                "accuracy".into(),
                cost,
            ),
            ("majority-vote accuracy per round".into(), "round".into(), "accuracy".into(), per_round),
        ],
    )
}
