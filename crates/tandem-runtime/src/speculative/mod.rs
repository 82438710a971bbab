//! Speculative decoding: drafters propose tokens, the target verifies them all in one forward.
//!
//! A [`Drafter`] sees each decoding sequence's tokens (and, if it asks, the target's hidden states
//! at the positions the target has committed) and proposes up to k next tokens. [`verify`] turns
//! the target's logits over `[pending, d1..dk]` into the tokens actually emitted: greedy keeps the
//! longest prefix equal to the target's argmax; sampling uses rejection sampling, so the output
//! distribution is exactly the target's whatever the drafter proposes. Drafters only change speed.
mod draft_model;
pub mod eagle;
mod ngram;
mod oracle;
mod verify;

pub use draft_model::DraftModelDrafter;
pub use eagle::{EagleConfig, EagleDrafter, EagleWeights, ServeAs, WarmStart};
pub use ngram::NgramDrafter;
pub use oracle::OracleDrafter;
pub use verify::{verify, Verified};

use crate::sampling::{Sampler, SamplingParams, Target};
use candle_core::Tensor;
use std::sync::Arc;
use tandem_models::{Model, Result};

/// One decoding sequence asking for a draft.
#[derive(Debug, Clone)]
pub struct DraftRequest<'a> {
    /// The sequence's KV slot in the target (drafters keep per-slot state under the same index).
    pub slot: usize,
    /// Prompt and output so far. The last token is sampled but not yet in the target's cache; the
    /// draft continues after it.
    pub tokens: &'a [u32],
    /// Propose at most this many tokens.
    pub k: usize,
    /// At most this many tokens for a draft copied by prompt lookup (`Draft::lookup`), which a
    /// drafter may offer even where `k` is 0: copies are free to make, and the engine tunes their
    /// length apart from the learned drafter's.
    pub copy_k: usize,
    /// At most this many `Draft::alternatives` in all, over every draft position (0: a plain
    /// chain): the draft tree's node budget beyond the chain. The engine asks for them only where
    /// it can verify them: greedy requests with room for the extra rows.
    pub alternatives: usize,
    pub sampling: &'a SamplingParams,
}

/// Proposed continuation of one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// The distribution each token was drawn from (sparse, target ids), for rejection sampling.
    /// None: the tokens were chosen deterministically (the distribution is one-hot).
    pub probs: Option<Vec<Vec<(u32, f32)>>>,
    /// Copied from earlier in the sequence by prompt lookup, not proposed by a learned drafter:
    /// online training neither learns from its rejections nor judges the drafter by it.
    pub lookup: bool,
    /// Other candidates for draft positions (greedy requests only), verified in the same forward
    /// as siblings of the tokens they stand beside, in order of position: where the chain is
    /// first rejected, a sibling that is the target's token there is accepted, with the target's
    /// next token after it. The draft is then a tree (the chain with branches of one token), so a
    /// wrong guess where the drafter was unsure does not end the step empty-handed.
    pub alternatives: Vec<Alternative>,
}

/// A sibling of a draft token: another candidate for the same position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alternative {
    /// The index in `Draft::tokens` of the token it stands beside.
    pub of: usize,
    pub token: u32,
}

impl Draft {
    pub fn greedy(tokens: Vec<u32>) -> Draft {
        Draft { tokens, probs: None, lookup: false, alternatives: Vec::new() }
    }

    /// The drafter's probability of its `i`-th token.
    pub fn prob_of_own(&self, i: usize) -> f32 {
        match &self.probs {
            None => 1.0,
            Some(p) => p[i].iter().find(|c| c.0 == self.tokens[i]).map_or(0.0, |c| c.1),
        }
    }
}

/// Proposes draft tokens. Implementations keep whatever per-sequence state they need, keyed by
/// slot; the engine calls `release` when a slot's sequence ends.
pub trait Drafter: Send {
    /// For logs and metrics, e.g. "ngram" or "eagle".
    fn name(&self) -> String;

    /// Called once by the engine before use.
    fn prepare(&mut self, _slots: usize, _max_seq_len: usize) -> Result<()> {
        Ok(())
    }

    /// Target layers whose hidden states `observe` should receive (none by default).
    fn target_layers(&self) -> &[usize] {
        &[]
    }

    /// The target's hidden states (one [n, hidden] tensor per `target_layers` entry) at positions
    /// `start..start + n` of `slot`, which the target has now committed to its cache.
    fn observe(&mut self, _slot: usize, _start: usize, _hidden: &[Tensor]) -> Result<()> {
        Ok(())
    }

    /// One draft per request, each at most `k` tokens (fewer, even none, is allowed).
    fn propose(&mut self, target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>>;

    /// The sequence in `slot` has ended.
    fn release(&mut self, _slot: usize) {}

    /// Seconds and positions spent bringing per-sequence state up to date with the target since
    /// the last call. After steps without drafts this is a backlog that steady drafting would not
    /// pay, so the draft-length controller discounts it.
    fn take_catch_up(&mut self) -> (f64, usize) {
        (0.0, 0)
    }
}

/// A drafter whose weights are trained while it serves (online training): the engine swaps new
/// versions in between steps.
pub trait TrainableDrafter: Drafter {
    type Weights: Send + Sync;
    /// The weights now served.
    fn served_weights(&self) -> Arc<Self::Weights>;
    /// Serves `weights` from the next draft on.
    fn update(&mut self, weights: Arc<Self::Weights>) -> Result<()>;
}

/// A sampler for a drafter's own draws. Seeded requests stay reproducible, but from a stream
/// unrelated to the target's: drafts that share the target's random numbers would correlate with
/// the acceptance tests and skew the output distribution.
pub(crate) fn drafter_sampler(params: &SamplingParams) -> Sampler {
    let seed = params.seed.map(|s| (s ^ 0x5DEE_CE66_D1B5_4A32).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    Sampler::new(SamplingParams { seed, ..params.clone() })
}

/// Chooses a draft token from drafter logits the way the request samples: argmax when greedy, else
/// a draw from the same filtered distribution, which is returned for the rejection test.
pub(crate) fn draft_token(sampler: &mut Sampler, logits: &[f32]) -> (u32, Option<Vec<(u32, f32)>>) {
    match sampler.target(logits, &[]) {
        Target::Greedy(id) => (id, None),
        Target::Probs(p) => (sampler.draw(&p), Some(p)),
    }
}
