//! How much memory a training pass takes, so that a request too big for the machine is refused
//! with the estimate instead of being tried (a single 5,000-token datum once grew the server to
//! 24 GB and the kernel killed it).
//!
//! Peak memory of one forward_backward pass, measured as the growth of the process's peak RSS
//! (`crates/tandem-train/tests/memory.rs` checks the estimate against the measurement):
//! - per token, the activations autograd keeps for the backward: a few rows of the hidden,
//!   attention and MLP widths per layer, and what the fused head's backward holds per token
//!   (a couple of vocabulary-wide rows' worth: its hidden-state gradients and vocabulary slices);
//! - per sequence, the attention backward's blocks of query rows against every key before them
//!   (linear in its length: `BWD_QUERY_BLOCK` rows at a time);
//! - the gradients of every trained value (twice: this request's and the accumulated sum).
//!
//! Attention itself is linear in the sequence: its forward is the serving kernel (no [t, t]
//! matrix) and its backward works in blocks of query rows; the head's logits are never whole
//! (`tandem_models::ops::head`) and an adapter's delta is one op (`tandem_models::ops::lora`).
use tandem_models::ops::ATTENTION_BWD_QUERY_BLOCK as ATTN_BLOCK;
use tandem_models::ModelConfig;

/// f32 values kept per token, fitted to measured peaks on SmolLM2-135M and Qwen2.5-0.5B
/// (this machine, 2026-12-03; `docs/training-memory.md`), each rounded up:
/// - vocabulary-wide rows: 2.0 measured;
const VOCAB_ROWS: f64 = 2.5;
/// - rows of the layer widths (hidden + MLP + q/k/v) per layer: LoRA 2.7 measured on SmolLM2 and
///   1.5 on Qwen2.5 beside the vocabulary rows (an adapted projection is one op: it keeps its
///   input alone; 3.5 leaves CI machines a margin), full training 2.5;
const LORA_LAYER_ROWS: f64 = 3.5;
const FULL_LAYER_ROWS: f64 = 3.0;
/// - a forward-only pass keeps nothing for a backward (0.3 vocabulary rows' worth measured).
const FORWARD_VOCAB_ROWS: f64 = 0.35;
/// The f32 [heads, block, t] temporaries an attention backward block holds.
const ATTN_TEMPS: f64 = 8.0;

/// What a pass trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PassKind {
    ForwardOnly,
    Lora,
    /// Full weights: `parameters` trained values (their gradients are held too).
    Full {
        parameters: usize,
    },
}

/// Estimated peak bytes of one pass over sequences of `lens` tokens.
pub fn pass_bytes(c: &ModelConfig, lens: &[usize], kind: PassKind) -> u64 {
    let tokens: usize = lens.iter().sum();
    let widths = (c.hidden_size + c.intermediate_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim) as f64;
    let (vocab_rows, layer_rows, grads) = match kind {
        PassKind::ForwardOnly => (FORWARD_VOCAB_ROWS, 0.0, 0.0),
        PassKind::Lora => (VOCAB_ROWS, LORA_LAYER_ROWS, 0.0),
        PassKind::Full { parameters } => (VOCAB_ROWS, FULL_LAYER_ROWS, 2.0 * parameters as f64),
    };
    let per_token = vocab_rows * c.vocab_size as f64 + layer_rows * widths * c.num_layers as f64 + widths;
    let longest = lens.iter().copied().max().unwrap_or(0);
    let attention = ATTN_TEMPS * (c.num_heads * ATTN_BLOCK.min(longest) * longest) as f64;
    (4.0 * (per_token * tokens as f64 + attention + grads)) as u64
}

/// "1.4 GiB", "310 MiB".
pub fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
