//! The draft-length controller: picks k (0 = no speculation) by measured end-to-end tokens/s.

/// What the engine measured at one draft length (exponentially weighted, like the choice).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct KStat {
    pub k: usize,
    pub tokens_per_sec: f64,
    /// Tokens emitted per decode step: how much of a draft the target accepts.
    pub tokens_per_step: f64,
    /// Seconds per decode step (drafting, the forward over k + 1 rows, bookkeeping): what a draft
    /// costs. Against k = 0's, the two figures say whether acceptance or cost limits the gain.
    pub step_secs: f64,
    pub steps: u64,
}

/// Steps at one draft length before its rate counts.
const SAMPLES: u64 = 8;

/// Picks the draft length by measured end-to-end decode throughput: an exponentially weighted
/// tokens/s per k (0 = no speculation), mostly the best, sometimes a neighbour (so a drafter that
/// improves is noticed, and one that worsens is left).
pub(crate) struct KController {
    max_k: usize,
    explore: f64,
    /// Per k: weighted tokens/s, samples.
    rate: Vec<(f64, u64)>,
    /// Per k: weighted tokens per step and seconds per step (reported, not used to choose).
    shape: Vec<(f64, f64)>,
    best: usize,
    step: u64,
    rng: u64,
}

impl KController {
    pub fn new(max_k: usize, explore: f64) -> Self {
        KController {
            max_k,
            explore,
            rate: vec![(0.0, 0); max_k + 1],
            shape: vec![(0.0, 0.0); max_k + 1],
            best: 0,
            step: 0,
            rng: 0x2545_F491_4F6C_DD1D,
        }
    }

    fn next_random(&mut self) -> f64 {
        // xorshift64*: exploration needs no quality randomness, only no pattern that aligns with steps.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The draft length for the next step.
    pub fn choose(&mut self) -> usize {
        self.step += 1;
        if let Some(k) = self.climbing() {
            return k;
        }
        if self.next_random() < self.explore {
            // From k = 0 (or the longest) there is one neighbour: every trial goes to it.
            let up = self.best == 0 || (self.best < self.max_k && self.next_random() < 0.5);
            return if up { (self.best + 1).min(self.max_k) } else { self.best.saturating_sub(1) };
        }
        self.best
    }

    /// The first sweep: k = 0 and 1, then each next length while the last one measured was
    /// faster than the one before it. A good drafter then reaches its best length within tens of
    /// steps; found by exploration alone (one step in twenty above the best, eight samples
    /// before a move) it took hundreds per length, most of a short run.
    fn climbing(&self) -> Option<usize> {
        for k in 0..=self.max_k {
            if self.rate[k].1 >= SAMPLES {
                continue;
            }
            let rising = k < 2 || self.rate[k - 1].0 > self.rate[k - 2].0;
            return rising.then_some(k);
        }
        None
    }

    /// A decode-only step ran with draft length `k`, emitting `tokens` in `secs`.
    pub fn record(&mut self, k: usize, tokens: usize, secs: f64) {
        if k > self.max_k || secs <= 0.0 {
            return;
        }
        let r = tokens as f64 / secs;
        let (avg, n) = &mut self.rate[k];
        let alpha = if *n < 16 { 1.0 / (*n + 1) as f64 } else { 0.05 };
        *avg += alpha * (r - *avg);
        *n += 1;
        let (per_step, step_secs) = &mut self.shape[k];
        *per_step += alpha * (tokens as f64 - *per_step);
        *step_secs += alpha * (secs - *step_secs);
        if self.climbing().is_some() {
            // Mid-sweep: the best measured so far, so exploration starts from there.
            self.best = (0..=self.max_k).filter(|&k| self.rate[k].1 >= SAMPLES).fold(0, |b, k| {
                if self.rate[k].0 > self.rate[b].0 {
                    k
                } else {
                    b
                }
            });
            return;
        }
        let best = self.best;
        let measured = |k: usize| self.rate[k].1 >= SAMPLES;
        // Move to a measured neighbour that is clearly faster: step times are noisy (batch
        // composition, a trainer sharing the CPU), and a wrong move to a longer draft costs more
        // than staying a little longer at a shorter one.
        for cand in [best.saturating_sub(1), (best + 1).min(self.max_k)] {
            let margin = if cand > best { 1.03 } else { 1.0 };
            if cand != best && measured(cand) && self.rate[cand].0 > self.rate[self.best].0 * margin {
                self.best = cand;
            }
        }
        if !measured(self.best) {
            self.best = 0;
        }
    }

    pub fn best(&self) -> usize {
        self.best
    }

    /// tokens/s at the best draft length over tokens/s without drafts (1.0 until both are measured).
    pub fn gain(&self) -> f64 {
        let (base, best) = (self.rate[0], self.rate[self.best]);
        if self.best == 0 || base.1 < SAMPLES || best.1 < SAMPLES || base.0 <= 0.0 {
            return 1.0;
        }
        best.0 / base.0
    }

    /// The figures of every k measured.
    pub fn table(&self) -> Vec<KStat> {
        (0..=self.max_k)
            .filter(|&k| self.rate[k].1 > 0)
            .map(|k| KStat {
                k,
                tokens_per_sec: self.rate[k].0,
                tokens_per_step: self.shape[k].0,
                step_secs: self.shape[k].1,
                steps: self.rate[k].1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_controller_finds_the_fastest_length() {
        let mut c = KController::new(6, 0.1);
        // Throughput peaks at k = 3.
        let speed = |k: usize| 30.0 - 2.0 * (k as f64 - 3.0).powi(2);
        for _ in 0..2000 {
            let k = c.choose();
            c.record(k, (speed(k) * 10.0) as usize, 1.0);
        }
        assert_eq!(c.best(), 3, "{:?}", c.table());
        // Its report: per k, tokens per step and seconds per step, whose ratio is the rate.
        for s in c.table() {
            assert!((s.step_secs - 1.0).abs() < 1e-9, "{s:?}");
            assert!((s.tokens_per_step - (speed(s.k) * 10.0).floor()).abs() < 1e-6, "{s:?}");
            assert!((s.tokens_per_sec - s.tokens_per_step / s.step_secs).abs() < 1e-6, "{s:?}");
        }
        // The first sweep climbs to the peak within its samples (8 per length up to one past it).
        let mut c = KController::new(6, 0.1);
        for _ in 0..5 * SAMPLES {
            let k = c.choose();
            c.record(k, (speed(k) * 10.0) as usize, 1.0);
        }
        assert_eq!(c.best(), 3, "{:?}", c.table());
        assert!(c.table().iter().all(|s| s.k <= 4), "the sweep went past the peak: {:?}", c.table());
        // A drafter that is useless: k = 0 wins.
        let mut c = KController::new(6, 0.1);
        for _ in 0..500 {
            let k = c.choose();
            c.record(k, 10, 1.0 + 0.2 * k as f64);
        }
        assert_eq!(c.best(), 0);
    }
}
