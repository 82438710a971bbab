//! Replay: a sample of what a drafter was trained on before it served (a day-0 drafter's
//! self-distillation over code, math and chat), kept beside it and mixed into every online step.
//!
//! Online training sees one kind of traffic at a time; 500 steps on code alone took a
//! self-distilled drafter's held-out first-token agreement on math from 0.790 to 0.735 and on chat
//! from 0.843 to 0.797 (docs/speculative-decoding.md, "Online training that does not forget"): it
//! forgot. A share of each step spent on the old data keeps what it knew while it learns what it
//! sees (experience replay).
use crate::pool::{Batch, Draw, TracePool};
use crate::traces_io::{encode_trace, load_dir, trace_files};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_engine::online::Trace;
use tandem_models::{ModelError, Result};

/// The replay set's folder inside a drafter's folder.
pub const REPLAY_DIR: &str = "replay";

/// Positions `tandem train-drafter` keeps as a drafter's replay set by default: ~48 answers of
/// code, math and chat; in bf16 about as many bytes as SmolLM2's drafter itself (38 MB).
pub const REPLAY_POSITIONS: usize = 8192;

/// Share of each online step's positions drawn from the replay set.
pub const REPLAY_SHARE: f64 = 0.25;

/// The replay set of `drafter_dir`, if it has one.
pub fn replay_dir(drafter_dir: &Path) -> Option<PathBuf> {
    let d = drafter_dir.join(REPLAY_DIR);
    d.is_dir().then_some(d)
}

/// Traces mixed into online training, and the share of each step they take.
pub struct Replay {
    pool: TracePool,
    share: f64,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replay({} traces, {} positions, share {})", self.traces(), self.positions(), self.share)
    }
}

impl Replay {
    /// The traces in `dir` (written by `write`), for a drafter reading `feature_size` floats per
    /// position; `share` of each step (clamped to 0..=0.9: live traffic always gets some).
    pub fn load(dir: &Path, feature_size: usize, share: f64) -> Result<Replay> {
        let mut pool = TracePool::new(usize::MAX);
        for t in load_dir(dir)? {
            if t.feature_size != feature_size {
                return Err(ModelError::checkpoint(
                    dir,
                    format!(
                        "replay traces hold {}-float features; this drafter reads {feature_size}: another model's?",
                        t.feature_size
                    ),
                ));
            }
            pool.add(t);
        }
        if pool.is_empty() {
            return Err(ModelError::checkpoint(dir, "the replay folder holds no usable traces"));
        }
        Ok(Replay { pool, share: share.clamp(0.0, 0.9) })
    }

    pub fn positions(&self) -> usize {
        self.pool.positions()
    }

    pub fn traces(&self) -> usize {
        self.pool.len()
    }

    /// The replayed traces.
    pub fn pool(&self) -> &TracePool {
        &self.pool
    }

    /// Writes the set into `drafter_dir`'s replay folder unless it has one (a checkpoint of a
    /// drafter keeps the set it was trained with, so a server continuing from it replays it too).
    pub fn keep_beside(&self, drafter_dir: &Path) -> Result<()> {
        if replay_dir(drafter_dir).is_some() {
            return Ok(());
        }
        write_set(self.pool.traces(), &drafter_dir.join(REPLAY_DIR)).map(|_| ())
    }
}

/// About `rows` positions for one step: the replay's share drawn uniformly from its set, the rest
/// from `live` (favouring recent traffic). None if `live` gives none.
pub fn sample(
    live: &TracePool,
    replay: Option<&Replay>,
    rng: &mut StdRng,
    rows: usize,
    window: usize,
    draft_vocab: usize,
    t2d: &dyn Fn(u32) -> Option<usize>,
) -> Option<Batch> {
    let mut b = live.sample(rng, rows - replayed(replay, rows), window, draft_vocab, t2d)?;
    if let Some(r) = replay {
        r.pool.fill(&mut b, rng, rows, window, Draw::Uniform, t2d);
    }
    Some(b)
}

/// Rows of a `rows`-position step that come from the replay set.
fn replayed(replay: Option<&Replay>, rows: usize) -> usize {
    replay.map_or(0, |r| ((rows as f64 * r.share).round() as usize).min(rows.saturating_sub(1)))
}

/// Writes traces drawn at random from `traces` until about `positions` are kept, into
/// `drafter_dir`'s replay folder (replacing what was there), hidden states in bf16. Returns the
/// traces and positions written.
pub fn write(traces: &[Arc<Trace>], positions: usize, drafter_dir: &Path, rng: &mut StdRng) -> Result<(usize, usize)> {
    let mut order: Vec<&Arc<Trace>> = traces.iter().collect();
    order.shuffle(rng);
    let mut kept = 0;
    let chosen: Vec<&Arc<Trace>> = order
        .into_iter()
        .take_while(|t| {
            let more = kept < positions;
            kept += t.positions();
            more
        })
        .collect();
    let dir = drafter_dir.join(REPLAY_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| ModelError::checkpoint(&dir, e))?;
    }
    let n = write_set(chosen.iter().copied(), &dir)?;
    Ok((n, chosen.iter().map(|t| t.positions()).sum()))
}

/// Writes `traces` as `dir/trace-N.safetensors` (bf16 hidden states, as a broker ships them).
fn write_set<'a>(traces: impl Iterator<Item = &'a Arc<Trace>>, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::checkpoint(dir, e))?;
    let mut n = trace_files(dir)?.len();
    let first = n;
    for t in traces {
        let path = dir.join(format!("trace-{n:08}.safetensors"));
        std::fs::write(&path, encode_trace(t)?).map_err(|e| ModelError::checkpoint(&path, e))?;
        n += 1;
    }
    Ok(n - first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A trace of 8 positions whose tokens all equal `tag`, features 2 floats.
    fn trace(tag: u32) -> Trace {
        Trace { tokens: vec![tag; 9], prompt_len: 1, feature_size: 2, features: vec![0.5; 16], ..Default::default() }
    }

    #[test]
    fn a_step_draws_its_share_from_the_replay_set_and_the_rest_from_live_traffic() {
        let dir = std::env::temp_dir().join(format!("tandem-replay-{}", std::process::id()));
        let old: Vec<Arc<Trace>> = (0..40).map(|_| Arc::new(trace(1))).collect();
        let mut rng = StdRng::seed_from_u64(3);
        let (n, positions) = write(&old, 100, &dir, &mut rng).unwrap();
        assert_eq!((n, positions), (13, 104), "traces drawn until 100 positions are kept");
        let replay = Replay::load(&dir.join(REPLAY_DIR), 2, 0.25).unwrap();
        assert_eq!(replay.positions(), 104);
        assert!(Replay::load(&dir.join(REPLAY_DIR), 3, 0.25).is_err(), "another model's features");
        let mut live = TracePool::new(usize::MAX);
        for _ in 0..10 {
            live.add(trace(2));
        }
        let (mut from_replay, mut rows) = (0, 0);
        for _ in 0..200 {
            let b = sample(&live, Some(&replay), &mut rng, 32, 4, 8, &|t| Some(t as usize)).unwrap();
            assert_eq!(b.rows(), 32);
            from_replay += b.next_tokens.iter().filter(|&&t| t == 1).count();
            rows += b.rows();
        }
        assert_eq!(from_replay * 4, rows, "a quarter of every step");
        // Without a replay set every row is live traffic.
        let b = sample(&live, None, &mut rng, 32, 4, 8, &|t| Some(t as usize)).unwrap();
        assert!(b.next_tokens.iter().all(|&t| t == 2));
        // A checkpoint folder gets a copy once; one that has a set keeps its own.
        let ckpt = dir.join("ckpt");
        replay.keep_beside(&ckpt).unwrap();
        replay.keep_beside(&ckpt).unwrap();
        assert_eq!(trace_files(&ckpt.join(REPLAY_DIR)).unwrap().len(), 13);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
