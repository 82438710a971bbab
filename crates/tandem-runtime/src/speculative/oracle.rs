//! Drafters that know the answer: the upper bound of what speculation can buy (the oracle proposes
//! the target's own greedy continuation), and, with mistakes injected, a tester of rollback.
use super::{Alternative, Draft, DraftRequest, Drafter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_models::{Model, Result};

pub struct OracleDrafter {
    /// Full known sequences (prompt + the target's greedy output).
    sequences: Vec<Vec<u32>>,
    /// Chance that each proposal goes wrong at a random position (0: a perfect oracle; 1: every
    /// draft has a wrong token, at its start when `always_wrong_first`). A wrong draft offers
    /// runners-up (`Draft::alternatives`) where asked: beside the wrong token, the right one half
    /// the time.
    mistake_rate: f64,
    vocab_size: u32,
    rng: StdRng,
}

impl OracleDrafter {
    /// Proposes the continuation of whichever of `sequences` the context is a prefix of.
    pub fn new(sequences: Vec<Vec<u32>>, vocab_size: usize) -> Self {
        OracleDrafter { sequences, mistake_rate: 0.0, vocab_size: vocab_size as u32, rng: StdRng::seed_from_u64(0) }
    }

    /// Each draft goes wrong at a random position with probability `rate` (1.0: every draft is wrong
    /// from its first token on).
    pub fn with_mistakes(mut self, rate: f64, seed: u64) -> Self {
        self.mistake_rate = rate;
        self.rng = StdRng::seed_from_u64(seed);
        self
    }

    fn continuation(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        self.sequences
            .iter()
            .find(|s| s.len() > tokens.len() && s.starts_with(tokens))
            .map(|s| s[tokens.len()..(tokens.len() + k).min(s.len())].to_vec())
            .unwrap_or_default()
    }
}

impl Drafter for OracleDrafter {
    fn name(&self) -> String {
        if self.mistake_rate >= 1.0 {
            "always-wrong".into()
        } else if self.mistake_rate > 0.0 {
            "oracle-with-mistakes".into()
        } else {
            "oracle".into()
        }
    }

    fn propose(&mut self, _target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        let mut drafts = Vec::with_capacity(requests.len());
        for r in requests {
            let mut tokens = self.continuation(r.tokens, r.k);
            let mut alternatives = Vec::new();
            if self.mistake_rate >= 1.0 {
                // Wrong from the first token: the right one shifted by one.
                tokens = (0..r.k).map(|i| tokens.get(i).map_or(i as u32, |t| (t + 1) % self.vocab_size)).collect();
            } else if !tokens.is_empty() && self.rng.random::<f64>() < self.mistake_rate {
                let at = self.rng.random_range(0..tokens.len());
                let right = tokens[at];
                tokens[at] = (tokens[at] + 1 + self.rng.random_range(0..self.vocab_size - 1)) % self.vocab_size;
                if r.alternatives > 0 {
                    // Runners-up at the mistake: a wrong one, and half the time the right one
                    // behind it; then, when the mistake is later, a wrong one beside the first
                    // token (where the chain is right, siblings must change nothing).
                    let mut wrong = || (right + 1 + self.rng.random_range(0..self.vocab_size - 1)) % self.vocab_size;
                    let (w0, w1) = (wrong(), wrong());
                    alternatives.push(Alternative { of: at, token: w1 });
                    if self.rng.random::<bool>() {
                        alternatives.push(Alternative { of: at, token: right });
                    }
                    if at > 0 && w0 != tokens[0] {
                        alternatives.push(Alternative { of: 0, token: w0 });
                    }
                    alternatives.truncate(r.alternatives);
                    alternatives.sort_by_key(|a| a.of);
                }
                // Random tokens after the mistake, so the rejected tail differs too.
                for t in tokens.iter_mut().skip(at + 1) {
                    *t = self.rng.random_range(0..self.vocab_size);
                }
            }
            drafts.push(Draft { alternatives, ..Draft::greedy(tokens) });
        }
        Ok(drafts)
    }
}
