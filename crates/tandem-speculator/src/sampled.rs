//! A sampled vocabulary for the trainer's loss (sampled softmax).
//!
//! The head over the whole draft vocabulary is ~40% of a trainer step's products (forward and
//! the backward to its input) although a label row holds its mass on a few tokens. A step can
//! instead score a subset S: every token a label of the batch gives at least `MIN_PROB` (and each
//! row's top token and the rejected proposals), plus uniformly drawn others, whose logits carry
//! ln(|rest| / |drawn|) so that their exponentials stand for the whole rest of the vocabulary in
//! the softmax's normaliser (its unbiased estimate). Label mass outside S is dropped.
use crate::pool::Batch;
use rand::rngs::StdRng;
use rand::Rng;

/// Label entries at least this likely are scored (a derived distribution over 8,192 tokens has
/// at most 100 of them).
const MIN_PROB: f32 = 0.01;

#[derive(Debug, Clone)]
pub struct SampledVocab {
    /// The draft ids scored, positives first.
    pub cols: Vec<u32>,
    /// Added to each scored logit: 0 for positives, ln(|rest| / |drawn|) for drawn ones.
    pub bias: Vec<f32>,
    /// Position in `cols` of each draft id (-1: not scored).
    index: Vec<i32>,
}

impl SampledVocab {
    /// The subset for `b`: its positives, then others drawn until there are `size` (at least a
    /// quarter of `size` drawn, however many positives).
    pub fn new(b: &Batch, size: usize, rng: &mut StdRng) -> Self {
        let vd = b.draft_vocab;
        let mut index = vec![-1i32; vd];
        let mut cols = Vec::with_capacity(size);
        let mut add = |id: usize, cols: &mut Vec<u32>| {
            if id < vd && index[id] < 0 {
                index[id] = cols.len() as i32;
                cols.push(id as u32);
            }
        };
        for r in 0..b.rows() {
            if !b.has_label[r] {
                continue;
            }
            if let Ok(top) = usize::try_from(b.top_label[r]) {
                add(top, &mut cols);
            }
            for (j, &p) in b.labels[r * vd..(r + 1) * vd].iter().enumerate() {
                if p >= MIN_PROB {
                    add(j, &mut cols);
                }
            }
        }
        for &(_, id, _) in &b.rejected {
            add(id, &mut cols);
        }
        let positives = cols.len();
        let rest = vd - positives;
        let drawn = size.saturating_sub(positives).max(size / 4).min(rest);
        while cols.len() < positives + drawn {
            add(rng.random_range(0..vd), &mut cols);
        }
        let weight = if drawn > 0 { (rest as f32 / drawn as f32).ln() } else { 0.0 };
        let bias = (0..cols.len()).map(|i| if i < positives { 0.0 } else { weight }).collect();
        SampledVocab { cols, bias, index }
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    /// `b`'s label rows over the scored ids only: [rows, len].
    pub fn labels(&self, b: &Batch) -> Vec<f32> {
        let vd = b.draft_vocab;
        let mut out = Vec::with_capacity(b.rows() * self.len());
        for r in 0..b.rows() {
            let row = &b.labels[r * vd..(r + 1) * vd];
            out.extend(self.cols.iter().map(|&c| row[c as usize]));
        }
        out
    }

    /// Position of a draft id among the scored ones.
    pub fn position(&self, id: usize) -> Option<usize> {
        self.index.get(id).and_then(|&i| usize::try_from(i).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn positives_are_kept_and_drawn_ones_stand_for_the_rest() {
        let vd = 1000;
        let mut b = Batch { draft_vocab: vd, ..Default::default() };
        for r in 0..3 {
            let mut row = vec![0f32; vd];
            row[r * 10] = 0.7;
            row[r * 10 + 1] = 0.295;
            row[999] = 0.005; // under MIN_PROB: not a positive
            b.labels.extend(row);
            b.has_label.push(true);
            b.top_label.push((r * 10) as i64);
            b.next_tokens.push(0);
        }
        b.rejected.push((1, 500, 0));
        let s = SampledVocab::new(&b, 100, &mut StdRng::seed_from_u64(1));
        assert_eq!(s.len(), 100);
        let positives = [0usize, 1, 10, 11, 20, 21, 500];
        for (i, &id) in positives.iter().enumerate() {
            assert_eq!(s.position(id), Some(i), "positive {id}");
            assert_eq!(s.bias[i], 0.0);
        }
        // 93 drawn stand for the 993 ids that are not positives.
        assert!((s.bias[99] - (993f32 / 93.0).ln()).abs() < 1e-6);
        let mut seen = s.cols.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 100, "scored ids are distinct");
        let labels = s.labels(&b);
        assert_eq!(labels[0], 0.7);
        assert_eq!(labels[100 + s.position(11).unwrap()], 0.295);
    }
}
