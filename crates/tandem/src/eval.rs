//! `tandem eval perplexity`: a model's perplexity on held-out text, through the serving forward.
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use tandem_cli::care_arg::{bar, encode};
use tandem_cli::{load_model, models, DtypeArg};

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a model on text (scored in windows through the KV cache and kernels that
    /// serve, a converted model's latent attention included). Prints one line, JSON with --json.
    Perplexity(PerplexityArgs),
}

#[derive(clap::Args)]
pub struct PerplexityArgs {
    /// A .gguf file, an HF model folder (a `tandem convert care` output too), or `smollm2` /
    /// `qwen-coder`.
    #[arg(long)]
    model: Option<String>,
    /// Text files or folders. Default: CPython's LICENSE.txt (read through python3), text people
    /// wrote and a different document from the default calibration text.
    #[arg(long, num_args = 1..)]
    text: Vec<PathBuf>,
    /// Tokens per scored window (each window starts with an empty cache).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Score at most this many tokens of the text (0: all).
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    #[command(flatten)]
    cache: tandem_cli::CacheArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    let EvalCommand::Perplexity(args) = cmd;
    let path = models::resolve(args.model.as_deref())?;
    let opts = args.cache.apply(args.dtype.load_options(tandem_cli::device(None)?));
    let loaded = load_model(&path, &opts)?;
    let text = match args.text.is_empty() {
        true => tandem_care::text::python_license(),
        false => tandem_care::text::read_paths(&args.text),
    }
    .map_err(|e| anyhow!(e))?;
    let mut tokens = encode(&loaded, &text)?;
    if args.max_tokens > 0 {
        tokens.truncate(args.max_tokens);
    }
    let bar = bar("scoring", "windows");
    let (nll, count) =
        tandem_models::eval::negative_log_likelihood(&loaded.model, &tokens, args.window.max(2), &mut |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
    bar.finish_and_clear();
    let ppl = tandem_models::eval::perplexity(nll, count);
    let kv = loaded.model.config.kv_bytes_per_token();
    if args.json {
        let j = serde_json::json!({"model": loaded.name, "perplexity": ppl, "tokens_scored": count,
            "window": args.window, "kv_bytes_per_token": kv});
        println!("{j}");
    } else {
        println!(
            "{}: perplexity {ppl:.3} over {count} tokens (windows of {}; KV {kv} bytes/token)",
            loaded.name, args.window
        );
    }
    Ok(())
}
