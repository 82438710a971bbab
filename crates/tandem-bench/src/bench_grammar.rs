//! `tandem bench grammar`: what structured outputs cost. Per model: the token trie's one-time
//! build, each grammar's compile time, and greedy decode tok/s through the serving engine with the
//! grammar against the same prompt without one, plainly and with n-gram speculation (whose output
//! must equal the plain constrained one).
use crate::bench_spec::{run_once, Run};
use anyhow::{ensure, Result};
use serde::Serialize;
use serde_json::json;
use std::time::Instant;
use tandem_cli::{load_model, models, DtypeArg};
use tandem_models::Device;
use tandem_runtime::speculative::{Drafter, NgramDrafter};
use tandem_runtime::{ChatTemplate, GrammarSpec, Grammars, Message, SamplingParams};

#[derive(clap::Args)]
pub struct GrammarBenchArgs {
    /// Models: paths or `smollm2` / `qwen-coder` (default: both).
    #[arg(long)]
    model: Vec<String>,
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// Most tokens generated per run (greedy).
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    #[arg(long, default_value = "bench-results/grammar.json")]
    out: String,
}

#[derive(Serialize)]
struct Row {
    model: String,
    grammar: String,
    compile_ms: f64,
    tokens: usize,
    decode_tok_s: f64,
    /// decode tok/s against the same prompt without a grammar.
    vs_free: f64,
    ngram_tok_s: f64,
    /// The n-gram run's output equals the plain constrained one.
    identical: bool,
}

const PROMPT: &str = "List five classic novels as JSON: for each its title, author and year of publication.";

/// The grammars measured (label, spec): a schema for the prompt's answer, any JSON object, a
/// regular expression.
fn grammars() -> Vec<(&'static str, GrammarSpec)> {
    let books = json!({
        "type": "object",
        "properties": {"books": {"type": "array", "maxItems": 5, "items": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"}},
            "required": ["title", "author", "year"],
            "additionalProperties": false,
        }}},
        "required": ["books"],
        "additionalProperties": false,
    });
    vec![
        ("json_schema", GrammarSpec::JsonSchema(books)),
        ("json_object", GrammarSpec::JsonObject),
        ("regex", GrammarSpec::Regex(r"(\d\. [A-Z][^\n]{5,60}\n){5}".into())),
    ]
}

pub fn run(args: GrammarBenchArgs) -> Result<()> {
    let names =
        if args.model.is_empty() { vec!["smollm2".to_string(), "qwen-coder".to_string()] } else { args.model.clone() };
    let mut rows = Vec::new();
    let mut tries = Vec::new();
    println!(
        "{:<36} {:<12} {:>10} {:>6} {:>9} {:>8} {:>11} {:>9}",
        "model", "grammar", "compile ms", "tokens", "tok/s", "vs free", "ngram tok/s", "identical"
    );
    for name in &names {
        let path = models::resolve(Some(name))?;
        let loaded = load_model(&path, &args.dtype.load_options(Device::Cpu))?;
        let model_name = format!("{} {}", loaded.name, args.dtype.name());
        let template = ChatTemplate::new(
            loaded.chat_template.as_deref(),
            loaded.bos_token.as_deref(),
            loaded.eos_token.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        let text = template.render(&[Message::new("user", PROMPT)], true).map_err(anyhow::Error::msg)?;
        let prompt = loaded.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
        let stop = loaded.stop_token_ids.clone();
        let started = Instant::now();
        let compiler = Grammars::for_model(&loaded).map_err(anyhow::Error::msg)?;
        let trie_secs = started.elapsed().as_secs_f64();
        println!("{model_name}: token trie built in {trie_secs:.2} s (once per model)");
        tries.push(json!({"model": model_name, "trie_secs": trie_secs}));
        let mut model = loaded.model;
        // One run on the serving engine: greedy, with `sampling`'s grammar, plain or with n-gram drafts.
        let go = |model, sampling, ngram: bool| {
            let drafter = ngram.then(|| (Box::new(NgramDrafter::default()) as Box<dyn Drafter>, 8));
            run_once(model, &prompt, args.max_tokens, &stop, drafter, true, sampling)
        };
        (_, model) = go(model, SamplingParams::default(), false)?; // warm-up
        let free: Run;
        (free, model) = go(model, SamplingParams::default(), false)?;
        for (label, spec) in grammars() {
            let t = Instant::now();
            let grammar = compiler.compile(&spec).map_err(anyhow::Error::msg)?;
            let compile_ms = t.elapsed().as_secs_f64() * 1e3;
            let sampling = SamplingParams { grammar: Some(grammar), ..Default::default() };
            let (plain, ngram): (Run, Run);
            (plain, model) = go(model, sampling.clone(), false)?;
            (ngram, model) = go(model, sampling, true)?;
            let row = Row {
                model: model_name.clone(),
                grammar: label.into(),
                compile_ms,
                tokens: plain.tokens.len(),
                decode_tok_s: plain.decode_tok_s,
                vs_free: plain.decode_tok_s / free.decode_tok_s,
                ngram_tok_s: ngram.decode_tok_s,
                identical: ngram.tokens == plain.tokens,
            };
            println!(
                "{:<36} {:<12} {:>10.2} {:>6} {:>9.1} {:>7.2}x {:>11.1} {:>9}",
                row.model,
                row.grammar,
                row.compile_ms,
                row.tokens,
                row.decode_tok_s,
                row.vs_free,
                row.ngram_tok_s,
                if row.identical { "yes" } else { "NO" }
            );
            rows.push(row);
        }
        println!("{:<36} {:<12} {:>10} {:>6} {:>9.1}", model_name, "none", "", free.tokens.len(), free.decode_tok_s);
    }
    let json =
        json!({"machine": crate::machine_description(), "max_tokens": args.max_tokens, "tries": tries, "rows": rows});
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.out);
    ensure!(rows.iter().all(|r| r.identical), "a speculative constrained output differed from the plain one");
    Ok(())
}
