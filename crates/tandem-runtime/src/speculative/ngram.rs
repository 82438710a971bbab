//! Prompt lookup: find the longest recent n-gram that ends the sequence earlier in its own tokens
//! and propose what followed it. Free to run and strong when the output copies the prompt (edits,
//! summaries with quotes, code refactors).
use super::{Draft, DraftRequest, Drafter};
use tandem_models::{Model, Result};

#[derive(Debug, Clone)]
pub struct NgramDrafter {
    /// Longest and shortest suffix lengths tried (longest first).
    pub max_ngram: usize,
    pub min_ngram: usize,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        NgramDrafter { max_ngram: 4, min_ngram: 1 }
    }
}

impl NgramDrafter {
    /// The continuation after the most recent earlier occurrence of the longest matching suffix.
    pub fn lookup(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        let len = tokens.len();
        for n in (self.min_ngram.max(1)..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &tokens[len - n..];
            // Most recent occurrence that is followed by at least one token.
            for start in (0..len - n).rev() {
                if &tokens[start..start + n] == suffix {
                    let from = start + n;
                    return tokens[from..(from + k).min(len)].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> String {
        "ngram".into()
    }

    fn propose(&mut self, _target: &Model, requests: &[DraftRequest]) -> Result<Vec<Draft>> {
        Ok(requests.iter().map(|r| Draft::greedy(self.lookup(r.tokens, r.k))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_longest_recent_match() {
        let d = NgramDrafter::default();
        // "1 2 3 4 5 ... 1 2 3" -> propose "4 5"
        assert_eq!(d.lookup(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 2), vec![4, 5]);
        // The longer match wins over a more recent shorter one.
        assert_eq!(d.lookup(&[7, 8, 1, 6, 8, 2, 7, 8], 1), vec![1]);
        // Most recent among equals.
        assert_eq!(d.lookup(&[5, 1, 5, 2, 5], 3), vec![2, 5]);
        assert_eq!(d.lookup(&[1, 2, 3], 4), Vec::<u32>::new());
    }
}
