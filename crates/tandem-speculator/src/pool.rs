//! The trainer's pool of recent traces and the batches it samples from them.
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use tandem_engine::online::Trace;

/// A weight version's traces are sampled this much less often for each newer version of its
/// family the pool has seen: a policy under RL keeps drifting, and the drafter should follow the
/// version it serves now while older rollouts still teach what did not change.
pub const STALE_DECAY: f64 = 0.5;
/// Newer versions counted per family (further behind weighs STALE_DECAY^this, about nothing).
const VERSIONS_KEPT: usize = 32;

/// Positions beyond this are not trained on (the trainer's rope table ends there).
pub const MAX_POSITION: usize = 16384;

/// Windows of traces packed into one sequence: row r is trace position t of some window.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub feature_size: usize,
    pub draft_vocab: usize,
    /// [rows, feature_size]: the target's features at t.
    pub features: Vec<f32>,
    /// Token t + 1 (its embedding is the drafter's other input).
    pub next_tokens: Vec<u32>,
    /// t, for rope.
    pub positions: Vec<u32>,
    /// Index of the row within its window, and the window's number.
    pub offsets: Vec<usize>,
    pub windows: Vec<u32>,
    /// [rows, draft_vocab]: the target's distribution over token t + 2 (zero rows: no label).
    pub labels: Vec<f32>,
    pub has_label: Vec<bool>,
    /// The label is the target's distribution (recorded at an output position, or derived by
    /// `Trainer::target_labels`); otherwise it is the next token of the text (a prompt position).
    pub soft_label: Vec<bool>,
    /// The target's most likely token t + 2 as a draft id, if in the draft vocabulary.
    pub top_label: Vec<i64>,
    /// (row, draft id, step): proposals the target rejected.
    pub rejected: Vec<(usize, usize, usize)>,
    /// Rows without the target's distribution whose trace kept the target's last residual stream
    /// at t + 1 (`derived_hidden`, one row each): a trainer holding the target's head computes
    /// their labels (`Trainer::target_labels`); otherwise the next token of the text stays the label.
    pub derived: Vec<usize>,
    pub derived_hidden: Vec<f32>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.next_tokens.len()
    }

    pub fn labelled(&self) -> usize {
        self.has_label.iter().filter(|&&l| l).count()
    }

    /// Additive attention mask of training-time-test step `i`: row t sees rows u of its window
    /// with offset(u) <= offset(t) - i.
    pub fn mask(&self, i: usize) -> Vec<f32> {
        let n = self.rows();
        let mut m = vec![f32::NEG_INFINITY; n * n];
        for t in 0..n {
            for u in 0..n {
                if self.windows[u] == self.windows[t] && self.offsets[u] + i <= self.offsets[t] {
                    m[t * n + u] = 0.0;
                }
            }
        }
        m
    }

    /// 1.0 for rows with a label whose step-`i` chain starts inside their window.
    pub fn valid(&self, i: usize) -> Vec<f32> {
        (0..self.rows()).map(|t| (self.has_label[t] && self.offsets[t] >= i) as u8 as f32).collect()
    }

    /// Share of labelled rows whose drafter argmax (`best`, one per row) is the target's top token.
    pub fn top1_agreement(&self, best: &[usize]) -> f64 {
        let (mut hit, mut n) = (0usize, 0usize);
        for (t, &b) in best.iter().enumerate() {
            if !self.has_label[t] {
                continue;
            }
            n += 1;
            hit += (b as i64 == self.top_label[t]) as usize;
        }
        hit as f64 / n.max(1) as f64
    }

    /// One window over `start..start + len` of `trace`.
    pub fn window(
        trace: &Trace,
        start: usize,
        len: usize,
        draft_vocab: usize,
        t2d: &dyn Fn(u32) -> Option<usize>,
    ) -> Batch {
        let mut b = Batch { feature_size: trace.feature_size, draft_vocab, ..Default::default() };
        b.push_window(trace, start, len, t2d);
        b
    }

    /// The output positions of `trace` (from its last prompt position on; the newest `max_rows`
    /// of them), where drafting happens: what drafter quality is judged on. None if under 2.
    pub fn outputs(
        trace: &Trace,
        max_rows: usize,
        draft_vocab: usize,
        t2d: &dyn Fn(u32) -> Option<usize>,
    ) -> Option<Batch> {
        let usable = trace.positions().min(trace.tokens.len().saturating_sub(1));
        let start = trace.prompt_len.saturating_sub(1).max(usable.saturating_sub(max_rows)).min(usable);
        (usable - start >= 2).then(|| Self::window(trace, start, usable - start, draft_vocab, t2d))
    }

    /// Appends rows `start..start + len` of `trace`.
    fn push_window(&mut self, trace: &Trace, start: usize, len: usize, t2d: &dyn Fn(u32) -> Option<usize>) {
        let fs = trace.feature_size;
        let window = self.windows.last().map_or(0, |w| w + 1);
        let first_row = self.rows();
        let hs = trace.final_size();
        for (o, t) in (start..start + len).enumerate() {
            self.features.extend_from_slice(&trace.features[t * fs..(t + 1) * fs]);
            self.next_tokens.push(trace.tokens[t + 1]);
            self.positions.push(t as u32);
            self.offsets.push(o);
            self.windows.push(window);
            let mut row = vec![0f32; self.draft_vocab];
            let mut top = -1i64;
            let soft = trace.soft.get(t + 1).filter(|s| !s.is_empty());
            match soft {
                Some(entries) => {
                    // The target's top entries, renormalised over those the draft vocabulary has.
                    let mut mass = 0.0;
                    for &(id, p) in entries {
                        if let Some(d) = t2d(id) {
                            row[d] += p;
                            mass += p;
                        }
                    }
                    if mass > 1e-6 {
                        row.iter_mut().for_each(|x| *x /= mass);
                    }
                    top = t2d(entries[0].0).map_or(-1, |d| d as i64);
                }
                None => {
                    if let Some(d) = trace.tokens.get(t + 2).and_then(|&id| t2d(id)) {
                        row[d] = 1.0;
                        top = d as i64;
                    }
                }
            }
            let labelled = row.iter().any(|&x| x > 0.0);
            if soft.is_none() && hs > 0 && t + 1 < trace.positions() {
                self.derived.push(first_row + o);
                self.derived_hidden.extend_from_slice(&trace.final_hidden[(t + 1) * hs..(t + 2) * hs]);
            }
            self.labels.extend_from_slice(&row);
            self.has_label.push(labelled);
            self.soft_label.push(soft.is_some());
            self.top_label.push(top);
        }
        for r in &trace.rejected {
            // The proposal for token pos + 1 was drafted at position pos - 1.
            if r.pos > start && r.pos - 1 < start + len {
                if let Some(d) = t2d(r.token) {
                    self.rejected.push((first_row + r.pos - 1 - start, d, r.depth));
                }
            }
        }
    }
}

/// Recent traces, bounded by positions (the oldest go first).
pub struct TracePool {
    traces: VecDeque<Arc<Trace>>,
    positions: usize,
    max_positions: usize,
    /// Positions ever added.
    pub seen: u64,
    /// The newest version ids seen per weight-version family.
    versions: HashMap<Arc<str>, BTreeSet<u64>>,
}

impl TracePool {
    pub fn new(max_positions: usize) -> Self {
        TracePool { traces: VecDeque::new(), positions: 0, max_positions, seen: 0, versions: HashMap::new() }
    }

    pub fn add(&mut self, trace: Trace) {
        if trace.positions() < 2 || trace.tokens.len() < 2 {
            return;
        }
        if let Some(v) = &trace.version {
            let ids = self.versions.entry(v.family.clone()).or_default();
            ids.insert(v.id);
            while ids.len() > VERSIONS_KEPT {
                ids.pop_first();
            }
        }
        self.positions += trace.positions();
        self.seen += trace.positions() as u64;
        self.traces.push_back(Arc::new(trace));
        while self.positions > self.max_positions && self.traces.len() > 1 {
            let old = self.traces.pop_front().expect("non-empty");
            self.positions -= old.positions();
        }
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }

    /// How likely `trace` is kept when drawn: 1 for the served model's traces and a family's
    /// newest version, STALE_DECAY per newer version of its family.
    pub fn freshness(&self, trace: &Trace) -> f64 {
        let Some(v) = &trace.version else { return 1.0 };
        let newer = self.versions.get(&v.family).map_or(0, |ids| ids.range(v.id + 1..).count());
        STALE_DECAY.powi(newer as i32)
    }

    /// About `rows` positions in windows of at most `window`, favouring recent traces (so a new
    /// domain is learnt quickly) while older ones keep being revisited, and a weight-version
    /// family's newer versions over its older ones (`freshness`).
    pub fn sample(
        &self,
        rng: &mut StdRng,
        rows: usize,
        window: usize,
        draft_vocab: usize,
        t2d: &dyn Fn(u32) -> Option<usize>,
    ) -> Option<Batch> {
        let first = self.traces.front()?;
        let mut b = Batch { feature_size: first.feature_size, draft_vocab, ..Default::default() };
        self.fill(&mut b, rng, rows, window, Draw::Recent, t2d);
        (b.rows() > 0).then_some(b)
    }

    /// The traces held, oldest first.
    pub fn traces(&self) -> impl Iterator<Item = &Arc<Trace>> {
        self.traces.iter()
    }

    /// Appends windows of at most `window` positions to `b` until it holds about `rows`, drawing
    /// traces as `draw` says. Traces of another feature size than `b`'s are skipped.
    pub fn fill(
        &self,
        b: &mut Batch,
        rng: &mut StdRng,
        rows: usize,
        window: usize,
        draw: Draw,
        t2d: &dyn Fn(u32) -> Option<usize>,
    ) {
        let n = self.traces.len();
        let mut tries = 0;
        while n > 0 && b.rows() < rows && tries < 256 {
            tries += 1;
            let u: f64 = rng.random();
            let back = match draw {
                // u^2 skews towards the newest traces.
                Draw::Recent => ((u * u * n as f64) as usize).min(n - 1),
                Draw::Uniform => ((u * n as f64) as usize).min(n - 1),
            };
            let trace = &self.traces[n - 1 - back];
            if trace.version.is_some() && rng.random::<f64>() >= self.freshness(trace) {
                continue;
            }
            // Rows need the next token; positions past the rope table are skipped.
            let usable = trace.positions().min(trace.tokens.len() - 1).min(MAX_POSITION);
            if usable < 2 || trace.feature_size != b.feature_size {
                continue;
            }
            let len = window.min(usable).min(rows - b.rows());
            if len < 2 {
                break;
            }
            let start = rng.random_range(0..=usable - len);
            b.push_window(trace, start, len, t2d);
        }
    }
}

/// How `TracePool::fill` picks traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// Favouring the newest (live traffic: a new domain is learnt quickly).
    Recent,
    /// All alike (a replay set has no order).
    Uniform,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tandem_engine::online::TraceVersion;

    /// A trace of 8 positions whose tokens all equal `tag`, of version `id` of family "policy"
    /// (None: the served model's).
    fn trace(tag: u32, id: Option<u64>) -> Trace {
        Trace {
            tokens: vec![tag; 9],
            prompt_len: 1,
            feature_size: 1,
            features: vec![0.0; 8],
            version: id.map(|id| TraceVersion { family: "policy".into(), id }),
            ..Default::default()
        }
    }

    #[test]
    fn a_familys_newer_versions_are_sampled_more() {
        let mut pool = TracePool::new(usize::MAX);
        // Interleaved in a rotating order, so the recency skew favours none of them.
        let kinds = [(1, Some(4)), (2, Some(9)), (3, Some(5)), (4, None)];
        for round in 0..400 {
            for j in 0..4 {
                let (tag, id) = kinds[(round + j) % 4];
                pool.add(trace(tag, id));
            }
        }
        assert_eq!(pool.freshness(&trace(0, Some(9))), 1.0);
        assert_eq!(pool.freshness(&trace(0, Some(5))), STALE_DECAY);
        assert_eq!(pool.freshness(&trace(0, Some(4))), STALE_DECAY * STALE_DECAY);
        assert_eq!(pool.freshness(&trace(0, None)), 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut windows = [0usize; 5];
        for _ in 0..400 {
            let b = pool.sample(&mut rng, 16, 4, 8, &|t| Some(t as usize)).unwrap();
            for (i, &w) in b.windows.iter().enumerate() {
                if i == 0 || b.windows[i - 1] != w {
                    windows[b.next_tokens[i] as usize] += 1;
                }
            }
        }
        // Newest version and the served model alike; one version behind about half; two a quarter.
        let share = |tag: usize| windows[tag] as f64 / windows[2] as f64;
        assert!((share(4) - 1.0).abs() < 0.15, "{windows:?}");
        assert!((share(3) - 0.5).abs() < 0.1, "{windows:?}");
        assert!((share(1) - 0.25).abs() < 0.08, "{windows:?}");
    }
}
