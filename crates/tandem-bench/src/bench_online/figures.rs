//! Figures over the requests a configuration served: time in flight, the baselines' sample
//! (`--baseline-every`), tok/s paired with another configuration's, and per-window rows.
use super::{Done, RunOutput, WindowRow};

/// Time some request of `done` (sorted by finish) was in flight, counted from `from` on.
pub(super) fn busy_secs<'a>(done: impl IntoIterator<Item = &'a Done>, from: f64) -> f64 {
    let mut spans: Vec<(f64, f64)> = done.into_iter().map(|d| (d.submitted_secs.max(from), d.finished_secs)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut busy, mut reach) = (0.0, f64::NEG_INFINITY);
    for (s, e) in spans {
        let s = s.max(reach);
        if e > s {
            busy += e - s;
            reach = e;
        }
    }
    busy.max(1e-9)
}

/// Whether request `i` is in the sample of one request in `every` (`--baseline-every`): the
/// first, then those whose number hashes to a multiple of `every` (SplitMix64's finalizer).
pub(super) fn sampled(i: usize, every: usize) -> bool {
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    i == 0 || (z ^ (z >> 31)).is_multiple_of(every as u64)
}

/// tok/s of `run` and of `base` over the requests both served that `keep` selects (None: none).
pub(super) fn paired(run: &RunOutput, base: &RunOutput, keep: impl Fn(&Done) -> bool) -> Option<(f64, f64)> {
    let served = |r: &RunOutput| r.done.iter().map(|d| d.index).collect::<std::collections::HashSet<_>>();
    let both: std::collections::HashSet<usize> = served(run).intersection(&served(base)).copied().collect();
    let tok_s = |r: &RunOutput| {
        let picked = || r.done.iter().filter(|d| both.contains(&d.index) && keep(d));
        (picked().next().is_some()).then(|| picked().map(|d| d.tokens).sum::<usize>() as f64 / busy_secs(picked(), 0.0))
    };
    tok_s(run).zip(tok_s(base))
}

/// Per-window figures of one run: windows of `window` requests as the run served them, or with
/// `by_index` (`--baseline-every`) of `window` requests of the stream, of which the run may have
/// served only some.
pub(super) fn windows(name: &str, run: &RunOutput, window: usize, by_index: bool, stream_len: usize) -> Vec<WindowRow> {
    let mut rows = Vec::new();
    let mut prev_t = 0.0;
    let mut prev_drafts = (0, 0);
    let mut served_here = 0;
    let chunks: Vec<&[Done]> = match by_index {
        true => run.done.chunk_by(|a, b| a.index / window == b.index / window).collect(),
        false => run.done.chunks(window).collect(),
    };
    for (w, chunk) in chunks.into_iter().enumerate() {
        served_here += chunk.len();
        let served = match by_index {
            true => ((chunk[0].index / window + 1) * window).min(stream_len),
            false => w * window + chunk.len(),
        };
        let end = chunk.last().map_or(prev_t, |d| d.finished_secs);
        let tokens: usize = chunk.iter().map(|d| d.tokens).sum();
        let steps: usize = chunk.iter().map(|d| d.decode_steps).sum();
        let sample = run.samples.iter().rev().find(|s| s.0 <= served_here);
        let domain = chunk.iter().map(|d| d.domain).max_by_key(|dm| chunk.iter().filter(|d| d.domain == *dm).count());
        rows.push(WindowRow {
            config: name.to_string(),
            served,
            domain: domain.unwrap_or("code"),
            acceptance_length: tokens as f64 / steps.max(1) as f64,
            // Over the time requests were in flight since the previous window ended.
            tok_s: tokens as f64 / busy_secs(chunk, prev_t),
            speedup: None,
            chosen_k: sample.map(|s| s.1),
            drafter_version: sample.map(|s| s.2),
            gain: sample.map(|s| s.3),
            first_agreement: sample.map(|s| {
                let (drafts, accepted) = (s.6 .0 - prev_drafts.0, s.6 .1 - prev_drafts.1);
                prev_drafts = s.6;
                accepted as f64 / drafts.max(1) as f64
            }),
            train_share: sample.map(|s| s.4),
            train_steps: sample.map(|s| s.5),
        });
        prev_t = end;
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_online::Summary;

    /// A run of one request at a time: request `index` (in `indices`) took 1 s and made
    /// `tokens(index)` tokens.
    fn run_of(indices: &[usize], tokens: impl Fn(usize) -> usize) -> RunOutput {
        let done = indices
            .iter()
            .enumerate()
            .map(|(n, &index)| Done {
                index,
                domain: "code",
                submitted_secs: n as f64,
                finished_secs: n as f64 + 1.0,
                tokens: tokens(index),
                decode_steps: 1,
                turn_secs: 0.0,
                output: Vec::new(),
            })
            .collect();
        RunOutput { done, wall: indices.len() as f64, samples: Vec::new(), summary: Summary::default() }
    }

    #[test]
    fn baselines_serving_every_nth_request_are_compared_on_those_requests() {
        // The learning run serves all 12 requests, faster on the later ones; `none` every 4th.
        let learned = run_of(&(0..12).collect::<Vec<_>>(), |i| 10 + i);
        let none = run_of(&[0, 4, 8], |_| 10);
        let (t, b) = paired(&learned, &none, |_| true).unwrap();
        assert!((t - (10.0 + 14.0 + 18.0) / 3.0).abs() < 1e-9 && (b - 10.0).abs() < 1e-9, "{t} {b}");
        let (t, _) = paired(&learned, &none, |d| d.index >= 6).unwrap();
        assert!((t - 18.0).abs() < 1e-9, "{t}");
        assert!(paired(&learned, &none, |d| d.index == 5).is_none());
        // Windows of the stream, whoever served how much of each.
        let served = |r: &RunOutput| windows("x", r, 5, true, 12).iter().map(|w| w.served).collect::<Vec<_>>();
        assert_eq!(served(&learned), vec![5, 10, 12]);
        assert_eq!(served(&none), vec![5, 10]);
        assert_eq!(windows("x", &none, 5, true, 12)[1].tok_s, 10.0);
    }

    #[test]
    fn the_baselines_sample_follows_no_pattern_of_the_stream() {
        let picked: Vec<usize> = (0..24_000).filter(|&i| sampled(i, 12)).collect();
        assert!((1_850..2_150).contains(&picked.len()), "{}", picked.len());
        // Code prompts alternate two kinds by parity: both must be in the sample.
        let even = picked.iter().filter(|&&i| i % 2 == 0).count();
        assert!((800..1_200).contains(&even), "{even} of {}", picked.len());
        assert!(sampled(0, 12) && (0..100).all(|i| sampled(i, 1)));
    }
}
