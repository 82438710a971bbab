//! Turning logits into the next token: repetition, presence and frequency penalties, temperature,
//! top-k, top-p, min-p, seeded randomness, and the log-probabilities users ask for.
use crate::grammar::{Following, Grammar};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches top_p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token the output already holds (OpenAI's
    /// `presence_penalty`, -2..=2); 0 disables.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it (OpenAI's
    /// `frequency_penalty`, -2..=2); 0 disables.
    pub frequency_penalty: f32,
    /// The sequence's stop tokens (EOS and the request's) are banned until the output holds this
    /// many tokens (vLLM's `min_tokens`); 0 disables.
    pub min_tokens: usize,
    /// Makes sampling reproducible.
    pub seed: Option<u64>,
    /// Also return this many most likely alternatives with each token's logprob.
    pub top_logprobs: usize,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`: -100 effectively bans
    /// a token, 100 forces it); reported logprobs stay the model's own.
    pub logit_bias: Vec<(u32, f32)>,
    /// Structured output: only tokens that keep the output within this grammar are drawn.
    pub grammar: Option<Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_tokens: 0,
            seed: None,
            top_logprobs: 0,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }
}

/// The highest temperature any API accepts (OpenAI's documented range is [0, 2]; the training
/// API follows the same rule so that the two never disagree).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// The largest presence or frequency penalty either way (OpenAI's documented range, as vLLM's).
pub const MAX_PENALTY: f32 = 2.0;

/// A sampling parameter out of its range: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for InvalidParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl SamplingParams {
    /// The one check of every sampling parameter's range, for every API.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |param, message: String| Err(InvalidParam { param, message });
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return bad(
                "temperature",
                format!("`temperature` must be in [0, {MAX_TEMPERATURE}], got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("`min_p` must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return bad(param, format!("`{param}` must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {v}"));
            }
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(
                "logit_bias",
                format!("`logit_bias` values must be between -100 and 100, got {b} for token {t}"),
            );
        }
        Ok(())
    }
}

/// A chosen token with its log-probability under the model (the raw, unprocessed distribution,
/// as vLLM reports by default) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Leading tokens of every history that are the prompt: presence and frequency penalties
    /// count the output only (as vLLM's do); the repetition penalty counts both.
    prompt_len: usize,
    /// The tokens that end the sequence, banned while the output is under `min_tokens`.
    stop_tokens: Vec<u32>,
    /// Where the output is in its grammar, if it has one.
    grammar: Option<Following>,
}

/// log-softmax of the logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l - lse).collect()
}

/// log-softmax of the logits at `id` alone: bit for bit `log_softmax(logits)[id]`, without a
/// vocabulary-sized vector (every emitted token reports its logprob).
pub fn logprob(logits: &[f32], id: u32) -> f32 {
    logits[id as usize] - log_sum_exp(logits)
}

/// log Σ exp(logits): the one normaliser every reported logprob uses (sampling, verification,
/// the training API's logprobs), so they agree to the bit.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    tandem_models::ops::kernels::log_sum_exp(logits)
}

/// Index of the largest value; the lowest index wins ties, so greedy decoding is deterministic.
pub fn argmax(values: &[f32]) -> u32 {
    tandem_models::ops::kernels::argmax(values)
}

/// The n largest entries, largest first (ties: lower id first; `f32::total_cmp` order). One scan
/// with a heap of the best n so far: with n much smaller than a vocabulary, most entries cost one
/// comparison with the worst kept.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;
    /// Orders entries by value, then the lower id as the larger.
    #[derive(PartialEq)]
    struct Entry(f32, u32);
    impl Eq for Entry {}
    impl Ord for Entry {
        fn cmp(&self, other: &Self) -> Ordering {
            self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
        }
    }
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    let n = n.min(values.len());
    if n == 0 {
        return vec![];
    }
    // A min-heap: its top is the worst of the best n.
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(n + 1);
    // The worst kept value, for a one-compare rejection of most entries (a value strictly below
    // it cannot enter in any order; equal values, ±0 and NaN take the exact comparison).
    let mut worst = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v < worst {
            continue;
        }
        let e = Entry(v, i as u32);
        if heap.len() < n {
            heap.push(Reverse(e));
        } else if heap.peek().is_some_and(|w| e > w.0) {
            heap.pop();
            heap.push(Reverse(e));
        }
        if heap.len() == n {
            worst = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0);
        }
    }
    // Ascending in Reverse order is descending in value.
    heap.into_sorted_vec().into_iter().map(|Reverse(Entry(v, i))| (i, v)).collect()
}

/// `f` applied to the scores of `tokens` (ids past the vocabulary are no token's).
fn adjust(scores: &mut [f32], tokens: &[u32], f: impl Fn(f32) -> f32) {
    for &t in tokens {
        if let Some(l) = scores.get_mut(t as usize) {
            *l = f(*l);
        }
    }
}

/// Bans every score the grammar does not allow (`allowed`; None: only the end). Where it allows
/// the end-of-sequence token, every stop token (`ends`) keeps its score (the grammar's tokenizer
/// knows one end; the sequence may have several). If nothing is left (a grammar that can only end,
/// under `min_tokens`), the end wins: the ends get their raw scores back.
fn constrain(scores: &mut [f32], allowed: Option<&llguidance::toktrie::SimpleVob>, ends: &[u32], raw: &[f32]) {
    let end_allowed = allowed.is_none_or(|m| ends.iter().any(|&t| (t as usize) < m.len() && m.is_allowed(t)));
    let kept: Vec<(usize, f32)> = match end_allowed {
        true => ends.iter().filter_map(|&t| scores.get(t as usize).map(|&v| (t as usize, v))).collect(),
        false => Vec::new(),
    };
    match allowed {
        Some(m) => {
            m.iter_unset_entries(|t| {
                if let Some(v) = scores.get_mut(t) {
                    *v = f32::NEG_INFINITY;
                }
            });
            scores.iter_mut().skip(m.len()).for_each(|v| *v = f32::NEG_INFINITY);
        }
        None => scores.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
    }
    for (t, v) in kept {
        scores[t] = v;
    }
    if scores.iter().all(|&v| v == f32::NEG_INFINITY) {
        for (t, &r) in ends.iter().filter_map(|&t| raw.get(t as usize).map(|r| (t as usize, r))) {
            scores[t] = r;
        }
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let grammar = params.grammar.as_ref().map(Grammar::follow);
        Sampler { params, rng, prompt_len: 0, stop_tokens: Vec::new(), grammar }
    }

    /// The same sampler for a sequence whose histories start with a `prompt_len`-token prompt.
    pub fn after_prompt(self, prompt_len: usize) -> Self {
        Sampler { prompt_len, ..self }
    }

    /// The same sampler for a sequence that `stop_tokens` end (for `min_tokens`).
    pub fn ending_with(self, stop_tokens: Vec<u32>) -> Self {
        Sampler { stop_tokens, ..self }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token. `history` is every token of the sequence so far (prompt and output),
    /// for the penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> SampledToken {
        let id = match self.target(logits, history) {
            Target::Greedy(id) => id,
            Target::Probs(probs) => self.draw(&probs),
        };
        self.token(logits, id)
    }

    /// The token `id` with its logprobs under `logits` (raw, as reported to users).
    pub fn token(&self, logits: &[f32], id: u32) -> SampledToken {
        match self.params.top_logprobs {
            0 => SampledToken { id, logprob: logprob(logits, id), top_logprobs: Vec::new() },
            n => {
                let all = log_softmax(logits);
                SampledToken { id, logprob: all[id as usize], top_logprobs: top_n(&all, n) }
            }
        }
    }

    /// The distribution the next token is drawn from: the argmax when greedy, else the candidates
    /// that survive the penalty, temperature and top-k / top-p / min-p filters, normalised.
    pub fn target(&mut self, logits: &[f32], history: &[u32]) -> Target {
        let output = history.get(self.prompt_len..).unwrap_or_default();
        // The grammar's allowed tokens (None: it allows only the end).
        let allowed = self.grammar.as_mut().map(|g| g.allowed(output));
        let p = &self.params;
        let repetition = p.repetition_penalty != 1.0 && !history.is_empty();
        let counted = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        // A grammar that requires the end overrides min_tokens.
        let held = output.len() < p.min_tokens && !self.stop_tokens.is_empty() && !matches!(allowed, Some(None));
        let adjusted: Vec<f32>;
        let scores = if repetition || counted || !p.logit_bias.is_empty() || held || allowed.is_some() {
            // One copy of the logits for every adjustment, in this order.
            let mut s = logits.to_vec();
            if repetition {
                let mut seen = history.to_vec();
                seen.sort_unstable();
                seen.dedup();
                adjust(&mut s, &seen, |l| if l > 0.0 { l / p.repetition_penalty } else { l * p.repetition_penalty });
            }
            if counted {
                let mut out = output.to_vec();
                out.sort_unstable();
                for run in out.chunk_by(|a, b| a == b) {
                    let penalty = p.frequency_penalty * run.len() as f32 + p.presence_penalty;
                    adjust(&mut s, &run[..1], |l| l - penalty);
                }
            }
            for &(t, bias) in &p.logit_bias {
                adjust(&mut s, &[t], |l| l + bias);
            }
            if held {
                // After the bias, so that no bias lets a stop token through early.
                adjust(&mut s, &self.stop_tokens, |_| f32::NEG_INFINITY);
            }
            if let (Some(allowed), Some(g)) = (allowed, &self.grammar) {
                // Last, so that no bias or penalty lets a token outside the grammar through.
                let ends: Vec<u32> = self.stop_tokens.iter().copied().chain([g.eos()]).collect();
                constrain(&mut s, allowed.as_ref(), &ends, logits);
            }
            adjusted = s;
            &adjusted
        } else {
            logits
        };
        if p.temperature == 0.0 {
            Target::Greedy(argmax(scores))
        } else {
            Target::Probs(self.filtered(scores))
        }
    }

    /// Draws one token from `probs` (which need not be normalised).
    pub fn draw(&mut self, probs: &[(u32, f32)]) -> u32 {
        let mass: f32 = probs.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(c, p) in probs {
            r -= p;
            // A candidate of probability 0 (a banned stop token) is never drawn, even at r = 0.
            if r <= 0.0 && p > 0.0 {
                return c;
            }
        }
        probs.iter().rev().find(|c| c.1 > 0.0).or(probs.last()).expect("at least one candidate").0
    }

    /// A uniform number in [0, 1) from this request's generator (for accept/reject decisions).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    fn filtered(&self, scores: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = scores.iter().map(|&s| ((s - max) * inv_t).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);

        // Candidates, most likely first. Each filter keeps a prefix of that order, so only tokens
        // above a threshold that provably holds that prefix need sorting (not the whole vocabulary).
        let p_max = probs.iter().copied().fold(0.0, f32::max);
        let floor = p.min_p * p_max;
        let mut threshold = if p.top_k == 0 && p.top_p >= 1.0 { floor } else { (p_max * 1e-3).max(floor) };
        let mut cands: Vec<u32> = loop {
            let cands: Vec<u32> = (0..probs.len() as u32).filter(|&i| probs[i as usize] >= threshold).collect();
            let holds_prefix = if p.top_k > 0 {
                cands.len() >= p.top_k
            } else {
                cands.iter().map(|&i| probs[i as usize]).sum::<f32>() >= p.top_p
            };
            if holds_prefix || threshold <= floor {
                break cands;
            }
            threshold = if threshold < 1e-30 { floor } else { (threshold * 1e-3).max(floor) };
        };
        if p.top_k > 0 || p.top_p < 1.0 {
            cands.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
        }
        if p.top_k > 0 {
            cands.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            // The nucleus of what top-k left, renormalised.
            let target = p.top_p * cands.iter().map(|&c| probs[c as usize]).sum::<f32>();
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, &c) in cands.iter().enumerate() {
                acc += probs[c as usize];
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let mass: f32 = cands.iter().map(|&c| probs[c as usize]).sum();
        cands.into_iter().map(|c| (c, probs[c as usize] / mass)).collect()
    }
}

/// What the next token is drawn from.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Temperature 0: this token, deterministically.
    Greedy(u32),
    /// Candidate tokens with their probabilities (summing to 1); every other token has 0.
    Probs(Vec<(u32, f32)>),
}

impl Target {
    /// The probability of `id`.
    pub fn prob(&self, id: u32) -> f32 {
        match self {
            Target::Greedy(g) => (*g == id) as u8 as f32,
            Target::Probs(p) => p.iter().find(|c| c.0 == id).map_or(0.0, |c| c.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_equals_a_full_sort() {
        // Many ties (values repeat every 37 ids), a negative stretch, and n beyond the length.
        let values: Vec<f32> =
            (0..2000u32).map(|i| ((i * 7919) % 37) as f32 - if i > 1500 { 40.0 } else { 0.0 }).collect();
        let mut sorted: Vec<u32> = (0..values.len() as u32).collect();
        sorted.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b)));
        for n in [0, 1, 5, 64, 2000, 3000] {
            let want: Vec<(u32, f32)> = sorted.iter().take(n).map(|&i| (i, values[i as usize])).collect();
            assert_eq!(top_n(&values, n), want, "n = {n}");
        }
    }

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, seed: Some(7), ..Default::default() }
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams { top_logprobs: 2, ..Default::default() });
        let t = s.sample(&[1.0, 3.0, 2.0], &[]);
        assert_eq!(t.id, 1);
        let lp = log_softmax(&[1.0, 3.0, 2.0]);
        assert!((t.logprob - lp[1]).abs() < 1e-6);
        assert_eq!(t.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn one_logprob_is_the_log_softmax_entry_to_the_bit() {
        let logits: Vec<f32> = (0..49_152).map(|i| ((i as f32) * 0.618).sin() * 12.0).collect();
        let all = log_softmax(&logits);
        for id in [0u32, 7, 4_096, 49_151] {
            assert_eq!(logprob(&logits, id).to_bits(), all[id as usize].to_bits());
        }
    }

    #[test]
    fn seed_makes_sampling_reproducible() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0));
            (0..50).map(|_| s.sample(&logits, &[]).id).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 17) % 23) as f32).collect();
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..params(5.0) });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]).id, argmax(&logits));
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probs ~ [0.6, 0.3, 0.1]: top_p 0.5 keeps only token 0, 0.8 keeps 0 and 1.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(SamplingParams { top_p: 0.5, ..params(1.0) });
        assert!((0..200).all(|_| s.sample(&logits, &[]).id == 0));
        let mut s = Sampler::new(SamplingParams { top_p: 0.8, ..params(1.0) });
        let ids: Vec<u32> = (0..500).map(|_| s.sample(&logits, &[]).id).collect();
        assert!(ids.contains(&1) && !ids.contains(&2));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(SamplingParams { min_p: 0.2, ..params(1.0) });
        let ids: Vec<u32> = (0..500).map(|_| s.sample(&logits, &[]).id).collect();
        assert!(ids.contains(&1) && !ids.contains(&2));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let mut s = Sampler::new(params(1.0));
        let n = 20000;
        let zeros = (0..n).filter(|_| s.sample(&logits, &[]).id == 0).count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.02, "{frac}");
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]).id, 1);
        assert_eq!(s.sample(&[2.0, 1.5], &[]).id, 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_output_only() {
        // A prompt of [2, 2], then the output [0, 0, 1]: 0 twice, 1 once, 2 only in the prompt.
        let logits = [3.0f32, 2.5, 2.9, 0.0];
        let history = [2, 2, 0, 0, 1];
        let params =
            SamplingParams { temperature: 1.0, presence_penalty: 0.25, frequency_penalty: 0.5, ..Default::default() };
        let expect: [f32; 4] = [3.0 - 2.0 * 0.5 - 0.25, 2.5 - 0.5 - 0.25, 2.9, 0.0];
        let Target::Probs(probs) = Sampler::new(params.clone()).after_prompt(2).target(&logits, &history) else {
            panic!("sampling at temperature 1 gives probabilities")
        };
        let z: f64 = expect.iter().map(|&x| (x as f64).exp()).sum();
        assert_eq!(probs.len(), 4);
        for (t, p) in probs {
            let want = (expect[t as usize] as f64).exp() / z;
            assert!((p as f64 - want).abs() < 1e-6, "token {t}: {p} against {want}");
        }
        // Greedy: token 2 wins once the output's tokens are penalised; 0 without penalties.
        let greedy = SamplingParams { temperature: 0.0, ..params };
        let pick = |mut s: Sampler| match s.target(&logits, &history) {
            Target::Greedy(id) => id,
            Target::Probs(_) => panic!("greedy"),
        };
        assert_eq!(pick(Sampler::new(greedy.clone()).after_prompt(2)), 2);
        assert_eq!(pick(Sampler::new(SamplingParams::default()).after_prompt(2)), 0);
        // Counted over the prompt too, 2 would lose its lead (2.9 - 2 * 0.5 - 0.25 = 1.65).
        assert_eq!(pick(Sampler::new(greedy.clone())), 0);
        for bad in [2.5, -2.01, f32::NAN] {
            let e = SamplingParams { frequency_penalty: bad, ..greedy.clone() }.validate().unwrap_err();
            assert_eq!(e.param, "frequency_penalty");
            let e = SamplingParams { presence_penalty: bad, ..greedy.clone() }.validate().unwrap_err();
            assert_eq!(e.param, "presence_penalty");
        }
    }

    #[test]
    fn min_tokens_holds_the_stop_tokens_back_until_the_output_is_long_enough() {
        let logits = [1.0f32, 5.0, 4.0, 0.5];
        let params = SamplingParams { min_tokens: 2, logit_bias: vec![(1, 50.0)], ..Default::default() };
        let mut s = Sampler::new(params.clone()).after_prompt(3).ending_with(vec![1, 3]);
        let mut pick = |history: &[u32]| match s.target(&logits, history) {
            Target::Greedy(id) => id,
            Target::Probs(_) => panic!("greedy"),
        };
        // Outputs of 0 and 1 tokens: 1 (a stop token, even biased) is held back; at 2 it wins.
        assert_eq!(pick(&[7, 7, 7]), 2);
        assert_eq!(pick(&[7, 7, 7, 2]), 2);
        assert_eq!(pick(&[7, 7, 7, 2, 2]), 1);
        // Sampling: the stop tokens get no probability at all.
        let mut hot =
            Sampler::new(SamplingParams { temperature: 1.0, ..params }).after_prompt(3).ending_with(vec![1, 3]);
        let Target::Probs(probs) = hot.target(&logits, &[7, 7, 7]) else { panic!("sampled") };
        assert!(probs.iter().all(|&(t, p)| (t != 1 && t != 3) || p == 0.0), "{probs:?}");
    }

    #[test]
    fn logit_bias_moves_the_choice_and_leaves_logprobs_raw() {
        let logits = [1.0, 3.0, 2.0];
        let raw = log_softmax(&logits);
        let mut forced = Sampler::new(SamplingParams { logit_bias: vec![(0, 5.0)], ..Default::default() });
        let t = forced.sample(&logits, &[]);
        assert_eq!((t.id, t.logprob), (0, raw[0]));
        let mut banned = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            logit_bias: vec![(1, -100.0), (2, -100.0)],
            ..Default::default()
        });
        assert!((0..50).all(|_| banned.sample(&logits, &[]).id == 0));
        let out_of_range = SamplingParams { logit_bias: vec![(1, 101.0)], ..Default::default() };
        assert!(out_of_range.validate().is_err());
    }
}
