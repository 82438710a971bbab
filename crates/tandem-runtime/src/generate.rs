//! Single-sequence generation: chunked prefill, then one decode step per token, streaming each
//! sampled token to the caller. The CLI and the benchmarks use it; the server's engine batches
//! many sequences through the same `Model::forward`.
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use std::time::Instant;
use tandem_models::{KvCache, LogitsFor, Model, Result, SequenceInput, Tokenizer};

/// Prompt tokens fed per forward during prefill: bounds activation memory for long prompts.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends at any of these tokens (which are not returned).
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub generated_tokens: usize,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    /// Tokens after the first (which prefill produced) over the decode time.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

pub struct Generation {
    pub tokens: Vec<SampledToken>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

/// Logits of the selected row as a host vector.
fn row(logits: &candle_core::Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(logits.get(i)?.to_vec1::<f32>()?)
}

/// Generates from `prompt` in cache slot `slot` (which is reset first). `on_token` sees each token
/// as it is sampled and may return false to stop early.
pub fn generate(
    model: &Model,
    cache: &mut KvCache,
    slot: usize,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&SampledToken) -> bool,
) -> Result<Generation> {
    cache.reset(slot)?;
    let mut sampler =
        Sampler::new(opts.sampling.clone()).after_prompt(prompt.len()).ending_with(opts.stop_token_ids.clone());
    let mut history = prompt.to_vec();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut tokens = Vec::new();
    if prompt.is_empty() {
        return Err(tandem_models::ModelError::InvalidBatch("the prompt is empty".into()));
    }
    if opts.max_tokens == 0 {
        return Ok(Generation { tokens, finish_reason: FinishReason::Length, stats });
    }

    let start = Instant::now();
    let mut logits = None;
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let want = if i + 1 == chunks.len() { LogitsFor::Last } else { LogitsFor::None };
        let out = model.forward(&[SequenceInput { slot, tokens: chunk, logits: want, siblings: &[] }], cache, &[])?;
        logits = Some(out.logits);
    }
    let mut next = sampler.sample(&row(&logits.expect("prompt is not empty"), 0)?, &history);
    stats.prompt_secs = start.elapsed().as_secs_f64();

    let decode_start = Instant::now();
    let mut finish_reason = FinishReason::Length;
    loop {
        if opts.stop_token_ids.contains(&next.id) {
            finish_reason = FinishReason::Stop;
            break;
        }
        history.push(next.id);
        tokens.push(next.clone());
        if !on_token(&next) {
            finish_reason = FinishReason::Stop;
            break;
        }
        if tokens.len() >= opts.max_tokens || cache.len(slot) + 1 > cache.capacity().min(model.max_positions()) {
            break;
        }
        let out = model.forward(
            &[SequenceInput { slot, tokens: &[next.id], logits: LogitsFor::Last, siblings: &[] }],
            cache,
            &[],
        )?;
        next = sampler.sample(&row(&out.logits, 0)?, &history);
    }
    stats.generated_tokens = tokens.len();
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(Generation { tokens, finish_reason, stats })
}

/// Turns a stream of token ids into a stream of text, never splitting a multi-byte character
/// (byte-level BPE tokens may end mid-character).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream { tokenizer, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// The new text that token `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true).ok()?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..], true).ok()?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.is_char_boundary(prefix.len()) {
            let new = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Some(new)
        } else {
            None
        }
    }
}
