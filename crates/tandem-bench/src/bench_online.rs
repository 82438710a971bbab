//! `tandem bench online`: does the drafter learn from the traffic it serves?
//!
//! Replays one prompt stream (code, then math, then chat: two domain shifts) at temperature 0
//! through the serving engine under several configurations and reports, per window of requests,
//! the acceptance length and the end-to-end output tokens/s:
//! - `none`: no speculation; `ngram`: prompt lookup;
//! - `scratch`: an EAGLE drafter trained online from random weights;
//! - `warm`: trained online from the target's last layer and unembedding (`--warm-start full`,
//!   head frozen); `warm-head`: from the unembedding alone (head frozen);
//! - `offline`: a drafter trained offline (the same trainer) on the traces the `warm` run recorded
//!   of this same stream, then frozen;
//! - `day0`: a drafter made before any traffic (`--day0-drafter DIR`, e.g. by self-distillation),
//!   then trained online as `warm` is; `day0#N` the N-th of several (`--day0-drafter A,B`), so
//!   two day-0 drafters can take turns in one run;
//! - `cold`: the warm-started drafter frozen, never trained (what a useless drafter costs once the
//!   draft length controller has its say);
//! - `CONFIG+lookup` (e.g. `warm+lookup`): that EAGLE configuration with prompt lookup tried first
//!   (copied drafts where the sequence repeats itself, the drafter's elsewhere);
//! - `CONFIG+chain` (e.g. `warm+lookup+chain`): that configuration verifying chains only, without
//!   the draft tree's siblings (`--spec-alternatives 0`);
//! - `CONFIG+frozen` (e.g. `day0+lookup+frozen`): that EAGLE configuration served as it starts,
//!   with no trainer (beside `CONFIG` under --interleave: what online training buys and costs);
//! - `none+train`: no speculation while a trainer trains in the background at the configured CPU
//!   share (what training costs serving).
//!
//! Every configuration's outputs are checked identical to `none` (greedy). Writes a table, JSON and
//! a PNG (acceptance length and tokens/s against requests served).
//!
//! Over 600 lines because one benchmark drives the stream, every configuration, the llama.cpp
//! peer, windowed figures, the table, JSON and plot.
use crate::plot;
use crate::turns::Turns;
use crate::workload::{self, Prompt};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_cli::online_arg::{self, OnlineArgs};
use tandem_cli::{load_model, models, DtypeArg};
use tandem_engine::online::{DrafterExchange, KStat, OnlineHooks};
use tandem_engine::{Engine, EngineConfig, Event, Fcfs, GenerationRequest, StepKinds};
use tandem_models::{Device, LoadOptions};
use tandem_runtime::speculative::{Drafter, EagleDrafter, NgramDrafter, WarmStart};
use tandem_runtime::SamplingParams;

mod figures;
mod tables;
use figures::{busy_secs, paired, sampled, windows};
mod trainers;

#[derive(clap::Args)]
pub struct OnlineBenchArgs {
    /// Target model (default: smollm2).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// Requests per domain: code, math, chat.
    #[arg(long, value_delimiter = ',', default_value = "500,200,200")]
    domains: Vec<usize>,
    /// The reduced run (under 10 minutes here): 30,15,15 requests, configurations none, ngram and
    /// warm+lookup (unless --configs says otherwise).
    #[arg(long)]
    reduced: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Each client's pause between a response and its next request (an agent's tool call or a
    /// user reading): the engine idles and the trainer may take the idle cores. tokens/s is counted
    /// over the time requests were in flight, so pauses do not dilute it.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Configurations to run, in order (`offline` needs `warm` before it). An EAGLE configuration
    /// with `+lookup` (e.g. `warm+lookup`) tries prompt lookup before its drafter; one with
    /// `+frozen` (e.g. `day0+lookup+frozen`) is served with no trainer; one with `@DTYPE` (e.g.
    /// `day0+lookup@q4_1`) serves its drafter's matrices as DTYPE (--draft-dtype's values).
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_CONFIGS)]
    configs: Vec<String>,
    /// Run the configurations side by side, taking turns request by request (request 1 under
    /// each, then request 2, ...), each on its own engine: a machine that slows down for a while
    /// slows every configuration alike, so their ratios hold where one-after-another runs swing
    /// by 10-30%. One request in flight; with --think-ms each configuration's pause comes right
    /// before its own request, and only then may its trainer use the idle cores. Not with
    /// `offline` or `none+train` (they read the traces of a `warm` run before them).
    #[arg(long)]
    interleave: bool,
    /// Under --interleave, configurations that do not learn (no speculation, n-gram, `+frozen`)
    /// serve one request in N of the stream (drawn by a hash of its number, so the sample follows
    /// no pattern of the stream: every N-th would take only even-numbered code prompts, all of one
    /// kind), and every ratio to `none` is taken over the requests both served: an hour of a
    /// drafter that keeps learning, compared in the same run, costs its baselines 1/N of theirs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    baseline_every: u64,
    /// Most draft tokens per step.
    #[arg(long, default_value_t = 6)]
    spec_k: usize,
    /// Most runners-up of draft tokens verified beside each draft (`--spec-alternatives`: the draft
    /// tree's node budget; the controller picks up to this many by measured tokens/s).
    #[arg(long, default_value_t = 2)]
    spec_alternatives: usize,
    /// Requests per reported window.
    #[arg(long, default_value_t = 50)]
    window: usize,
    /// Also report each configuration's tok/s over the requests from this one on (a target such
    /// as "1.8x from request 250 on", once a drafter has seen that much traffic).
    #[arg(long)]
    from_request: Option<usize>,
    /// The drafter the `day0` configuration starts from (made before any traffic, e.g. by
    /// `tandem train-drafter --self-distill N --out DIR`); it is then trained online as `warm` is.
    /// Several, comma-separated: `day0` is the first, `day0#2` (e.g. `day0#2+lookup`) the second.
    #[arg(long, value_delimiter = ',')]
    day0_drafter: Vec<std::path::PathBuf>,
    /// Optimizer steps for the `offline` drafter.
    #[arg(long, default_value_t = 600)]
    offline_steps: u64,
    #[arg(long, default_value_t = 8192)]
    draft_vocab: usize,
    /// Shortest match prompt lookup uses in `+lookup` configurations.
    #[arg(long, default_value_t = tandem_cli::spec_arg::LOOKUP_MIN)]
    lookup_min: usize,
    /// The drafter's matrices while serving (the trainer keeps f32).
    #[arg(long, value_enum, default_value_t = tandem_cli::spec_arg::DraftDtype::default())]
    draft_dtype: tandem_cli::spec_arg::DraftDtype,
    /// Also time llama.cpp's plain decode on the first prompts of each domain (same file, same tokens).
    #[arg(long)]
    peer: bool,
    #[arg(long, default_value = "bench-results/online.json")]
    out: String,
    #[command(flatten)]
    online: OnlineArgs,
}

const DEFAULT_CONFIGS: &str = "none,ngram,scratch,warm,warm+lookup,warm-head,offline,none+train";

/// One finished request.
#[derive(Serialize, Clone, Debug)]
struct Done {
    index: usize,
    domain: &'static str,
    submitted_secs: f64,
    finished_secs: f64,
    tokens: usize,
    decode_steps: usize,
    /// Seconds of trainer turns lent while it was in flight (with one request in flight, the
    /// serving time it lost to training).
    turn_secs: f64,
    #[serde(skip)]
    output: Vec<u32>,
}

#[derive(Serialize, Clone, Debug)]
struct WindowRow {
    config: String,
    /// Requests served by the end of the window.
    served: usize,
    domain: &'static str,
    acceptance_length: f64,
    tok_s: f64,
    /// tok/s over `none`'s in the same window (when `none` ran).
    speedup: Option<f64>,
    chosen_k: Option<u64>,
    drafter_version: Option<u64>,
    /// Measured speed-up of the chosen k over k = 0 (the engine's own estimate) and the trainer's
    /// CPU share of one core it allowed, at the window's end.
    gain: Option<f64>,
    /// Share of the window's learned drafts (not prompt-lookup copies) whose first token the
    /// target accepted: the drafter's agreement on traffic it had not trained on, unlike the
    /// acceptance length independent of the draft length the controller chose.
    first_agreement: Option<f64>,
    train_share: Option<f64>,
    train_steps: Option<u64>,
}

#[derive(Serialize, Clone, Debug, Default)]
struct Summary {
    config: String,
    requests: usize,
    wall_secs: f64,
    tok_s: f64,
    acceptance_length: f64,
    identical_to_none: Option<bool>,
    /// Requests whose outputs were compared with `none`'s (those both served).
    compared_to_none: usize,
    /// tok/s over `none`'s on the requests both served.
    speedup: Option<f64>,
    trainer_steps: u64,
    drafter_versions: u64,
    rollbacks: u64,
    traces_dropped: u64,
    trainer_cpu_secs: f64,
    /// Seconds serving paused for the trainer's turns (a saturated server lends them), and their
    /// share of the time requests were in flight.
    trainer_turn_secs: f64,
    trainer_turn_share: f64,
    /// Draft tokens verified and accepted; of them, those copied by prompt lookup (`+lookup`).
    drafted_tokens: u64,
    accepted_tokens: u64,
    lookup_drafted_tokens: u64,
    lookup_accepted_tokens: u64,
    /// Runners-up of first draft tokens verified, and steps where one was the target's token.
    alternatives_drafted: u64,
    alternatives_accepted: u64,
    /// Seconds the engine spent choosing drafts (prompt lookup, the learned drafter's catch-up and
    /// tokens) before the verifying forwards: what drafting cost, beside what verifying it did.
    draft_secs: f64,
    /// Requests (from the start of each domain) until a window had acceptance >= 2.0 and >= 1.3x
    /// `none`'s tok/s; None: never in this run.
    reached_target_after: Vec<(String, Option<usize>)>,
    /// tok/s over requests `--from-request` on, and that over `none`'s.
    tok_s_from_request: Option<f64>,
    speedup_from_request: Option<f64>,
    /// The draft shape controller's model at the end, per draft length (steps with only copied
    /// drafts are not counted).
    k_table: Vec<KStat>,
    /// The same per sibling budget of the draft tree (`KStat::k` is the budget) at the held length.
    alternatives_table: Vec<KStat>,
    /// Every engine step's wall time by kind (prefill, plain decode, copied drafts, the drafter's drafts).
    steps: StepKinds,
}

struct RunOutput {
    done: Vec<Done>,
    wall: f64,
    samples: Samples,
    summary: Summary,
}

/// Requests served, chosen k and drafter version, sampled as requests finish.
/// (served, chosen k, serving version, gain, trainer share, trainer steps, (learned drafts served,
/// of them with the first token accepted)) after each request.
type Samples = Vec<(usize, u64, u64, f64, f64, u64, (u64, u64))>;

/// Serves the stream with `concurrency` requests in flight; samples (served, k, version) as it goes.
#[allow(clippy::too_many_arguments)]
fn replay(
    engine: Engine,
    handle: tandem_engine::EngineHandle,
    prompts: &[Prompt],
    ids: &[Vec<u32>],
    stop: &[u32],
    args: &OnlineBenchArgs,
    exchange: Option<&DrafterExchange>,
    label: &str,
    think: Duration,
    turns: Option<(&Turns, usize, usize)>,
) -> Result<(Vec<Done>, f64, Samples, tandem_engine::SpecStats)> {
    let thread = engine.spawn();
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    let samples = Mutex::new(Vec::new());
    let start = Instant::now();
    // Side by side (`--interleave`), one bar per configuration would overwrite the others'.
    let bar = match turns {
        Some(_) => indicatif::ProgressBar::hidden(),
        None => indicatif::ProgressBar::new(prompts.len() as u64),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!("{label:>10} {{bar:40}} {{pos}}/{{len}} [{{elapsed}}]"))
            .expect("template"),
    );
    // One request, start to finish, recorded in `done` (and a sample of the drafter's state).
    let serve_one = |i: usize| -> Result<()> {
        let submitted_secs = start.elapsed().as_secs_f64();
        let lent = || exchange.map_or(0.0, |ex| ex.turns.lent_secs.get());
        let lent_before = lent();
        let request = GenerationRequest {
            prompt: ids[i].clone(),
            max_tokens: args.max_tokens,
            sampling: SamplingParams::default(),
            stop_token_ids: stop.to_vec(),
            client: None,
            agent: None,
            weights: None,
            score: None,
        };
        let mut rx = handle.submit(request).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut output = Vec::new();
        let (tokens, steps) = loop {
            match rx.blocking_recv().context("the engine stopped")? {
                Event::Token(t) => output.push(t.id),
                Event::Finished { usage, .. } => {
                    let steps = usage.speculation.map_or(usage.completion_tokens, |s| s.decode_steps);
                    break (usage.completion_tokens, steps);
                }
                Event::Failed(m) => bail!("request {i} failed: {m}"),
                Event::Scored(_) => {}
            }
        };
        let mut d = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        d.push(Done {
            index: i,
            domain: prompts[i].domain,
            submitted_secs,
            finished_secs: start.elapsed().as_secs_f64(),
            tokens,
            decode_steps: steps,
            turn_secs: lent() - lent_before,
            output,
        });
        if let Some(ex) = exchange {
            samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((
                d.len(),
                ex.metrics.chosen_k.load(Ordering::Relaxed),
                ex.weights.serving_version.load(Ordering::Relaxed),
                ex.metrics.speedup(),
                ex.metrics.train_share.get(),
                ex.metrics.train_steps.load(Ordering::Relaxed),
                (
                    ex.metrics.served_drafts.load(Ordering::Relaxed),
                    ex.metrics.served_first_accepted.load(Ordering::Relaxed),
                ),
            ));
        }
        Ok(())
    };
    std::thread::scope(|s| -> Result<()> {
        let mut joins = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            joins.push(s.spawn(|| -> Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= prompts.len() {
                        return Ok(());
                    }
                    let Some((t, config, every)) = turns else {
                        serve_one(i)?;
                        bar.inc(1);
                        std::thread::sleep(think);
                        continue;
                    };
                    t.wait(i, config)?;
                    if !sampled(i, every) {
                        // `--baseline-every`: not this configuration's request; its turn passes.
                        t.end(true);
                        continue;
                    }
                    // Side by side with think time, this client's pause comes in its own turn,
                    // right before its request: only then is the engine's idle time its trainer's,
                    // and a trainer's part that runs on into a request slows its own.
                    if !think.is_zero() {
                        if let Some(ex) = exchange {
                            ex.idle.hold(false);
                        }
                        std::thread::sleep(think);
                    }
                    let served = serve_one(i);
                    if let Some(ex) = exchange {
                        ex.idle.hold(true);
                    }
                    t.end(served.is_ok());
                    served?;
                }
            }));
        }
        for j in joins {
            j.join().expect("client thread")?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let wall = start.elapsed().as_secs_f64();
    let spec = handle.spec_stats();
    handle.shutdown();
    let _ = thread.join();
    let mut done = done.into_inner().expect("not poisoned");
    done.sort_by(|a, b| a.finished_secs.total_cmp(&b.finished_secs));
    Ok((done, wall, samples.into_inner().expect("not poisoned"), spec))
}

fn engine_config(args: &OnlineBenchArgs, spec: bool, chain_only: bool) -> EngineConfig {
    EngineConfig {
        max_batch: args.concurrency.max(1),
        max_seq_len: 2048,
        spec_k: if spec { args.spec_k } else { 0 },
        spec_alternatives: if chain_only { 0 } else { args.spec_alternatives },
        ..Default::default()
    }
}

fn run_config(
    name: &str,
    path: &Path,
    prompts: &[Prompt],
    args: &OnlineBenchArgs,
    trace_dir: &Path,
    turns: Option<(&Turns, usize)>,
) -> Result<RunOutput> {
    let loaded = load_model(path, &args.dtype.load_options(Device::Cpu))?;
    let ids = workload::chat_ids(&loaded, prompts)?;
    let stop = loaded.stop_token_ids.clone();
    let mut summary = Summary { config: name.to_string(), requests: prompts.len(), ..Default::default() };
    let online = &args.online;
    // `CONFIG@DTYPE`: the drafter's matrices as DTYPE (e.g. `day0+lookup@q4_1` beside
    // `day0+lookup` under --interleave) instead of --draft-dtype.
    let full_name = name;
    let (name, dtype) = match name.split_once('@') {
        Some((base, d)) => {
            use clap::ValueEnum;
            let d = tandem_cli::spec_arg::DraftDtype::from_str(d, true)
                .map_err(|e| anyhow::anyhow!("configuration {name}: {e}"))?;
            (base, d.serve_as())
        }
        None => (name, args.draft_dtype.serve_as()),
    };
    let eagle = |warm: WarmStart| -> Result<EagleDrafter> {
        Ok(EagleDrafter::fresh(&loaded.model, Some(args.draft_vocab), warm, 0)?.with_serving(dtype)?)
    };
    // `CONFIG+frozen`: no trainer; `CONFIG+chain`: without runners-up; `CONFIG+lookup`: prompt
    // lookup tried first.
    let (name, frozen) = match name.strip_suffix("+frozen") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let (name_base, chain_only) = match name.strip_suffix("+chain") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let (base, lookup) = match name_base.strip_suffix("+lookup") {
        Some(base) if base != "none" => (base, true),
        _ => (name_base, false),
    };
    // `day0#N`: the N-th --day0-drafter.
    let (base, day0_index) = match base.split_once('#') {
        Some(("day0", n)) => (
            "day0",
            n.parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .with_context(|| format!("configuration {full_name}: day0#N counts from 1"))?
                - 1,
        ),
        _ => (base, 0),
    };
    let (drafter, trained, hooks_used): (Option<Box<dyn Drafter>>, Option<EagleDrafter>, bool) = match base {
        "none" | "none+train" => (None, None, false),
        "ngram" => (Some(Box::new(NgramDrafter::default())), None, false),
        "scratch" => (None, Some(eagle(WarmStart::None)?), true),
        "warm" | "cold" => (None, Some(eagle(WarmStart::Full)?), true),
        "warm-head" => (None, Some(eagle(WarmStart::Head)?), true),
        "offline" => (None, Some(trainers::train_offline(&loaded, trace_dir, args)?), true),
        "day0" => {
            let dir = args.day0_drafter.get(day0_index).with_context(|| {
                format!("configuration {full_name} needs --day0-drafter with {} directories", day0_index + 1)
            })?;
            (None, Some(EagleDrafter::load(dir, &loaded.model)?.with_serving(dtype)?), true)
        }
        other => bail!("unknown configuration `{other}`"),
    };
    let spec = drafter.is_some() || trained.is_some();
    // `cold`, `offline` and `+frozen` serve a frozen drafter: no trainer, so no traces.
    let trains = trained.is_some() && !(frozen || matches!(base, "offline" | "cold"));
    // The trainer's settings first: they decide what the engine keeps in traces.
    let mut o = online.clone();
    if trains && base == "warm" {
        // The offline configuration trains on exactly what this run saw.
        let _ = std::fs::remove_dir_all(trace_dir);
        o.trace_dir = Some(trace_dir.to_path_buf());
    }
    o.drafter_save = Some(std::env::temp_dir().join(format!("tandem-bench-drafter-{full_name}")));
    let hooks = if trains { o.hooks(o.trace_buffer_mib << 20) } else { OnlineHooks::new(0) };
    match turns {
        // Side by side, this engine's idle time is the others' serving: without think time its
        // trainer trains as beside a saturated server, in the turns its own engine lends it; with
        // think time, in its own client's pauses (see `replay`).
        Some(_) if args.think_ms == 0 => hooks.exchange.idle.assume_saturated(),
        Some(_) => hooks.exchange.idle.hold(true),
        None => {}
    }
    let mut trainer = None;
    if let Some(e) = trained.as_ref().filter(|_| trains) {
        let warm = match base {
            "scratch" => WarmStart::None,
            "warm-head" => WarmStart::Head,
            _ => WarmStart::Full,
        };
        trainer = Some(online_arg::start_with(&o, &loaded.model, e, warm, hooks.clone())?);
    }
    let background =
        if base == "none+train" { Some(trainers::background_trainer(&loaded, trace_dir, args)?) } else { None };
    let (mut engine, handle) =
        Engine::new(loaded.model, engine_config(args, spec, chain_only), Box::new(Fcfs::default()))?;
    if let Some(d) = drafter {
        engine = engine.with_drafter(d)?;
    }
    if let Some(e) = trained {
        let e = e.with_lookup(lookup.then(|| tandem_cli::spec_arg::lookup(args.lookup_min)).flatten());
        engine = engine.with_trainable_drafter(Box::new(e))?.with_online(hooks.clone())?;
    }
    // Every configuration pauses alike: a request after a pause runs slower (measured here: a
    // frozen drafter with pauses 0.95x of no speculation without), whoever uses the pause.
    let think = Duration::from_millis(args.think_ms);
    // A configuration that learns serves every request; the others one in --baseline-every.
    let every = if trains { 1 } else { args.baseline_every as usize };
    let turns = turns.map(|(t, c)| (t, c, every));
    let (done, wall, samples, spec_stats) =
        replay(engine, handle, prompts, &ids, &stop, args, hooks_used.then_some(&*hooks.exchange), name, think, turns)?;
    if let Some(t) = trainer {
        let st = t.status();
        summary.trainer_steps = st.steps;
        summary.trainer_cpu_secs = st.compute_secs;
        t.shutdown();
    }
    if let Some((stop, thread)) = background {
        stop.store(true, Ordering::SeqCst);
        summary.trainer_steps = thread.join().expect("background trainer")?;
    }
    let ex = &hooks.exchange;
    summary.trainer_turn_secs = ex.turns.lent_secs.get();
    summary.drafter_versions = ex.weights.published.load(Ordering::Relaxed);
    summary.k_table = ex.metrics.k_table.lock().unwrap_or_else(|e| e.into_inner()).clone();
    summary.alternatives_table = ex.metrics.alternatives_table.lock().unwrap_or_else(|e| e.into_inner()).clone();
    summary.rollbacks = ex.weights.rollbacks.load(Ordering::Relaxed);
    summary.traces_dropped = hooks.traces.dropped();
    summary.drafted_tokens = spec_stats.drafted_tokens;
    summary.accepted_tokens = spec_stats.accepted_tokens;
    summary.lookup_drafted_tokens = spec_stats.lookup_drafted_tokens;
    summary.lookup_accepted_tokens = spec_stats.lookup_accepted_tokens;
    summary.alternatives_drafted = spec_stats.alternatives_drafted;
    summary.alternatives_accepted = spec_stats.alternatives_accepted;
    summary.draft_secs = spec_stats.draft_secs;
    summary.steps = spec_stats.steps;
    summary.wall_secs = wall;
    let tokens: usize = done.iter().map(|d| d.tokens).sum();
    let steps: usize = done.iter().map(|d| d.decode_steps).sum();
    let in_flight = busy_secs(&done, 0.0);
    summary.requests = done.len();
    summary.tok_s = tokens as f64 / in_flight;
    summary.trainer_turn_share = summary.trainer_turn_secs / in_flight;
    summary.acceptance_length = tokens as f64 / steps.max(1) as f64;
    Ok(RunOutput { done, wall, samples, summary })
}

/// `--interleave`: every configuration on its own engine at once, taking turns request by request.
fn interleaved(
    args: &OnlineBenchArgs,
    path: &Path,
    prompts: &[Prompt],
    trace_dir: &Path,
) -> Result<Vec<(String, RunOutput)>> {
    ensure!(args.concurrency == 1, "--interleave takes turns one request at a time");
    if let Some(c) = args.configs.iter().find(|c| matches!(c.as_str(), "offline" | "none+train")) {
        bail!("--interleave cannot run `{c}`: it needs the traces of a `warm` run finished before it");
    }
    let turns = Turns::new(args.configs.len());
    std::thread::scope(|s| {
        let runs: Vec<_> = args
            .configs
            .iter()
            .enumerate()
            .map(|(c, name)| {
                let turns = &turns;
                s.spawn(move || {
                    let r = run_config(name, path, prompts, args, trace_dir, Some((turns, c)));
                    if r.is_err() {
                        turns.end(false);
                    }
                    r.with_context(|| format!("configuration {name}")).map(|r| (name.clone(), r))
                })
            })
            .collect();
        runs.into_iter().map(|j| j.join().expect("configuration thread")).collect()
    })
}

pub fn run(mut args: OnlineBenchArgs) -> Result<()> {
    if args.reduced {
        args.domains = workload::REDUCED_DOMAINS.to_vec();
        if args.configs.join(",") == DEFAULT_CONFIGS {
            args.configs = vec!["none".into(), "ngram".into(), "warm+lookup".into()];
        }
        args.window = args.window.min(10);
    }
    ensure!(args.domains.len() == 3, "--domains takes three counts: code,math,chat");
    ensure!(args.baseline_every == 1 || args.interleave, "--baseline-every needs --interleave");
    let path = models::resolve(args.model.as_deref())?;
    let prompts = workload::stream(args.domains[0], args.domains[1], args.domains[2], workload::STREAM_SEED)?;
    let keep_traces = args.online.trace_dir.is_some();
    let trace_dir = args
        .online
        .trace_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tandem-bench-online-traces-{}", std::process::id())));
    eprintln!(
        "stream: {} code, {} math, {} chat requests, {} tokens each, {} in flight; machine: {}",
        args.domains[0],
        args.domains[1],
        args.domains[2],
        args.max_tokens,
        args.concurrency,
        crate::machine_description()
    );
    let mut runs: Vec<(String, RunOutput)> = Vec::new();
    if args.interleave {
        runs = interleaved(&args, &path, &prompts, &trace_dir)?;
    } else {
        for name in args.configs.clone() {
            let r = run_config(&name, &path, &prompts, &args, &trace_dir, None)
                .with_context(|| format!("configuration {name}"))?;
            runs.push((name, r));
        }
    }
    for (name, r) in &runs {
        eprintln!(
            "{name:>10}: {:.1} tok/s, acceptance {:.2}, {:.0} s, trainer steps {}, versions {}, rollbacks {}",
            r.summary.tok_s,
            r.summary.acceptance_length,
            r.wall,
            r.summary.trainer_steps,
            r.summary.drafter_versions,
            r.summary.rollbacks
        );
        let s = &r.summary;
        if s.drafted_tokens > 0 {
            let learned = s.drafted_tokens - s.lookup_drafted_tokens;
            eprintln!(
                "{:>10}  drafts accepted: learned {}/{learned}, copied by lookup {}/{}, runners-up {}/{}; \
                 drafting {:.1} s, {:.3} ms per learned draft token",
                "",
                s.accepted_tokens - s.lookup_accepted_tokens,
                s.lookup_accepted_tokens,
                s.lookup_drafted_tokens,
                s.alternatives_accepted,
                s.alternatives_drafted,
                s.draft_secs,
                1e3 * s.draft_secs / learned.max(1) as f64
            );
        }
    }
    // Identical outputs, and per-window ratios against `none`.
    let none = runs.iter().position(|(n, _)| n == "none");
    let reference: Option<Vec<Option<Vec<u32>>>> = none.map(|i| {
        let mut v = vec![None; prompts.len()];
        for d in &runs[i].1.done {
            v[d.index] = Some(d.output.clone());
        }
        v
    });
    let by_index = args.baseline_every > 1;
    let window_rows = |name: &str, run: &RunOutput| windows(name, run, args.window, by_index, prompts.len());
    let none_run = none.map(|i| &runs[i].1);
    let none_windows = none_run.map(|r| window_rows("none", r));
    let from = |run: &RunOutput| {
        args.from_request.map(|n| {
            let later = || run.done.iter().filter(move |d| d.index >= n);
            later().map(|d| d.tokens).sum::<usize>() as f64 / busy_secs(later(), 0.0)
        })
    };
    let shifts = [0, args.domains[0], args.domains[0] + args.domains[1]];
    let mut all_rows = Vec::new();
    let mut summaries = Vec::new();
    for (name, run) in &runs {
        let mut summary = run.summary.clone();
        if let Some(r) = &reference {
            let compared: Vec<bool> =
                run.done.iter().filter_map(|d| r[d.index].as_ref().map(|o| *o == d.output)).collect();
            summary.identical_to_none = Some(compared.iter().all(|&same| same));
            summary.compared_to_none = compared.len();
        }
        let mut rows = window_rows(name, run);
        match (&none_windows, none_run) {
            // Over the window's requests `none` served too.
            (Some(_), Some(base)) if by_index => {
                for row in &mut rows {
                    let w = (row.served - 1) / args.window;
                    row.speedup = paired(run, base, |d| d.index / args.window == w).map(|(t, b)| t / b.max(1e-9));
                }
            }
            (Some(nw), _) => {
                for (row, base_row) in rows.iter_mut().zip(nw) {
                    row.speedup = Some(row.tok_s / base_row.tok_s.max(1e-9));
                }
            }
            _ => {}
        }
        for (d, &start) in ["code", "math", "chat"].iter().zip(&shifts) {
            let hit = rows.iter().find(|r| {
                r.served > start && r.domain == *d && r.acceptance_length >= 2.0 && r.speedup.unwrap_or(0.0) >= 1.3
            });
            summary.reached_target_after.push((d.to_string(), hit.map(|r| r.served - start)));
        }
        summary.speedup = none_run.and_then(|b| paired(run, b, |_| true)).map(|(t, b)| t / b.max(1e-9));
        summary.tok_s_from_request = from(run);
        summary.speedup_from_request = args
            .from_request
            .zip(none_run)
            .and_then(|(n, b)| paired(run, b, |d| d.index >= n))
            .map(|(t, b)| t / b.max(1e-9));
        all_rows.extend(rows);
        summaries.push(summary);
    }
    tables::print(&all_rows, &summaries);
    if let Some(n) = args.from_request {
        println!();
        for s in &summaries {
            let ratio = s.speedup_from_request.map_or(String::new(), |r| format!(", {r:.2}x none"));
            println!("{}: {:.1} tok/s from request {n} on{ratio}", s.config, s.tok_s_from_request.unwrap_or(0.0));
        }
    }
    let peer = if args.peer { Some(run_peer(&path, &prompts, &args)?) } else { None };
    if let Some(p) = &peer {
        println!("\nllama.cpp plain decode (same file, batch 1, first prompts of each domain): {p:.1} tok/s");
    }
    if let Some(dir) = Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "machine": crate::machine_description(),
        "model": path.display().to_string(),
        "domains": args.domains,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "window": args.window,
        "summaries": summaries,
        "windows": all_rows,
        // Every request of every configuration, in the order they finished.
        "requests": runs.iter().map(|(name, r)| (name.clone(), &r.done)).collect::<std::collections::BTreeMap<_, _>>(),
        "llama_cpp_plain_tok_s": peer,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    let png = PathBuf::from(&args.out).with_extension("png");
    let series = |f: &dyn Fn(&WindowRow) -> f64| -> plot::Series {
        runs.iter()
            .map(|(n, _)| {
                (n.clone(), all_rows.iter().filter(|r| &r.config == n).map(|r| (r.served as f64, f(r))).collect())
            })
            .collect()
    };
    let title = format!("shifts at {} (math) and {} (chat)", shifts[1], shifts[2]);
    plot::line_grid(
        png.to_str().context("path")?,
        &[
            (
                format!("acceptance length; {title}"),
                "requests served".into(),
                "tokens per target forward".into(),
                series(&|r| r.acceptance_length),
            ),
            (format!("output tokens/s; {title}"), "requests served".into(), "tokens/s".into(), series(&|r| r.tok_s)),
        ],
    )?;
    if !keep_traces {
        let _ = std::fs::remove_dir_all(&trace_dir);
    }
    eprintln!("wrote {} and {}", args.out, png.display());
    Ok(())
}

/// llama.cpp plain decode tok/s (batch 1) over the first 4 prompts of each domain.
fn run_peer(path: &Path, prompts: &[Prompt], args: &OnlineBenchArgs) -> Result<f64> {
    let loaded = load_model(path, &LoadOptions::default())?;
    let ids = workload::chat_ids(&loaded, prompts)?;
    let shifts = [0, args.domains[0], args.domains[0] + args.domains[1]];
    let names: Vec<String> =
        ["code", "math", "chat"].iter().flat_map(|d| (0..4).map(move |j| format!("{d}{j}"))).collect();
    let mut picked = Vec::new();
    for (d, &s) in shifts.iter().enumerate() {
        for j in 0..4 {
            if let Some(p) = ids.get(s + j) {
                picked.push((names[d * 4 + j].as_str(), p.clone()));
            }
        }
    }
    let rows = crate::bench_spec::run_peer(path, args.dtype, &picked, args.max_tokens, "none")?;
    let (tokens, secs) = rows.iter().fold((0.0, 0.0), |(t, s), r| {
        let n = r.tokens.saturating_sub(1) as f64;
        (t + n, s + n / r.decode_tok_s.max(1e-9))
    });
    Ok(tokens / secs.max(1e-9))
}
