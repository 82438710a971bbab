//! An independent small model with the target's tokenizer drafts by decoding k tokens itself.
use super::{draft_token, drafter_sampler, Draft, DraftRequest, Drafter};
use crate::sampling::Sampler;
use tandem_models::{KvCache, LogitsFor, Model, ModelError, Result, SequenceInput};

pub struct DraftModelDrafter {
    model: Model,
    cache: Option<KvCache>,
    /// Tokens each slot of the draft cache holds; the next proposal reuses their common prefix
    /// with the sequence, so accepted drafts are not fed twice.
    cached: Vec<Vec<u32>>,
    /// Per-slot samplers for sampled requests (seeded from the request's seed).
    samplers: Vec<Option<Sampler>>,
}

impl DraftModelDrafter {
    pub fn new(model: Model) -> Self {
        DraftModelDrafter { model, cache: None, cached: Vec::new(), samplers: Vec::new() }
    }
}

impl Drafter for DraftModelDrafter {
    fn name(&self) -> String {
        "draft-model".into()
    }

    fn prepare(&mut self, slots: usize, max_seq_len: usize) -> Result<()> {
        let capacity = max_seq_len.min(self.model.max_positions());
        self.cache = Some(KvCache::new(&self.model.config, slots, capacity, self.model.device())?);
        self.cached = vec![Vec::new(); slots];
        self.samplers = (0..slots).map(|_| None).collect();
        Ok(())
    }

    fn propose(&mut self, target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        if target.config.vocab_size > self.model.config.vocab_size {
            return Err(ModelError::Drafter(format!(
                "the draft model's vocabulary ({}) is smaller than the target's ({})",
                self.model.config.vocab_size, target.config.vocab_size
            )));
        }
        let cache = self.cache.as_mut().ok_or_else(|| ModelError::Drafter("drafter not prepared".into()))?;
        let limit = cache.capacity();
        // Catch up: feed what the draft cache lacks of each sequence, logits at its end.
        let mut feeds: Vec<(usize, Vec<u32>, usize)> = Vec::new(); // (request index, tokens, k)
        for (i, r) in requests.iter().enumerate() {
            let k = r.k.min(limit.saturating_sub(r.tokens.len()) + 1);
            if k == 0 || r.tokens.len() > limit {
                continue;
            }
            let held = &self.cached[r.slot];
            let common = held.iter().zip(r.tokens).take_while(|(a, b)| a == b).count().min(r.tokens.len() - 1);
            cache.truncate(r.slot, common)?;
            self.cached[r.slot].truncate(common);
            feeds.push((i, r.tokens[common..].to_vec(), k));
        }
        let mut drafts = vec![Draft::default(); requests.len()];
        for &(i, _, _) in &feeds {
            let r = &requests[i];
            // One sampler per sequence, kept until `release`: a fresh one each step would replay
            // the same random numbers.
            self.samplers[r.slot].get_or_insert_with(|| drafter_sampler(r.sampling));
            if r.sampling.temperature > 0.0 {
                drafts[i].probs = Some(Vec::new());
            }
        }
        let mut step = 0;
        while !feeds.is_empty() {
            let batch: Vec<SequenceInput> = feeds
                .iter()
                .map(|(i, t, _)| SequenceInput {
                    slot: requests[*i].slot,
                    tokens: t,
                    logits: LogitsFor::Last,
                    siblings: &[],
                })
                .collect();
            let out = self.model.forward(&batch, cache, &[])?;
            let logits = out.logits.to_vec2::<f32>()?;
            let mut next = Vec::new();
            for ((i, fed, k), row) in feeds.into_iter().zip(logits) {
                let slot = requests[i].slot;
                self.cached[slot].extend_from_slice(&fed);
                let sampler = self.samplers[slot].as_mut().expect("sampler set above");
                let (id, q) = draft_token(sampler, &row[..target.config.vocab_size]);
                drafts[i].tokens.push(id);
                if let (Some(all), Some(q)) = (drafts[i].probs.as_mut(), q) {
                    all.push(q);
                }
                if step + 1 < k {
                    next.push((i, vec![id], k));
                }
            }
            feeds = next;
            step += 1;
        }
        Ok(drafts)
    }

    fn release(&mut self, slot: usize) {
        if let Some(c) = self.cache.as_mut() {
            let _ = c.reset(slot);
        }
        if let Some(held) = self.cached.get_mut(slot) {
            held.clear();
        }
        if let Some(s) = self.samplers.get_mut(slot) {
            *s = None;
        }
    }
}
