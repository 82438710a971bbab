//! `tandem train-drafter`: trains an EAGLE drafter offline, with the online trainer's code, from
//! traces a server recorded (`tandem serve --spec eagle --spec-train online --trace-dir DIR`)
//! and/or from text the target reads first (`--corpus`), which labels every position with the
//! target's own distribution, and/or from the target's own answers to prompts made offline
//! (`--self-distill`: self-distillation, what a day-0 drafter is trained on).
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;
use tandem_cli::online_arg::TrainArgs;
use tandem_cli::spec_arg::{self, SpecArgs};
use tandem_cli::{load_model, models, DtypeArg, Progress};
use tandem_runtime::speculative::{EagleDrafter, WarmStart};
use tandem_speculator::traces_io::{load_trace, trace_files};
use tandem_speculator::{distill, replay, Batch, TracePool, TrainConfig, Trainer};

use crate::resume::Resume;

#[derive(clap::Args)]
pub struct TrainDrafterArgs {
    /// Folder of recorded traces (`trace-*.safetensors`).
    #[arg(long, required_unless_present_any = ["corpus", "self_distill", "follow"])]
    traces: Option<PathBuf>,
    /// Prompts (code, math and chat, made offline: `workload::distill_prompts`) the target answers
    /// greedily; prompt and answer are then read back as a trace, every position labelled with the
    /// target's own distribution: self-distillation.
    #[arg(long, default_value_t = 0)]
    self_distill: usize,
    /// Seed of the self-distillation prompts' draw and of the training batches: a later round
    /// (`--drafter` an earlier one) with another seed answers prompts the earlier rounds did not.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most tokens of each answer.
    #[arg(long, default_value_t = 128)]
    answer_tokens: usize,
    /// Held-out served traffic: N prompts spread evenly over `tandem bench online --reduced`'s stream
    /// (all three domains), answered by
    /// the target; the drafter's agreement with the target on the answers is reported as it trains,
    /// beside a random drafter's.
    #[arg(long, default_value_t = 0)]
    eval_served: usize,
    /// Text the target reads first, every position labelled with its own distribution: files,
    /// folders (their .py, .rs, .md and .txt files, recursively), or `python-stdlib` (the Python
    /// standard library's packages; `bench online`'s code prompts come from its other files).
    #[arg(long)]
    corpus: Vec<String>,
    /// Tokens of corpus text to read (chunks drawn at random across the files).
    #[arg(long, default_value_t = 200_000)]
    corpus_tokens: usize,
    /// Tokens per corpus chunk (one trace each).
    #[arg(long, default_value_t = 256)]
    corpus_chunk: usize,
    /// The target model the traces came from (default: smollm2).
    #[arg(long)]
    model: Option<String>,
    /// How the target's weights are held: as serving will hold them (`auto`, GGUF blocks kept: the
    /// drafter then learns the hidden states it will be served), or f32 / bf16.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// Where to write the trained drafter (config.json + model.safetensors).
    #[arg(long, default_value = "tandem-drafter")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 500)]
    steps: u64,
    /// Keep the last N trace files out of training and report the drafter's agreement with the
    /// target on their output positions (what drafting would see on unseen traffic).
    #[arg(long, default_value_t = 0)]
    holdout: usize,
    /// Steps between reports.
    #[arg(long, default_value_t = 50)]
    report_every: u64,
    /// Positions of the training traces (drawn at random, whole traces) kept beside the drafter
    /// as its replay set (`DIR/replay`, hidden states in bf16): online training mixes them into
    /// every step so that the drafter does not forget them (`--train-replay-share`). 0: none.
    #[arg(long, default_value_t = tandem_speculator::replay::REPLAY_POSITIONS)]
    replay_positions: usize,
    /// Steps between saved states in OUT/progress (with the answers, as each part of them is
    /// read back): the same command run again after a stop goes on from the last one and writes
    /// the drafter an uninterrupted run would have.
    #[arg(long, default_value_t = 250)]
    checkpoint_every: u64,
    /// Stop after this step, its state saved: the same command later goes on from it (a long
    /// training run in parts).
    #[arg(long)]
    stop_after: Option<u64>,
    /// With --follow: optimizer steps between published versions.
    #[arg(long, default_value_t = 10)]
    publish_every: u64,
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    train: TrainArgs,
    #[command(flatten)]
    replay: tandem_cli::online_arg::ReplayArgs,
    #[command(flatten)]
    follow: crate::follow::FollowArgs,
}

pub fn run(args: TrainDrafterArgs) -> Result<()> {
    let path = models::resolve(args.model.as_deref())?;
    let loaded = load_model(&path, &args.dtype.load_options(tandem_models::Device::Cpu))?;
    let drafter = spec_arg::build_eagle(&args.spec, &loaded)?;
    // What the drafter started from was trained on, mixed into every step (offline too: training
    // a day-0 drafter further on one kind of traces would otherwise forget the rest).
    let replay = args.replay.load(&drafter)?;
    if let Some(url) = &args.follow.follow {
        let trainer = args.train.for_online(&drafter).trainer(&drafter, &loaded.model, args.spec.warm_start)?;
        return crate::follow::run(crate::follow::Follow {
            url,
            model: &loaded.name,
            config: drafter.config.clone(),
            trainer,
            publish_every: args.publish_every,
            seed: args.seed,
            args: &args.follow,
            replay,
        });
    }
    let resume = Resume::open(&args.out, &Resume::command_key())?;
    let mut pool = TracePool::new(usize::MAX);
    let tc = TrainConfig { seed: args.seed, ..args.train.train_config(args.spec.warm_start) };
    if !args.corpus.is_empty() {
        let chunks = corpus_chunks(&args.corpus, &loaded.tokenizer, args.corpus_tokens, args.corpus_chunk, tc.seed)?;
        let bar = Progress::new(chunks.len() as u64, "corpus chunks read by the target");
        let traces =
            distill::text_traces(&loaded.model, &drafter.config.target_layers, &chunks, 4, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        for t in traces {
            pool.add(t);
        }
        eprintln!("corpus: {} chunks, {} positions", chunks.len(), pool.positions());
    }
    if args.self_distill > 0 {
        let prompts = tandem_bench::workload::distill_prompts(args.self_distill, tc.seed)?;
        for t in self_distilled(&loaded, &drafter.config.target_layers, &prompts, args.answer_tokens, &resume)? {
            pool.add(t);
        }
        eprintln!("self-distillation: {} answers, {} positions in the pool", args.self_distill, pool.positions());
    }
    let files = match &args.traces {
        Some(dir) => trace_files(dir)?,
        None => Vec::new(),
    };
    if args.holdout > 0 && files.len() <= args.holdout {
        bail!("{} trace files: need more than --holdout {}", files.len(), args.holdout);
    }
    let fs = drafter.config.target_layers.len() * drafter.config.hidden_size;
    let mut held = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let t = load_trace(f).with_context(|| format!("reading {}", f.display()))?;
        if t.feature_size != fs {
            bail!(
                "{} holds {}-float features; this drafter reads {fs}: traces of another model?",
                f.display(),
                t.feature_size
            );
        }
        if i + args.holdout >= files.len() {
            held.push(("held-out traces", t));
        } else {
            pool.add(t);
        }
    }
    if args.eval_served > 0 {
        use tandem_bench::workload::{stream, REDUCED_DOMAINS, STREAM_SEED};
        let [code, math, chat] = REDUCED_DOMAINS;
        let all = stream(code, math, chat, STREAM_SEED)?;
        let served: Vec<_> = all.iter().step_by(all.len() / args.eval_served.clamp(1, all.len())).cloned().collect();
        let answered =
            answered_traces(&loaded, &drafter.config.target_layers, &served, args.answer_tokens, "held out")?;
        held.extend(served.iter().map(|p| p.domain).zip(answered));
    }
    eprintln!("{} traces, {} positions ({} held out)", pool.len(), pool.positions(), held.len());
    let mut trainer = args.train.trainer(&drafter, &loaded.model, args.spec.warm_start)?;
    let start = resume.restore(&mut trainer)? + 1;
    if start > 1 {
        eprintln!("continuing from step {} ({})", start - 1, args.out.join("progress").display());
    }
    let vd = trainer.config.draft_vocab_size;
    let bar = Progress::new(args.steps, "steps");
    bar.inc(start - 1);
    // Held-out batches: each held trace's output positions (from the last prompt position on),
    // with the group it is reported in (its domain, or held-out trace files).
    let held: Vec<(&str, Batch)> = held
        .iter()
        .filter_map(|(g, t)| Some((*g, Batch::outputs(t, usize::MAX, vd, &|id| trainer.draft_id(id))?)))
        .collect();
    // Held-out figures: first-token agreement, second-token agreement (reading its own output,
    // as drafting does), first-token cross-entropy; and first-token agreement per group, where
    // there are several (what training on one kind of traffic does to the others).
    let evaluate = |trainer: &Trainer| -> Result<String> {
        let mut groups: Vec<(&str, f64, f64)> = Vec::new();
        let (mut top1, mut second, mut ce, mut n) = (0.0, 0.0, 0.0, 0.0);
        for (g, b) in &held {
            let s = trainer.evaluate(b)?;
            let w = s.positions as f64;
            top1 += s.top1 * w;
            second += s.top1_second * w;
            ce += s.ce0 * w;
            n += w;
            match groups.iter_mut().find(|x| x.0 == *g) {
                Some(x) => (x.1, x.2) = (x.1 + s.top1 * w, x.2 + w),
                None => groups.push((g, s.top1 * w, w)),
            }
        }
        let n = f64::max(n, 1.0);
        let by_group = match groups.len() {
            0 | 1 => String::new(),
            _ => {
                let each: Vec<String> = groups.iter().map(|(g, a, w)| format!("{g} {:.3}", a / w.max(1.0))).collect();
                format!(" [{}]", each.join(", "))
            }
        };
        Ok(format!(
            "held-out top-1 agreement {:.3}{by_group} (second token {:.3}), cross-entropy {:.3}",
            top1 / n,
            second / n,
            ce / n
        ))
    };
    if !held.is_empty() && start == 1 {
        let random = EagleDrafter::random(&loaded.model, Some(trainer.config.draft_vocab_size), tc.seed)?;
        let random = args.train.trainer(&random, &loaded.model, WarmStart::None)?;
        eprintln!("a random drafter: {}", evaluate(&random)?);
        eprintln!("step 0: {}", evaluate(&trainer)?);
    }
    let every = args.report_every.max(1);
    // Loss and agreement summed since the last report, and over how many steps.
    let mut avg = (0.0, 0.0, 0u64);
    for step in start..=args.steps {
        // Each step's draw from the seed and its number alone, so a run in parts draws as one.
        let mut rng = rand::rngs::StdRng::seed_from_u64(tc.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t2d = |id| trainer.draft_id(id);
        let batch = replay::sample(&pool, replay.as_deref(), &mut rng, tc.batch_positions, tc.window, vd, &t2d)
            .context("the traces hold no trainable positions")?;
        let s = trainer.step(&batch)?;
        bar.set_message(format!("loss {:.3} top-1 {:.2}", s.loss, s.top1));
        bar.inc(1);
        avg = (avg.0 + s.loss, avg.1 + s.top1, avg.2 + 1);
        if step % every == 0 {
            let held_out = match held.is_empty() {
                true => String::new(),
                false => format!("; {}", evaluate(&trainer)?),
            };
            bar.suspend(|| {
                eprintln!(
                    "step {step}: loss {:.3}, top-1 agreement {:.3} (mean of the last {} batches){held_out}",
                    avg.0 / avg.2 as f64,
                    avg.1 / avg.2 as f64,
                    avg.2
                )
            });
            avg = (0.0, 0.0, 0);
        }
        if step % args.checkpoint_every.max(1) == 0 || args.stop_after == Some(step) {
            resume.save(&trainer)?;
        }
        if args.stop_after == Some(step) && step < args.steps {
            bar.finish();
            eprintln!("stopped after step {step}; the same command goes on from it");
            return Ok(());
        }
    }
    bar.finish();
    trainer.weights()?.save(&trainer.config, &args.out)?;
    eprintln!("drafter written to {} (serve it with --spec eagle:{})", args.out.display(), args.out.display());
    if args.replay_positions > 0 {
        // What this drafter was trained on: the traces, and the set it replayed.
        let replayed = replay.as_ref().map(|r| r.pool().traces());
        let traces: Vec<_> = pool.traces().chain(replayed.into_iter().flatten()).cloned().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(tc.seed);
        let (n, positions) = tandem_speculator::replay::write(&traces, args.replay_positions, &args.out, &mut rng)?;
        eprintln!("replay set: {n} of its traces ({positions} positions) in {}", args.out.join("replay").display());
    }
    resume.finish()
}

/// Chunks of `chunk` tokens from the corpus files, drawn across them at random (at most four per
/// file, so no single file dominates) until `tokens` are gathered.
fn corpus_chunks(
    sources: &[String],
    tokenizer: &tandem_models::Tokenizer,
    tokens: usize,
    chunk: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rand::seq::SliceRandom;
    if chunk < 8 {
        bail!("--corpus-chunk {chunk} is too short (at least 8 tokens)");
    }
    let mut files = Vec::new();
    for s in sources {
        if s == "python-stdlib" {
            files.extend(tandem_bench::workload::stdlib_package_files()?);
            continue;
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            tandem_bench::workload::files_under(&p, &["py", "rs", "md", "txt"], &[], &mut files)?;
        } else if p.is_file() {
            files.push(p);
        } else {
            bail!("corpus {s}: no such file or folder (or `python-stdlib`)");
        }
    }
    if files.is_empty() {
        bail!("the corpus holds no .py, .rs, .md or .txt files");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    files.shuffle(&mut rng);
    let mut out = Vec::new();
    let mut gathered = 0;
    for f in files {
        if gathered >= tokens {
            break;
        }
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let ids = tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", f.display()))?
            .get_ids()
            .to_vec();
        let mut pieces: Vec<&[u32]> = ids.chunks(chunk).filter(|c| c.len() >= chunk / 2).collect();
        pieces.shuffle(&mut rng);
        for p in pieces.into_iter().take(4) {
            gathered += p.len();
            out.push(p.to_vec());
            if gathered >= tokens {
                break;
            }
        }
    }
    Ok(out)
}

/// Prompts answered per part kept in the run's progress (16 batches of the engine's 16).
const ANSWER_PART: usize = 256;

/// `answered_traces` of `prompts`, a part at a time, each part kept in `resume` as it is read
/// back, or taken from there where an earlier run of this command made it.
fn self_distilled(
    loaded: &tandem_models::LoadedModel,
    target_layers: &[usize],
    prompts: &[tandem_bench::workload::Prompt],
    max_tokens: usize,
    resume: &Resume,
) -> Result<Vec<tandem_engine::online::Trace>> {
    let mut out = Vec::with_capacity(prompts.len());
    let parts = prompts.len().div_ceil(ANSWER_PART);
    for (i, part) in prompts.chunks(ANSWER_PART).enumerate() {
        let traces = match resume.answers(i)? {
            Some(kept) if kept.len() == part.len() => {
                eprintln!("answers, part {} of {parts}: kept from an earlier run of this command", i + 1);
                kept
            }
            _ => {
                let label = format!("part {} of {parts}", i + 1);
                let made = answered_traces(loaded, target_layers, part, max_tokens, &label)?;
                resume.keep_answers(i, &made)?;
                made
            }
        };
        out.extend(traces);
    }
    Ok(out)
}

/// Traces of the target answering `prompts` greedily (at most `max_tokens` each), served by the
/// engine 16 at a time: prompt and answer read back by the target, the answer's positions marked
/// as output (`prompt_len`), every position labelled with the target's own distribution.
fn answered_traces(
    loaded: &tandem_models::LoadedModel,
    target_layers: &[usize],
    prompts: &[tandem_bench::workload::Prompt],
    max_tokens: usize,
    label: &str,
) -> Result<Vec<tandem_engine::online::Trace>> {
    use tandem_engine::{Engine, EngineConfig, Event, Fcfs, GenerationRequest};
    let ids = tandem_bench::workload::chat_ids(loaded, prompts)?;
    let config = EngineConfig { max_batch: 16, max_waiting: ids.len().max(1), ..Default::default() };
    let (engine, handle) = Engine::new(loaded.model.clone(), config, Box::new(Fcfs::default()))?;
    let thread = engine.spawn();
    let bar = Progress::new(ids.len() as u64, "prompts answered by the target");
    bar.set_message(label.to_string());
    let receivers = ids
        .iter()
        .map(|prompt| {
            let request = GenerationRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling: tandem_runtime::SamplingParams { temperature: 0.0, ..Default::default() },
                stop_token_ids: loaded.stop_token_ids.clone(),
                client: None,
                agent: None,
                weights: None,
                score: None,
            };
            handle.submit(request).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let prompt_lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut chunks = Vec::with_capacity(ids.len());
    for (prompt, mut rx) in ids.into_iter().zip(receivers) {
        let mut seq = prompt;
        loop {
            match rx.blocking_recv().context("the engine stopped")? {
                Event::Token(t) => seq.push(t.id),
                Event::Finished { .. } => break,
                Event::Failed(m) => bail!("a self-distillation prompt failed: {m}"),
                Event::Scored(_) => {}
            }
        }
        chunks.push(seq);
        bar.inc(1);
    }
    bar.finish_and_clear();
    handle.shutdown();
    let _ = thread.join();
    // Reading the answers back costs about as long as answering them.
    let bar = Progress::new(chunks.len() as u64, "answers read back by the target");
    bar.set_message(label.to_string());
    let mut traces = distill::text_traces(&loaded.model, target_layers, &chunks, 4, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    for (t, len) in traces.iter_mut().zip(prompt_lens) {
        t.prompt_len = len;
    }
    Ok(traces)
}
