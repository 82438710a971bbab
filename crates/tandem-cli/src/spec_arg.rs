//! `--spec` and `--spec-k`: which drafter speculative decoding uses.
use crate::load_model;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tandem_engine::EngineConfig;
use tandem_models::{LoadOptions, LoadedModel};
use tandem_runtime::speculative::{DraftModelDrafter, Drafter, EagleDrafter, NgramDrafter, ServeAs, WarmStart};

#[derive(clap::Args, Clone, Debug)]
pub struct SpecArgs {
    /// Speculative decoding: `none`, `ngram` (prompt lookup), `eagle` (a fresh EAGLE-3-style drafter
    /// on the target's hidden states), `eagle:DIR` (a saved one) or `draft-model:PATH` (a small model
    /// with the same tokenizer). Output is identical to `none` (greedy) or has the same distribution
    /// (sampling); only speed changes.
    #[arg(long, default_value = "none")]
    pub spec: String,
    /// Most tokens drafted per sequence per step.
    #[arg(long, default_value_t = EngineConfig::default().spec_k)]
    pub spec_k: usize,
    /// Always draft --spec-k tokens (by default each sequence's draft length adapts to how many
    /// of its drafts are accepted, between 1 and --spec-k).
    #[arg(long)]
    pub spec_fixed_k: bool,
    /// Greedy requests: also verify up to this many of the drafter's runners-up, at any draft
    /// position, in the same forward (a draft tree; EAGLE drafters). 0: chains only.
    #[arg(long, default_value_t = EngineConfig::default().spec_alternatives)]
    pub spec_alternatives: usize,
    /// Rows of a fresh EAGLE drafter's output layer: the first N token ids (BPE ids roughly follow
    /// frequency). Smaller drafts faster; 0 keeps the whole vocabulary.
    #[arg(long, default_value_t = 8192)]
    pub draft_vocab: usize,
    /// What a fresh EAGLE drafter copies from the target: `none` (random), `head` (the target's
    /// unembedding rows and final norm) or `full` (head, plus its last layer as the decoder layer).
    /// Measured on SmolLM2 code traces (agreement with the target on held-out requests after 300
    /// steps): full with the copied head kept frozen learns best and with the cheapest steps, so it
    /// is the default (docs/speculative-decoding.md, "Online speculator training").
    #[arg(long, default_value = "full")]
    pub warm_start: WarmStart,
    /// Type of the EAGLE drafter's matrices while serving: `q4_1` (the default) reads 5 bits a
    /// value per draft token, `q8_0` 8.5 and `bf16` 16 (drafts never change outputs; the trainer
    /// keeps f32). Measured by `tandem bench draft` and `tandem bench online`
    /// (docs/speculative-decoding.md, 2026-12-06).
    #[arg(long, value_enum, default_value_t = DraftDtype::default())]
    pub draft_dtype: DraftDtype,
    /// Start the EAGLE drafter from this saved drafter (same as `--spec eagle:DIR`).
    #[arg(long)]
    pub drafter: Option<std::path::PathBuf>,
    /// With an EAGLE drafter, try prompt lookup first: where the sequence's last N (up to 4)
    /// tokens occurred earlier in it, draft what followed them; elsewhere the EAGLE drafter
    /// drafts. Copies are free and right whenever the output repeats its context; online training
    /// ignores them. 0: the EAGLE drafter alone.
    #[arg(long, default_value_t = LOOKUP_MIN)]
    pub spec_lookup: usize,
}

impl SpecArgs {
    fn draft_vocab(&self) -> Option<usize> {
        (self.draft_vocab > 0).then_some(self.draft_vocab)
    }
}

/// The saved drafter's folder the arguments name (`eagle:DIR`, or `--drafter` once it holds one).
fn saved_drafter(args: &SpecArgs) -> Option<PathBuf> {
    match args.spec.strip_prefix("eagle:") {
        Some(dir) => Some(PathBuf::from(dir)),
        // --drafter names a checkpoint folder that may not exist yet (a first online run).
        None => args.drafter.clone().filter(|d| d.join("model.safetensors").exists()),
    }
}

/// The EAGLE drafter the arguments name: loaded from `saved_drafter`, else fresh.
pub fn build_eagle(args: &SpecArgs, target: &LoadedModel) -> Result<EagleDrafter> {
    let drafter = match saved_drafter(args) {
        Some(dir) => {
            EagleDrafter::load(&dir, &target.model).with_context(|| format!("loading the drafter {}", dir.display()))?
        }
        None => EagleDrafter::fresh(&target.model, args.draft_vocab(), args.warm_start, 0)?,
    };
    Ok(drafter.with_serving(args.draft_dtype.serve_as())?.with_lookup(lookup(args.spec_lookup)))
}

/// The shortest match prompt lookup copies after (`--spec-lookup`, and `tandem bench online
/// --lookup-min`). Two-token matches are often chance: with 3 the learned drafter keeps those
/// steps, and the busy-server stream ran 2.8% faster beside no speculation (with copies starting
/// at two tokens, `Sequence::copy_k`; nine interleaved pairs, docs/speculative-decoding.md).
pub const LOOKUP_MIN: usize = 3;

/// Prompt lookup for matches of `min` to 4 tokens (or longer if `min` is), none for 0.
pub fn lookup(min: usize) -> Option<NgramDrafter> {
    (min > 0).then(|| NgramDrafter { max_ngram: min.max(4), min_ngram: min })
}

/// The EAGLE drafter's matrix type while serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DraftDtype {
    F32,
    Bf16,
    /// GGUF Q8_0 blocks through the quantized kernels: on SmolLM2 Q4_1 a draft token costs about
    /// 8% of a target decode step against bf16's 13%.
    #[value(name = "q8_0")]
    Q8_0,
    /// GGUF Q4_1 blocks: 60% of Q8_0's bytes, a draft token ~5% of a target step. The default:
    /// beside Q8_0 on a busy server (Zen 5, 2026-12-06) acceptance within 0-4% and 1.7-3.8%
    /// more tokens/s on both default models.
    #[default]
    #[value(name = "q4_1")]
    Q4_1,
}

impl DraftDtype {
    pub fn serve_as(self) -> ServeAs {
        match self {
            DraftDtype::F32 => ServeAs::F32,
            DraftDtype::Bf16 => ServeAs::Bf16,
            DraftDtype::Q8_0 => ServeAs::Q8_0,
            DraftDtype::Q4_1 => ServeAs::Q4_1,
        }
    }
}

/// The drafter `args.spec` names, or None for `none`.
pub fn build(args: &SpecArgs, target: &LoadedModel, opts: &LoadOptions) -> Result<Option<Box<dyn Drafter>>> {
    let (kind, arg) = match args.spec.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (args.spec.as_str(), None),
    };
    Ok(match (kind, arg) {
        ("none", None) => None,
        ("ngram", None) => Some(Box::new(NgramDrafter::default())),
        ("eagle", _) => Some(Box::new(build_eagle(args, target)?)),
        ("draft-model", Some(path)) => {
            let draft = load_model(Path::new(path), opts)?;
            if draft.tokenizer.get_vocab_size(true) != target.tokenizer.get_vocab_size(true) {
                bail!(
                    "the draft model's tokenizer ({} tokens) differs from the target's ({})",
                    draft.tokenizer.get_vocab_size(true),
                    target.tokenizer.get_vocab_size(true)
                );
            }
            Some(Box::new(DraftModelDrafter::new(draft.model)))
        }
        _ => bail!("unknown --spec `{}`: use none, ngram, eagle, eagle:DIR or draft-model:PATH", args.spec),
    })
}
