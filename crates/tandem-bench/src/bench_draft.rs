//! `tandem bench draft`: what the EAGLE drafter costs beside the target it drafts for. At each
//! batch size, a steady decode: every sequence commits one token per step (so the drafter catches
//! up one row each), the target runs one decode step over the batch, and the drafter drafts k
//! tokens for every sequence (one batched catch-up, then one batched row per further token).
//! Reports one draft token's cost (the drafter's time per step / k) relative to the target's
//! decode step at the same batch: the figure the learned-drafter issue targets (at most 10%).
//!
//! Then the drafter's trainer: one optimizer step over a batch of positions from traces of real
//! text (the target's features and its own distribution as labels), unrolled 1..3 steps deep as
//! online training unrolls it, on one thread (the online trainer's share of a busy server) and on
//! every core (an idle one). Reports ms per step and steps per minute.
use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;
use std::time::Instant;
use tandem_cli::spec_arg::DraftDtype;
use tandem_cli::{load_model, models};
use tandem_models::{KvCache, LoadOptions, LogitsFor, SequenceInput, WeightDtype};
use tandem_runtime::sampling::SamplingParams;
use tandem_runtime::speculative::{DraftRequest, Drafter, EagleDrafter, WarmStart};

#[derive(clap::Args)]
pub struct DraftBenchArgs {
    /// Model: a path or `smollm2` / `qwen-coder`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Target weights: quantized (GGUF blocks kept), f32 or bf16.
    #[arg(long, default_value = "quantized")]
    mode: String,
    /// Sequences drafted for at once.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    batch: Vec<usize>,
    /// Draft tokens per sequence per step.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Rows of the drafter's output layer (0: the whole vocabulary).
    #[arg(long, default_value_t = 8192)]
    draft_vocab: usize,
    /// The drafter's matrices while serving.
    #[arg(long, value_enum, default_value_t = DraftDtype::default())]
    draft_dtype: DraftDtype,
    /// Prompt length of each sequence (the drafter holds the last 64 positions of it).
    #[arg(long, default_value_t = 96)]
    prompt_tokens: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Unroll depths of the timed trainer steps (`0`: no trainer timing).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    train_depths: Vec<usize>,
    /// Positions per trainer step.
    #[arg(long, default_value_t = 128)]
    train_batch: usize,
    /// Keep the drafter's head frozen in the trainer (as online training of a warm-started or
    /// day-0 drafter does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    train_frozen_head: bool,
    /// Draft ids scored per trainer step (the trainer's --train-sampled-vocab; 0: all).
    #[arg(long, default_value_t = tandem_speculator::TrainConfig::default().sampled_vocab)]
    train_sampled_vocab: usize,
    #[arg(long, default_value = "bench-results/draft.json")]
    out: String,
}

#[derive(Serialize)]
struct TrainRow {
    threads: usize,
    depth: usize,
    /// Median seconds of one optimizer step.
    step_s: f64,
    steps_per_minute: f64,
}

#[derive(Serialize)]
struct Row {
    batch: usize,
    k: usize,
    /// Median seconds of one target decode step over the batch.
    target_step_s: f64,
    /// Median seconds the drafter takes per step (catch-up and k tokens for every sequence).
    draft_s: f64,
    /// draft_s / k / target_step_s: one draft token for the whole batch, relative to a target step.
    draft_token_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(a: DraftBenchArgs) -> Result<()> {
    let path = models::resolve(Some(&a.model))?;
    let weight_dtype = if a.mode == "bf16" { WeightDtype::Bf16 } else { WeightDtype::F32 };
    let opts = LoadOptions { keep_quantized: a.mode == "quantized", weight_dtype, ..Default::default() };
    let loaded = load_model(&path, &opts)?;
    let model = &loaded.model;
    let vocab = (model.config.vocab_size as u32).min(30_000);
    println!("{} ({}), drafter: vocabulary {}, {:?}, k = {}", loaded.name, a.mode, a.draft_vocab, a.draft_dtype, a.k);
    println!("{:>6} {:>14} {:>12} {:>20}", "batch", "target step ms", "drafter ms", "draft token / step");
    let mut rows = Vec::new();
    for &batch in &a.batch {
        let draft_vocab = (a.draft_vocab > 0).then_some(a.draft_vocab);
        let mut drafter =
            EagleDrafter::fresh(model, draft_vocab, WarmStart::Full, 0)?.with_serving(a.draft_dtype.serve_as())?;
        let capacity = a.prompt_tokens + a.steps + a.k + 8;
        drafter.prepare(batch, capacity)?;
        let mut cache = KvCache::new(&model.config, batch, capacity, model.device())?;
        let mut tokens: Vec<Vec<u32>> = (0..batch)
            .map(|s| (0..a.prompt_tokens).map(|i| (i as u32 * 7919 + s as u32 * 31 + 17) % vocab).collect())
            .collect();
        let layers = drafter.target_layers().to_vec();
        // The prompt, with the target's real hidden states for the drafter.
        for (slot, t) in tokens.iter().enumerate() {
            let input = SequenceInput { slot, tokens: &t[..t.len() - 1], logits: LogitsFor::None, siblings: &[] };
            let out = model.forward(&[input], &mut cache, &layers)?;
            drafter.observe(slot, 0, &out.hidden)?;
        }
        let sampling = SamplingParams { temperature: 0.0, ..Default::default() };
        let (mut target_times, mut draft_times) = (Vec::new(), Vec::new());
        for step in 0..a.steps + 2 {
            let requests: Vec<DraftRequest> = (0..batch)
                .map(|slot| DraftRequest {
                    slot,
                    tokens: &tokens[slot],
                    k: a.k,
                    copy_k: 0,
                    alternatives: 0,
                    sampling: &sampling,
                })
                .collect();
            let t = Instant::now();
            drafter.propose(model, &requests)?;
            let draft_s = t.elapsed().as_secs_f64();
            let inputs: Vec<SequenceInput> = (0..batch)
                .map(|slot| SequenceInput {
                    slot,
                    tokens: &tokens[slot][tokens[slot].len() - 1..],
                    logits: LogitsFor::Last,
                    siblings: &[],
                })
                .collect();
            let t = Instant::now();
            let out = model.forward(&inputs, &mut cache, &layers)?;
            let target_s = t.elapsed().as_secs_f64();
            for (slot, t) in tokens.iter_mut().enumerate() {
                let hidden: Vec<Tensor> =
                    out.hidden.iter().map(|x| x.narrow(0, slot, 1)).collect::<candle_core::Result<_>>()?;
                drafter.observe(slot, t.len() - 1, &hidden)?;
                t.push((t.len() as u32 * 104_729 + slot as u32) % vocab);
            }
            if step >= 2 {
                draft_times.push(draft_s);
                target_times.push(target_s);
            }
        }
        let (target_step_s, draft_s) = (median(target_times), median(draft_times));
        let row =
            Row { batch, k: a.k, target_step_s, draft_s, draft_token_ratio: draft_s / a.k as f64 / target_step_s };
        println!(
            "{:>6} {:>14.2} {:>12.2} {:>19.1}%",
            row.batch,
            row.target_step_s * 1e3,
            row.draft_s * 1e3,
            row.draft_token_ratio * 100.0
        );
        rows.push(row);
    }
    let train_rows = trainer_rows(&loaded, &a)?;
    if let Some(dir) = std::path::Path::new(&a.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "machine": crate::machine_description(),
        "model": loaded.name,
        "mode": a.mode,
        "draft_vocab": a.draft_vocab,
        "draft_dtype": format!("{:?}", a.draft_dtype),
        "rows": rows,
        "train_batch": a.train_batch,
        "train_frozen_head": a.train_frozen_head,
        "train_sampled_vocab": a.train_sampled_vocab,
        "train_rows": train_rows,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", a.out);
    Ok(())
}

/// The trainer's step at each unroll depth, on one thread and on every core.
fn trainer_rows(loaded: &tandem_models::LoadedModel, a: &DraftBenchArgs) -> Result<Vec<TrainRow>> {
    use rand::SeedableRng;
    use tandem_speculator::{distill, TracePool, TrainConfig, Trainer};
    let depths: Vec<usize> = a.train_depths.iter().copied().filter(|&d| d > 0).collect();
    if depths.is_empty() {
        return Ok(Vec::new());
    }
    let model = &loaded.model;
    let drafter = EagleDrafter::fresh(model, (a.draft_vocab > 0).then_some(a.draft_vocab), WarmStart::Full, 0)?;
    let tc =
        TrainConfig { freeze_head: a.train_frozen_head, sampled_vocab: a.train_sampled_vocab, ..Default::default() };
    let (rows, norm) = model.unembedding_rows(&drafter.weights().d2t)?;
    let mut trainer = Trainer::new(drafter.config.clone(), drafter.weights(), model.embedding_table()?, tc.clone())?
        .with_target_head(rows, norm)?;
    let chunks = crate::workload::chat_ids(loaded, &crate::workload::distill_prompts(40, 1)?)?;
    let mut pool = TracePool::new(usize::MAX);
    for t in distill::text_traces(model, &drafter.config.target_layers, &chunks, 4, |_| {})? {
        pool.add(t);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vd = trainer.config.draft_vocab_size;
    println!(
        "\ntrainer: {} positions per step, head {}",
        a.train_batch,
        if tc.freeze_head { "frozen" } else { "trained" }
    );
    println!("{:>8} {:>6} {:>10} {:>14}", "threads", "depth", "step ms", "steps / min");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for threads in [1, cores] {
        let pool_t = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        for &depth in &depths {
            let mut times = Vec::new();
            for i in 0..a.steps.clamp(3, 10) + 1 {
                let batch = pool
                    .sample(&mut rng, a.train_batch, tc.window, vd, &|id| trainer.draft_id(id))
                    .ok_or_else(|| anyhow::anyhow!("the text traces hold no trainable positions"))?;
                let t = Instant::now();
                pool_t.install(|| trainer.step_unrolled(&batch, depth))?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let step_s = median(times);
            let row = TrainRow { threads, depth, step_s, steps_per_minute: 60.0 / step_s };
            println!("{:>8} {:>6} {:>10.1} {:>14.0}", threads, depth, step_s * 1e3, row.steps_per_minute);
            out.push(row);
        }
        if cores == 1 {
            break;
        }
    }
    Ok(out)
}
