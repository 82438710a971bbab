//! Verification of a draft against the target's logits.
use super::Draft;
use crate::sampling::{SampledToken, Sampler, Target};

/// What one verification emits.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The accepted draft tokens, then one token from the target itself: the correction at the
    /// first rejection, or the bonus token after a fully accepted draft.
    pub tokens: Vec<SampledToken>,
    /// How many draft tokens were accepted (`tokens.len() - 1`), an accepted sibling included.
    pub accepted: usize,
    /// The index in `draft.alternatives` of the sibling accepted in place of the draft token it
    /// stands beside (then the last accepted token).
    pub alternative: Option<usize>,
}

/// Verifies `draft` given the target's logits at `[pending, d1, .., dk]` (`logits[i]` predicts the
/// token after position i, so it judges `draft.tokens[i]`). `history` is the sequence so far, for
/// the repetition penalty.
///
/// Greedy: accept while the draft equals the target's argmax; the correction is the argmax, so the
/// output is exactly plain greedy decoding. Sampling: accept `d` with probability min(1, p(d)/q(d)),
/// on rejection draw from max(0, p - q) normalised; this leaves every emitted token distributed
/// exactly as the target's p (Leviathan et al. 2023, Chen et al. 2023).
///
/// With `draft.alternatives` the rows after those are the siblings' (`logits[k + 1 + j]` follows
/// alternative j, which saw the chain before its position and itself). Greedy only: where the
/// chain is first rejected, if the target's token is a sibling of that position, the sibling is
/// accepted and the target's token after it is emitted too: still exactly what plain greedy
/// decoding emits. A sampled request ignores them (the chain's rejection sampling alone keeps p).
pub fn verify(sampler: &mut Sampler, logits: &[&[f32]], draft: &Draft, history: &[u32]) -> Verified {
    let k = draft.tokens.len();
    assert_eq!(
        logits.len(),
        k + 1 + draft.alternatives.len(),
        "one logits row per draft token and alternative plus the bonus"
    );
    let mut history = history.to_vec();
    let mut tokens = Vec::with_capacity(k + 1);
    for (i, &d) in draft.tokens.iter().enumerate() {
        let target = sampler.target(logits[i], &history);
        let accept = match &target {
            Target::Greedy(id) => *id == d,
            Target::Probs(_) => {
                let p = target.prob(d);
                let q = draft.prob_of_own(i);
                // q == 0 cannot come from a drawn token; treat such a draft as deterministic.
                let ratio = if q > 0.0 { p / q } else { p };
                p > 0.0 && sampler.uniform() < ratio
            }
        };
        if accept {
            tokens.push(sampler.token(logits[i], d));
            history.push(d);
            continue;
        }
        let id = match target {
            Target::Greedy(id) => {
                if let Some(j) = draft.alternatives.iter().position(|a| a.of == i && a.token == id) {
                    tokens.push(sampler.token(logits[i], id));
                    history.push(id);
                    tokens.push(sampler.sample(logits[k + 1 + j], &history));
                    return Verified { tokens, accepted: i + 1, alternative: Some(j) };
                }
                id
            }
            Target::Probs(p) => residual_draw(sampler, &p, draft, i, d),
        };
        let accepted = tokens.len();
        tokens.push(sampler.token(logits[i], id));
        return Verified { tokens, accepted, alternative: None };
    }
    let bonus = sampler.sample(logits[k], &history);
    tokens.push(bonus);
    Verified { tokens, accepted: k, alternative: None }
}

/// After draft token `d` (position i) was rejected: a draw from max(0, p - q) normalised.
fn residual_draw(sampler: &mut Sampler, p: &[(u32, f32)], draft: &Draft, i: usize, d: u32) -> u32 {
    let residual: Vec<(u32, f32)> = p
        .iter()
        .map(|&(t, pt)| {
            let qt = match &draft.probs {
                None => (t == d) as u8 as f32,
                Some(q) => q[i].iter().find(|c| c.0 == t).map_or(0.0, |c| c.1),
            };
            (t, (pt - qt).max(0.0))
        })
        .collect();
    // All-zero residual means p <= q everywhere, i.e. p == q: rejection was impossible except by
    // rounding, so p itself is the right fallback.
    if residual.iter().any(|c| c.1 > 0.0) {
        sampler.draw(&residual)
    } else {
        sampler.draw(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::speculative::Alternative;

    fn ln(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn greedy_accepts_the_matching_prefix_and_corrects() {
        let mut s = Sampler::new(SamplingParams::default());
        let rows = [ln(&[0.1, 0.7, 0.2]), ln(&[0.6, 0.3, 0.1]), ln(&[0.2, 0.2, 0.6])];
        let rows: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let v = verify(&mut s, &rows, &Draft::greedy(vec![1, 2]), &[]);
        assert_eq!((v.accepted, v.tokens.iter().map(|t| t.id).collect::<Vec<_>>()), (1, vec![1, 0]));
        let v = verify(&mut s, &rows, &Draft::greedy(vec![1, 0]), &[]);
        assert_eq!((v.accepted, v.tokens.iter().map(|t| t.id).collect::<Vec<_>>()), (2, vec![1, 0, 2]));
    }

    #[test]
    fn greedy_accepts_an_alternative_when_the_first_token_is_wrong() {
        let mut s = Sampler::new(SamplingParams::default());
        // Rows: pending, d1, then siblings 0 and 2 (alternatives to d1 = 1).
        let rows = [ln(&[0.5, 0.2, 0.3]), ln(&[0.1, 0.1, 0.8]), ln(&[0.6, 0.3, 0.1]), ln(&[0.1, 0.7, 0.2])];
        let rows: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let draft = Draft { alternatives: beside(0, &[2, 0]), ..Draft::greedy(vec![1]) };
        let v = verify(&mut s, &rows, &draft, &[]);
        // The target wants 0 (alternative 1), then row 3's argmax, 1.
        assert_eq!((v.accepted, v.alternative), (1, Some(1)));
        assert_eq!(v.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![0, 1]);
        // Nothing matches: the target's token alone, as without alternatives.
        let draft = Draft { alternatives: beside(0, &[2]), ..Draft::greedy(vec![1]) };
        let v = verify(&mut s, &rows[..3], &draft, &[]);
        assert_eq!((v.accepted, v.alternative, v.tokens[0].id), (0, None, 0));
        // The first token right: the chain decides, siblings unused.
        let draft = Draft { alternatives: beside(0, &[2]), ..Draft::greedy(vec![0]) };
        let v = verify(&mut s, &rows[..3], &draft, &[]);
        assert_eq!((v.accepted, v.alternative), (1, None));
        assert_eq!(v.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![0, 2]);
    }

    fn beside(of: usize, tokens: &[u32]) -> Vec<Alternative> {
        tokens.iter().map(|&token| Alternative { of, token }).collect()
    }

    #[test]
    fn greedy_accepts_a_sibling_where_the_chain_is_first_rejected() {
        let mut s = Sampler::new(SamplingParams::default());
        // Draft [1, 1, 1]; siblings 2 beside position 0, 0 and 2 beside position 1. Rows:
        // pending, d1, d2, d3, then the siblings'.
        let rows = [
            ln(&[0.1, 0.8, 0.1]), // wants 1: d1 accepted
            ln(&[0.1, 0.2, 0.7]), // wants 2: d2 rejected, sibling 2 of position 1 accepted
            ln(&[0.6, 0.3, 0.1]),
            ln(&[0.3, 0.4, 0.3]),
            ln(&[0.2, 0.2, 0.6]), // sibling 2 beside position 0 (not reached)
            ln(&[0.7, 0.2, 0.1]), // sibling 0 beside position 1
            ln(&[0.1, 0.1, 0.8]), // sibling 2 beside position 1: the target's next is 2
        ];
        let rows: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let alternatives = [beside(0, &[2]), beside(1, &[0, 2])].concat();
        let draft = Draft { alternatives, ..Draft::greedy(vec![1, 1, 1]) };
        let v = verify(&mut s, &rows, &draft, &[]);
        assert_eq!((v.accepted, v.alternative), (2, Some(2)));
        assert_eq!(v.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2, 2]);
        // A sibling counts only at the position where the chain broke: d1 = 0 is rejected (the
        // target wants 1), so position 1's siblings are never reached.
        let draft = Draft { alternatives: beside(1, &[0]), ..Draft::greedy(vec![0, 1, 1]) };
        let v = verify(&mut s, &rows[..5], &draft, &[]);
        assert_eq!((v.accepted, v.alternative), (0, None));
        assert_eq!(v.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1]);
    }

    /// Chi-square statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[usize], expected: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(expected).map(|(&c, &e)| (c as f64 - n as f64 * e).powi(2) / (n as f64 * e)).sum()
    }

    /// The first emitted token must follow p whatever q proposes, sampled or deterministic drafts:
    /// a wrong acceptance rule or residual skews the counts far beyond the chi-square bound.
    #[test]
    fn rejection_sampling_keeps_the_target_distribution() {
        let p = [0.5f32, 0.2, 0.15, 0.1, 0.05];
        let q = [0.05f32, 0.1, 0.15, 0.2, 0.5];
        let logits = ln(&p);
        let params = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(params.clone());
        let mut drafter = Sampler::new(SamplingParams { seed: Some(4), ..params });
        let q_sparse: Vec<(u32, f32)> = q.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
        let n = 40_000;
        let mut sampled = vec![0; 5];
        let mut fixed = vec![0; 5];
        for _ in 0..n {
            let d = drafter.draw(&q_sparse);
            let draft =
                Draft { tokens: vec![d], probs: Some(vec![q_sparse.clone()]), lookup: false, alternatives: vec![] };
            sampled[verify(&mut s, &[&logits, &logits], &draft, &[]).tokens[0].id as usize] += 1;
            // A deterministic drafter always proposing the least likely token.
            fixed[verify(&mut s, &[&logits, &logits], &Draft::greedy(vec![4]), &[]).tokens[0].id as usize] += 1;
        }
        let expected: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        // 4 degrees of freedom: P(chi2 > 18.47) = 0.001.
        assert!(chi_square(&sampled, &expected) < 18.47, "{sampled:?}");
        assert!(chi_square(&fixed, &expected) < 18.47, "{fixed:?}");
        // The wrong rule (always accept) would be caught: its first token follows q.
        let mut naive = vec![0; 5];
        for _ in 0..n {
            naive[drafter.draw(&q_sparse) as usize] += 1;
        }
        assert!(chi_square(&naive, &expected) > 1000.0);
    }
}
